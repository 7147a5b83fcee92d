"""The fused recurrent decoding kernel (Triton, DESIGN §1) against the fp32 step-by-step oracle `naive_recurrence`.

    S_t = diag(λ_t) S_{t-1} + k_t v_tᵀ,   o_t = scale · S_tᵀ q_t

On CPU the kernel runs in Triton's interpreter (conftest sets TRITON_INTERPRET=1): fp32 and fp16 only, bf16 on the GPU
(DESIGN §7; tools/gpu_check_small_kernels.py). With a GPU the same tests run on CUDA tensors. Head dims are not
powers of two, so every load is masked.
"""

import pytest
import torch

pytest.importorskip("triton")

from linear_decay.ops_recurrent import triton_fused_recurrent  # noqa: E402
from linear_decay.recurrence import naive_recurrence  # noqa: E402

from conftest import relative_error  # noqa: E402

pytestmark = pytest.mark.slow  # the Triton kernels in the interpreter

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B, H, K, V = 2, 3, 24, 40  # K != V, neither a power of two
DECAY_KINDS = ("vector", "scalar", "static", "none")


def make_inputs(kind, length, seed=0, low=-1.0, high=0.0, key_dim=K, value_dim=V, batch=B, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, length, H, key_dim, generator=gen).to(dtype)
    k = torch.randn(batch, length, H, key_dim, generator=gen).to(dtype)
    v = torch.randn(batch, length, H, value_dim, generator=gen).to(dtype)
    shape = {"vector": (batch, length, H, key_dim), "scalar": (batch, length, H), "static": (H,), "none": None}[kind]
    log_decay = None if shape is None else torch.rand(shape, generator=gen) * (high - low) + low
    state = torch.randn(batch, H, key_dim, value_dim, generator=gen)
    return tuple(None if t is None else t.to(DEVICE) for t in (q, k, v, log_decay, state))


def check_against_oracle(q, k, v, log_decay, state, scale=0.5, tol=1e-5):
    """Run kernel and oracle (the kernel on a copy of the state, which it updates in place); compare o and S_T."""
    o_ref, final_ref = naive_recurrence(q, k, v, log_decay, scale=scale, initial_state=state, output_final_state=True)
    state_arg = None if state is None else state.clone()
    o, final = triton_fused_recurrent(q, k, v, log_decay, scale=scale, initial_state=state_arg,
                                      output_final_state=True)
    assert o.dtype == v.dtype and o.shape == o_ref.shape
    assert final.dtype == torch.float32 and final.shape == final_ref.shape
    assert relative_error(o, o_ref) <= tol
    assert relative_error(final, final_ref) <= 1e-5
    return o, final, state_arg


@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "initial_state"])
@pytest.mark.parametrize("length", [1, 3])
@pytest.mark.parametrize("kind", DECAY_KINDS)
def test_matches_oracle(kind, length, with_state):
    q, k, v, log_decay, state = make_inputs(kind, length, seed=length)
    check_against_oracle(q, k, v, log_decay, state if with_state else None)


@pytest.mark.parametrize("kind", DECAY_KINDS)
def test_state_updated_in_place(kind):
    """An fp32 contiguous initial state receives the new state and is returned as the final state."""
    q, k, v, log_decay, state = make_inputs(kind, 2, seed=5)
    _, final_ref = naive_recurrence(q, k, v, log_decay, initial_state=state, output_final_state=True)
    buffer = state.clone()
    _, final = triton_fused_recurrent(q, k, v, log_decay, initial_state=buffer, output_final_state=True)
    assert final is buffer and final.data_ptr() == buffer.data_ptr()
    assert relative_error(buffer, final_ref) <= 1e-5
    assert relative_error(buffer, state) > 1e-2  # it did change


def test_initial_state_untouched_without_final_state():
    q, k, v, log_decay, state = make_inputs("vector", 2, seed=6)
    o_ref, _ = naive_recurrence(q, k, v, log_decay, initial_state=state)
    buffer = state.clone()
    o, final = triton_fused_recurrent(q, k, v, log_decay, initial_state=buffer)
    assert final is None
    assert torch.equal(buffer, state)
    assert relative_error(o, o_ref) <= 1e-5


