"""`semanticist-fast plan` against what the runs it plans measure on this machine.

Memory is measured independently of the planner's tracer: torch.profiler's allocation events (profile_memory)
are the CPU allocator's own reports of every allocation and free of the real step, so their running sum is the
bytes the step really held; the planner's figure comes from fake tensors that never touch that allocator. The
state (weights, EMA, AdamW moments) is read off the real objects after the first step, the step's own memory
(activations, gradients, temporaries) from the profiled second step: a steady-state step, moments already there.
"""
import copy
import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from semanticist_fast.common.noise import BatchNoise
from semanticist_fast.common.seeds import NOISE_STREAM, derive_seed
from semanticist_fast.config import load_config
from semanticist_fast.engine.engines import init_world
from semanticist_fast.engine.ema import EMA
from semanticist_fast.engine.optimizer import LocalOptimizerStep
from semanticist_fast.engine.trainer import Trainer
from semanticist_fast.plan import planner
from semanticist_fast.tasks import spec_for_file
from semanticist_fast.tasks.autoregressive_stage import ARTask
from semanticist_fast.tasks.tokenizer_stage import TokenizerTask

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_TINY = ROOT / "configs" / "tokenizer_tiny.yaml"
AR_TINY = ROOT / "configs" / "autoregressive_tiny.yaml"
# A larger pixel tokenizer, trained in two micro-steps per optimizer step (gradients held across them).
SMALL = ["model.image_size=64", "model.encoder.dim=128", "model.encoder.num_slots=16", "model.decoder.hidden=128",
         "train.batch_size=16", "train.grad_accum=2"]
# The issue asks for 15 %; the plans agree within bytes (one process, ZeRO-2), and a tolerance this tight fails a
# plan that forgets any one part of the state (the master weights are 11 % of the ZeRO runs' peak).
TOLERANCE = 0.05
CASES = {"tokenizer-tiny": (TOKENIZER_TINY, []), "ar-tiny": (AR_TINY, []), "tokenizer-small": (TOKENIZER_TINY, SMALL)}


def load(path, overrides=()):
    return load_config(spec_for_file(path).run_config, path, list(overrides))


def real_task(run):
    if run.kind == "tokenizer":
        return TokenizerTask(run, torch.device("cpu"), None)
    return ARTask(run, torch.device("cpu"), None)


def real_batch(run, m: int, generator: torch.Generator):
    if run.kind == "tokenizer":
        s = run.model.image_size
        return torch.rand(m, 3, s, s, generator=generator), torch.randint(0, 10, (m,), generator=generator)
    cfg = run.model
    return (torch.randn(m, cfg.num_tokens, cfg.token_dim, generator=generator),
            torch.randint(0, cfg.num_classes, (m,), generator=generator))


def storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def allocation_peak(prof) -> int:
    """The running peak of the allocator's reported allocations (+) and frees (-) during the profiled region."""
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.typed[0] == _EventType.Allocation:
            events.append((node.start_time_ns, node.typed[1].alloc_size))
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


