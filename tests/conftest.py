import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

# diffusers (the VAE reference) imports torchvision, whose PyPI build cannot load its ops on a CPU torch.
import semanticist_fast.eval.torchvision_compat  # noqa: E402,F401


@pytest.fixture(autouse=True)
def _run_from_repo_root(monkeypatch):
    # Configs are referenced as configs/*.yaml, as a user would from a checkout.
    monkeypatch.chdir(ROOT)
    os.environ.setdefault("PYTHONHASHSEED", "0")


@pytest.fixture
def one_thread():
    # Tiny models: intra-op threads only add contention on a shared 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=[True, False], ids=["fast", "reference"])
def fast_paths(request):
    """Runs a test twice: through the fast paths (C++ ops, split attention) and through the PyTorch references."""
    from semanticist_fast.kernels import dispatch

    previous = dispatch.fast_paths_enabled()
    dispatch.set_fast_paths(request.param)
    try:
        yield request.param
    finally:
        dispatch.set_fast_paths(previous)
