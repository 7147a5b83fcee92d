"""The fused output gate + RMSNorm (Triton, DESIGN §1 "Output"): y = RMSNorm_d(o ⊙ sigmoid(z)) · weight, and the plain
RMSNorm of the blocks on the same kernels (no gate).

Forward and the three gradients against the PyTorch reference evaluated in fp64 on upcast inputs; the reference
against the model's own two-step code; and the whole model with LINEAR_DECAY_BACKEND=triton vs torch. On CPU the
kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1): fp32 and fp16 only (DESIGN §7); with a GPU the
same tests run on CUDA tensors.
"""

import pytest
import torch

pytest.importorskip("triton")

import linear_decay.modeling_linear_decay as modeling  # noqa: E402
from linear_decay.ops_norm import gated_rms_norm, gated_rms_norm_reference, rms_norm  # noqa: E402
from linear_decay.modeling_linear_decay import LinearDecayRMSNorm  # noqa: E402
from linear_decay.recurrence import BACKENDS, chunked_recurrence  # noqa: E402

from conftest import perturbed_model, relative_error, tiny_config  # noqa: E402

pytestmark = pytest.mark.slow  # the Triton kernels in the interpreter

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-5


def make_inputs(shape, seed=0, dtype=torch.float32, weight_dtype=None):
    gen = torch.Generator().manual_seed(seed)
    hidden = shape[-1]
    o = torch.randn(shape, generator=gen).to(dtype)
    gate_logits = (2 * torch.randn(shape, generator=gen)).to(dtype)  # gates spread over (0, 1)
    weight = (1 + 0.3 * torch.randn(hidden, generator=gen)).to(weight_dtype or dtype)
    grad_y = torch.randn(shape, generator=gen)
    return o.to(DEVICE), gate_logits.to(DEVICE), weight.to(DEVICE), grad_y.to(DEVICE)


def forward_backward(fn, o, gate_logits, weight, grad_y):
    """y and the gradients of Σ y · grad_y with respect to o, gate_logits and weight."""
    leaves = [t.detach().clone().requires_grad_() for t in (o, gate_logits, weight)]
    y = fn(*leaves, EPS)
    y.backward(grad_y.to(y.dtype))
    return y.detach(), [t.grad for t in leaves]


def fp64_reference(o, gate_logits, weight, grad_y):
    return forward_backward(gated_rms_norm_reference, o.double(), gate_logits.double(), weight.double(),
                            grad_y.double())


@pytest.mark.parametrize("shape", [(37, 48), (2, 5, 100), (3, 5)], ids=["37x48", "2x5x100", "3x5"])
def test_fp32_matches_fp64_reference(shape):
    """Rows not a multiple of the backward's rows per program, hidden sizes not a power of two."""
    inputs = make_inputs(shape, seed=len(shape))
    y, grads = forward_backward(gated_rms_norm, *inputs)
    y_ref, grads_ref = fp64_reference(*inputs)
    assert y.dtype == torch.float32 and y.shape == shape
    assert relative_error(y, y_ref) <= 1e-6
    for name, grad, grad_ref in zip(("o", "gate_logits", "weight"), grads, grads_ref):
        assert grad.dtype == torch.float32 and grad.shape == grad_ref.shape
        assert relative_error(grad, grad_ref) <= 1e-5, name


def test_fp16_matches_fp64_reference():
    inputs = make_inputs((29, 72), seed=3, dtype=torch.float16)
    y, grads = forward_backward(gated_rms_norm, *inputs)
    y_ref, grads_ref = fp64_reference(*inputs)
    assert y.dtype == torch.float16 and all(g.dtype == torch.float16 for g in grads)
    assert relative_error(y, y_ref) <= 2e-3
    for name, grad, grad_ref in zip(("o", "gate_logits", "weight"), grads, grads_ref):
        assert relative_error(grad, grad_ref) <= 2e-3, name


def test_normalised_value_is_rounded_to_the_input_dtype():
    """fp16 activations with an fp32 weight (autocast): y is fp32 = weight · fp16(normalised), exactly as the model's
    norm does it, so y / weight lands on fp16 values."""
    o, gate_logits, weight, grad_y = make_inputs((11, 40), seed=4, dtype=torch.float16, weight_dtype=torch.float32)
    y, grads = forward_backward(gated_rms_norm, o, gate_logits, weight, grad_y)
    assert y.dtype == torch.float32
    assert [g.dtype for g in grads] == [torch.float16, torch.float16, torch.float32]
    expected = weight * gated_rms_norm_reference(o.float(), gate_logits.float(), torch.ones_like(weight)).half()
    assert relative_error(y, expected) <= 1e-6
    _, grads_ref = fp64_reference(o, gate_logits, weight, grad_y)
    for grad, grad_ref in zip(grads, grads_ref):
        assert relative_error(grad, grad_ref) <= 2e-3


def test_non_contiguous_inputs_and_gradient():
    o, gate_logits, weight, grad_y = make_inputs((6, 48), seed=5)
    o_t = o.t().contiguous().t()  # same values, column-major
    y, grads = forward_backward(gated_rms_norm, o_t, gate_logits, weight, grad_y.t().contiguous().t())
    y_ref, grads_ref = fp64_reference(o, gate_logits, weight, grad_y)
    assert relative_error(y, y_ref) <= 1e-6
    assert all(relative_error(g, r) <= 1e-5 for g, r in zip(grads, grads_ref))


