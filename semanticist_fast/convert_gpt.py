"""Official epsilon-LlamaGen checkpoint -> our GPT state dict and config.

Our parameter names are the official ones, so conversion strips wrapper prefixes, infers the architecture from
the tensor shapes and checks the key set strictly against a model built from that config.
Used by `semanticist-fast convert` (semanticist_fast/convert.py).
"""
from typing import Optional

import torch

from .convert import count_blocks, strip_prefixes
from .engine.checkpoint import check_state_fits
from .models.gpt import GPT, GPT_SIZES, GPTConfig


def _shape(sd: dict, key: str) -> tuple:
    if key not in sd:
        raise ValueError(f"official GPT checkpoint is missing {key!r}; is this an epsilon-LlamaGen checkpoint?")
    return tuple(sd[key].shape)


def infer_gpt_config(sd: dict, heads: Optional[int] = None) -> GPTConfig:
    """The GPTConfig whose parameter shapes match the (prefix-free) state dict sd.

    The head count is not visible in the shapes: it comes from the standard size with these layers and dim,
    or must be given.
    """
    num_classes_plus_null, dim = _shape(sd, "cls_embedding.embedding_table.weight")
    layers = count_blocks(sd, "layers.")
    size = next((name for name, (l, _, d) in GPT_SIZES.items() if (l, d) == (layers, dim)), "custom")
    if heads is None:
        if size == "custom":
            raise ValueError(f"no standard GPT size has {layers} layers of dim {dim}; pass the head count")
        heads = GPT_SIZES[size][1]
    elif size != "custom" and GPT_SIZES[size][1] != heads:
        size = "custom"
    token_dim = _shape(sd, "z_proj.weight")[1]
    num_tokens = _shape(sd, "diffusion_pos_embed_learned")[1]
    width = _shape(sd, "diffloss.net.input_proj.weight")[0]
    mlp_in = _shape(sd, "diffloss.net.res_blocks.0.mlp.0.weight")[1]
    out_channels = _shape(sd, "diffloss.net.final_layer.linear.weight")[0]
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
        head_depth=count_blocks(sd, "diffloss.net.res_blocks."),
        head_cond="concat" if mlp_in == 2 * width else "adaln",
        head_objective=objective,
        # The reference samples flow heads with 250 SDE steps and DDPM heads with 100 respaced steps.
        head_sample_steps=250 if objective == "flow" else 100,
    )


def convert_gpt_state_dict(sd: dict, heads: Optional[int] = None) -> tuple[dict, GPTConfig]:
    """(our state dict, config) from an official GPT state dict; a top-level "state_dict" wrapper is unwrapped.

    Strict: every missing, unexpected or mis-shaped key is reported by name.
    """
    if "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    ours = strip_prefixes(sd)
    config = infer_gpt_config(ours, heads)
    with torch.device("meta"):
        model = GPT(config)
    check_state_fits(model, ours, what=f"official GPT checkpoint (inferred config {config})")
    return {k: ours[k] for k in model.state_dict()}, config
