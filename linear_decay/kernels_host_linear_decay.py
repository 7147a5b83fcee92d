"""Host-side arithmetic shared by the kernel modules.

Eager training steps of the 410m model are host-bound on the H200 machine (BENCHMARKS.md, sixth and seventh
sessions), and these run tens of times per layer and step: `triton.cdiv` and `triton.next_power_of_2` are constexpr
functions in Triton 3.5+ (each host call goes through their wrapper), and `torch.cuda.get_device_properties` is
looked up once per device here instead of per call. Plain torch, no Triton.
"""

import functools

import torch


def cdiv(a, b):
    """⌈a / b⌉ for positive b."""
    return -(-a // b)


def next_power_of_2(n):
    """The smallest power of two ≥ n (1 for n ≤ 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device, cpu_value):
    """The CUDA device's SM count (looked up once per device); `cpu_value` for CPU tensors (Triton's interpreter),
    where each caller picks a count that sends its CPU tests through the paths meant for few programs."""
    if device.type != "cuda":
        return cpu_value
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


__all__ = ["cdiv", "next_power_of_2", "sm_count"]
