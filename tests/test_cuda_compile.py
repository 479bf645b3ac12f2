"""The CUDA sources compile on a machine without a GPU, and the CMake CUDA target links one shared CUDA runtime.

nvcc: the one on PATH, else the one the dev install brings from PyPI (nvidia-cuda-nvcc with nvidia-cuda-cccl,
pinned in constraints.txt to the CUDA 13.0 toolkit): on a fresh machine these tests run, they do not skip.

Every csrc/**/*.cu is plain CUDA (no torch headers), so `nvcc -c` alone must build it for sm_90 plus PTX.
The torch binding of those kernels (csrc/torch/cuda_ops.cpp) is only built by CMake when torch has CUDA;
it uses only core c10 headers, so it is syntax-checked here against the installed torch as well.
"""
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension

ROOT = Path(__file__).resolve().parents[1]
CU_FILES = sorted((ROOT / "csrc").rglob("*.cu"))


def find_nvcc(path: str | None = None) -> str | None:
    """nvcc on `path` (default $PATH), else bin/nvcc of the installed nvidia-cuda-nvcc wheel."""
    on_path = shutil.which("nvcc", path=path)
    if on_path:
        return on_path
    try:
        wheel = importlib.metadata.distribution("nvidia-cuda-nvcc")
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in wheel.files or []:
        if file.name == "nvcc" and file.parent.name == "bin":
            return str(file.locate())
    return None


NVCC = find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="no nvcc: bash scripts/install.sh --dev brings one from PyPI")
NO_TOOLKIT_PATH = "/usr/bin:/bin"  # the host compiler, and no CUDA toolkit


@pytest.fixture(scope="module", params=["path", "pypi"])
def nvcc(request) -> tuple[str, dict]:
    """(nvcc, environment): the toolkit's from PATH where there is one, and always the PyPI wheel's alone."""
    if request.param == "path":
        if shutil.which("nvcc") is None:
            pytest.skip("no nvcc on PATH (the PyPI one is tested)")
        return shutil.which("nvcc"), dict(os.environ)
    found = find_nvcc(path="")
    if found is None:
        pytest.fail("nvidia-cuda-nvcc is not installed: bash scripts/install.sh --dev (or pip install -c "
                    "constraints.txt -r requirements-dev.txt)")
    return found, {**os.environ, "PATH": NO_TOOLKIT_PATH, "CUDA_HOME": "", "CUDA_PATH": ""}


def _cuda_include(nvcc: str, env: dict) -> Path | None:
    """The toolkit's include dir (nvcc may be a wrapper script, so look in the usual homes too)."""
    homes = [Path(nvcc).resolve().parents[1], env.get("CUDA_HOME"), env.get("CUDA_PATH"), "/usr/local/cuda"]
    for home in homes:
        if home and (Path(home) / "include" / "cuda_runtime_api.h").exists():
            return Path(home) / "include"
    return None


def test_cu_sources_exist():
    assert {p.name for p in CU_FILES} >= {"nested_dropout.cu", "standardize.cu"}


@pytest.mark.parametrize("source", CU_FILES, ids=lambda p: p.name)
def test_nvcc_compiles(nvcc, source, tmp_path):
    nvcc, env = nvcc
    cmd = [nvcc, "-c", "-std=c++17", "-O2", "-Xcompiler", "-fPIC",
           "-gencode", "arch=compute_90,code=sm_90", "-gencode", "arch=compute_90,code=compute_90",
           "-I", str(source.parent), str(source), "-o", str(tmp_path / (source.stem + ".o"))]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / (source.stem + ".o")).stat().st_size > 0


