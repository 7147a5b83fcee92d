"""Fused Mamba2 decay (DESIGN.md §2): log λ = −c ⊙ softplus(z + b), c = exp(A_log), b = dt_bias.

    log_decay = softplus_decay(z, coefficient, bias)    Triton forward and backward (autograd)

Its PyTorch reference is the unit itself (`decay.Mamba2Decay.log_decay`, which the tests compare with).

c and b are per channel ([D] fp32, or None for 1 and 0: the ablations without A or dt_bias); z is [..., D] in any
float dtype, log λ fp32. The units of this form say so (`DecayParameterization.softplus_form`): mamba2 and its three
ablations. Unfused, the unit runs a cast and four elementwise kernels forward and about eight backward (two of them
column sums for c and b) on fp32 [B, T, D] tensors; here the forward reads z once and writes log λ, the backward reads
z and ∂L/∂log λ once, writes ∂L/∂z in z's dtype and per-program column sums for c and b. On the H200 the 410m mamba2
model's training step measured 154 ms without and 126 ms with it at 8×2048 (two runs).
gla and simple (logsigmoid, two or three elementwise kernels each) stay in PyTorch: fused the same way (−softplus(−x))
they measured slower in two separate whole-model runs on the H200. Their steps are
host-bound, and this autograd function (0.65–0.79 ms of host time per forward + backward call at 1×64 tokens on the
H200 machines, tools/host_overhead.py) costs more than the two or three torch ops it would replace; mamba2's
twelve do not.
No `tl.dot`: fp32 / fp16 / bf16 z all run on CPU under TRITON_INTERPRET=1.
"""

try:
    import triton
    import triton.language as tl
except ImportError as error:  # CPU-only torch ships without Triton: the PyTorch path is used instead
    raise ImportError("Triton is not installed") from error

import torch
from torch.autograd.function import once_differentiable

from .ops_host import cdiv, next_power_of_2, sm_count

TILE = 2048  # elements of one [rows, channels] tile: 16 per thread at 4 warps (71-116 registers on sm_90, no spills)
PROGRAMS_PER_SM = 4  # backward: programs that loop over rows, each writing one partial column sum per parameter


@triton.jit
def _softplus(x):
    """softplus(x) = max(x, 0) + log1p(e^{−|x|}); log1p as log(w)·u/(w − 1), w = 1 + u (exact where u ≪ 1, where
    log(1 + u) alone loses every digit: log λ of decays near 1)."""
    u = tl.exp(-tl.abs(x))
    w = 1.0 + u
    exact = w == 1.0
    return tl.maximum(x, 0.0) + tl.where(exact, u, tl.log(w) * u / tl.where(exact, 1.0, w - 1.0))


@triton.jit
def _tile(z_ptr, bias_ptr, row0, rows, width, BLOCK_ROWS: tl.constexpr, BLOCK_W: tl.constexpr,
          HAS_BIAS: tl.constexpr):
    """One [BLOCK_ROWS, BLOCK_W] tile at (row0, this program's channel block): offsets, mask, x = z + b."""
    r = row0 + tl.arange(0, BLOCK_ROWS)
    c = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    mask = (r < rows)[:, None] & (c < width)[None, :]
    offsets = r.to(tl.int64)[:, None] * width + c[None, :]
    x = tl.load(z_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x += tl.load(bias_ptr + c, mask=c < width, other=0.0)[None, :]
    return offsets, mask, x


@triton.jit
def _channel_values(ptr, width, BLOCK_W: tl.constexpr, PRESENT: tl.constexpr):
    c = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    if PRESENT:
        return tl.load(ptr + c, mask=c < width, other=0.0)
    return tl.full((BLOCK_W,), 1.0, tl.float32)


@triton.jit
def _softplus_decay_forward_kernel(z_ptr, coefficient_ptr, bias_ptr, log_decay_ptr, rows, width,
                                   HAS_COEFFICIENT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                                   BLOCK_W: tl.constexpr):
    offsets, mask, x = _tile(z_ptr, bias_ptr, tl.program_id(0) * BLOCK_ROWS, rows, width, BLOCK_ROWS, BLOCK_W,
                             HAS_BIAS)
    coefficient = _channel_values(coefficient_ptr, width, BLOCK_W, HAS_COEFFICIENT)
    tl.store(log_decay_ptr + offsets, -coefficient[None, :] * _softplus(x), mask=mask)


@triton.jit
def _softplus_decay_backward_kernel(z_ptr, coefficient_ptr, bias_ptr, grad_ptr, grad_z_ptr, coefficient_partial_ptr,
                                    bias_partial_ptr, rows, width, rows_per_program,
                                    HAS_COEFFICIENT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                                    BLOCK_W: tl.constexpr):
    """∂/∂x of −c·softplus(x) is −c·σ(x): ∂L/∂z = −c·σ(x)·g = ∂L/∂b per row, ∂L/∂c = −softplus(x)·g per row;
    this program's rows [program·rows_per_program, +rows_per_program) summed into one partial row per parameter."""
    program = tl.program_id(0)
    coefficient = _channel_values(coefficient_ptr, width, BLOCK_W, HAS_COEFFICIENT)
    bias_sum = tl.zeros((BLOCK_W,), tl.float32)
    coefficient_sum = tl.zeros((BLOCK_W,), tl.float32)
    first = program * rows_per_program
    for row0 in range(first, tl.minimum(first + rows_per_program, rows), BLOCK_ROWS):
        offsets, mask, x = _tile(z_ptr, bias_ptr, row0, rows, width, BLOCK_ROWS, BLOCK_W, HAS_BIAS)
        grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0)
        grad_x = -coefficient[None, :] * tl.sigmoid(x) * grad
        tl.store(grad_z_ptr + offsets, grad_x.to(grad_z_ptr.dtype.element_ty), mask=mask)
        bias_sum += tl.sum(grad_x, axis=0)
        coefficient_sum += tl.sum(-_softplus(x) * grad, axis=0)
    c = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    if HAS_BIAS:
        tl.store(bias_partial_ptr + program * width + c, bias_sum, mask=c < width)
    if HAS_COEFFICIENT:
        tl.store(coefficient_partial_ptr + program * width + c, coefficient_sum, mask=c < width)


