"""Weight files in, state dicts out: one reader, one prefix stripper, one strict check for every loader.

Used by the frozen encoders (KL-16 VAE, DINOv2), the official-checkpoint converter, inference and the trainer.
"""
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# Prefixes that wrappers add to every key: torch.compile (also inside submodules) and DDP / DeepSpeed.
WRAPPER_PREFIXES = ("_orig_mod.", "module.")
# Entries of a training checkpoint that hold the weights, in order of preference.
CONTAINER_KEYS = ("ema", "model", "state_dict", "module")


def read_weights(path) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} from a .safetensors file or a torch file (a state dict, or a checkpoint holding one
    under CONTAINER_KEYS), with wrapper prefixes stripped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch and safetensors raise a different type for each way a file can be wrong
        kind = "safetensors" if path.suffix == ".safetensors" else "torch"
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"cannot read weights from {path}: it is not a readable {kind} file "
                         f"({type(e).__name__}: {first_line})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        key = next((k for k in CONTAINER_KEYS if isinstance(state.get(k), dict)), None)
        if key is None:
            raise ValueError(f"{path} holds no state dict (top-level keys: {sorted(state)[:10]})")
        log.info("using the %r entry of %s", key, path)
        state = state[key]
    return strip_prefixes(state)


def strip_prefixes(state: dict, shared: tuple[str, ...] = ()) -> dict:
    """Remove the wrapper prefixes from every key (any number of them, and compile's inner `._orig_mod.`), then
    each prefix of `shared` that every key carries (a container's namespace, e.g. DINOv2's `backbone.`)."""
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
            key = key.replace("._orig_mod.", ".")
        out[key] = value
    for prefix in shared:
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix):]: v for k, v in out.items()}
    return out


def count_blocks(state: dict, prefix: str) -> int:
    """The number of blocks `prefix{i}.` in state; they must be numbered 0..n-1."""
    indices = {int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix)}
    if indices != set(range(len(indices))):
        raise ValueError(f"checkpoint blocks {prefix}N are not numbered 0..n-1: {sorted(indices)}")
    return len(indices)


def check_state_fits(model: torch.nn.Module, state: dict, what: str = "checkpoint") -> None:
    """Raise a ValueError naming every missing, unexpected and wrongly shaped key of `state` for `model`."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        lines = [f"the {what} does not fit this model (was it made with a different config?)"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + "; ".join(items[:8]) + (" ..." if len(items) > 8 else ""))
        raise ValueError("\n".join(lines))


def load_model_state(model: torch.nn.Module, state: dict, what: str = "checkpoint") -> None:
    """Strict load with an error that names the mismatched keys and shapes, not a wall of text."""
    check_state_fits(model, state, what)
    model.load_state_dict(state, strict=True)
