"""The engine seam (engine/engines.py): each engine hands previews the EMA weights, on the schedule it can serve
(every preview step on one process, the next checkpoint under ZeRO), and records itself in its checkpoints."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import TensorDataset

from semanticist_fast.common.distributed import close
from semanticist_fast.common.runs import checkpoint_dir, read_meta
from semanticist_fast.engine.checkpoint import consolidated_slices
from semanticist_fast.engine.train_config import OptimConfig, TrainConfig
from semanticist_fast.engine.engines import init_world
from semanticist_fast.engine.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
STEPS, CKPT_EVERY, PREVIEW_EVERY = 16, 5, 3  # checkpoints at 5, 10, 15, 16


class RegressionTask:
    """A small MLP fitting a sum; its BatchNorm has buffers (statistics), which the EMA does not average. (Before
    the first layer: after one, that layer's bias would get no gradient but rounding noise, which AdamW scales up.)"""
    kind = "regression"

    def __init__(self):
        torch.manual_seed(0)
        self.model = self.new_model()
        self.previews: dict[int, dict[str, torch.Tensor]] = {}

    def new_model(self) -> nn.Module:
        return nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 16), nn.GELU(), nn.Linear(16, 1))

    def loss(self, model, batch, step, epoch, rng):
        x, y = batch
        loss = (model(x) - y).square().mean()
        return loss, {"loss": loss.detach()}

    def preview(self, model, step, path):
        assert not model.training
        self.previews[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_and_preview(engine: str, out: Path) -> dict[int, dict[str, torch.Tensor]]:
    """Two epochs of 8 steps (2 micro-batches each) on `engine`; the previews, by step."""
    world = init_world(engine, "cpu", 60.0)
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    train = TrainConfig(batch_size=8, micro_batch_size=4, engine=engine, epochs=2, log_every=1,
                        ckpt_every=CKPT_EVERY, preview_every=PREVIEW_EVERY, keep_checkpoints=4, ema_decay=0.5,
                        num_workers=0, precision="fp32", progress=False, device="cpu")
    task = RegressionTask()
    Trainer(task, TensorDataset(x, x.sum(1, keepdim=True)), train, OptimConfig(lr=3e-2, warmup_epochs=0), out, {},
            world).fit()
    return task.previews


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    single = tmp_path_factory.mktemp("single")
    zero = tmp_path_factory.mktemp("zero")
    code = ("import sys, torch, test_engine_seam as t; "
            "torch.save(t.train_and_preview('deepspeed', t.Path(sys.argv[1])), sys.argv[1] + '/previews.pt'); "
            "t.close()")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "OMP_NUM_THREADS": "2",
           "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}
    r = subprocess.run([sys.executable, "-c", code, str(zero)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return {"single": (single, train_and_preview("single", single)),
            "deepspeed": (zero, torch.load(zero / "previews.pt"))}


def test_previews_come_at_every_preview_step_alone_and_at_the_next_checkpoint_under_zero(runs):
    assert sorted(runs["single"][1]) == [3, 6, 9, 12, 15]
    assert sorted(runs["deepspeed"][1]) == [5, 10, 15]  # the first checkpoint on or after steps 3, 6 and 9, 12


@pytest.mark.parametrize("engine", ["single", "deepspeed"])
def test_a_preview_runs_the_ema_weights_with_the_models_buffers(engine, runs):
    out, previews = runs[engine]
    ckpt = checkpoint_dir(out, 15)
    ema, weights = consolidated_slices(ckpt, "ema"), consolidated_slices(ckpt, "param")
    saved = load_file(str(ckpt / "ema.safetensors"))  # the EMA and the model's buffers, as inference loads them
    preview = previews[15]
    assert preview.keys() == saved.keys()
    for name, value in preview.items():
        torch.testing.assert_close(value, saved[name], rtol=0, atol=0, msg=name)
        if name in ema:
            torch.testing.assert_close(value.flatten(), ema[name].flatten(), rtol=0, atol=0, msg=name)
    # The averages lag the trained weights (decay 0.5), so a preview of the trained model would fail above.
    assert any(not torch.equal(ema[n], weights[n]) for n in ema)
    assert read_meta(ckpt)["engine"] == engine
    assert read_meta(ckpt)["zero_stage"] == (2 if engine == "deepspeed" else None)


def test_both_engines_preview_the_same_ema(runs):
    single, zero = runs["single"][1][15], runs["deepspeed"][1][15]
    for name in single:
        torch.testing.assert_close(zero[name], single[name], rtol=1e-5, atol=1e-6, msg=name)
