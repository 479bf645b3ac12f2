"""CompiledSampler: class labels -> images from an exported directory (semanticist_fast/export/package.py).

Needs torch and the packages only: it imports no model, kernel, inference or training code of this project, just
the sampler math of semanticist_fast.diffusion (plain torch), which the eager path uses too. The loops are those
of inference.generation.generate and inference.Tokenizer.decode, step for step and draw for draw, so the same
generator gives the same images (within float tolerance: the kernels are Inductor's).

    sampler = CompiledSampler.load("runs/ar_tiny_export")
    images = sampler.sample_images(torch.tensor([1, 7]), torch.Generator().manual_seed(0), head_steps=25)

The KV caches are tensors this object owns, one set per row count, passed to the AR steps, which write their
position in place; positions not yet written are masked, so a reused cache needs no clearing. On a GPU the
per-token steps (the AR decode step and the head step) and the decoder step replay from CUDA graphs
(export/cuda_graphs.py; untested on GPU here); the noise is drawn outside the graphs, as the eager loop draws it.
"""
import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from ..common.device import inference_precision
from ..common.sample_settings import SETTINGS, SampleConfig, tokens_to_generate
from ..diffusion.sampling import HeadSampler, decoder_process, guidance_at
from .cuda_graphs import GraphedCall

# The steps that replay from CUDA graphs, and where their state inputs (the KV caches, written in place) begin.
GRAPHED = {"ar_prefill": 1, "ar_decode": 2, "head_step": None, "decoder_step": None}


@dataclass
class Program:
    """One loaded package; inputs are made contiguous (a package reads them by its traced strides). A bf16 export
    has its casts in the graph; its fp32 matmuls, like a tf32 export's, run with TF32 (precision "tf32")."""
    run: Callable
    precision: str = "fp32"

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        with inference_precision(args[0].device, self.precision):
            return self.run(*(a.contiguous() for a in args))


def load_programs(directory: Path, manifest: dict, graphs: bool) -> dict[str, Callable]:
    """The manifest's packages, the GRAPHED ones wrapped to replay from CUDA graphs when graphs is on.

    Under graphs every package loads with run_single_threaded=True: by default an AOTI model container hands its
    calls to a pool of model instances and queries CUDA events to reclaim one, which is illegal while a stream is
    capturing ("operation not permitted when stream is capturing"); the single-threaded container does neither."""
    programs = {}
    precision = "fp32" if manifest.get("precision", "fp32") == "fp32" else "tf32"
    for name, spec in manifest["programs"].items():
        file = str(directory / spec["file"])
        program = Program(torch._inductor.aoti_load_package(file, run_single_threaded=graphs) if manifest["compiled"]
                          else torch.export.load(file).module(), precision)
        if graphs and name in GRAPHED:
            start = GRAPHED[name]
            program = GraphedCall(program, range(start, len(spec["inputs"])) if start is not None else ())
        programs[name] = program
    return programs


