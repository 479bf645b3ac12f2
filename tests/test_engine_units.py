"""Engine pieces in isolation: LR schedule, EMA, crash-safe checkpoint files, checkpoint rotation, AdamW groups."""
import math
import os

import pytest
import torch
import torch.nn as nn

from semanticist_fast.common.files import atomic_torch_save, atomic_write_text
from semanticist_fast.common.runs import checkpoint_path, latest_checkpoint, list_checkpoints, load_checkpoint
from semanticist_fast.engine.checkpoint import prune_checkpoints
from semanticist_fast.models.weights import check_state_fits, load_model_state
from semanticist_fast.engine.ema import EMA
from semanticist_fast.engine.optimizer import build_adamw, param_groups
from semanticist_fast.engine.schedule import lr_at


# ---- learning-rate schedule ----

def test_lr_warmup_then_cosine_to_min_lr():
    base, warmup, total, min_lr = 1e-3, 10, 110, 1e-5
    lrs = [lr_at(s, base, warmup, total, "cosine", min_lr) for s in range(total + 5)]
    for s in range(warmup):  # linear from base/warmup up to base
        assert lrs[s] == pytest.approx(base * (s + 1) / warmup)
    assert lrs[warmup] == pytest.approx(base)
    for s in range(warmup, total + 1):
        progress = (s - warmup) / (total - warmup)
        assert lrs[s] == pytest.approx(min_lr + (base - min_lr) * 0.5 * (1 + math.cos(math.pi * progress)))
    assert lrs[total] == pytest.approx(min_lr)
    assert lrs[(warmup + total) // 2] == pytest.approx((base + min_lr) / 2)  # half way down the half-cosine
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))  # never rises after warmup
    assert all(lr == pytest.approx(min_lr) for lr in lrs[total:])  # stays at min_lr past the end


def test_lr_without_warmup_and_constant():
    assert lr_at(0, 2.0, 0, 100) == pytest.approx(2.0)
    assert lr_at(100, 2.0, 0, 100) == pytest.approx(0.0)
    for s in (0, 4):
        assert lr_at(s, 0.5, 5, 100, "constant") == pytest.approx(0.5 * (s + 1) / 5)
    for s in (5, 50, 100, 1000):
        assert lr_at(s, 0.5, 5, 100, "constant", min_lr=0.1) == 0.5
    # Warmup as long as the run: decay_steps clamps to 1 instead of dividing by zero.
    assert lr_at(10, 1.0, 10, 10) == pytest.approx(1.0)


# ---- EMA ----

class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3)
        self.norm = nn.BatchNorm1d(3)


def test_ema_matches_closed_form():
    torch.manual_seed(0)
    model = _Toy()
    decay = 0.9
    ema = EMA(model, decay)
    assert all(not p.requires_grad for p in ema.model.parameters())
    assert not ema.model.training
    expected = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    for _ in range(7):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g))
            model.norm.running_mean.add_(1.0)
        ema.update()
        for n, p in model.named_parameters():
            expected[n] = decay * expected[n] + (1 - decay) * p.detach().double()
    for n, p in ema.model.named_parameters():
        torch.testing.assert_close(p.double(), expected[n], rtol=1e-5, atol=1e-6)
    # Buffers are copied, not averaged.
    torch.testing.assert_close(ema.model.norm.running_mean, model.norm.running_mean)
    assert ema.model.norm.num_batches_tracked == model.norm.num_batches_tracked


def test_ema_of_constant_weights_after_n_steps():
    torch.manual_seed(2)
    model = nn.Linear(4, 4)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema = EMA(model, decay=0.99)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-2.0).add_(3.0)
    n = 25
    for _ in range(n):
        ema.update()
    for name, p in ema.model.named_parameters():
        target = dict(model.named_parameters())[name].detach()
        closed = target + 0.99 ** n * (start[name] - target)
        torch.testing.assert_close(p, closed, rtol=1e-5, atol=1e-6)


def test_ema_state_dict_round_trip():
    model = nn.Linear(3, 2)
    ema = EMA(model, 0.5)
    other = EMA(nn.Linear(3, 2), 0.5)
    other.load_state_dict(ema.state_dict())
    for a, b in zip(ema.model.parameters(), other.model.parameters()):
        assert torch.equal(a, b)


# ---- crash-safe files ----

class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("simulated crash while writing")


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_atomic_torch_save_writes_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "sub" / "state.pt"
    atomic_torch_save({"w": torch.arange(5)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(5))
    atomic_torch_save({"w": torch.arange(3)}, path)  # replacing works too
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(3))
    assert os.listdir(path.parent) == ["state.pt"]


