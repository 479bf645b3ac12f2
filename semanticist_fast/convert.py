"""Official Semanticist checkpoints -> our checkpoint format (`semanticist-fast convert`).

Tokenizer (DiT-L-2, DiT-XL-2) and epsilon-LlamaGen GPT checkpoints. Our parameter names are the official ones, so
conversion strips wrapper prefixes, infers the architecture from tensor shapes (head counts, which shapes cannot
show, from the named sizes, or from overrides for other widths: `model.heads=N` for a GPT, `model.encoder.heads=N
model.decoder.heads=N` for a tokenizer, and `model.decoder.repa_block=N` for a DiT shallower than the published
REPA block), and checks the key set strictly against a model built from that
config: any key we do not expect, or expect and do not find, is an error. The converted checkpoint carries the
`model` section of a run config, which is all that inference reads, in a .safetensors file (common/runs.py).
"""
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch

from .common.runs import write_weights_file
from .config import ConfigError, apply_overrides, from_dict, to_dict
from .models.dit import DIT_SIZES
from .models.gpt import GPT, GPT_SIZES, GPTConfig
from .models.sizes import size_named
from .models.tokenizer import SemanticistTokenizer, TokenizerConfig
from .models.vit import ENCODER_SIZES
from .models.weights import check_state_fits, count_blocks, read_weights, strip_prefixes

log = logging.getLogger(__name__)

# Buffers the reference registers that carry no learned state.
IGNORED_TOKENIZER_KEYS = {"nested_sampler.arange"}


@dataclass
class ConvertedTokenizer:
    """The config a converted tokenizer checkpoint carries (and that its `key=value` overrides address)."""
    kind: Literal["tokenizer"] = "tokenizer"
    model: TokenizerConfig = field(default_factory=TokenizerConfig)


@dataclass
class ConvertedGPT:
    kind: Literal["autoregressive"] = "autoregressive"
    model: GPTConfig = field(default_factory=GPTConfig)


def _shape(state: dict, key: str, what: str) -> tuple:
    if key not in state:
        raise ValueError(f"not {what} state dict: missing {key!r}")
    return tuple(state[key].shape)


def _checkpoint(kind: str, config, state: dict) -> dict:
    return {"kind": kind, "config": to_dict(config), "weights": state}


# -- tokenizer -----------------------------------------------------------------------------------------------------

OFFICIAL_REPA_BLOCK = 8  # the DiT block every published tokenizer's REPA projector reads


