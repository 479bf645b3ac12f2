"""The CUDA sources compile on a machine without a GPU.

Every csrc/**/*.cu is plain CUDA (no torch headers), so `nvcc -c` alone must build it for sm_90 plus PTX.
The torch binding of those kernels (csrc/torch/cuda_ops.cpp) is only built by CMake when torch has CUDA;
it uses only core c10 headers, so it is syntax-checked here against the installed torch as well.
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension

ROOT = Path(__file__).resolve().parents[1]
CU_FILES = sorted((ROOT / "csrc").rglob("*.cu"))
NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH")


def _cuda_include() -> Path | None:
    """The toolkit's include dir (nvcc may be a wrapper script, so look in the usual homes too)."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda", Path(NVCC).resolve().parents[1]]
    for home in homes:
        if home and (Path(home) / "include" / "cuda_runtime_api.h").exists():
            return Path(home) / "include"
    return None


def test_cu_sources_exist():
    assert {p.name for p in CU_FILES} >= {"nested_dropout.cu", "standardize.cu"}


@needs_nvcc
@pytest.mark.parametrize("source", CU_FILES, ids=lambda p: p.name)
def test_nvcc_compiles(source, tmp_path):
    cmd = [NVCC, "-c", "-std=c++17", "-O2", "-Xcompiler", "-fPIC",
           "-gencode", "arch=compute_90,code=sm_90", "-gencode", "arch=compute_90,code=compute_90",
           "-I", str(source.parent), str(source), "-o", str(tmp_path / (source.stem + ".o"))]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / (source.stem + ".o")).stat().st_size > 0


@needs_nvcc
def test_cuda_binding_compiles_against_torch_headers():
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    cuda_include = _cuda_include()
    if cuda_include is None:
        pytest.skip("CUDA toolkit headers not found (set CUDA_HOME)")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = [f"-I{p}" for p in torch.utils.cpp_extension.include_paths()] + [f"-I{cuda_include}"]
    cmd = [cxx, "-std=c++20", "-fsyntax-only", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *includes,
           str(ROOT / "csrc" / "torch" / "cuda_ops.cpp")]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
