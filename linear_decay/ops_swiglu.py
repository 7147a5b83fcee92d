"""Fused SwiGLU of the feed-forward block (DESIGN.md §1): y = silu(gate) ⊙ up, forward and backward in one kernel each.

    y = swiglu(gate, up)             Triton forward and backward (torch.autograd.Function)
    y = swiglu_reference(gate, up)   the same in PyTorch

The unfused form (`F.silu(gate) * up`) runs two kernels forward and about four backward, and keeps silu(gate) for the
backward; here the forward reads gate and up once and writes y, the backward reads gate, up and dy once and writes
both gradients, and nothing but the inputs is kept. Arithmetic in fp32, one rounding to the output dtype (the unfused
bf16 form rounds silu(gate) first). No `tl.dot`; fp32 / fp16 run on CPU under TRITON_INTERPRET=1.
"""

try:
    import triton
    import triton.language as tl
except ImportError as error:  # CPU-only torch ships without Triton: the PyTorch path is used instead
    raise ImportError("Triton is not installed") from error

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .ops_host import cdiv

BLOCK = 1024  # elements per program


def swiglu_reference(gate, up):
    return F.silu(gate) * up


@triton.jit
def _swiglu_forward_kernel(gate_ptr, up_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    gate = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offsets, (gate * tl.sigmoid(gate) * up).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward_kernel(gate_ptr, up_ptr, grad_y_ptr, grad_gate_ptr, grad_up_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    gate = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    grad_y = tl.load(grad_y_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    sigmoid = tl.sigmoid(gate)
    silu = gate * sigmoid
    # d silu(g) / dg = σ(g) (1 + g (1 − σ(g)))
    tl.store(grad_gate_ptr + offsets, (grad_y * up * sigmoid * (1.0 + gate * (1.0 - sigmoid))).to(
        grad_gate_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_up_ptr + offsets, (grad_y * silu).to(grad_up_ptr.dtype.element_ty), mask=mask)


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        if gate.shape != up.shape:
            raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have one shape")
        gate, up = gate.contiguous(), up.contiguous()
        y = torch.empty(gate.shape, device=gate.device, dtype=torch.promote_types(gate.dtype, up.dtype))
        n = y.numel()
        if n:
            _swiglu_forward_kernel[(cdiv(n, BLOCK),)](gate, up, y, n, BLOCK=BLOCK, num_warps=4)
        ctx.save_for_backward(gate, up)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        gate, up = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        if n:
            _swiglu_backward_kernel[(cdiv(n, BLOCK),)](gate, up, grad_y, grad_gate, grad_up, n, BLOCK=BLOCK,
                                                       num_warps=4)
        return grad_gate, grad_up


@torch.compiler.disable  # a compiled model traces the torch form instead (see modeling's use_fused_kernels)
def swiglu(gate, up):
    """silu(gate) ⊙ up, fused (module docstring)."""
    return SwiGLUFunction.apply(gate, up)


__all__ = ["swiglu", "swiglu_reference"]
