"""The demo's requests as plain functions: load the models once (`load_models`), then `reconstruct_gallery`,
`first_k_image` and `generate_grid` answer one request each. No Gradio here: the page (app.py) binds these to its
components, and the tests call them directly.

Every model call runs on the models' one thread (`on_model`), so requests from several browsers run one at a time
whatever the web server does. `DemoLimits` bounds the work of one request: bad input or input beyond a bound (no image, a file that
is not an image, a huge one, a token count outside 1..K, a decoder step spec the tokenizer has no sampler for or one
over the step bound, too many samples, guidance out of range) raises `DemoInputError`, whose message the page shows.
A request that holds the model past its deadline, or whose client has gone (the page says so through `cancelled`),
is stopped between two network calls (common/stopping.py) and raises `RequestStopped`.
"""
import atexit
import contextvars
import logging
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Callable, Optional, Sequence, TypeVar, Union

import torch
from PIL import Image

from ..common.files import sha256_file
from ..common.stopping import Stopped, stop_when
from ..common.runs import saved_config, weights_file
from ..config import ConfigError, from_dict
from ..data.datasets import DataConfig, class_names, load_images
from ..diffusion.flow import flow_steps
from ..diffusion.schedules import space_timesteps
from ..eval.grid import save_grid, save_samples, to_uint8, token_counts
from ..eval.reconstruction import held_out_set, parse_token_counts, reconstruction_report
from ..export.choice import Sampler, make_sampler
from ..inference import Tokenizer, load_generator

log = logging.getLogger(__name__)

DISPLAY_SIDE = 160  # smaller images are shown enlarged (nearest neighbour, so pixels stay visible)
EAGER_BATCH = 64  # as `semanticist-fast sample`: the same seed gives the same images
KEEP_DOWNLOADS = 16  # the newest generation requests whose files stay downloadable; older ones are deleted

Progress = Callable[[float, str], None]  # (fraction done, what runs now)
Cancelled = Callable[[], bool]  # whether the request's client has gone (the page asks its web server)
ImageSource = Union[str, Path, int]  # an uploaded file, or the index of a built-in held-out image
T = TypeVar("T")


class DemoInputError(ValueError):
    """A request the demo cannot answer as asked; the message says what to change."""


class RequestStopped(DemoInputError):
    """A request stopped before its end: past its deadline, or its client gone."""


@dataclass(frozen=True)
class DemoLimits:
    """Bounds on the work of one request, so that no request holds the one model slot for long. The defaults suit a
    demo others can reach; `semanticist-fast demo --limit KEY=VALUE` changes them for a trusted local user."""
    flow_steps: int = 200  # decoder network calls of euler / heun / adams: benchmarks/sampler_steps.py's reference
    ddpm_steps: int = 250  # decoder steps of the DDPM samplers ("250", ddimN, dpmN): the published recipe's
    per_class: int = 16  # generated images per class ...
    samples: int = 64  # ... and per request
    guidance: float = 20.0  # decoder and class guidance lie in 0..guidance (1 is none)
    temperature: float = 2.0  # AR temperature lies in (0, temperature]
    pixels: int = 40_000_000  # an uploaded image's size, read from its header before it is decoded
    upload_mib: float = 32.0  # an uploaded file's size
    request_seconds: float = 60.0  # model time one request may hold; then it is stopped
    queue: int = 16  # requests waiting for the model; more are told the demo is busy
    sessions: int = 256  # open pages whose state (the chosen image) the server keeps; past it the oldest is forgotten

    def validate(self) -> None:
        for name, value in asdict(self).items():
            if not value > 0:
                raise ValueError(f"demo limit {name} must be above 0, got {value}")

    @property
    def upload_bytes(self) -> int:
        return int(self.upload_mib * 2**20)

    def describe(self) -> str:
        """The bounds in one sentence, as the page states them."""
        return (f"Per request: decoder steps up to {self.flow_steps} (euler, heun, adams) or {self.ddpm_steps} "
                f"(DDPM: 250, ddimN, dpmN), guidance 0..{self.guidance:g}, temperature up to {self.temperature:g}, "
                f"{self.samples} samples ({self.per_class} per class), images up to {self.pixels / 1e6:g} "
                f"megapixels and {self.upload_mib:g} MiB, {self.request_seconds:g} s of model time. At most "
                f"{self.queue} requests wait their turn; more are told the demo is busy.")


