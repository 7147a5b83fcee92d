"""The causal-LM loss without materialising the logits (`config.loss_chunk_size`, DESIGN §1's head): the LM head
and cross-entropy a chunk of rows at a time. On CUDA the model's default loss is the fused kernel of `ops_loss`.
"""

import torch
import torch.nn.functional as F


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Σ_t CE(h_t Wᵀ, y_t) / divisor over rows with y_t ≠ -100, `chunk` rows at a time: each chunk's logits (fp32
    softmax) exist only inside the loop, and the gradients to h and W are formed there too (∂CE/∂logits =
    softmax − onehot), so nothing of size [N, vocab] is kept for the backward pass. Ignored rows are computed and
    zeroed rather than skipped or gathered out, and the divisor stays a tensor: the loss makes no host-device
    synchronisation, so the host can queue the backward while the GPU still runs the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk, divisor):
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None  # every row written below
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            targets = labels[rows]
            valid = (targets != -100)[:, None]
            targets = targets.clamp(min=0)[:, None]  # ignored rows pick class 0, then count nothing
            h = hidden[rows]
            logits = (h @ weight.t()).float()
            log_norm = torch.logsumexp(logits, dim=-1, keepdim=True)
            total += torch.where(valid, log_norm - logits.gather(1, targets), 0.0).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            grad_logits = torch.softmax(logits, dim=-1)
            grad_logits.scatter_add_(1, targets, torch.full_like(log_norm, -1.0))
            grad_logits = torch.where(valid, grad_logits / divisor, 0.0).to(weight.dtype)
            if grad_hidden is not None:
                grad_hidden[rows] = (grad_logits @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += (grad_logits.t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total / divisor

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (grad_hidden * grad_output.to(grad_hidden.dtype) if grad_hidden is not None else None,
                (grad_weight * grad_output).to(ctx.weight_dtype) if grad_weight is not None else None,
                None, None, None)


def chunked_linear_cross_entropy(hidden_states, weight, labels, chunk, num_items_in_batch=None):
    """The causal-LM loss of transformers' ForCausalLMLoss (labels shifted left by one, -100 ignored; mean over the
    labelled tokens, or their sum / `num_items_in_batch` under gradient accumulation) from the last hidden states and
    the LM head's weight, without materialising the logits (DESIGN §1's head; `config.loss_chunk_size`)."""
    targets, divisor = causal_lm_targets(labels, num_items_in_batch, hidden_states.device)
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk, divisor)


def causal_lm_targets(labels, num_items_in_batch, device):
    """ForCausalLMLoss's targets and divisor: labels shifted left by one (the last position of each row -100), flat;
    the number of labelled targets, or num_items_in_batch, as an fp32 device tensor (nan where nothing is labelled,
    as transformers' mean) — no host-device synchronisation."""
    targets = F.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1).to(device)
    divisor = (targets != -100).sum() if num_items_in_batch is None else num_items_in_batch
    divisor = torch.as_tensor(divisor, device=device).to(torch.float32)
    return targets, torch.where(divisor > 0, divisor, float("nan"))
