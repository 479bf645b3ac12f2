"""Engine pieces in isolation: LR schedule, EMA, crash-safe files, checkpoint folders and rotation, AdamW groups."""
import math
import os

import pytest
import torch
import torch.nn as nn

from semanticist_fast.common.files import atomic_torch_save, atomic_write_text
from semanticist_fast.common.runs import CheckpointError, checkpoint_dir, list_checkpoints, resolve_checkpoint
from semanticist_fast.engine.checkpoint import prune_checkpoints, remove_orphans
from semanticist_fast.engine.ema import EMA
from semanticist_fast.engine.optimizer import LocalOptimizerStep, build_adamw, param_groups
from semanticist_fast.engine.shard import Fragment, copy_overlaps
from semanticist_fast.models.weights import check_state_fits, load_model_state
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

def _ema_of(model: nn.Module, decay: float) -> tuple[EMA, list[torch.Tensor]]:
    shard = LocalOptimizerStep(model, 1e-3, (0.9, 0.95), 0.0, 1.0).shard()
    shadows = [torch.empty_like(f.master) for f in shard.fragments]
    return EMA(shard.fragments, decay, shadows), shadows


def test_ema_matches_closed_form():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3), nn.LayerNorm(3))
    decay = 0.9
    ema, shadows = _ema_of(model, decay)
    expected = [p.detach().double().clone() for p in model.parameters()]
    for s, p in zip(shadows, model.parameters()):
        assert torch.equal(s.view_as(p), p)  # the averages start at the weights
    g = torch.Generator().manual_seed(1)
    for _ in range(7):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g))
        ema.update()
        expected = [decay * e + (1 - decay) * p.detach().double() for e, p in zip(expected, model.parameters())]
    for s, e in zip(shadows, expected):
        torch.testing.assert_close(s.double().view_as(e), e, rtol=1e-5, atol=1e-6)


def test_ema_of_constant_weights_after_n_steps():
    torch.manual_seed(2)
    model = nn.Linear(4, 4)
    start = [p.detach().clone() for p in model.parameters()]
    ema, shadows = _ema_of(model, 0.99)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-2.0).add_(3.0)
    n = 25
    for _ in range(n):
        ema.update()
    for s, p, s0 in zip(shadows, model.parameters(), start):
        closed = p.detach() + 0.99 ** n * (s0 - p.detach())
        torch.testing.assert_close(s.view_as(p), closed, rtol=1e-5, atol=1e-6)


def test_ema_over_slices_equals_the_whole():
    """Under ZeRO each rank averages a slice; put together, the slices are the average of the whole."""
    torch.manual_seed(3)
    weights = torch.randn(10)
    whole = EMA([Fragment("w", (10,), 0, weights, None)], 0.8, [torch.empty(10)])
    pieces = [EMA([Fragment("w", (10,), a, weights[a:b], None)], 0.8, [torch.empty(b - a)]) for a, b in ((0, 3), (3, 10))]
    for _ in range(5):
        weights.add_(torch.randn(10))
        whole.update()
        for e in pieces:
            e.update()
    joined = torch.zeros(10)
    assert copy_overlaps(joined, 0, [(e.fragments[0].start, e.shadows[0]) for e in pieces]) == 10
    torch.testing.assert_close(joined, whole.shadows[0], rtol=0, atol=0)


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


# ---- checkpoint folders ----

def _fake_ckpts(out, steps):
    for step in steps:
        checkpoint_dir(out, step).mkdir(parents=True)


def test_checkpoint_listing_in_step_order(tmp_path):
    assert list_checkpoints(tmp_path) == []
    assert checkpoint_dir(tmp_path, 42).name == "ckpt-00000042"
    _fake_ckpts(tmp_path, [1000, 20, 300, 100000000])
    folder = tmp_path / "checkpoints"
    torch.save({"step": 7}, folder / "ckpt-00000007.pt")  # a checkpoint of an earlier version: still listed
    for name in ("ckpt-abc", ".tmp-ckpt-00000500", "ckpt-00000009.pt.bak", "notes.txt", "unreadable-ckpt-00000011"):
        (folder / name).write_text("x")
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["ckpt-00000007.pt", "ckpt-00000020", "ckpt-00000300", "ckpt-00001000", "ckpt-100000000"]


def test_resolve_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_checkpoint(tmp_path / "missing.safetensors")
    _fake_ckpts(tmp_path, [5])  # a folder without meta.json
    with pytest.raises(CheckpointError, match="meta.json is missing"):
        resolve_checkpoint(tmp_path)


def test_prune_keeps_the_newest(tmp_path):
    _fake_ckpts(tmp_path, [5, 10, 15, 20, 25])
    (tmp_path / "checkpoints" / "other.pt").write_text("x")
    prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000020", "ckpt-00000025"]
    assert (tmp_path / "checkpoints" / "other.pt").exists()
    prune_checkpoints(tmp_path, keep=5)
    assert len(list_checkpoints(tmp_path)) == 2
    prune_checkpoints(tmp_path, keep=0)  # 0 = keep everything
    assert len(list_checkpoints(tmp_path)) == 2
    prune_checkpoints(tmp_path / "nowhere", keep=1)


def test_orphans_of_a_killed_write_are_removed(tmp_path):
    _fake_ckpts(tmp_path, [4])
    folder = tmp_path / "checkpoints"
    (folder / ".tmp-ckpt-00000008" / "state").mkdir(parents=True)
    (folder / ".ckpt-00000008.pt.x1y2.tmp").write_text("torn")  # from an earlier version's single-file writes
    removed = remove_orphans(tmp_path)
    assert sorted(p.name for p in removed) == [".ckpt-00000008.pt.x1y2.tmp", ".tmp-ckpt-00000008"]
    assert [p.name for p in folder.iterdir()] == ["ckpt-00000004"]


def test_copy_overlaps_assembles_any_split():
    whole = torch.arange(12.0)
    saved = [(0, whole[0:5]), (5, whole[5:7]), (7, whole[7:12])]  # as 3 ranks saved it
    for start, end in ((0, 12), (0, 6), (6, 12), (4, 9)):  # as other ranks need it
        target = torch.zeros(end - start)
        assert copy_overlaps(target, start, saved) == end - start
        assert torch.equal(target, whole[start:end])


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



def test_a_non_finite_step_changes_nothing():
    """The guard: a step whose gradient norm is not finite leaves weights, moments and the step count as they were."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    step = LocalOptimizerStep(model, 0.1, (0.9, 0.95), 0.05, 1.0)
    step.backward(model(torch.randn(4, 3)).pow(2).mean())
    assert torch.isfinite(step.step(0.1))
    shard = step.shard()
    before = [(f.master.clone(), f.moment("exp_avg").clone(), f.moment("exp_avg_sq").clone()) for f in shard.fragments]
    step.backward(model(torch.full((4, 3), float("nan"))).mean())
    assert not torch.isfinite(step.step(0.1))
    assert shard.optimizer_steps() == 1
    for f, (w, m, v) in zip(shard.fragments, before):
        assert torch.equal(f.master, w) and torch.equal(f.moment("exp_avg"), m) and torch.equal(f.moment("exp_avg_sq"), v)
    step.backward(model(torch.randn(4, 3)).pow(2).mean())  # and the next good step applies again
    assert torch.isfinite(step.step(0.1)) and shard.optimizer_steps() == 2
    assert not torch.equal(shard.fragments[0].master, before[0][0])
