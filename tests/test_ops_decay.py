"""The fused Mamba2 decay (Triton): log λ = −c ⊙ softplus(z + b) for every unit that has that form, forward
and the gradients of z and of the unit's own parameters against the unit's PyTorch `log_decay`; the model routed
through it under LINEAR_DECAY_BACKEND=triton. On CPU the kernels run in Triton's interpreter (conftest sets
TRITON_INTERPRET=1); on a GPU the same tests run on CUDA."""

import pytest
import torch

pytest.importorskip("triton")

from linear_decay.decay import DECAY_REGISTRY  # noqa: E402
from linear_decay.ops_decay import softplus_decay  # noqa: E402

from conftest import assert_fused_kernel_matches_torch, relative_error, tiny_config  # noqa: E402

pytestmark = pytest.mark.slow  # the Triton kernels in the interpreter

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SOFTPLUS_FORM = ("mamba2", "mamba2_no_a", "mamba2_no_dt", "mamba2_no_a_no_dt")


def make_unit(decay_type, width, seed=0):
    """The registered unit at its initialisation, its parameters then moved (so that every one matters)."""
    config = tiny_config(decay_type=decay_type)
    unit = DECAY_REGISTRY[decay_type].module(config, 0, width)
    unit.reset_parameters(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in unit.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=gen))
    return unit.to(DEVICE)


def make_logits(shape, seed=0):
    """Decay logits over the range the units see, with saturated tails: softplus(x) = x and softplus(x) ≈ e^x, where
    log λ ≈ −1e-30 (a decay that rounds to 1 must still give its exact logarithm)."""
    gen = torch.Generator().manual_seed(seed)
    z = 3 * torch.randn(shape, generator=gen)
    flat = z.view(-1)
    flat[::7] = 80 * torch.randn(flat[::7].shape, generator=gen)
    flat[:4] = torch.tensor([70.0, -70.0, 1e-7, 0.0])
    return z.to(DEVICE)


def forward_backward(unit, z, grad, kernel):
    z = z.detach().clone().requires_grad_()
    unit.zero_grad(set_to_none=True)
    log_decay = unit(z, softplus_kernel=kernel)
    log_decay.backward(grad)
    return log_decay.detach(), z.grad, {name: p.grad.clone() for name, p in unit.named_parameters()}


def test_the_units_of_softplus_form():
    """Which registered units the fused kernel serves (a new unit of this form says so in `softplus_form`)."""
    config = tiny_config()
    with_form = {name for name, spec in DECAY_REGISTRY.items()
                 if spec.module(config, 0, 4).softplus_form() is not None}
    assert with_form == set(SOFTPLUS_FORM)


@pytest.mark.parametrize("width", [200, 3], ids=["vector-200", "scalar-3"])
@pytest.mark.parametrize("decay_type", SOFTPLUS_FORM)
def test_matches_the_unit(decay_type, width):
    """fp32 z: log λ, ∂z and the unit's parameter gradients match its PyTorch log_decay (elementwise relative error
    for log λ, so that decays near 1 count as much as strong ones); rows not a multiple of the tile."""
    unit = make_unit(decay_type, width, seed=width)
    z = make_logits((3, 53, width), seed=width)
    grad = torch.randn(z.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    log_decay, grad_z, grads = forward_backward(unit, z, grad, softplus_decay)
    ref_log_decay, ref_grad_z, ref_grads = forward_backward(unit, z, grad, None)
    assert log_decay.dtype == torch.float32 and log_decay.shape == z.shape
    assert torch.all(log_decay <= 0)
    elementwise = ((log_decay.double() - ref_log_decay.double()).abs()
                   / ref_log_decay.double().abs().clamp(min=1e-37))
    assert float(elementwise.max()) <= 1e-5
    assert relative_error(grad_z, ref_grad_z) <= 1e-5
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert relative_error(grads[name], ref_grads[name]) <= 1e-5, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits(dtype):
    """z in the projection's dtype (the model's bf16): read as is (no fp32 copy), ∂z returned in that dtype."""
    unit = make_unit("mamba2", 130)
    z = (2 * torch.randn(4, 33, 130, generator=torch.Generator().manual_seed(2))).to(dtype).to(DEVICE)
    grad = torch.randn(z.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    log_decay, grad_z, grads = forward_backward(unit, z, grad, softplus_decay)
    ref_log_decay, ref_grad_z, ref_grads = forward_backward(unit, z.float(), grad, None)
    assert log_decay.dtype == torch.float32 and grad_z.dtype == dtype
    assert relative_error(log_decay, ref_log_decay) <= 1e-6  # same fp32 arithmetic on the same values
    assert relative_error(grad_z, ref_grad_z) <= 1e-2  # one rounding to the low-precision dtype
    for name in grads:
        assert relative_error(grads[name], ref_grads[name]) <= 1e-5, name


def test_parameters_must_match_the_width():
    z = torch.zeros(2, 5, device=DEVICE)
    with pytest.raises(ValueError, match="must be \\[5\\]"):
        softplus_decay(z, torch.ones(4, device=DEVICE), None)


def test_model_decays_run_on_the_kernel(monkeypatch):
    """LINEAR_DECAY_BACKEND=triton sends every layer's decay through the kernel (counted) and gives the torch
    backend's logits and gradients (the recurrence pinned to the torch path so that only the fused pieces differ)."""
    assert_fused_kernel_matches_torch(monkeypatch, tiny_config(decay_type="mamba2"), "softplus_decay")