@dataclass
class Generation:
    """What the generation tab samples with: the eager AR model and its tokenizer, or an exported sampler."""
    sampler: Sampler
    class_names: list[str]
    batch_size: int
    source: str  # what the page says it samples with

    @property
    def defaults(self) -> dict:  # the run's (or the export's) sampling settings
        return self.sampler.settings

    @property
    def num_classes(self) -> int:
        return self.sampler.num_classes

    @property
    def num_tokens(self) -> int:  # N: the tab's token count k lies in 1..N
        return self.sampler.num_tokens

    @property
    def device(self) -> torch.device:
        return self.sampler.device


@dataclass
class DemoModels:
    tokenizer: Tokenizer
    tokenizer_source: str
    held_out: torch.Tensor  # (N, 3, S, S) in [0, 1]: the tokenizer run's held-out images
    held_out_captions: list[str]
    generation: Optional[Generation]
    out_dir: Path  # the downloads of the generation tab
    limits: DemoLimits = field(default_factory=DemoLimits)
    worker: ThreadPoolExecutor = field(  # the one thread every model call runs on (on_model)
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="demo-model"))

    @property
    def num_slots(self) -> int:
        return self.tokenizer.num_slots


def _run_class_names(run) -> list[str]:
    """Readable class names from the data section a checkpoint's run trained on; none where it names no data."""
    try:
        return class_names(from_dict(DataConfig, saved_config(run).get("data") or {}, prefix="data."))
    except (ValueError, OSError):  # a converted checkpoint, a checkpoint not on this machine, a bad data section
        return []


def _name(names: list[str], label: int) -> str:
    return names[label] if 0 <= label < len(names) else f"class {label}"


def _held_out(tokenizer_path, image_size: int, count: int) -> tuple[torch.Tensor, list[str]]:
    try:
        val = held_out_set(tokenizer_path, image_size)
    except (ValueError, OSError) as e:  # a converted checkpoint: no data section
        log.info("no built-in images to pick from: %s", e)
        return torch.empty(0, 3, image_size, image_size), []
    items = [val[i] for i in range(min(count, len(val)))]
    names = _run_class_names(tokenizer_path)
    return (torch.stack([image for image, _ in items]),
            [f"held-out #{i}: {_name(names, label)}" for i, (_, label) in enumerate(items)])


def _same_weights(a: Path, b: Path) -> bool:
    a, b = weights_file(a), weights_file(b)
    return a.resolve() == b.resolve() or (a.stat().st_size == b.stat().st_size and sha256_file(a) == sha256_file(b))


def _generation(ar, compiled, loaded, tokenizer: Tokenizer, tokenizer_path) -> Generation:
    """The eager AR model (decoding with the demo's tokenizer when it is the one the AR model was trained on, else
    with that one) or the export, as make_sampler picks."""
    if compiled is not None:
        sampler = make_sampler(compiled=compiled)
        run, source = ar or sampler.manifest["checkpoints"]["autoregressive"]["path"], f"{compiled} (compiled)"
    else:
        pinned = loaded.tokenizer_file()  # the tokenizer the AR model's tokens mean something to
        sampler = make_sampler(loaded, tokenizer=tokenizer if _same_weights(pinned, Path(tokenizer_path)) else None,
                               precision=tokenizer.precision)
        run, source = ar, f"{ar} (eager)"
    named = _run_class_names(run)
    return Generation(sampler, [_name(named, c) for c in range(sampler.num_classes)],
                      sampler.max_batch or EAGER_BATCH, source)


