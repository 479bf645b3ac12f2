"""The browser demo under load: `semanticist-fast demo` served on loopback, driven by N concurrent gradio_client
clients (Gradio's own API client, the way a script or a page would call it), plus the handlers' latencies in-process.

    python benchmarks/bench_demo.py --tokenizer RUN --ar RUN [--each 8]

Each client owns a session (it uploads one image first) and then sends `--each` well-formed requests one after
another, alternating a tokenizer request (reconstruct from k = 1 and all tokens) and a generation request (2
classes x 2 samples). Rounds of 1, 4 and 16 clients run interleaved (1, 4, 16, 1, 4, 16: the machine's other load
hits every level alike) and are pooled per level: requests per second (all requests / wall time of the round) and
p50 / p95 latency (submit to answer, queue wait included). Records `demo_load` in the results store.

tests/test_demo.py drives the same functions against a server with short limits, with abusive requests mixed in
(`abusive_requests`, `disconnect_mid_request`), and asserts what the answers are, never how fast they came.
"""
import argparse
import concurrent.futures
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
LEVELS = (1, 4, 16)
GRADIO_API = "gradio_api"  # Gradio 6's route prefix


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(tokenizer, ar, port: int, limits=(), log: Optional[Path] = None) -> subprocess.Popen:
    """`semanticist-fast demo` in a process of its own (its memory is its own: rss_mib), its output to log."""
    command = [sys.executable, "-m", "semanticist_fast", "demo", "--tokenizer", str(tokenizer), "--ar", str(ar),
               "--port", str(port), *[arg for item in limits for arg in ("--limit", item)]]
    out = open(log, "w") if log else subprocess.DEVNULL
    return subprocess.Popen(command, env=ENV, stdout=out, stderr=subprocess.STDOUT, text=True)


def wait_up(url: str, server: subprocess.Popen, timeout: float = 180) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the demo never answered on {url} (exit code {server.poll()})")


def stop(server: subprocess.Popen) -> int:
    server.send_signal(signal.SIGINT)  # Ctrl-C: Gradio closes and the command returns
    try:
        return server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        return server.wait()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def class_choices(url: str) -> list[str]:
    """The generation tab's class choices, as the page's configuration lists them."""
    import httpx

    config = httpx.get(f"{url}config", timeout=10).json()
    for component in config["components"]:
        if component.get("props", {}).get("elem_id") == "classes":
            return [value for _, value in component["props"]["choices"]]
    raise RuntimeError("the page has no class list (serve it with --ar)")


def connect(url: str, image: Path):
    """A client with its own session, whose tokenizer tab holds the uploaded image."""
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False, download_files=False)
    client.predict(handle_file(str(image)), api_name="/on_upload")
    return client


def well_formed(client, index: int, classes: list[str]) -> str:
    """Request `index` of a client: even a tokenizer request, odd a generation request; returns its status line."""
    if index % 2 == 0:
        return client.predict(["1", "all"], 1.0, "euler2", index, api_name="/on_reconstruct")[-1]
    return client.predict(classes[:2], 2, 3.0, "linear", 1.0, index, api_name="/on_generate")[-1]


def load_round(url: str, image: Path, clients: int, each: int, classes: list[str]) -> dict:
    """`clients` clients at once, each sending `each` well-formed requests in turn: latencies and wall time."""
    sessions = [connect(url, image) for _ in range(clients)]  # before the clock: connecting is not a request
    latencies: list[float] = []
    answers: list[str] = []
    lock = threading.Lock()

    def run(client) -> None:
        for i in range(each):
            start = time.perf_counter()
            answer = well_formed(client, i, classes)
            with lock:
                latencies.append(time.perf_counter() - start)
                answers.append(answer)

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        for done in [pool.submit(run, c) for c in sessions]:
            done.result()
    seconds = time.perf_counter() - start
    for client in sessions:
        client.close()
    return {"latencies": latencies, "seconds": seconds, "answers": answers}


def abusive_requests(url: str, image: Path, huge_image: Path, classes: list[str]) -> dict[str, str]:
    """Requests beyond the bounds (the server's limits decide which): each one's answer, an error message or
    "answered". Names: what was asked."""
    from gradio_client import handle_file

    client = connect(url, image)
    asks = {
        "decoder steps euler100000": lambda: client.predict(["1"], 1.0, "euler100000", 0, api_name="/on_reconstruct"),
        "decoder steps euler99999999": lambda: client.predict(["1"], 1.0, "euler99999999", 0,
                                                              api_name="/on_reconstruct"),
        "decoder guidance 1e6": lambda: client.predict(["1"], 1e6, "euler2", 0, api_name="/on_reconstruct"),
        "class guidance -3": lambda: client.predict(classes[:1], 1, -3.0, "linear", 1.0, 0, api_name="/on_generate"),
        "17 samples per class": lambda: client.predict(classes[:1], 17, 3.0, "linear", 1.0, 0,
                                                       api_name="/on_generate"),
        "80 samples": lambda: client.predict(classes[:5], 16, 3.0, "linear", 1.0, 0, api_name="/on_generate"),
        "temperature 50": lambda: client.predict(classes[:1], 1, 3.0, "linear", 50.0, 0, api_name="/on_generate"),
        "a 48-megapixel image": lambda: client.predict(handle_file(str(huge_image)), api_name="/on_upload"),
    }
    answers = {}
    for name, ask in asks.items():
        try:
            ask()
            answers[name] = "answered"
        except Exception as e:  # gradio_client's AppError carries the page's one line
            answers[name] = str(e)
    client.close()
    return answers


