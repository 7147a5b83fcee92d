"""The fused SwiGLU (Triton): y = silu(gate) ⊙ up, forward and both gradients against the PyTorch form evaluated in
fp64 on upcast inputs, and the whole model's MLPs routed through it under LINEAR_DECAY_BACKEND=triton. On CPU the
kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1): fp32 and fp16 only (DESIGN §7)."""

import pytest
import torch

pytest.importorskip("triton")

from linear_decay.ops_swiglu import BLOCK, swiglu, swiglu_reference  # noqa: E402

from conftest import assert_fused_kernel_matches_torch, relative_error, tiny_config  # noqa: E402

pytestmark = pytest.mark.slow  # the Triton kernels in the interpreter

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def forward_backward(fn, gate, up, grad_y):
    leaves = [t.detach().clone().requires_grad_() for t in (gate, up)]
    y = fn(*leaves)
    y.backward(grad_y.to(y.dtype))
    return y.detach(), [t.grad for t in leaves]


def make_inputs(shape, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    gate, up, grad_y = (3 * torch.randn(shape, generator=gen) for _ in range(3))
    return gate.to(dtype).to(DEVICE), up.to(dtype).to(DEVICE), grad_y.to(DEVICE)


@pytest.mark.parametrize("shape", [(3, 7, 50), (BLOCK + 5,), (2, 1)], ids=["3x7x50", "block+5", "2x1"])
def test_matches_fp64_reference(shape):
    gate, up, grad_y = make_inputs(shape, seed=len(shape))
    y, grads = forward_backward(swiglu, gate, up, grad_y)
    y_ref, grads_ref = forward_backward(swiglu_reference, gate.double(), up.double(), grad_y.double())
    assert y.dtype == torch.float32 and y.shape == shape
    assert relative_error(y, y_ref) <= 1e-6
    for name, grad, grad_ref in zip(("gate", "up"), grads, grads_ref):
        assert grad.dtype == torch.float32 and relative_error(grad, grad_ref) <= 1e-6, name


def test_fp16_and_non_contiguous_inputs():
    gate, up, grad_y = make_inputs((40, 24), dtype=torch.float16, seed=3)
    gate_t = gate.t().contiguous().t()  # same values, column-major
    y, grads = forward_backward(swiglu, gate_t, up, grad_y)
    y_ref, grads_ref = forward_backward(swiglu_reference, gate.double(), up.double(), grad_y.double())
    assert y.dtype == torch.float16 and all(g.dtype == torch.float16 for g in grads)
    assert relative_error(y, y_ref) <= 1e-3
    assert all(relative_error(g, r) <= 1e-3 for g, r in zip(grads, grads_ref))


def test_mismatched_shapes_are_an_error():
    with pytest.raises(ValueError, match="one shape"):
        swiglu(torch.ones(2, 3, device=DEVICE), torch.ones(3, 2, device=DEVICE))


def test_model_mlps_run_on_the_kernel(monkeypatch):
    """LINEAR_DECAY_BACKEND=triton sends every block's SwiGLU through the kernel (counted) and gives the torch
    backend's logits and gradients (the recurrence pinned to the torch path so that only the fused pieces differ)."""
    assert_fused_kernel_matches_torch(monkeypatch, tiny_config(decay_type="hgrn2"), "swiglu")
