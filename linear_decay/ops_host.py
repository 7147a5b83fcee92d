"""Host-side arithmetic shared by the kernel modules.

Eager training steps of the 410m model are host-bound on an H200 (tools/host_overhead.py), and these run tens
of times per layer and step: `triton.cdiv` and `triton.next_power_of_2` are constexpr functions in Triton 3.5+ (each
host call goes through their wrapper), and `torch.cuda.get_device_properties` is
looked up once per device here instead of per call; `per_tensor` keeps what the host derives from a tensor every layer
receives; `op_name` names the kernels' custom ops. Plain torch, no Triton.
"""

import functools
import weakref

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


def op_name(name, namespace="linear_decay"):
    """`namespace::name` for a `torch.library.custom_op`, or `name_2`, `name_3`, ... where that name is taken: an
    operator is registered once per process, and a checkpoint's remote code (a copy of these modules under another
    package) may be imported beside the installed package."""
    taken, index = name, 1
    while hasattr(getattr(torch.ops, namespace), taken):
        index += 1
        taken = f"{name}_{index}"
    return f"{namespace}::{taken}"


_PER_TENSOR = {}  # id(tensor) -> (weak reference, (tensor._version, inference mode), value)


def per_tensor(tensor, compute):
    """`compute(tensor)`, computed once per tensor object while it lives unmodified: the model passes one mask or
    cu_seqlens tensor to every layer of a forward, and what is derived from it on the host (packing plans, chunk
    layouts: each a device-to-host read) is then read once per forward instead of once per layer. A freed tensor's
    entry goes with it (weak reference), an in-place change (`_version`) recomputes, and so does a switch in or out of
    inference mode (its tensors cannot serve autograd); for inference tensors, inside torch.compile or a CUDA graph
    capture nothing is kept."""
    if (torch.compiler.is_compiling() or tensor.is_inference()  # (inference tensors keep no version counter)
            or (tensor.is_cuda and torch.cuda.is_current_stream_capturing())):
        return compute(tensor)
    key, state = id(tensor), (tensor._version, torch.is_inference_mode_enabled())
    entry = _PER_TENSOR.get(key)
    if entry is not None and entry[0]() is tensor and entry[1] == state:
        return entry[2]
    value = compute(tensor)
    _PER_TENSOR[key] = (weakref.ref(tensor, lambda _, key=key: _PER_TENSOR.pop(key, None)), state, value)
    return value


__all__ = ["cdiv", "next_power_of_2", "op_name", "per_tensor", "sm_count"]
