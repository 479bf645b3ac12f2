"""Analytic FLOP counts (multiply-add = 2) of the training steps, per image, from the model configs.

Counted: every matmul (linear layers, convolutions, patch embeddings) and attention (QK^T and AV, 4 * Lq * Lk *
dim per sample and layer). Elementwise work, norms, softmax and resampling are left out: they are a few percent
at these widths. Attention is counted dense, as a FLOP counter of the kernels would: the split slot-encoder
attention skips about a quarter of the encoder's score matrix and causal masks half of the GPT's; both are small.

Training = 3 x forward for the trained parts (forward, plus backward for activation and weight gradients);
the frozen VAE encoder and DINOv2 teacher run forward only (and are cacheable).

The one FLOP counter: `semanticist-fast plan` and the benchmarks (bench_train, bench_scaling, bench_data) use it.

    python -m semanticist_fast.plan.flops   # the published configurations against SEMANTICIST.md "Cost (FLOPs)"
"""
from ..models.dinov2 import DinoV2Config
from ..models.dit import DecoderConfig
from ..models.gpt import GPTConfig, ffn_hidden
from ..models.latent_codec import CodecConfig, codec_geometry
from ..models.tokenizer import TokenizerConfig
from ..models.vae_kl import VAEConfig
from ..models.vit import EncoderConfig

TIMESTEP_FREQUENCY_DIM = 256  # layers.TimestepEmbedder's sinusoid width


def linear(rows: int, d_in: int, d_out: int) -> int:
    return 2 * rows * d_in * d_out


def attention(q_tokens: int, k_tokens: int, dim: int) -> int:
    """Scores and weighted values of all heads together: two (Lq x Lk x dim) products."""
    return 4 * q_tokens * k_tokens * dim


def conv(out_pixels: int, c_in: int, c_out: int, kernel: int) -> int:
    return 2 * out_pixels * c_in * c_out * kernel * kernel


def vit_block(tokens: int, dim: int, mlp_hidden: int) -> int:
    """Pre-norm ViT block: qkv, attention, output projection, two-layer MLP."""
    return (linear(tokens, dim, 3 * dim) + attention(tokens, tokens, dim) + linear(tokens, dim, dim)
            + linear(tokens, dim, mlp_hidden) + linear(tokens, mlp_hidden, dim))


def timestep_embedder(rows: int, hidden: int) -> int:
    return linear(rows, TIMESTEP_FREQUENCY_DIM, hidden) + linear(rows, hidden, hidden)


# ---- stage 1 -----------------------------------------------------------------------------------------------------

