"""The GPU-only paths, held on the CPU where their behaviour shows without a GPU (issue 28): the AOTI loader under
CUDA graphs, the sampling precision, the ZeRO step's host syncs, the flash dispatch under compile, DINOv2's fp32
constants. The tests marked `cuda` run only on a GPU: benchmarks/gpu_suite.sh runs each as a step.
"""
import warnings

import pytest
import torch

from semanticist_fast.engine.zero import DeepSpeedOptimizerStep
from semanticist_fast.export import runtime

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run by benchmarks/gpu_suite.sh)")


# ---- 1. AOTI packages under CUDA graphs ---------------------------------------------------------------------------
def _manifest():
    inputs = [{"shape": [2, 3], "dtype": "float32"}] * 3
    return {"compiled": True, "programs": {name: {"file": f"{name}.pt2", "inputs": inputs}
                                           for name in ("ar_prefill", "ar_decode", "head_step", "latent_decode")}}


@pytest.mark.parametrize("graphs", [True, False])
def test_packages_load_single_threaded_exactly_when_graphed(monkeypatch, tmp_path, graphs):
    calls = []

    def fake_load(path, run_single_threaded=False, device_index=-1):
        calls.append((path, run_single_threaded))
        return lambda *args: args[0]

    monkeypatch.setattr(torch._inductor, "aoti_load_package", fake_load)
    programs = runtime.load_programs(tmp_path, _manifest(), graphs)
    assert [flag for _, flag in calls] == [graphs] * 4
    assert {path for path, _ in calls} == {str(tmp_path / f"{n}.pt2") for n in _manifest()["programs"]}
    graphed = {name for name, p in programs.items() if isinstance(p, runtime.GraphedCall)}
    assert graphed == ({"ar_prefill", "ar_decode", "head_step"} if graphs else set())


# ---- 3. the ZeRO step leaves the norm (and the skip it carries) on the device -------------------------------------
class _CountingTensor(torch.Tensor):
    """A grad norm that counts every conversion to a Python value (each one a device-to-host sync on a GPU)."""
    reads = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.__bool__, torch.Tensor.item, torch.Tensor.__float__, torch.Tensor.tolist):
            cls.reads += 1
        return super().__torch_function__(func, types, args, kwargs or {})


class _FakeZeroOptimizer:
    def __init__(self):
        self.param_groups = [{"lr": 0.0}]
        self.overflow_reads = 0

    @property
    def overflow(self):
        self.overflow_reads += 1
        return False


class _FakeEngine:
    def __init__(self, norm):
        self.norm, self.steps = norm, 0

    def step(self):
        self.steps += 1

    def get_global_grad_norm(self):
        return self.norm


def _zero_step(norm):
    step = object.__new__(DeepSpeedOptimizerStep)  # DeepSpeed itself is not needed to call step()
    step.engine, step.zero_optimizer, step.device = _FakeEngine(norm), _FakeZeroOptimizer(), torch.device("cpu")
    return step


def test_zero_step_returns_the_device_norm_without_a_host_read():
    _CountingTensor.reads = 0
    norm = torch.tensor(2.5).as_subclass(_CountingTensor)
    step = _zero_step(norm)
    out = [step.step(lr=1e-3) for _ in range(5)]
    assert step.engine.steps == 5 and step.zero_optimizer.param_groups[0]["lr"] == 1e-3
    assert step.zero_optimizer.overflow_reads == 0 and _CountingTensor.reads == 0
    assert all(o.dtype == torch.float32 and float(o) == 2.5 for o in out)


def test_zero_step_reports_a_skipped_step_as_an_infinite_norm():
    out = _zero_step(float("inf")).step(lr=1e-3)  # what DeepSpeed stores when it skipped the step
    assert out.dtype == torch.float32 and torch.isinf(out)
    with pytest.raises(RuntimeError, match="compute_grad_norm"):
        _zero_step(None).step(lr=1e-3)


# ---- 6. a bf16 teacher keeps DINOv2's fp32 constants --------------------------------------------------------------
def test_bf16_teacher_keeps_fp32_preprocessing_and_position_embedding():
    from semanticist_fast.models.dinov2 import IMAGENET_MEAN, IMAGENET_STD, small_test_dinov2

    model, _ = small_test_dinov2()
    pos_fp32 = model.pos_embed_resized.clone()
    assert pos_fp32.shape[1] != model.pos_embed.shape[1]  # resampled (56 px input, 98 px stored grid)
    model.to(torch.bfloat16)  # what the tokenizer task does to its teacher on a GPU
    assert model.patch_embed.proj.weight.dtype == torch.bfloat16 and model.pos_embed.dtype == torch.bfloat16
    assert model.image_mean.dtype == model.image_std.dtype == model.pos_embed_resized.dtype == torch.float32
    torch.testing.assert_close(model.pos_embed_resized, pos_fp32, rtol=0, atol=0)
    # The official preprocessing: bicubic resize, then torchvision's Normalize with the fp32 ImageNet constants.
    images = torch.rand(2, 3, 70, 70, generator=torch.Generator().manual_seed(0))
    resized = torch.nn.functional.interpolate(images, size=(56, 56), mode="bicubic")
    expected = (resized - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(model.preprocess(images), expected, rtol=0, atol=0)
    model.to(torch.float32)  # a later cast back leaves the constants as they were
    torch.testing.assert_close(model.pos_embed_resized, pos_fp32, rtol=0, atol=0)
