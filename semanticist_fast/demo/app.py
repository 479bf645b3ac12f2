"""The demo's page (Gradio): a tokenizer tab and a generation tab over the handlers of handlers.py.

Every model event shares one queue slot (concurrency id "model", limit 1), so requests wait their turn and the
page shows their place in the queue; the diffusion steps report progress (the samplers' tqdm bars, tracked by
Gradio). The queue holds at most limits.queue waiting requests; Gradio answers more with "This application is
currently busy. Please try again." (HTTP 503 to API clients). The page states the limits of one request
(handlers.DemoLimits); a request past its deadline, or whose client has gone, is stopped in the model work itself.
A handler's DemoInputError, or any other failure, reaches the page as one line in an error toast and the status
line, never as a traceback (the server log keeps the traceback of unexpected failures). The server binds to
127.0.0.1 unless told otherwise; Gradio's telemetry is off and the page loads nothing from outside.
"""
import functools
import html
import logging
import os
from typing import Callable

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: it reads this at import
import gradio as gr  # noqa: E402
from gradio.context import LocalContext  # noqa: E402

from ..eval.grid import token_counts  # noqa: E402
from . import handlers  # noqa: E402
from .handlers import DemoInputError, DemoModels  # noqa: E402

log = logging.getLogger(__name__)

MODEL = "model"  # the one concurrency slot every model call takes
PIXELATED = "#gallery img, #samples img, #builtins img, #input-preview img, #first-k-image img"
GALLERIES = ("#gallery", "#samples", "#builtins")
# Tiny images stay pixels, not blur; the galleries shrink to their images (Gradio's default keeps 450 px and fixed
# 100 px columns, which overflow the narrow left column) and the reconstructions' captions wrap instead of being cut.
CSS = (f"{PIXELATED} {{image-rendering: pixelated}}\n"
       + ", ".join(f"{g} .grid-wrap" for g in GALLERIES)
       + " {height: auto; min-height: 0; max-height: none; overflow: visible}\n"
       + ", ".join(f"{g} .grid-container" for g in GALLERIES)
       + " {grid-template-columns: repeat(var(--grid-cols), minmax(0, 1fr))}\n"
       "#gallery .caption-label {white-space: normal; max-width: 90%}")


