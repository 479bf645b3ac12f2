"""Packaging for semanticist-fast; builds the optional C++/CUDA extension semanticist_fast._C with CMake.

The extension compiles against the torch already installed, so build without isolation:

    pip install -c constraints.txt --no-build-isolation -e .     # this dev machine (CPU torch pinned)
    pip install --no-build-isolation -e .                          # a CUDA machine with its own torch
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


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import torch  # deferred: only an extension build needs it (hence --no-build-isolation)

        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DCMAKE_BUILD_TYPE={'Debug' if self.debug else 'Release'}",
        ]
        with_cuda = os.environ.get("SEMANTICIST_WITH_CUDA")
        if with_cuda is not None:
            args.append(f"-DSEMANTICIST_WITH_CUDA={'ON' if with_cuda not in ('0', '', 'OFF', 'off') else 'OFF'}")
        if os.environ.get("SEMANTICIST_CUDA_ARCHITECTURES"):
            args.append(f"-DSEMANTICIST_CUDA_ARCHITECTURES={os.environ['SEMANTICIST_CUDA_ARCHITECTURES']}")
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "--parallel", jobs], check=True)


ext_modules = [] if os.environ.get("SEMANTICIST_NO_EXT") == "1" else [CMakeExtension("semanticist_fast._C")]

setup(
    name="semanticist-fast",
    version="0.1.0",
    description="Fast, compiled training stack for the Semanticist tokenizer and epsilon-LlamaGen",
    python_requires=">=3.10",
    packages=find_packages(include=["semanticist_fast", "semanticist_fast.*"]),
    install_requires=["torch", "numpy", "pyyaml", "tqdm", "tensorboard", "safetensors", "pillow"],
    entry_points={"console_scripts": ["semanticist-fast = semanticist_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