def load_models(tokenizer=None, ar=None, compiled=None, device: Optional[str] = None,
                out_dir: Optional[Path] = None, num_held_out: int = 8, precision: str = "bf16",
                limits: Optional[DemoLimits] = None) -> DemoModels:
    """The demo's models, loaded once; the eager ones run in `precision` on a GPU (common/device.py), each request
    within `limits`. tokenizer: a run directory, checkpoint or weights file (default: the one the AR run was trained
    on); ar: an AR run for the generation tab; compiled: an exported directory (`semanticist-fast export`), which
    the generation tab then samples with instead of the eager AR model."""
    loaded = load_generator(ar, device) if ar is not None and compiled is None else None
    if tokenizer is None:
        if ar is None:
            raise ConfigError("the demo needs a tokenizer: give --tokenizer RUN (or --ar RUN, whose tokenizer it uses)")
        tokenizer = (loaded or load_generator(ar, "cpu")).tokenizer_file()
    tok = Tokenizer.from_checkpoint(tokenizer, device=device, precision=precision)
    held_out, captions = _held_out(tokenizer, tok.image_size, num_held_out)
    generation = _generation(ar, compiled, loaded, tok, tokenizer) if compiled is not None or loaded is not None \
        else None
    if out_dir is None:  # a server left running for days must not fill the disk: removed when the process exits
        out = Path(tempfile.mkdtemp(prefix="semanticist-demo-"))
        atexit.register(shutil.rmtree, out, ignore_errors=True)
    else:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
    return DemoModels(tok, str(tokenizer), held_out, captions, generation, out, limits or DemoLimits())


# -- inputs -----------------------------------------------------------------------------------------------------

def input_image(models: DemoModels, source: Optional[ImageSource]) -> torch.Tensor:
    """(1, 3, S, S) in [0, 1]: an image file centre-cropped as the tokenizer's data was, or a built-in one."""
    if source is None or source == "":
        raise DemoInputError("no image: upload one or pick a built-in held-out image")
    if isinstance(source, int):
        if not 0 <= source < len(models.held_out):
            raise DemoInputError(f"built-in image {source} does not exist (there are {len(models.held_out)})")
        return models.held_out[source:source + 1]
    path = Path(source)
    if not path.is_file():
        raise DemoInputError(f"the uploaded file {path.name} is gone: upload it again")
    size, limits = path.stat().st_size, models.limits
    if size > limits.upload_bytes:
        raise DemoInputError(f"{path.name} is {size / 2**20:.1f} MiB; the demo takes files up to "
                             f"{limits.upload_mib:g} MiB")
    try:
        return load_images([str(path)], models.tokenizer.image_size, max_pixels=limits.pixels)
    except ValueError as e:
        message = str(e).replace(str(path), path.name)
        if "cannot read" in message:
            message += " (upload a PNG, JPEG, WebP, BMP, GIF or TIFF image)"
        raise DemoInputError(message) from None


def counts_of(models: DemoModels, counts: Sequence[Union[int, str]]) -> list[int]:
    """Token counts, each a number in 1..K or "all", sorted, without repeats."""
    if not counts:
        raise DemoInputError("choose at least one token count")
    try:
        parsed = parse_token_counts(",".join(str(c) for c in counts), models.num_slots)
    except ConfigError as e:
        raise DemoInputError(str(e).removeprefix("tokens: ")) from None
    return sorted(set(parsed))


def display_image(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] -> a PIL image, enlarged by a whole factor when smaller than DISPLAY_SIDE."""
    array = to_uint8(image[None])[0].permute(1, 2, 0).numpy()
    pil = Image.fromarray(array)
    factor = -(-DISPLAY_SIDE // max(pil.size))
    return pil.resize((pil.width * factor, pil.height * factor), Image.NEAREST) if factor > 1 else pil


# -- the tokenizer tab --------------------------------------------------------------------------------------------

@dataclass
class Reconstructions:
    counts: list[int]
    images: list[Image.Image]  # for display; the scores are of the full-resolution tensors
    captions: list[str]
    psnr: list[float]
    ssim: list[float]
    flat_psnr: float  # each image painted its mean colour: the baseline
    plot: Image.Image  # PSNR against k
    seconds: float


def _number(value, what: str, kind: type = float):
    try:
        return kind(value)
    except (TypeError, ValueError, OverflowError):  # text, NaN or infinity where a count is wanted
        raise DemoInputError(f"{what} must be a number, got {value!r}") from None


def _guidance(models: DemoModels, guidance: float, what: str) -> float:
    guidance = _number(guidance, f"{what} guidance")
    if not 0 <= guidance <= models.limits.guidance:  # also refuses NaN
        raise DemoInputError(f"{what} guidance must be in 0..{models.limits.guidance:g} (1 is none), got {guidance:g}")
    return guidance


def decoder_calls(models: DemoModels, steps: str) -> int:
    """The network calls of one decode with a step spec the tokenizer's process accepts."""
    config = models.tokenizer.config.diffusion
    if config.objective == "flow":
        return flow_steps(steps)[1]
    return len(space_timesteps(config.num_timesteps, steps))