def infer_tokenizer_config(state: dict) -> dict:
    """The `model` section of a tokenizer run config, from the tensors' shapes. What shapes cannot show (the head
    counts, the block REPA reads) is None unless a named size or the published models settle it: overrides give it."""
    what = "a Semanticist tokenizer"
    enc_dim = _shape(state, "encoder.cls_token", what)[-1]
    patch = _shape(state, "encoder.patch_embed.proj.weight", what)[-1]
    num_slots = _shape(state, "encoder.slot_embed", what)[1]
    slot_dim = _shape(state, "encoder2slot.weight", what)[0]
    enc_tokens = _shape(state, "encoder.pos_embed", what)[1]
    hidden, latent_ch, dit_patch, _ = _shape(state, "dit.x_embedder.proj.weight", what)
    dit_tokens = _shape(state, "dit.pos_embed", what)[1]
    out_dim = _shape(state, "dit.final_layer.linear.weight", what)[0]
    enc_depth = count_blocks(state, "encoder.blocks.")
    dit_depth = count_blocks(state, "dit.blocks.")
    image_size = int(round((enc_tokens - 1 - num_slots) ** 0.5)) * patch
    latent_size = int(round(dit_tokens ** 0.5)) * dit_patch
    enc_name = size_named(ENCODER_SIZES, lambda row: row[0] == enc_dim)
    dit_name = size_named(DIT_SIZES, lambda row: row[0] == dit_depth and row[1] == hidden)
    learn_sigma = out_dim == dit_patch * dit_patch * latent_ch * 2
    has_repa = "dit.projector.0.weight" in state
    if dit_name is None:  # its heads come from an override
        decoder = {"size": "custom", "depth": dit_depth, "hidden": int(hidden), "heads": None}
    else:
        decoder = {"size": dit_name}
    decoder.update(patch_size=int(dit_patch), learn_sigma=learn_sigma,
                   repa_block=(OFFICIAL_REPA_BLOCK if dit_depth >= OFFICIAL_REPA_BLOCK else None) if has_repa else 0)
    if has_repa:
        decoder["repa_proj_dim"] = int(state["dit.projector.0.weight"].shape[0])
        decoder["repa_target_dim"] = int(state["dit.projector.4.weight"].shape[0])
    return {
        "image_size": int(image_size),
        "encoder": {"size": "custom", "dim": int(enc_dim), "depth": enc_depth,
                    "heads": None if enc_name is None else ENCODER_SIZES[enc_name][2],
                    "patch_size": int(patch), "num_slots": int(num_slots), "slot_dim": int(slot_dim)},
        "decoder": decoder,
        "codec": {"kind": "kl16" if latent_size != image_size else "pixel", "latent_channels": int(latent_ch),
                  "downsample": image_size // latent_size},
    }


def _require_unseen(model: dict, state: dict) -> None:
    """A ConfigError naming every field that the shapes could not show and no override gave."""
    enc, dec = model["encoder"], model["decoder"]
    dit_depth = count_blocks(state, "dit.blocks.")
    needs = []
    if enc.get("heads") is None:
        needs.append(f"model.encoder.heads=N (its width {enc['dim']} matches no named ViT size)")
    if dec.get("size") == "custom" and dec.get("heads") is None:
        needs.append(f"model.decoder.heads=N (its DiT of {dec['depth']} blocks of width {dec['hidden']} matches no "
                     "named size)")
    if dec.get("repa_block") is None:
        needs.append(f"model.decoder.repa_block=N (the block, 1..{dit_depth}, whose output its REPA projector reads; "
                     f"the published models read block {OFFICIAL_REPA_BLOCK}, which this DiT lacks)")
    if needs:
        raise ConfigError("head counts and the REPA block do not show in a checkpoint's shapes: pass "
                          + "; ".join(needs))


def convert_tokenizer(state: dict, overrides: Optional[list[str]] = None) -> dict:
    """Strict: every missing, unexpected or mis-shaped key is reported by name. Head counts and REPA's block,
    which shapes cannot show, come from the named sizes or from overrides (model.encoder.heads=N,
    model.decoder.heads=N, model.decoder.repa_block=N)."""
    state = {k: v for k, v in state.items() if k not in IGNORED_TOKENIZER_KEYS}
    raw = apply_overrides({"model": infer_tokenizer_config(state)}, overrides or [], ConvertedTokenizer)
    _require_unseen(raw["model"], state)
    if raw["model"]["codec"]["kind"] == "kl16" and not raw["model"]["codec"].get("path"):
        raw["model"]["codec"]["path"] = "PATH/TO/kl16-vae"  # a placeholder the user overrides at load time
        log.warning("no model.codec.path=... given: pass --codec-path when reconstructing with this checkpoint")
    config = from_dict(ConvertedTokenizer, raw)
    depth, repa_block = count_blocks(state, "dit.blocks."), config.model.decoder.repa_block
    if "dit.projector.0.weight" in state and not 0 < repa_block <= depth:
        raise ConfigError(f"model.decoder.repa_block={repa_block}: the checkpoint has a REPA projector, so the block "
                          f"it reads must be one of its DiT's 1..{depth}")
    with torch.device("meta"):
        model = SemanticistTokenizer(config.model)
    state = {k: v.float() for k, v in state.items()}
    given = f" with {' '.join(overrides)}" if overrides else ""
    check_state_fits(model, state, what=f"official tokenizer checkpoint{given}")
    return _checkpoint("tokenizer", config, state)


# -- GPT -------------------------------------------------------------------------------------------------------------

def infer_gpt_config(state: dict, heads: Optional[int] = None) -> GPTConfig:
    """The GPTConfig whose parameter shapes match the (prefix-free) state dict.

    The head count is not visible in the shapes: it comes from the named size with these layers and dim, or must
    be given.
    """
    what = "an epsilon-LlamaGen GPT"
    num_classes_plus_null, dim = _shape(state, "cls_embedding.embedding_table.weight", what)
    layers = count_blocks(state, "layers.")
    size = size_named(GPT_SIZES, lambda row: (row[0], row[2]) == (layers, dim)) or "custom"
    if heads is None:
        if size == "custom":
            raise ConfigError(f"no standard GPT size has {layers} layers of dim {dim}; pass the head count "
                              "(model.heads=N)")
        heads = GPT_SIZES[size][1]
    elif size != "custom" and GPT_SIZES[size][1] != heads:
        size = "custom"
    token_dim = _shape(state, "z_proj.weight", what)[1]
    num_tokens = _shape(state, "diffusion_pos_embed_learned", what)[1]
    width = _shape(state, "diffloss.net.input_proj.weight", what)[0]
    mlp_in = _shape(state, "diffloss.net.res_blocks.0.mlp.0.weight", what)[1]
    out_channels = _shape(state, "diffloss.net.final_layer.linear.weight", what)[0]
    if mlp_in not in (width, 2 * width):
        raise ValueError(f"head block input {mlp_in} is neither width {width} (adaln) nor 2x width (concat)")
    if out_channels not in (token_dim, 2 * token_dim):
        raise ValueError(f"head output {out_channels} is neither {token_dim} (flow) nor {2 * token_dim} (ddpm)")
    objective = "flow" if out_channels == token_dim else "ddpm"
    return GPTConfig(
        size=size,
        layers=None if size != "custom" else layers,
        heads=None if size != "custom" else heads,
        dim=None if size != "custom" else dim,
        token_dim=token_dim,
        num_tokens=num_tokens,
        num_classes=num_classes_plus_null - 1,
        head_width=width,
        head_depth=count_blocks(state, "diffloss.net.res_blocks."),
        head_cond="concat" if mlp_in == 2 * width else "adaln",
        head_objective=objective,
        # The reference samples flow heads with 250 SDE steps and DDPM heads with 100 respaced steps.
        head_sample_steps=250 if objective == "flow" else 100,
    )


def convert_gpt_state_dict(state: dict, heads: Optional[int] = None) -> tuple[dict, GPTConfig]:
    """(our state dict, config) from an official GPT state dict; a top-level "state_dict" wrapper is unwrapped.

    Strict: every missing, unexpected or mis-shaped key is reported by name.
    """
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    ours = strip_prefixes(state)
    config = infer_gpt_config(ours, heads)
    with torch.device("meta"):
        model = GPT(config)
    check_state_fits(model, ours, what=f"official GPT checkpoint (inferred config {config})")
    return {k: ours[k] for k in model.state_dict()}, config


def convert_gpt(state: dict, overrides: Optional[list[str]] = None) -> dict:
    # Head counts do not show in shapes: named sizes supply them, `model.heads=N` does for other sizes.
    heads = next((o.split("=", 1)[1] for o in overrides or [] if o.startswith("model.heads=")), None)
    if heads is not None and not heads.isdigit():
        raise ValueError(f"model.heads={heads}: expected a positive integer, e.g. model.heads=16")
    ours, gpt_config = convert_gpt_state_dict(state, None if heads is None else int(heads))
    config = from_dict(ConvertedGPT, apply_overrides({"model": to_dict(gpt_config)}, overrides or [], ConvertedGPT))
    with torch.device("meta"):  # the overrides may have changed a shape
        check_state_fits(GPT(config.model), ours, what=f"official GPT checkpoint with {' '.join(overrides or [])}")
    return _checkpoint("autoregressive", config, ours)


# -- files -----------------------------------------------------------------------------------------------------------

def detect_kind(state: dict) -> str:
    if any(k.startswith("dit.") for k in state) and any(k.startswith("encoder.") for k in state):
        return "tokenizer"
    if any(k.startswith("layers.") for k in state) and any(k.startswith("diffloss.") for k in state):
        return "gpt"
    raise ValueError("cannot tell whether this is a tokenizer or a GPT checkpoint; pass --kind")


def convert_checkpoint(src, dst, kind: str = "auto", overrides: Optional[list[str]] = None) -> Path:
    state = read_weights(Path(src))
    kind = detect_kind(state) if kind == "auto" else kind
    converted = convert_tokenizer(state, overrides) if kind == "tokenizer" else convert_gpt(state, overrides)
    dst = Path(dst)
    if dst.suffix != ".safetensors":
        raise ValueError(f"convert writes a .safetensors file; name the output like {dst.with_suffix('.safetensors')}")
    write_weights_file(dst, converted["weights"], converted["kind"], converted["config"])
    return dst