def _blocks(width):
    block_w = min(next_power_of_2(width), 128)
    return max(TILE // block_w, 1), block_w


class SoftplusDecayFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, coefficient, bias):
        width = z.shape[-1]
        for name, values in (("coefficient", coefficient), ("bias", bias)):
            if values is not None and values.shape != (width,):
                raise ValueError(f"softplus_decay: {name} {tuple(values.shape)} must be [{width}] (z's last dim)")
        z_rows = z.reshape(-1, width).contiguous()
        coefficient = coefficient.float().contiguous() if coefficient is not None else None
        bias = bias.float().contiguous() if bias is not None else None
        rows = z_rows.shape[0]
        log_decay = torch.empty(rows, width, device=z.device, dtype=torch.float32)
        block_rows, block_w = _blocks(width)
        if log_decay.numel():
            _softplus_decay_forward_kernel[(cdiv(rows, block_rows), cdiv(width, block_w))](
                z_rows, coefficient if coefficient is not None else z_rows, bias if bias is not None else z_rows,
                log_decay, rows, width, coefficient is not None, bias is not None, block_rows, block_w,
                num_warps=4)
        ctx.save_for_backward(z_rows, coefficient, bias)
        ctx.shape = z.shape
        return log_decay.view(z.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        z_rows, coefficient, bias = ctx.saved_tensors
        rows, width = z_rows.shape
        grad = grad.reshape(rows, width).float().contiguous()
        grad_z = torch.empty_like(z_rows)
        block_rows, block_w = _blocks(width)
        column_blocks = cdiv(width, block_w)
        programs = max(min(cdiv(rows, block_rows),
                           PROGRAMS_PER_SM * sm_count(z_rows.device, cpu_value=1) // column_blocks), 1)
        rows_per_program = max(cdiv(cdiv(rows, programs), block_rows), 1) * block_rows
        programs = max(cdiv(rows, rows_per_program), 1)
        # every launched program writes its partial rows (zeros where it has no rows)
        partial = z_rows.new_empty if grad_z.numel() else z_rows.new_zeros
        bias_partial = partial(programs, width, dtype=torch.float32) if bias is not None else None
        coefficient_partial = partial(programs, width, dtype=torch.float32) if coefficient is not None else None
        if grad_z.numel():
            _softplus_decay_backward_kernel[(programs, column_blocks)](
                z_rows, coefficient if coefficient is not None else z_rows, bias if bias is not None else z_rows,
                grad, grad_z, coefficient_partial if coefficient is not None else grad,
                bias_partial if bias is not None else grad, rows, width, rows_per_program,
                coefficient is not None, bias is not None, block_rows, block_w, num_warps=4)
        grad_coefficient = coefficient_partial.sum(0) if coefficient is not None else None
        grad_bias = bias_partial.sum(0) if bias is not None else None
        return grad_z.view(ctx.shape), grad_coefficient, grad_bias


@torch.compiler.disable  # a compiled model traces the torch form instead (see modeling's use_fused_kernels)
def softplus_decay(z, coefficient=None, bias=None):
    """−c ⊙ softplus(z + b) over z's last dim, fused (module docstring); log λ in fp32."""
    return SoftplusDecayFunction.apply(z, coefficient, bias)


__all__ = ["softplus_decay"]
