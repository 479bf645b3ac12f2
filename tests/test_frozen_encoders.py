import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from semanticist_fast.models.dinov2 import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DinoV2,
    DinoV2Config,
    load_dinov2,
    small_test_dinov2,
)
from semanticist_fast.models.vae_kl import (
    WEIGHTS_NAME,
    AutoencoderKL,
    VAEConfig,
    load_autoencoder_kl,
    sample_posterior,
    save_autoencoder_kl,
    small_test_config,
)

try:
    import diffusers
except ImportError:
    diffusers = None

MAR_CONFIG = {
    "_class_name": "AutoencoderKL",
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 5,
    "up_block_types": ["UpDecoderBlock2D"] * 5,
    "block_out_channels": [128, 128, 256, 256, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 256,
    "scaling_factor": 0.2325,
}


def randomize_(module: torch.nn.Module, seed: int, scale: float = 0.2) -> None:
    """Non-trivial weights everywhere (norm weights included) so mis-wired layers cannot hide."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            base = 1.0 if name.endswith("weight") and p.dim() == 1 else 0.0
            p.copy_(base + scale * torch.randn(p.shape, generator=gen))


def small_vae(seed: int = 0) -> AutoencoderKL:
    model = AutoencoderKL(VAEConfig.from_dict(small_test_config()))
    randomize_(model, seed)
    return model.eval()


# ---------------------------------------------------------------- VAE: plain functional reference

def ref_resnet(sd, p, x, groups):
    h = F.conv2d(F.silu(F.group_norm(x, groups, sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-6)),
                 sd[p + "conv1.weight"], sd[p + "conv1.bias"], padding=1)
    h = F.conv2d(F.silu(F.group_norm(h, groups, sd[p + "norm2.weight"], sd[p + "norm2.bias"], 1e-6)),
                 sd[p + "conv2.weight"], sd[p + "conv2.bias"], padding=1)
    if p + "conv_shortcut.weight" in sd:
        x = F.conv2d(x, sd[p + "conv_shortcut.weight"], sd[p + "conv_shortcut.bias"])
    return x + h


def ref_attention(sd, p, x, groups):
    b, c, hh, ww = x.shape
    t = F.group_norm(x, groups, sd[p + "group_norm.weight"], sd[p + "group_norm.bias"], 1e-6)
    t = t.reshape(b, c, hh * ww).transpose(1, 2)
    q, k, v = (F.linear(t, sd[p + n + ".weight"], sd[p + n + ".bias"]) for n in ("to_q", "to_k", "to_v"))
    a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(c), dim=-1) @ v
    out = F.linear(a, sd[p + "to_out.0.weight"], sd[p + "to_out.0.bias"])
    return x + out.transpose(1, 2).reshape(b, c, hh, ww)


def ref_mid(sd, p, x, g):
    x = ref_resnet(sd, p + "resnets.0.", x, g)
    x = ref_attention(sd, p + "attentions.0.", x, g)
    return ref_resnet(sd, p + "resnets.1.", x, g)


def ref_encode(sd, cfg: VAEConfig, x):
    g, n = cfg.norm_num_groups, len(cfg.block_out_channels)
    x = F.conv2d(x, sd["encoder.conv_in.weight"], sd["encoder.conv_in.bias"], padding=1)
    for i in range(n):
        for j in range(cfg.layers_per_block):
            x = ref_resnet(sd, f"encoder.down_blocks.{i}.resnets.{j}.", x, g)
        if i < n - 1:
            x = F.pad(x, (0, 1, 0, 1))
            p = f"encoder.down_blocks.{i}.downsamplers.0.conv."
            x = F.conv2d(x, sd[p + "weight"], sd[p + "bias"], stride=2)
    x = ref_mid(sd, "encoder.mid_block.", x, g)
    x = F.silu(F.group_norm(x, g, sd["encoder.conv_norm_out.weight"], sd["encoder.conv_norm_out.bias"], 1e-6))
    x = F.conv2d(x, sd["encoder.conv_out.weight"], sd["encoder.conv_out.bias"], padding=1)
    x = F.conv2d(x, sd["quant_conv.weight"], sd["quant_conv.bias"])
    mean, logvar = x.chunk(2, dim=1)
    return mean, logvar.clamp(-30, 20)


def ref_decode(sd, cfg: VAEConfig, z):
    g, n = cfg.norm_num_groups, len(cfg.block_out_channels)
    z = F.conv2d(z, sd["post_quant_conv.weight"], sd["post_quant_conv.bias"])
    x = F.conv2d(z, sd["decoder.conv_in.weight"], sd["decoder.conv_in.bias"], padding=1)
    x = ref_mid(sd, "decoder.mid_block.", x, g)
    for i in range(n):
        for j in range(cfg.layers_per_block + 1):
            x = ref_resnet(sd, f"decoder.up_blocks.{i}.resnets.{j}.", x, g)
        if i < n - 1:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            p = f"decoder.up_blocks.{i}.upsamplers.0.conv."
            x = F.conv2d(x, sd[p + "weight"], sd[p + "bias"], padding=1)
    x = F.silu(F.group_norm(x, g, sd["decoder.conv_norm_out.weight"], sd["decoder.conv_norm_out.bias"], 1e-6))
    return F.conv2d(x, sd["decoder.conv_out.weight"], sd["decoder.conv_out.bias"], padding=1)


@torch.no_grad()
def test_vae_matches_functional_reference_odd_sizes():
    model = small_vae(1)
    sd = model.state_dict()
    x = torch.rand(2, 3, 20, 27) * 2 - 1  # odd width: pad right then stride 2 gives 27 -> 13 -> 6
    mean, logvar = model.encode(x)
    assert mean.shape == logvar.shape == (2, 4, 5, 6)
    ref_mean, ref_logvar = ref_encode(sd, model.config, x)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logvar, ref_logvar, rtol=1e-4, atol=1e-4)
    z = torch.randn(3, 4, 5, 7)
    out = model.decode(z)
    assert out.shape == (3, 3, 20, 28)
    torch.testing.assert_close(out, ref_decode(sd, model.config, z), rtol=1e-4, atol=1e-4)


def test_vae_save_load_round_trip(tmp_path):
    model = small_vae(2)
    save_autoencoder_kl(model, small_test_config(), str(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["block_out_channels"] == [8, 8, 16]
    loaded, scale = load_autoencoder_kl(str(tmp_path))
    assert scale == 0.5
    assert not loaded.training
    assert all(not p.requires_grad for p in loaded.parameters())
    x = torch.rand(2, 3, 16, 12) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x), model.encode(x), rtol=0, atol=0)
        z = torch.randn(2, 4, 4, 3)
        torch.testing.assert_close(loaded.decode(z), model.decode(z), rtol=0, atol=0)
    as_double, _ = load_autoencoder_kl(str(tmp_path), dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in as_double.parameters())


def test_vae_legacy_attention_names(tmp_path):
    model = small_vae(3)
    save_autoencoder_kl(model, small_test_config(), str(tmp_path))
    weights = load_file(str(tmp_path / WEIGHTS_NAME))
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for k, v in weights.items():
        for new, legacy in old.items():
            if f".attentions.0.{new}." in k:
                k = k.replace(f".{new}.", f".{legacy}.")
                v = v[:, :, None, None].contiguous() if v.dim() == 2 and "decoder" in k else v  # conv-shaped form too
        renamed[k] = v
    assert any(".proj_attn." in k for k in renamed)
    save_file(renamed, str(tmp_path / WEIGHTS_NAME))
    loaded, _ = load_autoencoder_kl(str(tmp_path))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0)


def test_vae_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected config.json and diffusion_pytorch_model.safetensors"):
        load_autoencoder_kl(str(tmp_path))
    for field, value in [("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D", "DownEncoderBlock2D"]),
                         ("act_fn", "gelu"), ("use_quant_conv", False), ("shift_factor", 0.1)]:
        with pytest.raises(ValueError, match=field):
            VAEConfig.from_dict({**small_test_config(), field: value})
    model = small_vae(4)
    save_autoencoder_kl(model, small_test_config(), str(tmp_path))
    weights = load_file(str(tmp_path / WEIGHTS_NAME))
    weights["extra.weight"] = weights.pop("encoder.conv_in.weight")
    save_file(weights, str(tmp_path / WEIGHTS_NAME))
    with pytest.raises(ValueError, match=r"missing keys \(1\): encoder.conv_in.weight"):
        load_autoencoder_kl(str(tmp_path))


@torch.no_grad()
def test_vae_mar_kl16_shapes():
    cfg = VAEConfig.from_dict(MAR_CONFIG)
    assert cfg == VAEConfig()
    model = AutoencoderKL(cfg).eval()
    assert model.downsample_factor == 16
    mean, logvar = model.encode(torch.rand(1, 3, 64, 64) * 2 - 1)
    assert mean.shape == logvar.shape == (1, 16, 4, 4)
    assert model.decode(mean).shape == (1, 3, 64, 64)
    gen = torch.Generator().manual_seed(0)
    z = sample_posterior(mean, torch.full_like(logvar, -2.0), gen)
    assert torch.allclose((z - mean).std(), torch.tensor(math.exp(-1.0)), rtol=0.3)


@pytest.mark.skipif(diffusers is None, reason="diffusers not installed")
def test_vae_matches_diffusers(tmp_path):
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(**{k: v for k, v in small_test_config().items() if not k.startswith("_")})
    randomize_(ref, 5)
    ref.eval()
    ref.save_pretrained(str(tmp_path / "ref"), safe_serialization=True)
    ours, scale = load_autoencoder_kl(str(tmp_path / "ref"))
    assert scale == ref.config.scaling_factor
    x = torch.rand(2, 3, 24, 17) * 2 - 1
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
        mean, logvar = ours.encode(x)
        torch.testing.assert_close(mean, dist.mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logvar, dist.logvar, rtol=1e-5, atol=1e-5)
        z = torch.randn(2, 4, 6, 5)
        torch.testing.assert_close(ours.decode(z), ref.decode(z).sample, rtol=1e-5, atol=1e-5)
    # And the other way: what we save, diffusers reads.
    save_autoencoder_kl(ours, small_test_config(), str(tmp_path / "ours"))
    back = diffusers.AutoencoderKL.from_pretrained(str(tmp_path / "ours"))
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0)


@pytest.mark.skipif(diffusers is None, reason="diffusers not installed")
def test_vae_mar_layout_matches_diffusers():
    ref = diffusers.AutoencoderKL(**{k: v for k, v in MAR_CONFIG.items() if not k.startswith("_")})
    ours = AutoencoderKL(VAEConfig.from_dict(MAR_CONFIG))
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == ref_shapes


# ---------------------------------------------------------------- DINOv2

def ref_dino_patch_tokens(sd, cfg: DinoV2Config, images):
    """Hand-written DINOv2 forward: resize, normalise, patchify, interpolate positions, blocks, final norm."""
    x = F.interpolate(images, size=(cfg.input_size, cfg.input_size), mode="bicubic", align_corners=False)
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=cfg.patch_size)
    b, d = x.shape[:2]
    x = torch.cat([sd["cls_token"].expand(b, 1, d), x.flatten(2).transpose(1, 2)], dim=1)
    m, g = cfg.img_size // cfg.patch_size, cfg.input_size // cfg.patch_size
    grid = sd["pos_embed"][:, 1:].reshape(1, m, m, d).permute(0, 3, 1, 2)
    if m != g:  # DINOv2 uses the stored table as is when the grid already matches
        grid = F.interpolate(grid, scale_factor=((g + 0.1) / m, (g + 0.1) / m), mode="bicubic", align_corners=False)
    x = x + torch.cat([sd["pos_embed"][:, :1], grid.flatten(2).transpose(1, 2)], dim=1)
    h = cfg.heads
    for i in range(cfg.depth):
        p = f"blocks.{i}."
        y = F.layer_norm(x, (d,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-6)
        qkv = F.linear(y, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]).reshape(b, -1, 3, h, d // h)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) * (d // h) ** -0.5, dim=-1) @ v
        a = F.linear(a.transpose(1, 2).reshape(b, -1, d), sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        x = x + sd[p + "ls1.gamma"] * a
        y = F.layer_norm(x, (d,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], 1e-6)
        y = F.linear(F.gelu(F.linear(y, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                     sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        x = x + sd[p + "ls2.gamma"] * y
    x = F.layer_norm(x, (d,), sd["norm.weight"], sd["norm.bias"], 1e-6)
    return x[:, 1:]


def test_dinov2_strict_load_and_reference_forward(tmp_path):
    model, sd = small_test_dinov2(depth=1, embed_dim=24, heads=3, seed=1)
    torch.save(sd, tmp_path / "dino.pth")
    loaded = load_dinov2(str(tmp_path / "dino.pth"), config=model.config)
    assert not loaded.training and all(not p.requires_grad for p in loaded.parameters())
    images = torch.rand(2, 3, 61, 77)
    with torch.no_grad():
        out = loaded(images)
        assert out.shape == (2, 16, 24)
        torch.testing.assert_close(out, ref_dino_patch_tokens(sd, model.config, images), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out, model(images), rtol=0, atol=0)
        # Normalisation matters: unnormalised input gives different tokens.
        raw = loaded.forward_features(F.interpolate(images, size=(56, 56), mode="bicubic"))[:, 1:]
        assert (raw - out).abs().max() > 1e-2


def test_dinov2_already_sized_input_and_same_grid():
    model, sd = small_test_dinov2(img_size=56, input_size=56, seed=2)
    torch.testing.assert_close(model.pos_embed_resized, sd["pos_embed"], rtol=0, atol=0)
    images = torch.rand(1, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(model(images), ref_dino_patch_tokens(sd, model.config, images),
                                   rtol=1e-4, atol=1e-4)


def test_dinov2_pos_cache_follows_loaded_weights():
    model, sd = small_test_dinov2(seed=3)
    _, other = small_test_dinov2(seed=4)
    before = model.pos_embed_resized.clone()
    model.load_state_dict(other)
    assert model.pos_embed_resized.shape == (1, 1 + 16, 32)
    assert not torch.allclose(before, model.pos_embed_resized)
    with torch.no_grad():
        images = torch.rand(1, 3, 40, 40)
        torch.testing.assert_close(model(images), ref_dino_patch_tokens(other, model.config, images),
                                   rtol=1e-4, atol=1e-4)


def test_dinov2_accepted_layouts(tmp_path):
    model, sd = small_test_dinov2(seed=5)
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        want = model(images)
    timm_like = {f"module.{k}": v for k, v in sd.items() if k != "mask_token"}
    save_file(timm_like, str(tmp_path / "dino.safetensors"))
    loaded = load_dinov2(str(tmp_path / "dino.safetensors"), config=model.config)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), want, rtol=0, atol=0)


def test_dinov2_errors(tmp_path):
    model, sd = small_test_dinov2(seed=6)
    with pytest.raises(FileNotFoundError):
        load_dinov2(str(tmp_path / "nope.pth"), config=model.config)
    bad = dict(sd)
    bad["register_tokens"] = torch.zeros(1, 4, 32)
    bad["blocks.0.ls1.scale"] = bad.pop("blocks.0.ls1.gamma")
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"missing keys \(1\): blocks.0.ls1.gamma") as err:
        load_dinov2(str(tmp_path / "bad.pth"), config=model.config)
    assert "register_tokens" in str(err.value)
    torch.save(sd, tmp_path / "good.pth")
    with pytest.raises(ValueError, match="shape mismatches"):
        load_dinov2(str(tmp_path / "good.pth"), config=DinoV2Config(32, 2, 2, 14, 126, 56))


def test_dinov2_vitb14_layout():
    model = DinoV2()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["pos_embed"] == (1, 1 + 37 * 37, 768)
    assert shapes["cls_token"] == (1, 1, 768) and shapes["mask_token"] == (1, 768)
    assert shapes["patch_embed.proj.weight"] == (768, 3, 14, 14)
    assert shapes["blocks.11.attn.qkv.weight"] == (3 * 768, 768)
    assert shapes["blocks.11.mlp.fc1.weight"] == (4 * 768, 768)
    assert shapes["blocks.0.ls2.gamma"] == (768,)
    assert len(shapes) == 3 + 2 + 12 * 14 + 2
    assert model.pos_embed_resized.shape == (1, 257, 768)
