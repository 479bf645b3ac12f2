"""The tokenizer's training loss (SemanticistTokenizer.forward_loss, through TokenizerTask.loss) against a plain
reference written out here from the published recipe: nested dropout with a plain torch.where, the ADM hybrid loss
(or velocity MSE) on the diffusion chain, REPA as a negative cosine similarity. Same draws, same order: bit for bit."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from semanticist_fast.common.noise import BatchNoise
from semanticist_fast.diffusion.flow import RectifiedFlow
from semanticist_fast.diffusion.gaussian import GaussianDiffusion
from semanticist_fast.models.latent_codec import PixelCodec
from semanticist_fast.tasks.tokenizer_stage import TokenizerTask
from helpers import micro_tokenizer_run, randomized

BATCH, TEACHER_DIM = 8, 24


class PatchTeacher(nn.Module):
    """A frozen stand-in for DINOv2: an 8x8 grid of TEACHER_DIM-d patch features, finer than the DiT's 4x4 grid (so
    REPA upsamples the DiT's grid, as at 256 px)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, TEACHER_DIM, kernel_size=2, stride=2)

    def forward(self, images):
        return self.proj(images).flatten(2).transpose(1, 2)


def reference_loss(model, process, images, teacher, step, epoch, rng):
    """The loss as the published recipe computes it, with the model's parts called one by one."""
    with torch.no_grad():
        latents = images * 2 - 1  # the pixel codec
        target = None if teacher is None else teacher(images)
    tokens = model.encode(images, rng)
    K = tokens.shape[1]
    nesting = epoch >= model.cfg.nested.enable_nest_after if model.cfg.nested.unit == "epoch" \
        else step >= model.cfg.nested.enable_nest_after
    drawn = rng.randint(1, K + 1, BATCH)
    keep = drawn if nesting else torch.full_like(drawn, K)
    keep = torch.where(rng.rand(BATCH) < model.cfg.nested.full_drop_prob, torch.zeros_like(keep), keep)
    kept = torch.arange(K)[None, :, None] < keep[:, None, None]
    slots = torch.where(kept, tokens, model.dit.null_cond.expand_as(tokens))
    projected = {}

    def denoiser(x_t, t):
        out, projected["repa"] = model.dit(x_t, t, slots, return_repa=True)
        return out

    terms = process.training_losses(denoiser, latents, rng=rng)
    loss = terms["loss"].mean()
    metrics = {"mse": terms["mse"].mean()}
    if "vb" in terms:
        metrics["vb"] = terms["vb"].mean()
    if target is not None:
        p = projected["repa"]
        g, G = int(p.shape[1] ** 0.5), int(target.shape[1] ** 0.5)
        grid = p.transpose(1, 2).reshape(BATCH, -1, g, g).float()
        p = F.interpolate(grid, size=(G, G), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
        cos = F.cosine_similarity(F.normalize(p.float(), dim=-1), F.normalize(target.float(), dim=-1), dim=-1)
        metrics["repa"] = -cos.mean(dim=1).mean()
        loss = loss + model.cfg.repa.weight * metrics["repa"]
    metrics["loss"] = loss
    return loss, metrics


@pytest.mark.parametrize("objective, repa, nesting", [("ddpm", True, True), ("ddpm", False, False),
                                                      ("flow", True, True)])
def test_task_loss_equals_reference_bit_for_bit(objective, repa, nesting):
    learn_sigma = objective == "ddpm"
    steps = "euler2" if objective == "flow" else "ddim5"
    run = micro_tokenizer_run(f"model.diffusion.objective={objective}", f"model.diffusion.sample_steps={steps}", f"model.decoder.learn_sigma={learn_sigma}",
                              "model.decoder.repa_block=1", "model.decoder.repa_proj_dim=32",
                              f"model.decoder.repa_target_dim={TEACHER_DIM}", "model.repa.weight=0.7",
                              "model.encoder.drop_path=0.2", "model.nested.full_drop_prob=0.3",
                              "model.diffusion.flow_t_mean=-0.5")
    torch.manual_seed(0)
    teacher = PatchTeacher().requires_grad_(False) if repa else None
    task = TokenizerTask(run, torch.device("cpu"), None, codec=PixelCodec(), teacher=teacher)
    model = randomized(task.new_model(), seed=1).train()
    images = torch.rand(BATCH, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    step, epoch = (10, 3) if nesting else (0, 0)
    d = run.model.diffusion
    process = RectifiedFlow(d.flow_t_mean, d.flow_t_std) if objective == "flow" else \
        GaussianDiffusion.create(d.num_timesteps, d.noise_schedule, learn_sigma=learn_sigma)

    loss, metrics = task.loss(model, (images, torch.zeros(BATCH, dtype=torch.long)), step, epoch,
                              BatchNoise(3, BATCH, slice(None), "cpu"))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    ref_loss, ref_metrics = reference_loss(model, process, images, teacher, step, epoch,
                                           BatchNoise(3, BATCH, slice(None), "cpu"))
    ref_loss.backward()

    assert set(metrics) == set(ref_metrics) == {"loss", "mse"} | ({"vb"} if learn_sigma else set()) \
        | ({"repa"} if repa else set())
    for name in ref_metrics:
        assert torch.equal(metrics[name], ref_metrics[name]), name
    assert grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.equal(grads[name], p.grad), name
    # The draws reached the model: the nulled slots' gradient shows which samples dropped what.
    assert grads["dit.null_cond"].abs().sum() > 0
    if repa:
        assert grads["dit.projector.0.weight"].abs().sum() > 0


def test_decoding_from_a_prefix_takes_the_training_path():
    """Decoding from the first k tokens (keep = k, CFG's branch keep = 0) is the plain masking of training: slots from
    k on are the null slots whatever the tokens there hold, and the guided output is uncond + g * (cond - uncond)."""
    run = micro_tokenizer_run("model.diffusion.objective=ddpm", "model.diffusion.sample_steps=ddim5")
    model = randomized(TokenizerTask(run, torch.device("cpu"), None, codec=PixelCodec()).new_model(), seed=4).eval()
    g = torch.Generator().manual_seed(5)
    tokens, x = torch.randn(3, 4, 16, generator=g), torch.randn(3, 3, 16, 16, generator=g)
    t, keep = torch.tensor([10, 500, 999]), torch.tensor([0, 2, 4])
    null = model.dit.null_cond.expand_as(tokens)
    slots = torch.where(torch.arange(4)[None, :, None] < keep[:, None, None], tokens, null)
    with torch.no_grad():
        cond, uncond = model.dit(x, t, slots), model.dit(x, t, null.contiguous())
        guided = model.dit.forward_guided(x, t, tokens, 2.5, keep)
        garbage = torch.where(torch.arange(4)[None, :, None] < keep[:, None, None], tokens, torch.randn_like(tokens))
        assert torch.equal(model.dit(x, t, garbage, keep), cond)
    C = model.dit.in_channels
    torch.testing.assert_close(guided[:, :C], uncond[:, :C] + 2.5 * (cond[:, :C] - uncond[:, :C]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(guided[:, C:], cond[:, C:], rtol=1e-6, atol=1e-6)  # the learned variance comes from the conditional branch


def test_a_repa_target_without_a_projector_names_the_setting():
    run = micro_tokenizer_run("model.decoder.repa_block=0")
    model = TokenizerTask(run, torch.device("cpu"), None, codec=PixelCodec()).new_model()
    images = torch.rand(2, 3, 16, 16)
    with pytest.raises(ValueError, match="model.decoder.repa_block=0 is outside the DiT's 1 blocks"):
        model.forward_loss(images, images * 2 - 1, RectifiedFlow(), 0, 0, repa_target=torch.randn(2, 64, 8))
