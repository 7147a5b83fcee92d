"""Fused output gate + RMSNorm (DESIGN.md §1, "Output"): y = RMSNorm_d(o ⊙ sigmoid(gate_logits)) · weight, and the
plain RMSNorm of the blocks (no gate) on the same kernels.

    y = gated_rms_norm(o, gate_logits, weight, eps)             Triton forward and backward (torch.autograd.Function)
    y = rms_norm(x, weight, eps)                                the same without the gate (`LinearDecayRMSNorm`)
    y = gated_rms_norm_reference(o, gate_logits, weight, eps)   the same in PyTorch (gate_logits None: no gate)

The numerics follow the model's two-step code (`o * sigmoid(gate)` then `LinearDecayRMSNorm`): the gate and the norm
are computed in fp32, the normalised value is cast to the input dtype (the promotion of o's and gate_logits' dtypes),
then multiplied by `weight`; y has the promotion of that dtype and weight's. Unlike the two-step code the gated value
is not rounded to the input dtype before the norm (one rounding fewer in bf16). Gradients go to o, gate_logits and
weight, each in its own dtype; the weight gradient is summed over rows in fp32 (per-program partial sums, then a
torch sum). The norm is over the last dim (the whole hidden size d, not per head).

One program per row in the forward; in the backward each program walks a contiguous range of rows and keeps its
weight-gradient partial sum in registers. No `tl.dot` (so none of the DESIGN §7 Hopper miscompile), no autotune (the
interpreter cannot run it), fp32/fp16 on CPU under TRITON_INTERPRET=1, bf16 on the GPU only.
"""

try:
    import triton
    import triton.language as tl
except ImportError as error:  # CPU-only torch ships without Triton: the PyTorch path is used instead
    raise ImportError("Triton is not installed") from error

import torch
from torch.autograd.function import once_differentiable

from .ops_host import cdiv, next_power_of_2, sm_count

MAX_HIDDEN_SIZE = 65536  # one row sits in one program's registers / local memory
# Backward programs on the GPU (a few per SM: enough parallelism, few weight-gradient partials to sum).
BACKWARD_PROGRAMS_PER_SM = 4

