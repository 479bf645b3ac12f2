"""A model of ZeRO's communication per optimizer step and how much of it the compute hides.

Per GPU, fp32 weights and gradients, ring collectives ((N-1)/N of the volume each way per collective), at the
slowest link of the ring (NVLink inside a node, InfiniBand once it spans nodes). Latency and congestion are
ignored, so the efficiency it gives, compute / (compute + exposed communication), is an upper bound.
(benchmarks/bench_scaling.py prints it for the published models; `semanticist-fast plan` for a config.)
"""


def zero_comm(params: int, flops_per_image: float, global_batch: int, gpus: int, micro_batch: int,
              peak_flops: float, mfu: float, link_bytes_per_s: float) -> dict:
    """One optimizer step of `global_batch` images on `gpus` GPUs in micro-steps of up to `micro_batch` images."""
    per_gpu_images = global_batch / gpus
    micro = min(micro_batch, per_gpu_images)
    accum = per_gpu_images / micro
    compute_s = per_gpu_images * flops_per_image / (peak_flops * mfu)
    micro_s = compute_s / accum
    volume = (gpus - 1) / gpus * 4 * params  # bytes each rank sends for one ring collective of fp32 tensors
    collective_s = volume / link_bytes_per_s
    out = {"images_per_gpu": per_gpu_images, "micro_steps": accum, "compute_s": compute_s,
           "link_GBps": link_bytes_per_s / 1e9}

    def stage(bytes_moved: float, comm_s: float, exposed_s: float) -> dict:
        return {"bytes_per_gpu": bytes_moved, "comm_s": comm_s, "exposed_s": exposed_s,
                "efficiency": compute_s / (compute_s + exposed_s)}

    # ZeRO-1: the accumulated gradients are reduce-scattered once, during the last micro-step's backward (2/3 of
    # its compute); the updated weights are all-gathered after the step, with nothing left to hide behind.
    out["zero1"] = stage(2 * volume, 2 * collective_s, max(0.0, collective_s - micro_s * 2 / 3) + collective_s)
    # ZeRO-2: every micro-step reduce-scatters its gradients during its backward; the same all-gather after.
    out["zero2"] = stage((accum + 1) * volume, (accum + 1) * collective_s,
                         accum * max(0.0, collective_s - micro_s * 2 / 3) + collective_s)
    # ZeRO-3: every micro-step all-gathers the weights for its forward and again for its backward, and
    # reduce-scatters its gradients; with prefetch all three hide behind the micro-step's compute.
    out["zero3"] = stage(accum * 3 * volume, accum * 3 * collective_s, accum * max(0.0, 3 * collective_s - micro_s))
    return out