def measure_real_step(run) -> dict:
    """Two optimizer steps of the real model, loss, AdamW and EMA as the single-process trainer builds them; the
    state's bytes after the first, the second step's allocation peak over that state."""
    torch.manual_seed(0)
    task = real_task(run)
    model = task.model.train()
    micro, accum = run.train.batch_plan(1)
    optimizer = LocalOptimizerStep(model, 1e-4, run.optim.betas, run.optim.weight_decay, run.optim.grad_clip, accum)
    ema_model = copy.deepcopy(model).eval().requires_grad_(False)
    shard = optimizer.shard()
    ema_params = dict(ema_model.named_parameters())
    ema = EMA(shard.fragments, 0.999, [ema_params[f.name] for f in shard.fragments])
    loss_fn = partial(task.loss, model)
    generator = torch.Generator().manual_seed(0)

    def step(step_index: int):
        for a in range(accum):
            batch = real_batch(run, micro, generator)
            rng = BatchNoise(derive_seed(0, NOISE_STREAM, step_index), run.train.batch_size,
                             slice(a * micro, (a + 1) * micro), "cpu")
            loss, _ = loss_fn(batch, 10 ** 6, 10 ** 6, rng)
            optimizer.backward(loss)
            del loss, batch, rng
        optimizer.step(1e-4)
        ema.update()

    step(0)
    moments = [v for state in optimizer.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    state = storage_bytes(list(model.state_dict().values()) + list(ema_model.state_dict().values()) + moments)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(1)
    return {"state": state, "step": allocation_peak(prof), "trained": sum(p.numel() for p in model.parameters()
                                                                          if p.requires_grad)}


@pytest.fixture(scope="module")
def measured():
    return {name: measure_real_step(load(path, overrides)) for name, (path, overrides) in CASES.items()}


@pytest.fixture(scope="module")
def plans():
    return {name: planner.make_plan(load(path, overrides), gpus=1, gpu="h100")
            for name, (path, overrides) in CASES.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_parameters_are_the_models(name, plans, measured):
    assert plans[name]["parameters"]["trained"] == measured[name]["trained"]


@pytest.mark.parametrize("name", list(CASES))
def test_memory_matches_a_real_step(name, plans, measured):
    mem, real = plans[name]["memory"], measured[name]
    state = sum(v for k, v in mem["state"].items() if k not in ("gradients", "offloaded_to_host"))
    step = mem["peak"] - state - mem["frozen_models"]  # activations, gradients, temporaries of the step
    assert state == pytest.approx(real["state"], rel=0.02), (state, real["state"])
    assert step == pytest.approx(real["step"], rel=TOLERANCE), (step, real["step"])
    assert mem["peak"] == pytest.approx(real["state"] + real["step"], rel=TOLERANCE)


def measure_deepspeed_step(stage: int) -> dict:
    """In a process of its own (a one-rank process group): the small run's two steps under DeepSpeed ZeRO-`stage`
    with small buckets, everything it allocates from the model's construction on profiled; and its plan."""
    from semanticist_fast.engine.zero import DeepSpeedOptimizerStep

    run = load(TOKENIZER_TINY, SMALL + DEEPSPEED + [f"train.zero_stage={stage}"])
    world = init_world("deepspeed", "cpu", 60.0)
    plan = planner.make_plan(run, gpus=world.size)
    torch.manual_seed(0)
    micro, accum = run.train.batch_plan(world.size)
    generator = torch.Generator().manual_seed(0)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        task = real_task(run)
        engine = DeepSpeedOptimizerStep(task.model, task.loss, run.train, run.optim, 1e-4, world.size, world.device)
        shard = engine.shard()
        ema = EMA(shard.fragments, 0.999, [f.master.detach().clone() for f in shard.fragments])  # as the trainer
        for step in range(2):
            for a in range(accum):
                batch = real_batch(run, micro, generator)
                rng = BatchNoise(derive_seed(0, NOISE_STREAM, step), run.train.batch_size,
                                 slice(a * micro, (a + 1) * micro), "cpu")
                loss, _ = engine.loss(batch, 10 ** 6, 10 ** 6, rng)
                engine.backward(loss)
                del loss, batch, rng
            engine.step(1e-4)
            ema.update()
    return {"measured": allocation_peak(prof), "planned": plan["memory"]["peak"]}


DEEPSPEED = ["train.engine=deepspeed", "train.zero.reduce_bucket_size=1000000",
             "train.zero.allgather_bucket_size=1000000", "train.zero.prefetch_bucket_size=1000000"]


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_memory_matches_a_real_deepspeed_step(stage):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "OMP_NUM_THREADS": "2"}
    code = f"import json, test_plan; print('RESULT', json.dumps(test_plan.measure_deepspeed_step({stage})))"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.split("RESULT", 1)[1])
    # ZeRO-3 gathers and releases parameters around each module as its prefetch runs ahead: its peak moves by a
    # few percent from run to run (377 to 411 MB here), so it is held to the 15 %.
    assert result["planned"] == pytest.approx(result["measured"], rel=TOLERANCE if stage < 3 else 0.15), result


