"""Makes torchvision importable where its C++ ops cannot load; import this before torchvision or torch_fidelity.

The torchvision wheels on PyPI are CUDA builds. On a CPU-only torch their `_C` library fails to load, and
torchvision then dies at import: `_meta_registrations` registers fake kernels for `torchvision::nms` and
`torchvision::qnms`, operators that only that library defines. Evaluation needs none of torchvision's ops (torch-
fidelity imports it for transforms and models), so where the library does not load we define the two schemas
ourselves: the import then succeeds, and calling those ops still fails, as it would without the shim. Where the
library loads (a CUDA machine), it defines the schemas itself and this module does nothing.
"""
import importlib.util
import sys
from pathlib import Path

import torch

# The schemas exactly as torchvision's csrc/ops/nms.cpp declares them.
_SCHEMAS = ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
            "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_library = None  # kept alive: the definitions last as long as the Library object


def _native_ops_load() -> bool:
    spec = importlib.util.find_spec("torchvision")  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        return True  # no torchvision: nothing to patch, and its import error will say so
    for folder in spec.submodule_search_locations:
        for lib in Path(folder).glob("_C*.so"):
            try:
                torch.ops.load_library(str(lib))
                return True
            except OSError:
                return False
    return False


def ensure_torchvision_importable() -> None:
    global _library
    if _library is not None or "torchvision" in sys.modules or _native_ops_load():
        return
    _library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS:
        _library.define(schema)


ensure_torchvision_importable()