def test_interrupted_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "state.pt"
    atomic_torch_save({"w": torch.ones(4)}, path)
    with pytest.raises(RuntimeError, match="simulated crash"):
        atomic_torch_save({"w": torch.zeros(4), "bad": _Unpicklable()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(4))
    assert _leftovers(tmp_path) == [] and os.listdir(tmp_path) == ["state.pt"]

    text = tmp_path / "config.yaml"
    atomic_write_text(text, "a: 1\n")
    with pytest.raises(AttributeError):
        atomic_write_text(text, None)  # fails inside the writer
    assert text.read_text() == "a: 1\n"
    assert _leftovers(tmp_path) == []


def test_interrupted_first_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        atomic_torch_save(_Unpicklable(), tmp_path / "new.pt")
    assert os.listdir(tmp_path) == []


# ---- checkpoint rotation ----

def _touch_ckpts(out, steps):
    for s in steps:
        p = checkpoint_path(out, s)
        p.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"step": s}, p)


def test_checkpoint_listing_and_latest(tmp_path):
    assert list_checkpoints(tmp_path) == [] and latest_checkpoint(tmp_path) is None
    assert checkpoint_path(tmp_path, 42).name == "ckpt-00000042.pt"
    _touch_ckpts(tmp_path, [1000, 20, 300, 100000000])
    folder = tmp_path / "checkpoints"
    for name in ("ckpt-abc.pt", ".ckpt-00000500.pt.x1y2.tmp", "ckpt-00000007.pt.bak", "notes.txt"):
        (folder / name).write_text("x")
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["ckpt-00000020.pt", "ckpt-00000300.pt", "ckpt-00001000.pt", "ckpt-100000000.pt"]
    assert latest_checkpoint(tmp_path).name == "ckpt-100000000.pt"
    assert load_checkpoint(tmp_path)["step"] == 100000000  # a run directory loads its newest checkpoint
    assert load_checkpoint(checkpoint_path(tmp_path, 20))["step"] == 20


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        load_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_prune_keeps_the_newest(tmp_path):
    _touch_ckpts(tmp_path, [5, 10, 15, 20, 25])
    (tmp_path / "checkpoints" / "other.pt").write_text("x")
    prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000020.pt", "ckpt-00000025.pt"]
    assert (tmp_path / "checkpoints" / "other.pt").exists()
    prune_checkpoints(tmp_path, keep=5)
    assert len(list_checkpoints(tmp_path)) == 2
    prune_checkpoints(tmp_path, keep=0)  # 0 = keep everything
    assert len(list_checkpoints(tmp_path)) == 2
    prune_checkpoints(tmp_path / "nowhere", keep=1)


def test_strict_state_loading_names_keys():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    load_model_state(model, state)
    bad = dict(state)
    bad["2.weight"] = torch.ones(1)
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): 2\.weight"):
        check_state_fits(model, bad)
    bad = dict(state)
    del bad["1.bias"]
    with pytest.raises(ValueError, match=r"missing keys \(1\): 1\.bias"):
        load_model_state(model, bad)
    bad = dict(state)
    bad["0.weight"] = torch.ones(4, 2)
    with pytest.raises(ValueError, match=r"0\.weight: file \(4, 2\) vs model \(4, 3\)"):
        load_model_state(model, bad)


# ---- optimizer groups ----

def test_param_groups_decay_matrices_only():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Linear(4, 5), nn.LayerNorm(5))
    extra = nn.Parameter(torch.zeros(1, 7, 5))  # a 3-D embedding, like pos_embed or null_cond
    frozen = nn.Parameter(torch.zeros(5, 5), requires_grad=False)
    model.register_parameter("embed", extra)
    model.register_parameter("frozen", frozen)
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(decay["params"]) == ids([model[0].weight, model[1].weight, extra])
    assert ids(no_decay["params"]) == ids([model[0].bias, model[1].bias, model[2].weight, model[2].bias])
    assert id(frozen) not in ids(decay["params"]) | ids(no_decay["params"])


def test_build_adamw_groups_and_step():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = build_adamw(model, lr=0.1, betas=(0.8, 0.9), weight_decay=0.5)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.5, 0.0]
    assert all(g["lr"] == 0.1 and g["betas"] == (0.8, 0.9) for g in opt.param_groups)
    before = model.bias.detach().clone()
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    # First AdamW step moves each parameter by lr * sign(grad) (bias has no decay).
    torch.testing.assert_close(model.bias.detach(), before - 0.1 * torch.sign(model.bias.grad), rtol=1e-4, atol=1e-5)

