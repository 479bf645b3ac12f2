"""Helpers shared by the Triton kernels: a sum combine function, grid sizing, warps, device scoping.

The kernels call only Triton builtins plus the jit functions of this package (no tl.sum / tl.sigmoid /
tl.zeros, which are jit functions of triton's standard library): under the CPU interpreter every jit
function must have been decorated with TRITON_INTERPRET=1 set, and triton itself may have been imported
before that (torch._dynamo imports it), while this package's modules are imported when the tests choose.
"""
import contextlib
import functools

import torch
import triton


@triton.jit
def add(a, b):
    """Combine function for tl.reduce(x, axis, add): a sum."""
    return a + b


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def num_warps_for(block: int) -> int:
    """One warp per 256 elements of a row, 1..8: enough loads in flight without starving registers."""
    return max(1, min(8, block // 256))


def row_launch(width: int) -> tuple[int, int]:
    """(BLOCK_C, num_warps) of a kernel that holds one row of `width` in registers (the norms, adaLN).

    The one place the row kernels' launch shape is chosen: the wrappers call it, and so does the compile check
    (triton_aot.py), which therefore compiles what a run launches.
    """
    block = next_power_of_2(width)
    return block, num_warps_for(block)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def rows_per_program(rows_per_group: int, groups: int, device: torch.device) -> int:
    """Rows one backward program reduces over so that groups * programs_per_group fills the GPU about 4x.

    Backward passes that sum a gradient over rows (dshift/dscale/dgate per sample, dweight over all rows)
    give each program a contiguous chunk of rows of one group and write one fp32 partial per program;
    torch then adds the few partials. Fewer, longer chunks mean less partial traffic, more mean more
    parallelism. On the CPU interpreter one chunk per group keeps the program count (= Python loops) low.
    """
    if device.type == "cuda":
        target = 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        chunks = max(1, min(rows_per_group, -(-target // max(groups, 1))))
    else:
        chunks = 1
    return -(-rows_per_group // chunks)


def on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