def _decoding(models: DemoModels, guidance: Optional[float], steps: Optional[str]) -> tuple[float, str]:
    """The decoder settings to use, checked against the process and the limits: the config's where not given."""
    config = models.tokenizer.config.diffusion
    guidance = _guidance(models, config.guidance if guidance is None else guidance, "decoder")
    steps = str(steps).strip() if steps not in (None, "") else str(config.sample_steps)
    if len(steps) > 16:  # also keeps int() away from a megabyte of digits
        raise DemoInputError(f"decoder steps {steps[:16]}...: give a sampler and a count, e.g. euler4 or ddim25")
    try:
        models.tokenizer.process.sampler(steps)
        calls = decoder_calls(models, steps)
    except ValueError as e:
        raise DemoInputError(str(e)) from None
    bound = models.limits.flow_steps if config.objective == "flow" else models.limits.ddpm_steps
    if calls > bound:
        raise DemoInputError(f"decoder steps {steps} make {calls} network calls; the demo allows at most {bound} "
                             f"a decode")
    return guidance, steps


def _seed(seed) -> int:
    seed = _number(seed, "the seed", int)
    if not 0 <= seed < 2**63:
        raise DemoInputError(f"the seed must be in 0..2^63-1, got {seed}")
    return seed


def on_model(models: DemoModels, work: Callable[[], T], cancelled: Optional[Cancelled] = None) -> T:
    """work() on the models' one thread, so requests run one at a time whatever the web server does (and the
    model's memory stays in one allocator arena, not one per web worker thread: the load test's memory bound).
    The request's deadline, limits.request_seconds of model time, starts when its work starts; past it, or once
    cancelled() says the client has gone, the work stops at its next network call and RequestStopped says why."""
    seconds = models.limits.request_seconds

    def job() -> T:
        end = time.monotonic() + seconds

        def reason() -> Optional[str]:
            if cancelled is not None and cancelled():
                return "its client has gone"
            if time.monotonic() > end:
                return (f"it ran past {seconds:g} s of model time, the most one request may take here: ask for fewer "
                        f"steps, token counts or samples")
            return None

        with stop_when(reason):
            return work()

    try:  # the caller's context travels along: Gradio's progress tracking finds its request there
        return models.worker.submit(contextvars.copy_context().run, job).result()
    except Stopped as e:
        log.info("request stopped: %s", e)
        raise RequestStopped(f"stopped: {e}") from None


def reconstruct_gallery(models: DemoModels, image: ImageSource, counts: Sequence[Union[int, str]],
                        guidance: Optional[float] = None, steps: Optional[str] = None, seed: int = 0,
                        progress: Optional[Progress] = None, step_bars: bool = False,
                        cancelled: Optional[Cancelled] = None) -> Reconstructions:
    """Reconstructions of one image from its first k tokens, for each k of counts, all from the same noise (seed),
    with PSNR and SSIM against the input. step_bars: a tqdm bar over each decode's steps (the page tracks it)."""
    x = input_image(models, image)
    ks = counts_of(models, counts)
    guidance, steps = _decoding(models, guidance, steps)
    seed = _seed(seed)

    def on_count(index: int, k: int) -> None:
        if progress is not None:
            progress(index / len(ks), f"decoding from the first {k} token{'s' * (k > 1)}")

    start = time.perf_counter()
    report, by_k = on_model(models, lambda: reconstruction_report(models.tokenizer, x, ks, guidance, steps, seed, 1,
                                                                  on_count, step_bars), cancelled)
    seconds = time.perf_counter() - start
    rows = report["per_tokens"]
    captions = [f"{row['tokens']} token{'s' * (row['tokens'] > 1)} · PSNR {row['psnr']:.2f} dB · "
                f"SSIM {row['ssim']:.3f}" for row in rows]
    psnr, ssim = [row["psnr"] for row in rows], [row["ssim"] for row in rows]
    return Reconstructions(ks, [display_image(by_k[k][0]) for k in ks], captions, psnr, ssim,
                           report["flat"]["psnr"], psnr_plot(ks, psnr, ssim, report["flat"]["psnr"],
                                                             models.num_slots), seconds)


