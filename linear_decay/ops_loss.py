"""Fused cross-entropy on the LM head's logits (DESIGN.md §1, the head): Σ_t CE(logits_t, y_t) / divisor.

    loss = cross_entropy(logits, targets, divisor, ignore_index)    Triton forward and backward (autograd)

Its reference is transformers' causal-LM loss (`ForCausalLMLoss`: the logits upcast to fp32, `F.cross_entropy`), which
the tests compare with. transformers' form copies the [N, vocab] logits to fp32, writes fp32 log-probabilities for the
backward, then an fp32 gradient and its cast back: about 15 bytes per logit written and read again, and two fp32
[N, vocab] tensors kept until the backward (6.6 GB at the 410m model's 16,384 tokens and 50,304 words). Here the
forward reads the logits once (per row: an online max and sum in fp32 per lane, then log Σ e^x and the target's
term) and keeps one fp32 number per row; the backward reads them once more and writes ∂L/∂logits =
(softmax − onehot) · ∂L/∂loss / divisor in the logits' dtype. The arithmetic is fp32 on the logits' values (the same
numbers as the upcast), one rounding of the gradient to the logits' dtype (as the upcast's backward).

Measured on an H200 together with the one-matmul input projections (modeling's `fused_projections`,
benchmarks/model.py --sections profile): the 410m models' training step at 1×16384 tokens went from 113–115 to 106–107
ms of device time, its peak memory down by 5.2–5.3 GiB.

Rows whose target is `ignore_index` count nothing and get a zero gradient. `divisor` is a device tensor (the number of
labelled tokens, or the Trainer's num_items_in_batch), read by the kernels, so the loss makes no host-device
synchronisation. No `tl.dot`: fp32 / fp16 logits run on CPU under TRITON_INTERPRET=1.
"""

try:
    import triton
    import triton.language as tl
except ImportError as error:  # CPU-only torch ships without Triton: the PyTorch path is used instead
    raise ImportError("Triton is not installed") from error

import torch
from torch.autograd.function import once_differentiable

from .ops_host import next_power_of_2

BLOCK = 4096  # logits of one row per loop step (16 per thread at 8 warps)


@triton.jit
def _cross_entropy_forward_kernel(logits_ptr, targets_ptr, log_norm_ptr, row_loss_ptr, vocab, row_stride,
                                  ignore_index, BLOCK: tl.constexpr):
    """One row: log_norm = log Σ_j e^{x_j} (a running max and sum per lane), row_loss = log_norm − x_target."""
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * row_stride
    lane_max = tl.full((BLOCK,), float("-inf"), tl.float32)
    lane_sum = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, vocab, BLOCK):
        columns = start + tl.arange(0, BLOCK)
        x = tl.load(base + columns, mask=columns < vocab, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(lane_max, x)
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # a lane with nothing yet stays at sum 0
        lane_sum = lane_sum * tl.exp(lane_max - shift) + tl.exp(x - shift)
        lane_max = new_max
    row_max = tl.max(lane_max, axis=0)
    log_norm = row_max + tl.log(tl.sum(lane_sum * tl.exp(lane_max - row_max), axis=0))
    target = tl.load(targets_ptr + row)
    labelled = target != ignore_index
    target_logit = tl.load(base + tl.where(labelled, target, 0)).to(tl.float32)
    tl.store(log_norm_ptr + row, log_norm)
    tl.store(row_loss_ptr + row, tl.where(labelled, log_norm - target_logit, 0.0))


@triton.jit
def _cross_entropy_backward_kernel(logits_ptr, targets_ptr, log_norm_ptr, grad_loss_ptr, divisor_ptr, grad_ptr,
                                   vocab, row_stride, grad_row_stride, ignore_index, BLOCK: tl.constexpr):
    """One row: ∂L/∂x_j = (e^{x_j − log_norm} − [j = target]) · ∂L/∂loss / divisor, zero for an ignored row."""
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * row_stride
    grad_base = grad_ptr + row.to(tl.int64) * grad_row_stride
    target = tl.load(targets_ptr + row)
    labelled = target != ignore_index
    scale = tl.where(labelled, tl.load(grad_loss_ptr) / tl.load(divisor_ptr), 0.0)
    log_norm = tl.load(log_norm_ptr + row)
    for start in range(0, vocab, BLOCK):
        columns = start + tl.arange(0, BLOCK)
        mask = columns < vocab
        x = tl.load(base + columns, mask=mask, other=0.0).to(tl.float32)
        grad = (tl.exp(x - log_norm) - tl.where(columns == target, 1.0, 0.0)) * scale
        tl.store(grad_base + columns, grad.to(grad_ptr.dtype.element_ty), mask=mask)


class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, divisor, ignore_index):
        vocab = logits.shape[-1]
        rows_logits = logits.reshape(-1, vocab)
        if rows_logits.stride(-1) != 1:
            rows_logits = rows_logits.contiguous()
        rows = rows_logits.shape[0]
        targets = targets.reshape(-1)
        if targets.shape[0] != rows:
            raise ValueError(f"cross_entropy: {targets.shape[0]} targets for {rows} rows of logits")
        divisor = divisor.to(device=logits.device, dtype=torch.float32).reshape(())
        log_norm = torch.empty(rows, device=logits.device, dtype=torch.float32)
        row_loss = torch.empty(rows, device=logits.device, dtype=torch.float32)
        block = min(BLOCK, next_power_of_2(vocab))
        if rows:
            _cross_entropy_forward_kernel[(rows,)](rows_logits, targets, log_norm, row_loss, vocab,
                                                   rows_logits.stride(0), ignore_index, BLOCK=block, num_warps=8)
        ctx.save_for_backward(rows_logits, targets, log_norm, divisor)
        ctx.ignore_index, ctx.shape, ctx.block = ignore_index, logits.shape, block
        return row_loss.sum() / divisor

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        rows_logits, targets, log_norm, divisor = ctx.saved_tensors
        rows, vocab = rows_logits.shape
        grad = torch.empty(rows, vocab, device=rows_logits.device, dtype=rows_logits.dtype)
        if rows:
            _cross_entropy_backward_kernel[(rows,)](
                rows_logits, targets, log_norm, grad_loss.float().reshape(()), divisor, grad, vocab,
                rows_logits.stride(0), grad.stride(0), ctx.ignore_index, BLOCK=ctx.block, num_warps=8)
        return grad.view(ctx.shape), None, None, None


@torch.compiler.disable  # a compiled model traces transformers' loss instead (see modeling's use_fused_kernels)
def cross_entropy(logits, targets, divisor, ignore_index=-100):
    """Σ CE(logits[i], targets[i]) / divisor over the rows whose target is not ignore_index (module docstring);
    logits [..., vocab] in any float dtype, targets of the leading shape, divisor a tensor; the loss in fp32."""
    return CrossEntropyFunction.apply(logits, targets, divisor, ignore_index)


__all__ = ["cross_entropy"]