def disconnect_mid_request(url: str, image: Path, steps: str, after: float = 0.5) -> str:
    """A client that asks for a long tokenizer request and drops its connection once the request runs: Gradio's
    queue protocol spoken by hand (join, then read the event stream), the connection closed `after` seconds past
    the server's "process_starts". Returns the last message read."""
    import httpx

    client = connect(url, image)  # the session holds the image
    fn_index = client._infer_fn_index("/on_reconstruct", None)
    session, last = client.session_hash, ""
    body = {"data": [None, ["1"], 1.0, steps, 0], "fn_index": fn_index, "session_hash": session,
            "event_data": None, "trigger_id": None}  # None: the gr.State, which the session holds
    with httpx.Client(timeout=30) as http:
        http.post(f"{url}{GRADIO_API}/queue/join", json=body).raise_for_status()
        with http.stream("GET", f"{url}{GRADIO_API}/queue/data", params={"session_hash": session}) as stream:
            started = None
            for line in stream.iter_lines():
                if line.startswith("data:"):
                    last = line
                if started is None and "process_starts" in line:
                    started = time.monotonic()
                if started is not None and time.monotonic() - started > after:
                    break  # leaving the block closes the connection mid-request
                if "process_completed" in line:
                    break
    client.close()
    return last


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def handler_latencies(tokenizer, ar, repeats: int = 5) -> dict:
    """The handlers in-process, without the web server: the model load, a tokenizer request (k = 1, 2, 4, all),
    generation of 2 classes x 4 and of 64 images; the median of `repeats` after one warm-up."""
    import torch

    from semanticist_fast.demo import handlers

    torch.set_num_threads(1)
    start = time.perf_counter()
    models = handlers.load_models(tokenizer, ar, device="cpu")
    loaded = time.perf_counter() - start
    counts = [k for k in (1, 2, 4, 8, 16, 32, 64, 128, 256) if k < models.num_slots] + ["all"]
    classes = handlers.class_choices(models)
    calls = {"tokenizer_request_s": lambda: handlers.reconstruct_gallery(models, 0, counts),
             "generation_2x4_s": lambda: handlers.generate_grid(models, classes[:2], 4),
             "generation_64_s": lambda: handlers.generate_grid(models, classes[:4], 16)}
    out = {"model_load_s": loaded, "token_counts": [str(k) for k in counts]}
    for name, call in calls.items():
        call()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        out[name] = statistics.median(times)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="tokenizer run")
    p.add_argument("--ar", required=True, help="AR run (trained on --tokenizer)")
    p.add_argument("--models", default="", help="what the runs are, for the record (e.g. 'micro models')")
    p.add_argument("--each", type=int, default=8, help="requests per client per round")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds per client count")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import numpy as np
    import torch
    from PIL import Image

    from benchmarks.common import write_result

    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_demo_{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    image = work / "image.png"
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(image)

    handlers_record = handler_latencies(args.tokenizer, args.ar)
    print("handlers:", handlers_record)
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    server = serve(args.tokenizer, args.ar, port, log=work / "server.log")
    try:
        wait_up(url, server)
        classes = class_choices(url)
        load_round(url, image, 2, 2, classes)  # warm-up: first calls allocate and compile nothing later ones do
        pooled = {n: {"latencies": [], "seconds": 0.0} for n in LEVELS}
        rss = [rss_mib(server.pid)]
        for _ in range(args.rounds):
            for n in LEVELS:
                result = load_round(url, image, n, args.each, classes)
                pooled[n]["latencies"] += result["latencies"]
                pooled[n]["seconds"] += result["seconds"]
                rss.append(rss_mib(server.pid))
                print(f"{n} clients: {len(result['latencies'])} requests in {result['seconds']:.2f} s")
    finally:
        code = stop(server)
    levels = [{"clients": n, "requests": len(v["latencies"]),
               "requests_per_second": len(v["latencies"]) / v["seconds"],
               "p50_s": percentile(v["latencies"], 0.5), "p95_s": percentile(v["latencies"], 0.95),
               "max_s": max(v["latencies"])} for n, v in pooled.items()]
    from semanticist_fast.demo.handlers import DemoLimits
    from dataclasses import asdict

    record = {"device": f"cpu ({os.cpu_count()} cores, torch threads 1: `semanticist-fast demo` default)",
              "device_kind": "cpu", "tokenizer": str(args.tokenizer), "ar": str(args.ar), "models": args.models,
              "mix": "per client: upload once, then alternately reconstruct (k = 1, all; euler2) and generate "
                     "(2 classes x 2)", "each": args.each, "rounds": args.rounds, "levels": levels,
              "server_rss_mib": {"after_warmup": rss[0], "max": max(rss), "last": rss[-1]},
              "server_exit_code": code, "limits": asdict(DemoLimits()), "handlers": handlers_record}
    for level in levels:
        print(f"{level['clients']:>2} clients: {level['requests_per_second']:.2f} req/s, p50 {level['p50_s']:.3f} s,"
              f" p95 {level['p95_s']:.3f} s")
    print("wrote", write_result("demo_load", record))


if __name__ == "__main__":
    main()