def test_cuda_binding_compiles_against_torch_headers(nvcc):
    nvcc, env = nvcc
    cxx = shutil.which("c++", path=env["PATH"]) or shutil.which("g++", path=env["PATH"])
    if cxx is None:
        pytest.skip("no host C++ compiler")
    cuda_include = _cuda_include(nvcc, env)
    if cuda_include is None:
        pytest.skip("CUDA toolkit headers not found (set CUDA_HOME)")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = [f"-I{p}" for p in torch.utils.cpp_extension.include_paths()] + [f"-I{cuda_include}"]
    if (cuda_include / "cccl").is_dir():  # the PyPI layout keeps cccl's headers apart
        includes.append(f"-I{cuda_include / 'cccl'}")
    cmd = [cxx, "-std=c++20", "-fsyntax-only", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *includes,
           str(ROOT / "csrc" / "torch" / "cuda_ops.cpp")]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]


def _dynamic_section(library: Path) -> tuple[list[str], list[str]]:
    """(NEEDED sonames, RUNPATH/RPATH directories) of a shared library, read with readelf."""
    out = subprocess.run(["readelf", "-d", str(library)], capture_output=True, text=True, check=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)
    paths = [p for found in re.findall(r"\((?:RUNPATH|RPATH)\)\s+Library r(?:un)?path: \[([^\]]*)\]", out)
             for p in found.split(":") if p]
    return needed, paths


@needs_nvcc
@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("readelf") is None or shutil.which("nm") is None,
                    reason="needs cmake, readelf and nm")
def test_cmake_cuda_target_links_one_shared_cudart_and_no_toolkit_rpath(tmp_path):
    """The CMake CUDA target, built here against the installed torch (CUDA forced on, the cudart torch would load
    taken, as AUTO does with a CUDA torch): one libcudart, the shared one (the cudart calls of the kernels are
    undefined in _C, resolved by it; CMake's static default would define them in _C), and no rpath into the
    toolkit, so the loader reuses the libcudart torch loaded."""
    env = {**os.environ, "PATH": f"{Path(NVCC).parent}:{os.environ['PATH']}"}
    build, out = tmp_path / "build", tmp_path / "out"
    configure = ["cmake", "-S", str(ROOT), "-B", str(build), f"-DPython_EXECUTABLE={sys.executable}",
                 f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out}",
                 "-DSEMANTICIST_WITH_CUDA=ON", "-DSEMANTICIST_CUDART_FROM_TORCH=ON",
                 "-DSEMANTICIST_CUDA_ARCHITECTURES=90-real"]
    for cmd in (configure, ["cmake", "--build", str(build), "--parallel", "2"]):
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    library = next(out.glob("_C*.so"))
    needed, paths = _dynamic_section(library)
    cudarts = [n for n in needed if n.startswith("libcudart")]
    assert len(cudarts) == 1 and re.fullmatch(r"libcudart\.so\.\d+", cudarts[0]), needed
    assert "cudart_static" not in (build / "CMakeFiles" / "_C.dir" / "link.txt").read_text()
    symbols = subprocess.run(["nm", str(library)], capture_output=True, text=True, check=True).stdout
    for api in ("cudaGetLastError", "__cudaRegisterFatBinary", "__cudaLaunchKernel"):
        kinds = re.findall(rf"^\s*(?:[0-9a-f]+\s+)?([A-Za-z])\s+{re.escape(api)}(?:@\S+)?$", symbols, re.M)
        assert kinds == ["U"], (api, kinds)  # undefined in _C: the shared libcudart provides it
    toolkit = Path(NVCC).resolve().parents[1]
    assert paths and not any(Path(p).resolve().is_relative_to(toolkit) for p in paths), paths


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU and the CUDA build of _C (gpu_suite.sh)")
def test_one_cuda_runtime_is_mapped_after_torch_and_the_extension_ran():
    """On a GPU: torch's CUDA ops and the extension's kernels both ran, and the process maps one libcudart."""
    code = ("import torch, semanticist_fast.kernels.extension as e; assert e.BUILT_WITH_CUDA, e.STATUS; "
            "x = torch.randn(4, 8, device='cuda') @ torch.randn(8, 8, device='cuda'); "
            "e.standardize(x); torch.cuda.synchronize(); "
            "maps = {l.split()[-1] for l in open('/proc/self/maps') if 'libcudart' in l}; print(sorted(maps)); "
            "assert len(maps) == 1, maps")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