def first_k_image(models: DemoModels, image: ImageSource, k: int, guidance: Optional[float] = None,
                  steps: Optional[str] = None, seed: int = 0,
                  cancelled: Optional[Cancelled] = None) -> tuple[Image.Image, str]:
    """The image from its first k tokens alone, and its caption (the same noise as the gallery's)."""
    result = reconstruct_gallery(models, image, [int(k)], guidance, steps, seed, cancelled=cancelled)
    return result.images[0], result.captions[0]


def psnr_plot(counts: list[int], psnr: list[float], ssim: list[float], flat_psnr: float,
              num_slots: int) -> Image.Image:
    """PSNR (and SSIM) against the number of tokens, beside the flat baseline, as a small PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display; a no-op once a figure exists
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.8, 3.0), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.plot(counts, psnr, "o-", color="tab:blue", label="PSNR")
    ax.axhline(flat_psnr, color="tab:gray", linestyle="--", linewidth=1, label="flat (mean colour)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(token_counts(num_slots), [str(k) for k in token_counts(num_slots)])
    ax.set_xlim(0.8, num_slots * 1.25)
    ax.set_xlabel("first k tokens")
    ax.set_ylabel("PSNR (dB)", color="tab:blue")
    ax.set_title("PSNR and SSIM against k", fontsize=9, pad=18)
    right = ax.twinx()
    right.plot(counts, ssim, "s:", color="tab:orange", label="SSIM")
    right.set_ylabel("SSIM", color="tab:orange")
    lines = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    ax.legend(lines, [line.get_label() for line in lines], loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3,
              fontsize=8, frameon=False)  # above the axes: inside, it would cover the points
    buffer = BytesIO()
    fig.savefig(buffer, format="png")
    return Image.open(BytesIO(buffer.getvalue()))


# -- the generation tab -------------------------------------------------------------------------------------------

@dataclass
class Samples:
    labels: list[int]
    images: list[Image.Image]  # for display
    captions: list[str]
    grid: Path  # PNG: a row per class
    archive: Path  # .npz: uint8 images (N, H, W, 3) and their labels, as `semanticist-fast sample` writes
    seconds: float


def class_choices(models: DemoModels) -> list[str]:
    """The generation tab's class list: 'i: name'."""
    if models.generation is None:
        return []
    return [f"{c}: {name}" for c, name in enumerate(models.generation.class_names)]


def classes_of(models: DemoModels, classes: Sequence[Union[int, str]]) -> list[int]:
    """Class indices from indices, 'i: name' choices or names."""
    gen = models.generation
    parsed = []
    for c in classes:
        text = str(c).strip()
        head = text.split(":", 1)[0].strip()
        if head.lstrip("-").isdigit():
            label = int(head)
        elif text in gen.class_names:
            label = gen.class_names.index(text)
        else:
            raise DemoInputError(f"unknown class {text!r}: choose from the list (0..{gen.num_classes - 1})")
        if not 0 <= label < gen.num_classes:
            raise DemoInputError(f"class {label} is outside 0..{gen.num_classes - 1}")
        parsed.append(label)
    if not parsed:
        raise DemoInputError("choose at least one class")
    return list(dict.fromkeys(parsed))