def test_steps_per_epoch_are_the_trainers(tmp_path):
    for overrides in ([], ["data.num_items=1000", "train.batch_size=48"]):
        run = load(TOKENIZER_TINY, overrides)
        task, make_train_set = spec_for_file(TOKENIZER_TINY).build(run, tmp_path, torch.device("cpu"))
        world = init_world("single", "cpu", 60.0)
        trainer = Trainer(task, make_train_set(world), run.train, run.optim, tmp_path, {}, world)
        plan = planner.make_plan(run)
        assert plan["time"]["steps_per_epoch"] == trainer.steps_per_epoch


def test_the_published_tokenizer_plans_without_weights_or_data():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "semanticist_fast", "plan", "configs/tokenizer_l.yaml", "--gpus", "8",
                        "--gpu", "h100", "--json"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    plan = json.loads(r.stdout)
    assert plan["batch"] == {"global": 2048, "micro": 64, "accumulation": 4}
    assert plan["time"]["steps_per_epoch"] == 1_281_167 // 2048
    assert plan["disk"]["latent_cache"]["bytes_per_image"] == 320 * 1024  # ten-crop: 20 views x mean, logvar
    mem = plan["memory"]
    assert 0 < mem["activations_peak"] < mem["peak"] and mem["largest_micro_batch"] is not None
    assert "ASSUMED" in plan["time"]["mfu_source"] or "measured" in plan["time"]["mfu_source"]


def test_mfu_comes_from_a_matching_record(tmp_path):
    store = tmp_path / "history.jsonl"
    row = {"workload": "ar-L", "trained_flops_per_image": 123, "optimised": {"mfu": 0.31}}
    store.write_text(json.dumps({"benchmark": "bench_train", "device": "NVIDIA H100 80GB HBM3", "date": "d",
                                 "commit": "c", "results": [row]}) + "\n")
    assert planner.measured_mfu("H100", 123, store)["mfu"] == 0.31
    assert planner.measured_mfu("H200", 123, store) is None  # another GPU
    assert planner.measured_mfu("H100", 124, store) is None  # another model size


def test_plan_check_sets_the_plan_beside_a_bench_train_record(tmp_path):
    """benchmarks/plan_check.py (a gpu_suite step): the plan of the published config at bench_train's batch, less
    its frozen models, against the record's measured peaks; the record's GPU picks the planner's GPU."""
    from benchmarks import plan_check
    from semanticist_fast.config import load_config
    from semanticist_fast.plan.planner import make_plan
    from semanticist_fast.tasks import spec_for_file

    assert plan_check.gpu_kind("NVIDIA H100 PCIe") == "h100-pcie"
    assert plan_check.gpu_kind("NVIDIA H200 (sm_90, 132 SMs)") == "h200"
    row = {"workload": "ar-L", "batch": 8, "trained_flops_per_image": 10 ** 12,
           "optimised": {"peak_memory_bytes": 2 * 10 ** 9, "images_per_s": 100.0, "mfu": 0.3},
           "plain": {"peak_memory_bytes": 4 * 10 ** 9, "images_per_s": 50.0, "mfu": 0.15}}
    other = {"benchmark": "bench_train", "device_kind": "cpu", "device": "cpu", "date": "x", "results": [row]}
    record = {"benchmark": "bench_train", "device_kind": "cuda", "device": "NVIDIA H200", "date": "20261205T000000Z",
              "results": [row]}
    store = tmp_path / "history.jsonl"
    store.write_text(json.dumps(record) + "\n" + json.dumps(other) + "\n")
    result = plan_check.main(["--store", str(store), "--no-write"])
    assert result["gpu"] == "h200" and result["bench_train"] == "bench_train@20261205T000000Z"
    (checked,) = result["results"]
    run = load_config(spec_for_file("configs/autoregressive_l.yaml").run_config, "configs/autoregressive_l.yaml",
                      ["train.engine=single", "train.batch_size=8", "train.micro_batch_size=8"])
    plan = make_plan(run, gpus=1, gpu="h200")
    predicted = plan["memory"]["peak"] - plan["memory"]["frozen_models"]
    assert checked["predicted_peak_bytes"] == predicted
    assert checked["optimised_memory_ratio"] == pytest.approx(predicted / 2e9)
    assert checked["plain_memory_ratio"] == pytest.approx(predicted / 4e9)
