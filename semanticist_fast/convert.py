"""Official Semanticist checkpoints -> our checkpoint format (`semanticist-fast convert`).

The model's configuration is inferred from tensor shapes (head counts from the named sizes, which shapes cannot
show), then the state dict is loaded strictly: any key we do not expect, or expect and do not find, is an error.
"""
import logging
from pathlib import Path
from typing import Optional

import torch

from .config import apply_overrides, from_dict, to_dict
from .engine.checkpoint import atomic_torch_save, check_state_fits
from .models.dit import DIT_SIZES
from .models.tokenizer import SemanticistTokenizer
from .models.vit import ENCODER_SIZES

log = logging.getLogger(__name__)

WRAPPER_PREFIXES = ("_orig_mod.", "module.")
# Buffers the reference registers that carry no learned state.
IGNORED_TOKENIZER_KEYS = {"nested_sampler.arange"}


def strip_prefixes(state: dict) -> dict:
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
    return out


def read_state_dict(path: Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        for key in ("ema", "model", "state_dict", "module"):
            if isinstance(state.get(key), dict):
                log.info("using the %r entry of %s", key, path)
                state = state[key]
                break
        else:
            raise ValueError(f"{path} holds no state dict (top-level keys: {sorted(state)[:10]})")
    return strip_prefixes(state)


def count_blocks(state: dict, prefix: str) -> int:
    """The number of blocks `prefix{i}.` in state; they must be numbered 0..n-1."""
    indices = {int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix)}
    if indices != set(range(len(indices))):
        raise ValueError(f"checkpoint blocks {prefix}N are not numbered 0..n-1: {sorted(indices)}")
    return len(indices)


def _named(sizes: dict, match, what: str):
    for name, spec in sizes.items():
        if match(spec):
            return name, spec
    raise ValueError(f"the checkpoint's {what} matches no named size ({', '.join(sizes)}); heads cannot be inferred")


def infer_tokenizer_config(state: dict) -> dict:
    """The `model` section of a tokenizer run config, from the tensors' shapes."""
    try:
        enc_dim = state["encoder.cls_token"].shape[-1]
        patch = state["encoder.patch_embed.proj.weight"].shape[-1]
        num_slots, slot_dim = state["encoder.slot_embed"].shape[1], state["encoder2slot.weight"].shape[0]
        enc_tokens = state["encoder.pos_embed"].shape[1]
        hidden, latent_ch, dit_patch, _ = state["dit.x_embedder.proj.weight"].shape
        dit_tokens = state["dit.pos_embed"].shape[1]
        out_dim = state["dit.final_layer.linear.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"not a Semanticist tokenizer state dict: missing {e}") from None
    enc_depth = count_blocks(state, "encoder.blocks.")
    dit_depth = count_blocks(state, "dit.blocks.")
    image_size = int(round((enc_tokens - 1 - num_slots) ** 0.5)) * patch
    latent_size = int(round(dit_tokens ** 0.5)) * dit_patch
    enc_name, (_, _, enc_heads, _) = _named(ENCODER_SIZES, lambda s: s[0] == enc_dim, f"encoder width {enc_dim}")
    dit_name, (_, _, dit_heads) = _named(DIT_SIZES, lambda s: s[0] == dit_depth and s[1] == hidden,
                                         f"DiT depth {dit_depth} / hidden {hidden}")
    learn_sigma = out_dim == dit_patch * dit_patch * latent_ch * 2
    has_repa = "dit.projector.0.weight" in state
    decoder = {"size": dit_name, "patch_size": int(dit_patch), "learn_sigma": learn_sigma,
               "repa_block": 8 if has_repa else 0}
    if has_repa:
        decoder["repa_proj_dim"] = int(state["dit.projector.0.weight"].shape[0])
        decoder["repa_target_dim"] = int(state["dit.projector.4.weight"].shape[0])
    return {
        "image_size": int(image_size),
        "encoder": {"size": "custom", "dim": int(enc_dim), "depth": enc_depth, "heads": enc_heads,
                    "patch_size": int(patch), "num_slots": int(num_slots), "slot_dim": int(slot_dim)},
        "decoder": decoder,
        "codec": {"kind": "kl16" if latent_size != image_size else "pixel", "latent_channels": int(latent_ch),
                  "downsample": image_size // latent_size},
    }


def convert_tokenizer(state: dict, overrides: Optional[list[str]] = None) -> dict:
    from .train_tokenizer import TokenizerRun

    state = {k: v for k, v in state.items() if k not in IGNORED_TOKENIZER_KEYS}
    raw = apply_overrides({"model": infer_tokenizer_config(state)}, overrides or [], TokenizerRun)
    if raw["model"]["codec"]["kind"] == "kl16" and not raw["model"]["codec"].get("path"):
        raw["model"]["codec"]["path"] = "PATH/TO/kl16-vae"  # a placeholder the user overrides at load time
        log.warning("no model.codec.path=... given: pass --codec-path when reconstructing with this checkpoint")
    run = from_dict(TokenizerRun, raw)
    with torch.device("meta"):
        model = SemanticistTokenizer(run.model)
    state = {k: v.float() for k, v in state.items()}
    check_state_fits(model, state, what="official tokenizer checkpoint")
    return {"kind": "tokenizer", "config": to_dict(run), "model": state, "ema": state, "step": 0, "epoch": 0,
            "batch_in_epoch": 0, "converted_from": "official"}


def convert_gpt(state: dict, overrides: Optional[list[str]] = None) -> dict:
    from .convert_gpt import convert_gpt_state_dict
    from .models.gpt import GPT
    from .train_ar import ARRun

    # Head counts do not show in shapes: named sizes supply them, `model.heads=N` does for other sizes.
    heads = next((o.split("=", 1)[1] for o in overrides or [] if o.startswith("model.heads=")), None)
    if heads is not None and not heads.isdigit():
        raise ValueError(f"model.heads={heads}: expected a positive integer, e.g. model.heads=16")
    ours, gpt_cfg = convert_gpt_state_dict(state, None if heads is None else int(heads))
    raw = apply_overrides({"model": to_dict(gpt_cfg)}, overrides or [], ARRun)
    run = from_dict(ARRun, raw)
    with torch.device("meta"):  # the overrides may have changed a shape
        check_state_fits(GPT(run.model), ours, what=f"official GPT checkpoint with {' '.join(overrides or [])}")
    return {"kind": "autoregressive", "config": to_dict(run), "model": ours, "ema": ours, "step": 0, "epoch": 0,
            "batch_in_epoch": 0, "converted_from": "official"}


def detect_kind(state: dict) -> str:
    if any(k.startswith("dit.") for k in state) and any(k.startswith("encoder.") for k in state):
        return "tokenizer"
    if any(k.startswith("layers.") for k in state) and any(k.startswith("diffloss.") for k in state):
        return "gpt"
    raise ValueError("cannot tell whether this is a tokenizer or a GPT checkpoint; pass --kind")


def convert_checkpoint(src, dst, kind: str = "auto", overrides: Optional[list[str]] = None) -> Path:
    state = read_state_dict(Path(src))
    kind = detect_kind(state) if kind == "auto" else kind
    converted = convert_tokenizer(state, overrides) if kind == "tokenizer" else convert_gpt(state, overrides)
    dst = Path(dst)
    atomic_torch_save(converted, dst)
    return dst