def test_reference_is_the_model_two_step_code():
    """The reference equals what the mixer computes without the kernel: o ⊙ sigmoid(z), then LinearDecayRMSNorm."""
    o, gate_logits, weight, _ = make_inputs((2, 7, 48), seed=6)
    norm = LinearDecayRMSNorm(48, eps=EPS).to(DEVICE)
    with torch.no_grad():
        norm.weight.copy_(weight)
        two_step = norm(o * torch.sigmoid(gate_logits))
    assert relative_error(gated_rms_norm_reference(o, gate_logits, weight, EPS), two_step) <= 1e-6


# ---------------------------------------------------------------------------------------------------------------
# The plain RMSNorm (no gate) against the model's torch norm
# ---------------------------------------------------------------------------------------------------------------


def torch_norm_forward_backward(x, weight, grad_y, dtype=None):
    """LinearDecayRMSNorm's own torch code (LINEAR_DECAY_BACKEND=torch), optionally in another dtype (fp64)."""
    norm = LinearDecayRMSNorm(x.shape[-1], eps=EPS).to(DEVICE)
    with torch.no_grad():
        norm.weight.data = weight.detach().clone().to(dtype or weight.dtype)
    leaf = x.detach().clone().to(dtype or x.dtype).requires_grad_()
    y = norm(leaf)
    y.backward(grad_y.to(y.dtype))
    return y.detach(), [leaf.grad, norm.weight.grad]


@pytest.mark.parametrize("shape", [(37, 48), (2, 5, 100)], ids=["37x48", "2x5x100"])
def test_plain_rms_norm_matches_the_model_norm(monkeypatch, shape):
    """rms_norm(x, weight) against LinearDecayRMSNorm's torch code in fp64: forward and both gradients."""
    monkeypatch.setenv("LINEAR_DECAY_BACKEND", "torch")
    x, _, weight, grad_y = make_inputs(shape, seed=8)
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight)]
    y = rms_norm(*leaves, EPS)
    y.backward(grad_y)
    y_ref, grads_ref = torch_norm_forward_backward(x, weight, grad_y, dtype=torch.float64)
    assert y.dtype == torch.float32 and relative_error(y, y_ref) <= 1e-6
    for name, leaf, grad_ref in zip(("x", "weight"), leaves, grads_ref):
        assert leaf.grad.dtype == torch.float32 and relative_error(leaf.grad, grad_ref) <= 1e-5, name


def test_plain_rms_norm_fp16_with_fp32_weight(monkeypatch):
    """Autocast-style mix: y = fp32 weight · fp16(normalised), as the model's norm; gradients in each input's dtype."""
    monkeypatch.setenv("LINEAR_DECAY_BACKEND", "torch")
    x, _, weight, grad_y = make_inputs((13, 40), seed=9, dtype=torch.float16, weight_dtype=torch.float32)
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight)]
    y = rms_norm(*leaves, EPS)
    y.backward(grad_y.to(y.dtype))
    y_model, grads_model = torch_norm_forward_backward(x, weight, grad_y)
    assert y.dtype == y_model.dtype == torch.float32
    assert relative_error(y, y_model) <= 1e-6
    assert [leaf.grad.dtype for leaf in leaves] == [torch.float16, torch.float32]
    for leaf, grad_ref in zip(leaves, grads_model):
        assert relative_error(leaf.grad, grad_ref) <= 2e-3


# ---------------------------------------------------------------------------------------------------------------
# The whole model
# ---------------------------------------------------------------------------------------------------------------


def logits_and_grads(model, input_ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=input_ids, labels=input_ids, use_cache=False)
    out.loss.backward()
    return out.logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_model_triton_backend_matches_torch(monkeypatch):
    """LINEAR_DECAY_BACKEND=triton routes every mixer's gate + norm and every block norm through the kernels (counted)
    and gives the torch backend's logits and gradients. The recurrence under "triton" is pinned to the torch path so
    that only the norms differ between the two runs."""
    monkeypatch.setitem(BACKENDS, "triton", chunked_recurrence)
    calls, plain_calls = [], []

    def counted(*args):
        calls.append(1)
        return gated_rms_norm(*args)

    def counted_plain(*args):
        plain_calls.append(1)
        return rms_norm(*args)

    monkeypatch.setattr(modeling, "gated_rms_norm", counted)
    monkeypatch.setattr(modeling, "rms_norm", counted_plain)
    config = tiny_config(decay_type="gla")
    model = perturbed_model(config).to(DEVICE)
    input_ids = torch.randint(0, config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(7)).to(DEVICE)

    monkeypatch.setenv("LINEAR_DECAY_BACKEND", "torch")
    logits_torch, grads_torch = logits_and_grads(model, input_ids)
    assert not calls and not plain_calls
    monkeypatch.setenv("LINEAR_DECAY_BACKEND", "auto")  # auto: the kernel on CUDA tensors, the torch code on CPU
    logits_and_grads(model, input_ids)
    assert len(calls) == (config.num_hidden_layers if DEVICE == "cuda" else 0)
    calls.clear()
    plain_calls.clear()

    monkeypatch.setenv("LINEAR_DECAY_BACKEND", "triton")
    logits_triton, grads_triton = logits_and_grads(model, input_ids)
    assert len(calls) == config.num_hidden_layers
    assert len(plain_calls) == 2 * config.num_hidden_layers + 1  # two per block and the final norm
    assert relative_error(logits_triton, logits_torch) <= 1e-5
    assert grads_triton.keys() == grads_torch.keys()
    bad = {name: relative_error(grads_triton[name], grads_torch[name]) for name in grads_torch}
    bad = {name: error for name, error in bad.items() if not error <= 1e-4}
    assert not bad, bad
