"""The one list of sampling settings: how the AR model draws its tokens and the tokenizer decodes them.

`SampleConfig` is the run's `sample:` section, the Python API's settings (inference.sample_images), the CLI's
sampling options (cli.py adds one option per field: `--head-steps` for head_steps, with the help written here),
the defaults an export stores in its manifest, and the overrides the compiled runtime accepts. It lives on the
ground floor, torch-free, because each of those reads it: the CLI before any heavy import (a training run holds
its stop signals first), the compiled runtime without loading any model code.
"""
from dataclasses import dataclass, field, fields
from typing import ClassVar, Literal, Optional, Union, get_args, get_origin


def _setting(default, help: str, *aliases: str):
    """A field with what the CLI says of it: its help and the older spellings of its option."""
    return field(default=default, metadata={"help": help, "aliases": aliases})


@dataclass
class SampleConfig:
    guidance: float = _setting(4.0, "classifier-free guidance scale on the class", "--cfg")
    guidance_schedule: Literal["linear", "constant"] = _setting(
        "linear", "how class guidance grows over the tokens", "--cfg-schedule")
    temperature: float = _setting(1.0, "diffusion-head temperature")
    head_steps: Optional[int] = _setting(None, "diffusion-head sampling steps per token (unset: the model's "
                                               "head_sample_steps)")
    sampler: Literal["sde", "ode", "heun", "adams", "dpm"] = _setting(
        "sde", "diffusion-head sampler: sde / ode (Euler; DDIM for a ddpm head), heun or adams (second order, flow "
               "heads), dpm (DPM-Solver++(2M), ddpm heads)")
    decoder_guidance: Optional[float] = _setting(None, "tokenizer decoder guidance scale (unset: the tokenizer's)",
                                                 "--decoder-cfg")
    decoder_steps: Optional[str] = _setting(None, "tokenizer decoder steps, e.g. 250, ddim25 or dpm20 (ddpm), "
                                                  "euler4, adams4 or heun4 (flow) (unset: the tokenizer's)")
    tokens: Optional[int] = _setting(None, "generate only the first k of the AR model's N tokens (k AR steps) and "
                                           "decode with the rest nulled, as `reconstruct --tokens k` decodes a "
                                           "prefix: a coarser image at a fraction of the AR cost (unset: all N)")
    RENAMED: ClassVar[dict] = {"cfg": "guidance", "cfg_schedule": "guidance_schedule",
                               "decoder_cfg": "decoder_guidance"}

    def validate(self) -> None:
        for name in ("head_steps", "tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"sample.{name} (--{name.replace('_', '-')}) must be at least 1, got {value}")


SETTINGS = tuple(f.name for f in fields(SampleConfig))


@dataclass(frozen=True)
class SampleOption:
    """One command-line option of a SampleConfig field, for argparse."""
    name: str  # the field, and the option's dest
    flags: tuple[str, ...]  # "--head-steps", then older spellings
    kind: type  # int, float or str
    choices: Optional[tuple[str, ...]]
    help: str


def sample_options() -> list[SampleOption]:
    """The sampling options, one per SampleConfig field, in its order."""
    options = []
    for f in fields(SampleConfig):
        tp, choices = f.type, None
        if get_origin(tp) is Union:  # Optional[X]
            tp = next(arg for arg in get_args(tp) if arg is not type(None))
        if get_origin(tp) is Literal:
            tp, choices = str, get_args(tp)
        options.append(SampleOption(f.name, ("--" + f.name.replace("_", "-"), *f.metadata["aliases"]), tp, choices,
                                    f.metadata["help"]))
    return options


def tokens_to_generate(tokens: Optional[int], num_tokens: int) -> int:
    """How many of the AR model's num_tokens to generate: all when tokens is None, else tokens, which must be in
    1..num_tokens."""
    if tokens is None:
        return num_tokens
    if not 1 <= tokens <= num_tokens:
        raise ValueError(f"--tokens / sample.tokens {tokens}: the AR model draws {num_tokens} tokens, so k must be in "
                         f"1..{num_tokens}; give a k in that range, or leave it unset for all {num_tokens}")
    return int(tokens)
