"""The fused cross-entropy (Triton) against transformers' causal-LM loss (`ForCausalLMLoss`: logits upcast, then
`F.cross_entropy`) evaluated in fp64: the loss and ∂L/∂logits with ignored rows, a vocabulary over one and under one
loop block, large logits, a divisor other than the count (num_items_in_batch) and an upstream gradient other than 1;
and the whole model's loss routed through it under LINEAR_DECAY_BACKEND=triton. On CPU the kernels run in Triton's
interpreter (conftest sets TRITON_INTERPRET=1): fp32 and fp16 only (DESIGN §7)."""

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

pytest.importorskip("triton")

from linear_decay.ops_loss import BLOCK, cross_entropy  # noqa: E402
from linear_decay.loss import causal_lm_targets  # noqa: E402

from conftest import assert_fused_kernel_matches_torch, relative_error, tiny_config  # noqa: E402

pytestmark = pytest.mark.slow  # the Triton kernels in the interpreter

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_batch(rows, length, vocab, dtype, seed, spread=4.0):
    generator = torch.Generator().manual_seed(seed)
    logits = (spread * torch.randn(rows, length, vocab, generator=generator)).to(dtype).to(DEVICE)
    labels = torch.randint(0, vocab, (rows, length), generator=generator)
    labels[0, :2] = -100  # an unscored prompt
    labels[-1, -3:] = -100  # right padding
    return logits, labels.to(DEVICE)


def loss_and_grad(loss_fn, logits, upstream=3.0):
    leaf = logits.detach().clone().requires_grad_()
    loss = loss_fn(leaf)
    (loss * upstream).backward()
    return loss.detach(), leaf.grad


@pytest.mark.parametrize("vocab", [37, BLOCK + 904], ids=["under-a-block", "over-a-block"])
@pytest.mark.parametrize("items", [None, 29], ids=["mean", "num_items_in_batch"])
def test_matches_transformers_loss_in_fp64(vocab, items):
    logits, labels = make_batch(2, 7, vocab, torch.float32, seed=vocab, spread=30.0)  # large logits: e^x overflows
    targets, divisor = causal_lm_targets(labels, items, logits.device)
    loss, grad = loss_and_grad(lambda x: cross_entropy(x, targets, divisor), logits)
    loss_ref, grad_ref = loss_and_grad(
        lambda x: ForCausalLMLoss(x, labels, vocab, num_items_in_batch=items), logits.double())
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32 and grad.shape == logits.shape
    assert relative_error(loss, loss_ref) <= 1e-6
    assert relative_error(grad, grad_ref) <= 1e-5  # fp32 e^{x − log Σ}: |x − log Σ| ≈ 100 here
    # ignored targets (the prompt's shifted positions, the padding, each row's last position) get no gradient
    assert not grad.view(-1, vocab)[targets == -100].any()


def test_fp16_logits_give_fp16_gradients():
    logits, labels = make_batch(3, 5, 300, torch.float16, seed=2)
    targets, divisor = causal_lm_targets(labels, None, logits.device)
    loss, grad = loss_and_grad(lambda x: cross_entropy(x, targets, divisor), logits)
    loss_ref, grad_ref = loss_and_grad(lambda x: ForCausalLMLoss(x, labels, 300), logits.double())
    assert loss.dtype == torch.float32 and grad.dtype == torch.float16
    assert relative_error(loss, loss_ref) <= 1e-6
    assert relative_error(grad, grad_ref) <= 1e-3


@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 needs the GPU (the interpreter runs fp32 / fp16)")
def test_bf16_logits_at_the_410m_vocabulary():
    logits, labels = make_batch(2, 64, 50304, torch.bfloat16, seed=4)
    targets, divisor = causal_lm_targets(labels, None, logits.device)
    loss, grad = loss_and_grad(lambda x: cross_entropy(x, targets, divisor), logits)
    loss_ref, grad_ref = loss_and_grad(lambda x: ForCausalLMLoss(x, labels, 50304), logits.double())
    assert grad.dtype == torch.bfloat16
    assert relative_error(loss, loss_ref) <= 1e-6
    assert relative_error(grad, grad_ref) <= 1e-2  # one bf16 rounding of each gradient


def test_nothing_labelled_is_nan_like_transformers():
    logits, labels = make_batch(1, 4, 20, torch.float32, seed=3)
    labels[:] = -100
    targets, divisor = causal_lm_targets(labels, None, logits.device)
    loss, grad = loss_and_grad(lambda x: cross_entropy(x, targets, divisor), logits)
    assert torch.isnan(loss) and torch.isnan(ForCausalLMLoss(logits, labels, 20))
    assert not grad.any()


def test_model_loss_runs_on_the_kernel(monkeypatch):
    """LINEAR_DECAY_BACKEND=triton computes the model's training loss on the kernel (once per forward) with the
    torch backend's loss, logits and gradients (transformers' loss there)."""
    assert_fused_kernel_matches_torch(monkeypatch, tiny_config(decay_type="gla"), "cross_entropy",
                                      calls_per_forward=1)


def test_a_custom_loss_function_is_kept(monkeypatch):
    """A loss set on the model, or an option the kernel does not take, goes through transformers' path."""
    import linear_decay.modeling_linear_decay as modeling

    monkeypatch.setenv("LINEAR_DECAY_BACKEND", "triton")
    calls = []
    monkeypatch.setattr(modeling, "cross_entropy", lambda *args: calls.append(1) or torch.zeros(()))
    model = modeling.LinearDecayForCausalLM(tiny_config(decay_type="simple", decay_granularity="scalar")).to(DEVICE)
    ids = torch.randint(0, 64, (2, 6), device=DEVICE)
    with torch.no_grad():
        model(input_ids=ids, labels=ids, use_cache=False)  # the default loss: on the kernel
        assert calls == [1]
        model(input_ids=ids, labels=ids, use_cache=False, ignore_index=5)  # an option of transformers' loss only
        assert calls == [1]
        model.loss_function = lambda logits, labels, vocab_size, **kwargs: logits.float().mean() * 0 + 7.0
        assert float(model(input_ids=ids, labels=ids, use_cache=False).loss) == 7.0
        assert calls == [1]
