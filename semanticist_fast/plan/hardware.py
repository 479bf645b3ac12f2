"""What the planner assumes of the hardware and the data, in one table each (every figure is a vendor's spec)."""
from dataclasses import dataclass

GiB = 2 ** 30


@dataclass(frozen=True)
class GPU:
    name: str  # as in the results store's device names (torch.cuda.get_device_name), for MFU records
    memory_bytes: int  # what CUDA reports as the device's total memory
    peak_bf16_tflops: float  # dense (no sparsity)
    nvlink_GBps: float  # per GPU, each way, inside a node (PCIe for cards without NVLink)
    infiniband_GBps: float = 50.0  # per GPU, each way, between nodes (8 x 400 Gb/s per node of 8)


GPUS = {
    "h100": GPU("H100", int(79.6 * GiB), 989.0, 450.0),  # H100 SXM 80 GB, NVLink 4
    "h100-pcie": GPU("H100 PCIe", int(79.6 * GiB), 756.0, 64.0),
    "h200": GPU("H200", int(139.8 * GiB), 989.0, 450.0),  # H200 SXM 141 GB
    "a100": GPU("A100", int(79.2 * GiB), 312.0, 300.0, 25.0),  # A100 SXM 80 GB, NVLink 3, 8 x 200 Gb/s
    "a100-40": GPU("A100", int(39.4 * GiB), 312.0, 300.0, 25.0),
    "l40s": GPU("L40S", int(44.4 * GiB), 362.0, 32.0, 12.5),
    "b200": GPU("B200", int(178.0 * GiB), 2250.0, 900.0),
}
GPUS_PER_NODE = 8
# The allocator's fragmentation, the CUDA context and kernel workspaces: a plan fits when its peak leaves this much.
HEADROOM = 0.10

# Training-set sizes of the named datasets a data.root may point at (what `len(ImageFolder)` gives).
IMAGENET_TRAIN_IMAGES = 1_281_167
KNOWN_DATASETS = {"imagenet": IMAGENET_TRAIN_IMAGES}


def gpu_named(name: str) -> GPU:
    if name not in GPUS:
        raise ValueError(f"--gpu {name!r} is not known; choose one of {', '.join(GPUS)}")
    return GPUS[name]