def test_other_state_dtype_or_layout_is_copied():
    """A state that is not fp32 contiguous is read through a fp32 copy; the caller's tensor stays as it was."""
    q, k, v, log_decay, state = make_inputs("scalar", 3, seed=7)
    _, final_ref = naive_recurrence(q, k, v, log_decay, initial_state=state, output_final_state=True)
    strided = state.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, [K, V] stored column-major
    before = strided.clone()
    _, final = triton_fused_recurrent(q, k, v, log_decay, initial_state=strided, output_final_state=True)
    assert final.data_ptr() != strided.data_ptr() and torch.equal(strided, before)
    assert relative_error(final, final_ref) <= 1e-5


@pytest.mark.parametrize("kind", ["vector", "scalar"])
def test_strong_decay(kind):
    """λ down to e^-60 (and one exact λ = 0): the old state vanishes, nothing over- or underflows into NaN."""
    q, k, v, log_decay, state = make_inputs(kind, 3, seed=8, low=-60.0, high=-20.0)
    log_decay[0, 1] = float("-inf")
    o, final, _ = check_against_oracle(q, k, v, log_decay, state * 1e3)
    assert torch.isfinite(o).all() and torch.isfinite(final).all()


def test_longer_sequence_and_head_dims():
    """Any T is correct (here 33 tokens, a mild decay so the state accumulates), at K=V=256 and at tiny odd dims."""
    check_against_oracle(*make_inputs("vector", 33, seed=9, low=-0.05), scale=0.125)
    check_against_oracle(*make_inputs("scalar", 2, seed=10, key_dim=256, value_dim=256, batch=1))
    check_against_oracle(*make_inputs("static", 2, seed=11, key_dim=3, value_dim=5))


@pytest.mark.parametrize("kind", DECAY_KINDS)
def test_fp16_inputs(kind):
    """fp16 q, k, v (fp32 state and decay arithmetic): o in fp16, within its rounding of the fp32 oracle."""
    q, k, v, log_decay, state = make_inputs(kind, 3, seed=12, dtype=torch.float16)
    check_against_oracle(q, k, v, log_decay, state, tol=2e-3)


def test_strided_and_broadcast_inputs():
    """Inputs as the model makes them: q, k expanded from per-head vectors (stride 0, the TPE filter), v and the
    vector decay as slices of wider tensors."""
    gen = torch.Generator().manual_seed(13)
    length = 2
    q = torch.randn(H, K, generator=gen).to(DEVICE).expand(B, length, H, K)
    k = torch.randn(H, K, generator=gen).to(DEVICE).expand(B, length, H, K)
    v = torch.randn(B, length, H, 2 * V, generator=gen).to(DEVICE)[..., :V]
    log_decay = -torch.rand(B, length, H, K + 8, generator=gen).to(DEVICE)[..., 8:]
    state = torch.randn(B, H, K, V, generator=gen).to(DEVICE)
    assert q.stride(0) == 0 and not v.is_contiguous()
    check_against_oracle(q, k, v, log_decay, state)


def test_zero_tokens():
    q, k, v, log_decay, state = make_inputs("vector", 0, seed=14)
    buffer = state.clone()
    o, final = triton_fused_recurrent(q, k, v, log_decay, initial_state=buffer, output_final_state=True)
    assert o.shape == (B, 0, H, V) and torch.equal(final, state)
    o, final = triton_fused_recurrent(q, k, v, log_decay, output_final_state=True)
    assert torch.equal(final, torch.zeros_like(state))


def test_refuses_inputs_that_need_grad():
    q, k, v, log_decay, state = make_inputs("vector", 1, seed=15)
    with pytest.raises(RuntimeError, match="inference-only"):
        triton_fused_recurrent(q.requires_grad_(), k, v, log_decay, initial_state=state)
    with torch.no_grad():  # no graph would be recorded: allowed
        triton_fused_recurrent(q, k, v, log_decay, initial_state=state)


def test_rejects_bad_shapes():
    q, k, v, log_decay, state = make_inputs("vector", 2, seed=16)
    with pytest.raises(ValueError, match="log_decay"):
        triton_fused_recurrent(q, k, v, log_decay[..., :-1])
    with pytest.raises(ValueError, match="initial_state"):
        triton_fused_recurrent(q, k, v, log_decay, initial_state=state[:, :, :-1])
    with pytest.raises(ValueError, match="up to 256"):
        triton_fused_recurrent(*make_inputs("none", 1, key_dim=257)[:3])