def generate_grid(models: DemoModels, classes: Sequence[Union[int, str]], per_class: int = 4,
                  guidance: Optional[float] = None, guidance_schedule: Optional[str] = None,
                  temperature: Optional[float] = None, seed: int = 0, progress: Optional[Progress] = None,
                  step_bars: bool = False, cancelled: Optional[Cancelled] = None,
                  tokens: Optional[int] = None) -> Samples:
    """per_class samples of each class (a grid row each), seeded as `semanticist-fast sample --seed` is, written
    as a PNG grid and an .npz for download. tokens: generate only the first k of the N tokens and decode with the
    rest nulled (`sample --tokens k`). Unset settings are the run's."""
    gen = models.generation
    if gen is None:
        raise DemoInputError("no AR model: start the demo with --ar RUN (or --compiled DIR) to generate")
    limits = models.limits
    labels_list = classes_of(models, classes)
    per_class = _number(per_class, "samples per class", int)
    if not 1 <= per_class <= limits.per_class:
        raise DemoInputError(f"samples per class must be in 1..{limits.per_class}, got {per_class}")
    if len(labels_list) * per_class > limits.samples:
        raise DemoInputError(f"{len(labels_list)} classes x {per_class} is {len(labels_list) * per_class} images; "
                             f"the demo draws at most {limits.samples} at once")
    if temperature is not None and not 0 < _number(temperature, "temperature") <= limits.temperature:
        raise DemoInputError(f"temperature must be above 0 and at most {limits.temperature:g}, got {temperature:g}")
    if guidance is not None:
        guidance = _guidance(models, guidance, "class")
    if guidance_schedule not in (None, "linear", "constant"):
        raise DemoInputError(f"guidance schedule {guidance_schedule!r}: choose linear or constant")
    if tokens is not None:
        tokens = _number(tokens, "the token count", int)
        if not 1 <= tokens <= gen.num_tokens:
            raise DemoInputError(f"the token count must be in 1..{gen.num_tokens} (this AR model draws "
                                 f"{gen.num_tokens}), got {tokens}")
    seed = _seed(seed)
    settings = {"guidance": guidance, "guidance_schedule": guidance_schedule,
                "temperature": None if temperature is None else float(temperature), "tokens": tokens}
    labels = torch.tensor([c for c in labels_list for _ in range(per_class)], device=gen.device)

    def draw() -> torch.Tensor:
        generator = torch.Generator(gen.device).manual_seed(seed)
        chunks = []
        for begin in range(0, labels.shape[0], gen.batch_size):
            if progress is not None:
                progress(begin / labels.shape[0], f"sampling images {begin + 1}..{labels.shape[0]}")
            try:
                chunks.append(gen.sampler.sample_images(labels[begin:begin + gen.batch_size], generator, step_bars,
                                                        **settings).cpu())
            except ValueError as e:  # settings an export cannot run (e.g. guidance on an unguided export)
                raise DemoInputError(str(e)) from None
        return torch.cat(chunks)

    start = time.perf_counter()
    images = on_model(models, draw, cancelled)
    seconds = time.perf_counter() - start
    folder = Path(tempfile.mkdtemp(prefix="samples-", dir=models.out_dir))
    grid, archive = folder / "samples.png", folder / "samples.npz"
    save_grid(list(images.view(len(labels_list), per_class, *images.shape[1:])), grid)
    save_samples(images, labels, archive)
    prune_downloads(models.out_dir)
    return Samples(labels.tolist(), [display_image(x) for x in images],
                   [f"{c}: {gen.class_names[c]}" for c in labels.tolist()], grid, archive, seconds)


def prune_downloads(out_dir: Path) -> None:
    """Delete all but the newest KEEP_DOWNLOADS request folders (samples-*), so the downloads folder stays bounded.
    Their names are random (mkdtemp), so age comes from the modification time."""
    folders = sorted((p for p in Path(out_dir).glob("samples-*") if p.is_dir()), key=lambda p: p.stat().st_mtime_ns)
    for old in folders[:-KEEP_DOWNLOADS]:
        shutil.rmtree(old, ignore_errors=True)