def _guarded(fn: Callable) -> Callable:
    """fn with every failure turned into a one-line message in the page. functools.wraps keeps fn's signature,
    from which Gradio learns what to pass (gr.SelectData, gr.Progress)."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DemoInputError as e:
            raise gr.Error(html.escape(str(e)), print_exception=False) from None
        except Exception as e:  # a failure of the model call itself: one line here, the traceback in the log
            log.exception("demo request failed")
            raise gr.Error(html.escape(f"the request failed: {type(e).__name__}: {e}"), print_exception=False) from None
    return call


def _tracker(progress: gr.Progress) -> handlers.Progress:
    return lambda fraction, what: progress(fraction, desc=what)


def _client_gone() -> handlers.Cancelled:
    """For the request this worker thread serves: whether its client has gone (closed the page, dropped the
    connection). Gradio then marks the running event not alive (Queue.clean_events) but offers no public way to
    ask, nor stops a function running in a thread; this reads its queue as gr.Progress does (gradio 6.31, pinned
    in constraints.txt; test_demo's load test disconnects a client and checks its request was stopped)."""
    blocks, event_id = LocalContext.blocks.get(None), LocalContext.event_id.get(None)
    queue = getattr(blocks, "_queue", None)
    running = [event for job in getattr(queue, "active_jobs", ()) if job for event in job]
    event = next((e for e in running if getattr(e, "_id", None) == event_id), None) if event_id else None
    if event is None:
        return lambda: False
    return lambda: not event.alive


def _tokenizer_tab(models: DemoModels) -> None:
    tok, limits = models.tokenizer, models.limits
    K = models.num_slots
    choices = [(str(k), str(k)) for k in token_counts(K)[:-1]] + [(f"all ({K})", "all")]
    source = gr.State(None)  # the image the next request uses: an uploaded file's path, or a built-in's index
    with gr.Row():
        with gr.Column(scale=1):
            upload = gr.File(label="Upload an image", type="filepath", elem_id="upload")
            builtins = gr.Gallery(value=list(zip([handlers.display_image(x) for x in models.held_out],
                                                 models.held_out_captions)),
                                  label="... or pick a held-out image", columns=4, height="auto",
                                  allow_preview=False, format="png", elem_id="builtins",
                                  visible=len(models.held_out) > 0)
            preview = gr.Image(label=f"What the tokenizer sees ({tok.image_size} x {tok.image_size} centre crop)",
                               interactive=False, format="png", height=200, elem_id="input-preview")
            counts = gr.CheckboxGroup(choices, value=[value for _, value in choices], label="Token counts k",
                                      elem_id="counts")
            with gr.Row():
                guidance = gr.Number(tok.config.diffusion.guidance, label="Decoder guidance (1 = none)",
                                     minimum=0, step=0.1, elem_id="decoder-guidance")
                steps = gr.Textbox(str(tok.config.diffusion.sample_steps), label="Decoder steps",
                                   info=f"flow: euler4, adams4, heun4 (up to {limits.flow_steps}); ddpm: 250, "
                                        f"ddim25, dpm20 (up to {limits.ddpm_steps})", elem_id="steps")
                seed = gr.Number(0, label="Seed", precision=0, minimum=0, elem_id="tok-seed")
            run = gr.Button("Reconstruct", variant="primary", elem_id="reconstruct")
        with gr.Column(scale=2):
            gallery = gr.Gallery(label="Reconstructions from the first k tokens", columns=4, height="auto",
                                 allow_preview=False, format="png", elem_id="gallery")
            with gr.Row():
                plot = gr.Image(label="PSNR against k", show_label=False, buttons=["download"], interactive=False,
                                format="png", elem_id="plot")  # the label would cover the legend
                with gr.Column():
                    first_k = gr.Slider(1, K, value=max(1, K // 2), step=1, label="First k tokens",
                                        elem_id="first-k")
                    first_image = gr.Image(label="From the first k tokens", interactive=False, format="png",
                                           height=200, elem_id="first-k-image")
            status = gr.Markdown(elem_id="tok-status")

    @_guarded
    def on_upload(path):
        image = handlers.input_image(models, path)
        return handlers.display_image(image[0]), path, "Image loaded: press Reconstruct."

    @_guarded
    def on_pick(event: gr.SelectData):
        image = handlers.input_image(models, event.index)
        return handlers.display_image(image[0]), event.index, f"Picked {models.held_out_captions[event.index]}."

    @_guarded
    def on_reconstruct(image, ks, guidance, steps, seed, progress=gr.Progress(track_tqdm=True)):
        result = handlers.reconstruct_gallery(models, image, ks, guidance, steps, seed, _tracker(progress),
                                              step_bars=True, cancelled=_client_gone())
        rows = "\n".join(f"| {k} | {p:.2f} | {s:.3f} |" for k, p, s in zip(result.counts, result.psnr, result.ssim))
        table = (f"| k | PSNR dB | SSIM |\n|---|---|---|\n{rows}\n| flat | {result.flat_psnr:.2f} | |\n\n"
                 f"Decoded {len(result.counts)} reconstruction{'s' * (len(result.counts) > 1)} in "
                 f"{result.seconds:.2f} s (flat: each pixel the image's mean colour).")
        return list(zip(result.images, result.captions)), result.plot, table

    @_guarded
    def on_first_k(image, k, guidance, steps, seed):
        if image is None:
            return None, gr.update()
        return handlers.first_k_image(models, image, k, guidance, steps, seed, _client_gone())[0], gr.update()

    upload.upload(on_upload, [upload], [preview, source, status])
    builtins.select(on_pick, None, [preview, source, status])
    inputs = [source, counts, guidance, steps, seed]
    run.click(on_reconstruct, inputs, [gallery, plot, status], concurrency_id=MODEL, concurrency_limit=1) \
        .success(on_first_k, [source, first_k, guidance, steps, seed], [first_image, status],
                 concurrency_id=MODEL, show_progress="hidden")
    first_k.release(on_first_k, [source, first_k, guidance, steps, seed], [first_image, status],
                    concurrency_id=MODEL, trigger_mode="always_last")


def _generation_tab(models: DemoModels) -> None:
    gen, limits = models.generation, models.limits
    if gen is None:
        gr.Markdown("No AR model: start the demo with `--ar RUN` (or `--compiled DIR`) to generate images.")
        return
    d = gen.defaults
    choices = handlers.class_choices(models)
    with gr.Row():
        with gr.Column(scale=1):
            classes = gr.Dropdown(choices, value=choices[:2], multiselect=True, label="Classes (a row each)",
                                  elem_id="classes")
            per_class = gr.Slider(1, limits.per_class, value=min(4, limits.per_class), step=1,
                                  label="Samples per class", elem_id="per-class")
            guidance = gr.Number(d["guidance"], label="Class guidance (1 = none)", minimum=0, step=0.5,
                                 elem_id="guidance")
            schedule = gr.Radio(["linear", "constant"], value=d["guidance_schedule"], label="Guidance schedule",
                                info="linear: grows from 1 at the first token to the scale at the last",
                                elem_id="schedule")
            temperature = gr.Slider(0.05, limits.temperature, value=min(d["temperature"], limits.temperature),
                                    step=0.05, label="Temperature", elem_id="temperature")
            tokens = gr.Slider(1, gen.num_tokens, value=d["tokens"] or gen.num_tokens, step=1,
                               label="Tokens generated (k)", elem_id="gen-tokens",
                               info=f"the first k of {gen.num_tokens} (k AR steps), the rest nulled: coarser, "
                                    f"cheaper images")
            seed = gr.Number(0, label="Seed", precision=0, minimum=0, elem_id="gen-seed")
            run = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Column(scale=2):
            samples = gr.Gallery(label="Samples (a row per class)", columns=4, height="auto", allow_preview=False,
                                 format="png", elem_id="samples")
            downloads = gr.File(label="Download: the PNG grid and an .npz of the uint8 images and labels",
                                file_count="multiple", interactive=False, elem_id="downloads")
            status = gr.Markdown(f"Sampling with {gen.source}.", elem_id="gen-status")

    @_guarded
    def on_generate(chosen, n, guidance, schedule, temperature, seed, k, progress=gr.Progress(track_tqdm=True)):
        result = handlers.generate_grid(models, chosen or [], n, guidance, schedule, temperature, seed,
                                        _tracker(progress), step_bars=True, cancelled=_client_gone(), tokens=k)
        shown = gr.Gallery(value=list(zip(result.images, result.captions)), columns=int(n))
        prefix = f"; from the first {int(k)} of {gen.num_tokens} tokens" if k and int(k) < gen.num_tokens else ""
        return shown, [str(result.grid), str(result.archive)], \
            f"{len(result.images)} images in {result.seconds:.2f} s ({gen.source}{prefix})."

    # k comes last: API clients that predate it (benchmarks/bench_demo.py) leave it at its default.
    run.click(on_generate, [classes, per_class, guidance, schedule, temperature, seed, tokens],
              [samples, downloads, status], concurrency_id=MODEL, concurrency_limit=1)


def build_app(models: DemoModels) -> gr.Blocks:
    with gr.Blocks(title="semanticist-fast demo", analytics_enabled=False) as app:
        gr.Markdown(f"## semanticist-fast\nTokenizer `{models.tokenizer_source}`: {models.num_slots} ordered tokens "
                    f"per {models.tokenizer.image_size} px image. Each image below is decoded from its first k "
                    f"tokens only; the rest are dropped.\n\n{models.limits.describe()}", elem_id="header")
        with gr.Tab("Tokenizer", id="tokenizer", elem_id="tab-tokenizer"):
            _tokenizer_tab(models)
        with gr.Tab("Generation", id="generation", elem_id="tab-generation"):
            _generation_tab(models)
    app.queue(max_size=models.limits.queue, default_concurrency_limit=1)
    return app


def launch(models: DemoModels, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> gr.Blocks:
    """Serve the page; block=False returns once it is up (the caller closes it with .close())."""
    app = build_app(models)
    # state_session_capacity: Gradio keeps the state of 10,000 sessions by default (about a MiB each here), so a
    # client opening sessions in a loop would grow the server's memory for hours; limits.sessions bounds it.
    app.launch(state_session_capacity=models.limits.sessions, server_name=host, server_port=port, prevent_thread_lock=not block, share=False, show_error=False,
               max_file_size=models.limits.upload_bytes, ssr_mode=False, quiet=not block, css=CSS,
               allowed_paths=[str(models.out_dir)], footer_links=[])
    return app