class CompiledSampler:
    def __init__(self, directory: Path, manifest: dict, programs: dict[str, Callable], device: torch.device):
        self.directory, self.manifest, self.programs, self.device = directory, manifest, programs, device
        # The manifest's settings; a field it predates (an older export) takes SampleConfig's default.
        self.settings = {**asdict(SampleConfig()), **manifest["sample"]}
        decoder_inputs = [i["name"] for i in manifest["programs"]["decoder_step"]["inputs"]]
        self._decoder_takes_count = "num_tokens" in decoder_inputs  # exports before `tokens` decode all N only
        head = manifest["head"]
        self.head_sampler = HeadSampler(head["objective"], head["default_steps"], head["ddpm_schedule"],
                                        head["ddpm_timesteps"])
        self.process = decoder_process(**manifest["decoder"]["process"]).to(device)
        self._decoders: dict = {}
        self._caches: dict[int, list[torch.Tensor]] = {}

    @classmethod
    def load(cls, directory: Union[str, Path], use_cuda_graphs: Optional[bool] = None) -> "CompiledSampler":
        """Load an exported directory. use_cuda_graphs (default: on for a CUDA export) replays the steps from
        CUDA graphs."""
        directory = Path(directory)
        path = directory / "manifest.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: export the sampler first (semanticist-fast export CKPT "
                                    f"--out {directory}); an interrupted export leaves no manifest")
        manifest = json.loads(path.read_text())
        if manifest.get("format") != 1:
            raise ValueError(f"{path}: unknown export format {manifest.get('format')!r}; re-export with this version")
        device = torch.device(manifest["device"])
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"{directory} was exported for CUDA and this machine has no GPU; export it on this "
                             f"machine (semanticist-fast export ... --device cpu)")
        graphs = device.type == "cuda" if use_cuda_graphs is None else use_cuda_graphs
        if graphs and device.type != "cuda":
            raise ValueError("use_cuda_graphs=True needs a CUDA export")
        if manifest["torch"] != torch.__version__:
            warnings.warn(f"{directory} was exported with torch {manifest['torch']} and this is torch "
                          f"{torch.__version__}; if it fails to load or run, re-export it with this torch")
        return cls(directory, manifest, load_programs(directory, manifest, graphs), device)

    @property
    def num_classes(self) -> int:
        return self.manifest["ar"]["num_classes"]

    @property
    def num_tokens(self) -> int:
        return self.manifest["ar"]["num_tokens"]

    @property
    def max_batch(self) -> int:
        return self.manifest["batch"]["max"]

    # -- settings ------------------------------------------------------------------------------------------------
    def resolved(self, **overrides) -> dict:
        """The stored sampling settings with every given one that is not None replacing them."""
        unknown = sorted(set(overrides) - set(SETTINGS))
        if unknown:
            raise ValueError(f"unknown sampling settings {unknown}; choose from {', '.join(SETTINGS)}")
        s = {**self.settings, **{k: v for k, v in overrides.items() if v is not None}}
        if s["guidance"] != 1.0 and not self.manifest["ar"]["guided"]:
            raise ValueError(f"{self.directory} was exported without class guidance (guidance 1.0): its steps have "
                             f"no CFG batch for guidance {s['guidance']}; re-export with --guidance {s['guidance']}")
        if s["decoder_guidance"] != 1.0 and not self.manifest["decoder"]["guided"]:
            raise ValueError(f"{self.directory} was exported without decoder guidance: re-export with "
                             f"--decoder-guidance {s['decoder_guidance']} to sample with it")
        self.head_sampler.check(s["sampler"])
        guidance_at(s["guidance"], 0, 1, s["guidance_schedule"])  # an unknown schedule fails now
        self._check_decodes(tokens_to_generate(s["tokens"], self.num_tokens))
        return s

    def _check_decodes(self, count: int) -> None:
        """An export made before generation from the first k tokens has a decoder step that decodes all N."""
        if count < self.num_tokens and not self._decoder_takes_count:
            raise ValueError(f"{self.directory} was exported before generation from the first k tokens: its decoder "
                             f"step decodes all {self.num_tokens}; re-export it to sample with --tokens "
                             f"{count}")

    def _check_batch(self, batch: int) -> None:
        lo, hi = self.manifest["batch"]["min"], self.manifest["batch"]["max"]
        if not lo <= batch <= hi:
            raise ValueError(f"{self.directory} was exported for batches of {lo} to {hi}, got {batch}; split the "
                             f"labels or re-export with --batch {batch}")

    def _caches_for(self, rows: int) -> list[torch.Tensor]:
        if rows not in self._caches:
            ar = self.manifest["ar"]
            shape, dtype = (rows, *ar["cache_shape"]), getattr(torch, ar["cache_dtype"])
            self._caches[rows] = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(2 * ar["layers"])]
        return self._caches[rows]

    # -- sampling --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, labels: torch.Tensor, generator: Optional[torch.Generator] = None, **overrides) -> torch.Tensor:
        """Class labels (B,) -> tokens (B, k, token_dim) float32, as inference.generate draws them: the first
        k = tokens (default all num_tokens), in k AR steps."""
        s = self.resolved(**overrides)
        ar = self.manifest["ar"]
        if labels.ndim != 1 or labels.dtype != torch.long:
            raise ValueError(f"labels must be a 1-d int64 tensor, got {labels.dtype} of shape {tuple(labels.shape)}")
        if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < ar["num_classes"]:
            raise ValueError(f"labels must be in 0..{ar['num_classes'] - 1}")
        batch, num_tokens, token_dim = labels.shape[0], ar["num_tokens"], ar["token_dim"]
        self._check_batch(batch)
        labels = labels.to(self.device)
        guided = ar["guided"]
        rows = 2 * batch if guided else batch
        caches = self._caches_for(rows)
        all_labels = torch.cat([labels, torch.full_like(labels, ar["num_classes"])]) if guided else labels
        positions = torch.arange(num_tokens, device=self.device)
        count = tokens_to_generate(s["tokens"], num_tokens)
        tokens = torch.zeros(batch, count, token_dim, device=self.device)
        for k in range(count):
            if k == 0:
                cond_emb = self.programs["ar_prefill"](all_labels, *caches)
            else:
                prev = tokens[:, k - 1:k]
                prev = torch.cat([prev, prev]) if guided else prev
                cond_emb = self.programs["ar_decode"](prev, positions[k:k + 1], *caches)
            scale = guidance_at(s["guidance"], k, num_tokens, s["guidance_schedule"]) if guided else None
            tokens[:, k] = self.head_sampler.sample(self._head_fn(cond_emb, scale), batch, token_dim, self.device,
                                                    s["temperature"], generator, s["head_steps"], s["sampler"])
        return tokens

    def _head_fn(self, cond_emb: torch.Tensor, scale: Optional[float]):
        step = self.programs["head_step"]
        extra = () if scale is None else (torch.tensor(scale, dtype=torch.float32, device=self.device),)

        def model_fn(x, t):
            # Every row shares one timestep: flow passes it as (1,), the DDPM chains as (rows,) integers.
            return step(x, t.reshape(-1)[:1].float(), cond_emb, *extra)

        return model_fn

    @torch.no_grad()
    def decode(self, ar_tokens: torch.Tensor, generator: Optional[torch.Generator] = None, progress: bool = False,
               **overrides) -> torch.Tensor:
        """The AR's tokens (B, n, token_dim), n <= num_tokens -> images in [0, 1], as inference.Tokenizer.decode
        does: from the first k = tokens (the setting; default n) of them, the slots after them nulled."""
        s = self.resolved(**overrides)
        tokens = ar_tokens
        ar = self.manifest["ar"]
        given = tokens.shape[1] if tokens.ndim == 3 else 0
        if tokens.ndim != 3 or not 1 <= given <= ar["num_tokens"] or tokens.shape[2] != ar["token_dim"]:
            raise ValueError(f"tokens must be (B, n, {ar['token_dim']}) with n in 1..{ar['num_tokens']}, got "
                             f"{tuple(tokens.shape)}")
        count = given if s["tokens"] is None else tokens_to_generate(s["tokens"], ar["num_tokens"])
        if count > given:
            raise ValueError(f"--tokens {count}: only {given} tokens were given to decode")
        self._check_decodes(count)
        self._check_batch(tokens.shape[0])
        tokens = tokens.to(self.device, torch.float32)
        if given < ar["num_tokens"]:  # the slots from count on are nulled in the step, whatever they hold
            padding = tokens.new_zeros(tokens.shape[0], ar["num_tokens"] - given, tokens.shape[2])
            tokens = torch.cat([tokens, padding], dim=1)
        steps = str(s["decoder_steps"])
        if steps not in self._decoders:
            self._decoders[steps] = self.process.sampler(steps)
        step = self.programs["decoder_step"]
        # A guided export runs the CFG batch at any scale, 1.0 included (equal to the unguided path up to rounding).
        extra = (torch.tensor(float(s["decoder_guidance"]), dtype=torch.float32, device=self.device),) \
            if self.manifest["decoder"]["guided"] else ()
        if self._decoder_takes_count:
            extra = (torch.tensor([count], device=self.device), *extra)

        def model_fn(x, t):
            return step(x, t.float(), tokens, *extra)

        noise = torch.randn((tokens.shape[0], *self.manifest["decoder"]["latent_shape"]), device=self.device,
                            generator=generator)
        latents = self._decoders[steps](model_fn, noise, generator, progress)
        return self.programs["latent_decode"](latents)

    def sample_images(self, labels: torch.Tensor, generator: Optional[torch.Generator] = None,
                      progress: bool = False, **overrides) -> torch.Tensor:
        """Class labels -> images in [0, 1]: inference.sample_images with the exported steps."""
        tokens = self.generate(labels, generator, **overrides)
        return self.decode(tokens, generator, progress, **overrides)