_TORCH_TO_TRITON = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def gated_rms_norm_reference(o, gate_logits, weight, eps=1e-5):
    """PyTorch reference of the fused kernel: the gate and the norm in fp32, cast to the input dtype, times weight."""
    if gate_logits is None:
        dtype, gated = o.dtype, o.float()
    else:
        dtype = torch.promote_types(o.dtype, gate_logits.dtype)
        gated = o.float() * torch.sigmoid(gate_logits.float())
    normalised = gated * torch.rsqrt(gated.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normalised.to(dtype)


@triton.jit
def _gated_rms_norm_forward_kernel(
    o_ptr, gate_ptr, weight_ptr, y_ptr, rstd_ptr,
    hidden, eps,
    stride_o, stride_gate, stride_y,
    NORMALISED_DTYPE: tl.constexpr,
    HAS_GATE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden

    o = tl.load(o_ptr + row * stride_o + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_GATE:
        gate_logits = tl.load(gate_ptr + row * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
        gated = o * tl.sigmoid(gate_logits)  # masked columns: 0 · sigmoid(0) = 0, so they add nothing to the mean
    else:
        gated = o

    rstd = tl.rsqrt(tl.sum(gated * gated, axis=0) / hidden + eps)
    normalised = (gated * rstd).to(NORMALISED_DTYPE).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)

    tl.store(y_ptr + row * stride_y + cols, (normalised * weight).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _gated_rms_norm_backward_kernel(
    o_ptr, gate_ptr, weight_ptr, rstd_ptr, grad_y_ptr,
    grad_o_ptr, grad_gate_ptr, grad_weight_partial_ptr,
    rows, hidden, rows_per_program,
    stride_o, stride_gate, stride_grad_y, stride_grad_o, stride_grad_gate,
    NORMALISED_DTYPE: tl.constexpr,
    HAS_GATE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    program = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    col_mask = cols < hidden
    weight = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    grad_weight = tl.zeros([BLOCK], dtype=tl.float32)

    for i in range(rows_per_program):
        row = program.to(tl.int64) * rows_per_program + i
        # Rows past the end load and store nothing. (Not `col_mask & (row < rows)`: the interpreter turns a
        # vector-and-scalar bool mask into integers and rejects it.)
        mask = cols < tl.where(row < rows, hidden, 0)

        # Recompute the forward from o, gate_logits and the saved 1/rms.
        o = tl.load(o_ptr + row * stride_o + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row, mask=row < rows, other=0.0)
        if HAS_GATE:
            gate = tl.sigmoid(tl.load(gate_ptr + row * stride_gate + cols, mask=mask, other=0.0).to(tl.float32))
            gated = o * gate
        else:
            gated = o
        normalised = gated * rstd
        grad_y = tl.load(grad_y_ptr + row * stride_grad_y + cols, mask=mask, other=0.0).to(tl.float32)

        # y = weight · cast(n): dweight += dy · cast(n); dn = dy · weight (the cast passes the gradient through).
        grad_weight += grad_y * normalised.to(NORMALISED_DTYPE).to(tl.float32)
        grad_normalised = grad_y * weight

        # n = g · rstd, rstd = (mean(g²) + eps)^-1/2:  dg = rstd · (dn − n · mean(dn · n)).
        grad_gated = rstd * (grad_normalised - normalised * (tl.sum(grad_normalised * normalised, axis=0) / hidden))

        if HAS_GATE:  # g = o · σ(z):  do = dg · σ(z),  dz = dg · o · σ(z)(1 − σ(z)).
            tl.store(grad_o_ptr + row * stride_grad_o + cols, (grad_gated * gate).to(grad_o_ptr.dtype.element_ty),
                     mask=mask)
            tl.store(grad_gate_ptr + row * stride_grad_gate + cols,
                     (grad_gated * gated * (1.0 - gate)).to(grad_gate_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(grad_o_ptr + row * stride_grad_o + cols, grad_gated.to(grad_o_ptr.dtype.element_ty), mask=mask)

    tl.store(grad_weight_partial_ptr + program * hidden + cols, grad_weight, mask=col_mask)


def _rows(x, hidden):
    """[..., d] -> [N, d] with unit stride along d (a view when possible)."""
    x = x.reshape(-1, hidden)
    return x if x.stride(-1) == 1 else x.contiguous()


def _launch_options(hidden):
    block = next_power_of_2(hidden)
    return dict(BLOCK=block, num_warps=min(max(block // 256, 1), 16))


def _backward_programs(rows, device):
    # the interpreter (CPU tensors): as on one SM, 4 programs, each a loop over its rows
    return min(rows, BACKWARD_PROGRAMS_PER_SM * sm_count(device, cpu_value=1))


class GatedRMSNormFunction(torch.autograd.Function):
    """gate_logits None: the plain RMSNorm (the kernels compiled without the gate)."""

    @staticmethod
    def forward(ctx, o, gate_logits, weight, eps):
        hidden = o.shape[-1]
        has_gate = gate_logits is not None
        if (has_gate and gate_logits.shape != o.shape) or weight.shape != (hidden,):
            raise ValueError(f"gated_rms_norm: o {tuple(o.shape)}, gate_logits "
                             f"{tuple(gate_logits.shape) if has_gate else None} and weight {tuple(weight.shape)} must "
                             "be [..., d], [..., d] (or None) and [d]")
        if hidden > MAX_HIDDEN_SIZE:
            raise ValueError(f"gated_rms_norm supports a last dim up to {MAX_HIDDEN_SIZE}, got {hidden}")
        normalised_dtype = torch.promote_types(o.dtype, gate_logits.dtype) if has_gate else o.dtype
        o_rows = _rows(o, hidden)
        gate_rows = _rows(gate_logits, hidden) if has_gate else o_rows  # o_rows: a placeholder the kernel never reads
        weight = weight.contiguous()
        rows = o_rows.shape[0]
        y = torch.empty(rows, hidden, device=o.device, dtype=torch.promote_types(normalised_dtype, weight.dtype))
        rstd = torch.empty(rows, device=o.device, dtype=torch.float32)
        if rows:
            _gated_rms_norm_forward_kernel[(rows,)](
                o_rows, gate_rows, weight, y, rstd,
                hidden, float(eps),
                o_rows.stride(0), gate_rows.stride(0), y.stride(0),
                NORMALISED_DTYPE=_TORCH_TO_TRITON[normalised_dtype], HAS_GATE=has_gate,
                **_launch_options(hidden),
            )
        ctx.save_for_backward(o_rows, gate_rows if has_gate else None, weight, rstd)
        ctx.normalised_dtype = normalised_dtype
        ctx.shapes = (o.shape, o.dtype, gate_logits.dtype if has_gate else None)
        return y.view(o.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        o_rows, gate_rows, weight, rstd = ctx.saved_tensors
        shape, o_dtype, gate_dtype = ctx.shapes
        has_gate = gate_rows is not None
        rows, hidden = o_rows.shape
        grad_y = _rows(grad_y, hidden)
        grad_o = torch.empty(rows, hidden, device=o_rows.device, dtype=o_dtype)
        grad_gate = torch.empty(rows, hidden, device=o_rows.device, dtype=gate_dtype) if has_gate else grad_o
        programs = max(_backward_programs(rows, o_rows.device), 1)
        rows_per_program = cdiv(rows, programs)
        # every launched program writes its partial row (zeros where it has no rows)
        grad_weight_partial = (torch.empty if rows else torch.zeros)(programs, hidden, device=o_rows.device,
                                                                     dtype=torch.float32)
        if rows:
            gate_or_placeholder = gate_rows if has_gate else o_rows
            _gated_rms_norm_backward_kernel[(programs,)](
                o_rows, gate_or_placeholder, weight, rstd, grad_y,
                grad_o, grad_gate, grad_weight_partial,
                rows, hidden, rows_per_program,
                o_rows.stride(0), gate_or_placeholder.stride(0), grad_y.stride(0), grad_o.stride(0),
                grad_gate.stride(0),
                NORMALISED_DTYPE=_TORCH_TO_TRITON[ctx.normalised_dtype], HAS_GATE=has_gate,
                **_launch_options(hidden),
            )
        grad_weight = grad_weight_partial.sum(0).to(weight.dtype)
        return grad_o.view(shape), grad_gate.view(shape) if has_gate else None, grad_weight, None


@torch.compiler.disable  # a compiled model traces the torch form instead (see modeling's use_fused_kernels)
def gated_rms_norm(o, gate_logits, weight, eps=1e-5):
    """RMSNorm(o ⊙ sigmoid(gate_logits)) · weight over the last dim, fused (DESIGN §1); see the module docstring."""
    return GatedRMSNormFunction.apply(o, gate_logits, weight, eps)


@torch.compiler.disable
def rms_norm(x, weight, eps=1e-5):
    """RMSNorm(x) · weight over the last dim on the fused kernels: x normalised in fp32, cast to x's dtype, times
    weight (the numerics of `LinearDecayRMSNorm`)."""
    return GatedRMSNormFunction.apply(x, None, weight, eps)


__all__ = ["gated_rms_norm", "gated_rms_norm_reference", "rms_norm"]