def encoder_forward(enc: EncoderConfig, image_size: int) -> int:
    """SlotEncoder + encoder2slot: [cls, patches, slots] through the ViT, slot outputs projected to slot_dim."""
    dim, depth, _, patch = enc.resolved()
    patches = (image_size // patch) ** 2
    tokens = 1 + patches + enc.num_slots
    return (conv(patches, 3, dim, patch) + depth * vit_block(tokens, dim, int(dim * enc.mlp_ratio))
            + linear(enc.num_slots, dim, enc.slot_dim))


def decoder_forward(dec: DecoderConfig, latent_channels: int, latent_size: int, num_slots: int, slot_dim: int,
                    repa: bool) -> int:
    """SlotDiT: patch + slot tokens through adaLN-Zero blocks, final layer on the patch tokens, REPA projector."""
    depth, hidden, _ = dec.resolved()
    p = dec.patch_size
    patches = (latent_size // p) ** 2
    tokens = patches + num_slots
    out_channels = latent_channels * (2 if dec.learn_sigma else 1)
    flops = (conv(patches, latent_channels, hidden, p) + timestep_embedder(1, hidden)
             + linear(num_slots, slot_dim, hidden))
    flops += depth * (linear(1, hidden, 6 * hidden) + vit_block(tokens, hidden, int(hidden * dec.mlp_ratio)))
    flops += linear(1, hidden, 2 * hidden) + linear(patches, hidden, p * p * out_channels)
    if repa and 0 < dec.repa_block <= depth:
        flops += (linear(patches, hidden, dec.repa_proj_dim) + linear(patches, dec.repa_proj_dim, dec.repa_proj_dim)
                  + linear(patches, dec.repa_proj_dim, dec.repa_target_dim))
    return flops


def vae_encoder_forward(cfg: VAEConfig, image_size: int) -> int:
    """The LDM KL encoder (vae_kl.Encoder) and quant_conv on one image."""
    chans = cfg.block_out_channels
    res = image_size
    flops = conv(res * res, cfg.in_channels, chans[0], 3)

    def resnet(c_in: int, c_out: int, pixels: int) -> int:
        shortcut = conv(pixels, c_in, c_out, 1) if c_in != c_out else 0
        return conv(pixels, c_in, c_out, 3) + conv(pixels, c_out, c_out, 3) + shortcut

    c_in = chans[0]
    for level, c_out in enumerate(chans):
        for i in range(cfg.layers_per_block):
            flops += resnet(c_in if i == 0 else c_out, c_out, res * res)
        c_in = c_out
        if level < len(chans) - 1:
            res //= 2  # stride-2 3x3 conv after a one-pixel right/bottom pad
            flops += conv(res * res, c_out, c_out, 3)
    c, pixels = chans[-1], res * res
    flops += 2 * resnet(c, c, pixels) + 4 * linear(pixels, c, c) + attention(pixels, pixels, c)
    flops += conv(pixels, c, 2 * cfg.latent_channels, 3) + conv(pixels, 2 * cfg.latent_channels,
                                                                2 * cfg.latent_channels, 1)
    return flops


def dinov2_forward(cfg: DinoV2Config) -> int:
    g = cfg.token_grid
    tokens = 1 + g * g
    return (conv(g * g, 3, cfg.embed_dim, cfg.patch_size)
            + cfg.depth * vit_block(tokens, cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio)))


def tokenizer_step(cfg: TokenizerConfig, repa: bool = True,
                   vae: VAEConfig | None = None, teacher: DinoV2Config | None = None) -> dict[str, int]:
    """FLOPs per image of one tokenizer training step, by part.

    repa: the DiT runs its REPA projector and the DINOv2 teacher runs. vae / teacher: the frozen models' configs
    (default: MAR's KL-16 when the codec is kl16, DINOv2 ViT-B/14).
    """
    channels, latent_size = codec_geometry(cfg.codec, cfg.image_size)
    enc = encoder_forward(cfg.encoder, cfg.image_size)
    dec = decoder_forward(cfg.decoder, channels, latent_size, cfg.encoder.num_slots, cfg.encoder.slot_dim, repa)
    vae_fwd = vae_encoder_forward(vae or VAEConfig(), cfg.image_size) if cfg.codec.kind == "kl16" else 0
    teacher_fwd = dinov2_forward(teacher or DinoV2Config()) if repa else 0
    trained = 3 * (enc + dec)
    return {"encoder_fwd": enc, "decoder_fwd": dec, "trained_fwd_bwd": trained, "vae_encoder_fwd": vae_fwd,
            "teacher_fwd": teacher_fwd, "total": trained + vae_fwd + teacher_fwd}


# ---- stage 2 -----------------------------------------------------------------------------------------------------

def gpt_forward(cfg: GPTConfig) -> int:
    """The transformer over [class, num_tokens - 1 projected tokens]: num_tokens positions."""
    layers, _, dim = cfg.resolved()
    seq = cfg.num_tokens
    hidden = ffn_hidden(dim)
    per_layer = (linear(seq, dim, 3 * dim) + attention(seq, seq, dim) + linear(seq, dim, dim)
                 + 2 * linear(seq, dim, hidden) + linear(seq, hidden, dim))
    return linear(seq - 1, cfg.token_dim, dim) + layers * per_layer


def head_forward(cfg: GPTConfig) -> int:
    """The diffusion head over num_tokens x diffusion_batch_mul rows, each with its own timestep."""
    _, _, dim = cfg.resolved()
    w = cfg.head_width
    rows = cfg.num_tokens * cfg.diffusion_batch_mul
    mlp_in = 2 * w if cfg.head_cond == "concat" else w
    out = cfg.token_dim * (2 if cfg.head_objective == "ddpm" else 1)
    per_row = timestep_embedder(1, w) + linear(1, dim, w) + linear(1, cfg.token_dim, w)
    per_row += cfg.head_depth * (linear(1, w, 3 * w) + linear(1, mlp_in, w) + linear(1, w, w))
    per_row += linear(1, w, 2 * w) + linear(1, mlp_in, out)
    return rows * per_row


def ar_step(cfg: GPTConfig) -> dict[str, int]:
    """FLOPs per image (one class-conditional token sequence) of one AR training step, by part."""
    gpt, head = gpt_forward(cfg), head_forward(cfg)
    return {"gpt_fwd": gpt, "head_fwd": head, "total": 3 * (gpt + head)}


def published_tokenizer_config() -> TokenizerConfig:
    """ViT-B/16 encoder, DiT-L/2 decoder, KL-16 latents, REPA (configs/tokenizer_l.yaml).

    The codec path is a placeholder: only the latent geometry is read from it, no weights are loaded.
    """
    return TokenizerConfig(image_size=256, encoder=EncoderConfig(size="base"),
                           decoder=DecoderConfig(size="L", patch_size=2),
                           codec=CodecConfig(kind="kl16", path="unused"))


def main() -> None:
    gf = 1e-9
    tok = tokenizer_step(published_tokenizer_config())
    print("tokenizer-L per image (GFLOP): " + ", ".join(f"{k} {v * gf:.1f}" for k, v in tok.items()))
    print("  spec: ViT-B 97, DiT-L-2 209, VAE encoder 138, DINOv2 46, total ~1100")
    ar = ar_step(GPTConfig(size="L"))
    print("ar-L per image (GFLOP): " + ", ".join(f"{k} {v * gf:.1f}" for k, v in ar.items()))
    print("  spec: GPT-L 20, head 46, total ~200")


if __name__ == "__main__":
    main()
