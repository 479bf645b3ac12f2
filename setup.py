"""Packaging for semanticist-fast; builds the optional C++/CUDA extension semanticist_fast._C with CMake.

The extension compiles against the torch already installed (an isolated build finds it through the
interpreter that ran pip, and never installs a torch of its own):

    pip install -c constraints.txt torch==2.13.0 && pip install -c constraints.txt -e .   # this CPU machine
    pip install -e .                                                                       # a CUDA machine with its own torch
    python setup.py build_ext --inplace                            # extension only, in the source tree

Environment:
    SEMANTICIST_NO_EXT=1               skip the extension (pure Python install; reference/Triton paths only)
    SEMANTICIST_WITH_CUDA=0|1          force the CUDA kernels off/on (default: on iff torch has CUDA)
    SEMANTICIST_CUDA_ARCHITECTURES=..  CMake CUDA_ARCHITECTURES list (default "90-real;90-virtual")
    MAX_JOBS=N                         parallel compile jobs
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


def outer_environment() -> dict:
    """The environment of the interpreter that ran pip. An isolated build (plain `pip install -e .`) hides the
    installed packages behind PYTHONPATH; the extension must build against the torch the user installed, not
    pull a new one into the build environment."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.pop("PYTHONNOUSERSITE", None)  # a torch installed with --user counts too
    return env


def torch_cmake_prefix(env: dict) -> str:
    try:
        import torch

        return torch.utils.cmake_prefix_path
    except ImportError:
        pass
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.utils.cmake_prefix_path)"],
                           env=env, capture_output=True, text=True)
    if probe.returncode != 0:
        raise RuntimeError(
            "semanticist-fast builds its C++ extension against the installed torch, and none was found for "
            f"{sys.executable}. Install torch first (on this CPU machine: pip install -c constraints.txt "
            "torch==2.13.0), or set SEMANTICIST_NO_EXT=1 to install without the extension.")
    return probe.stdout.strip().splitlines()[-1]


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        env = outer_environment()
        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_PREFIX_PATH={torch_cmake_prefix(env)}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DCMAKE_BUILD_TYPE={'Debug' if self.debug else 'Release'}",
        ]
        with_cuda = os.environ.get("SEMANTICIST_WITH_CUDA")
        if with_cuda is not None:
            args.append(f"-DSEMANTICIST_WITH_CUDA={'ON' if with_cuda not in ('0', '', 'OFF', 'off') else 'OFF'}")
        if os.environ.get("SEMANTICIST_CUDA_ARCHITECTURES"):
            args.append(f"-DSEMANTICIST_CUDA_ARCHITECTURES={os.environ['SEMANTICIST_CUDA_ARCHITECTURES']}")
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), *args], check=True, env=env)
        subprocess.run(["cmake", "--build", str(build_dir), "--parallel", jobs], check=True, env=env)


ext_modules = [] if os.environ.get("SEMANTICIST_NO_EXT") == "1" else [CMakeExtension("semanticist_fast._C")]

setup(
    name="semanticist-fast",
    version="0.1.0",
    description="Fast, compiled training stack for the Semanticist tokenizer and epsilon-LlamaGen",
    python_requires=">=3.10",
    packages=find_packages(include=["semanticist_fast", "semanticist_fast.*"]),
    install_requires=["torch", "numpy", "pyyaml", "tqdm", "tensorboard", "safetensors", "pillow"],
    # train.engine=deepspeed (scripts/install.sh installs it); `semanticist-fast eval` (rFID / gFID / IS):
    # torch-fidelity needs torchvision: take the one built for your torch (constraints.txt pins it for the CPU torch
    # 2.13.0), or pip may replace your torch with a newer one.
    # dali: data.loader=dali (NVIDIA DALI; its CPU pipeline runs anywhere).
    # demo: `semanticist-fast demo`, the browser demos (Gradio; matplotlib draws the PSNR-against-k plot).
    extras_require={"deepspeed": ["deepspeed"], "eval": ["torch-fidelity==0.4.0", "torchvision"],
                    "dali": ["nvidia-dali-cuda130", "nvidia-nvimgcodec-cu13"], "demo": ["gradio", "matplotlib"]},
    entry_points={"console_scripts": ["semanticist-fast = semanticist_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
