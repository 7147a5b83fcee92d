"""The recurrence (DESIGN §1): chunked and recurrent forms against the fp32 step-by-step oracle, and the oracle
against the parallel form written out here in fp64.

    S_t = diag(λ_t) S_{t-1} + k_t v_tᵀ,   o_t = scale · S_tᵀ q_t
"""

import pytest
import torch

import linear_decay.recurrence as rec
from linear_decay.recurrence import (
    chunked_recurrence,
    fused_recurrent,
    linear_decay_attention,
    naive_recurrence,
)

from conftest import relative_error

B, H, K, V = 2, 3, 8, 12  # K != V on purpose
TOL = 1e-5
DECAY_KINDS = ("vector", "scalar", "static", "none")


def make_inputs(kind, length, seed=0, low=-1.0, high=0.0, key_dim=K, value_dim=V, with_state=True):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, length, H, key_dim, generator=gen)
    k = torch.randn(B, length, H, key_dim, generator=gen)
    v = torch.randn(B, length, H, value_dim, generator=gen)
    shape = {"vector": (B, length, H, key_dim), "scalar": (B, length, H), "static": (H,), "none": None}[kind]
    log_decay = None if shape is None else torch.rand(shape, generator=gen) * (high - low) + low
    state = torch.randn(B, H, key_dim, value_dim, generator=gen) if with_state else None
    return q, k, v, log_decay, state


def run_with_grads(fn, q, k, v, log_decay, state, scale=1.0, seed=1, **kwargs):
    """o, final state and the gradients of a fixed random functional of both (so every output is exercised)."""
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (q, k, v, log_decay, state)]
    o, final = fn(*leaves[:4], scale=scale, initial_state=leaves[4], output_final_state=True, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    loss = (o.float() * torch.randn(o.shape, generator=gen)).sum()
    loss = loss + (final * torch.randn(final.shape, generator=gen)).sum()
    loss.backward()
    grads = {name: t.grad for name, t in zip(("q", "k", "v", "log_decay", "initial_state"), leaves) if t is not None}
    return o.detach(), final.detach(), grads


def assert_close(actual, expected, tol=TOL, what=""):
    """Relative errors of o, the final state and every gradient.

    A reference gradient that vanishes (d log λ at T = 1 from a zero state is exactly 0; with λ ≈ e^-50 it is
    ≈ 1e-22) has no meaningful relative error: there the absolute error is measured against the scale of the
    gradients of the same loss (‖dv‖), i.e. it must sit at the rounding level of the other terms.
    """
    o, s, g = actual
    o_ref, s_ref, g_ref = expected
    assert set(g) == set(g_ref)
    scale = float(g_ref["v"].double().norm())
    errors = {"o": relative_error(o, o_ref), "final_state": relative_error(s, s_ref)}
    for name in g_ref:
        if float(g_ref[name].double().norm()) < 1e-6 * scale:
            errors[f"d{name} (vanishing, abs/‖dv‖)"] = float((g[name].double() - g_ref[name].double()).norm()) / scale
        else:
            errors[f"d{name}"] = relative_error(g[name], g_ref[name])
    bad = {name: err for name, err in errors.items() if not err <= tol}
    assert not bad, f"{what}: relative errors above {tol}: {bad}"


# ---------------------------------------------------------------------------------------------------------------
# The oracle itself against the parallel form of DESIGN §1 (fp64, written out independently)
# ---------------------------------------------------------------------------------------------------------------


def expand_log_decay(log_decay, batch, length, heads, key_dim):
    if log_decay is None:
        return torch.zeros(batch, length, heads, key_dim, dtype=torch.float64)
    g = log_decay.double()
    if g.dim() == 1:
        return g[None, None, :, None].expand(batch, length, heads, key_dim)
    if g.dim() == 3:
        return g[..., None].expand(batch, length, heads, key_dim)
    return g


def parallel_form(q, k, v, log_decay, scale=1.0, initial_state=None):
    """o_t = scale · [Σ_{s≤t} (q_t ⊙ Π_{r=s+1..t} λ_r)·k_s v_s + (q_t ⊙ Π_{r=1..t} λ_r) S_0], in fp64."""
    q, k, v = q.double(), k.double(), v.double()
    batch, length, heads, key_dim = q.shape
    cum = expand_log_decay(log_decay, batch, length, heads, key_dim).cumsum(1)  # Σ_{r≤t} log λ_r
    o = torch.zeros(batch, length, heads, v.shape[-1], dtype=torch.float64)
    for t in range(length):
        for s in range(t + 1):
            weight = (q[:, t] * torch.exp(cum[:, t] - cum[:, s]) * k[:, s]).sum(-1)  # [B, H]
            o[:, t] += weight[..., None] * v[:, s]
        if initial_state is not None:
            o[:, t] += torch.einsum("bhk,bhkv->bhv", q[:, t] * torch.exp(cum[:, t]), initial_state.double())
    return o * scale


def final_state_form(k, v, log_decay, initial_state=None):
    """S_T = Σ_s diag(Π_{r=s+1..T} λ_r) k_s v_sᵀ + diag(Π_{r=1..T} λ_r) S_0, in fp64."""
    k, v = k.double(), v.double()
    batch, length, heads, key_dim = k.shape
    cum = expand_log_decay(log_decay, batch, length, heads, key_dim).cumsum(1)
    decay_to_end = torch.exp(cum[:, -1:] - cum)  # [B, T, H, K]
    state = torch.einsum("bthk,bthv->bhkv", k * decay_to_end, v)
    if initial_state is not None:
        state = state + torch.exp(cum[:, -1])[..., None] * initial_state.double()
    return state


@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "initial_state"])
@pytest.mark.parametrize("kind", DECAY_KINDS)
def test_naive_oracle_matches_parallel_form(kind, with_state):
    q, k, v, log_decay, state = make_inputs(kind, 20, seed=3, with_state=with_state)
    o, final = naive_recurrence(q, k, v, log_decay, scale=0.5, initial_state=state, output_final_state=True)
    assert o.dtype == torch.float32 and o.shape == (B, 20, H, V)
    assert final.dtype == torch.float32 and final.shape == (B, H, K, V)
    assert relative_error(o, parallel_form(q, k, v, log_decay, scale=0.5, initial_state=state)) <= 1e-6
    assert relative_error(final, final_state_form(k, v, log_decay, initial_state=state)) <= 1e-6


# ---------------------------------------------------------------------------------------------------------------
# chunked / recurrent forms against the oracle: outputs, final state and all gradients
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "initial_state"])
@pytest.mark.parametrize("length", [1, 37, 128, 150])
@pytest.mark.parametrize("kind", DECAY_KINDS)
@pytest.mark.parametrize("fn", [chunked_recurrence, fused_recurrent], ids=["chunked", "fused"])
def test_matches_naive(fn, kind, length, with_state):
    q, k, v, log_decay, state = make_inputs(kind, length, with_state=with_state)
    expected = run_with_grads(naive_recurrence, q, k, v, log_decay, state, scale=0.7)
    actual = run_with_grads(fn, q, k, v, log_decay, state, scale=0.7)
    assert actual[0].shape == (B, length, H, V) and actual[0].dtype == torch.float32
    assert actual[1].shape == (B, H, K, V) and actual[1].dtype == torch.float32
    assert_close(actual, expected, what=f"{fn.__name__} {kind} T={length}")


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 64, 200])
@pytest.mark.parametrize("kind", ["vector", "scalar"])
def test_chunked_any_chunk_size(kind, chunk_size):
    q, k, v, log_decay, state = make_inputs(kind, 70, seed=5)
    expected = run_with_grads(naive_recurrence, q, k, v, log_decay, state)
    actual = run_with_grads(chunked_recurrence, q, k, v, log_decay, state, chunk_size=chunk_size)
    assert_close(actual, expected, what=f"chunk_size={chunk_size}")


@pytest.mark.parametrize("fn", [chunked_recurrence, fused_recurrent, naive_recurrence], ids=lambda f: f.__name__)
def test_no_final_state_unless_asked(fn):
    q, k, v, log_decay, _ = make_inputs("vector", 10)
    o, final = fn(q, k, v, log_decay)
    assert final is None
    expected = parallel_form(q, k, v, log_decay)
    assert relative_error(o, expected) <= 1e-6


def test_lrpe_like_key_dim_and_long_values():
    """Key dim larger than the value dim (LRPE doubles K) and a vector decay on it."""
    q, k, v, log_decay, state = make_inputs("vector", 40, key_dim=16, value_dim=4)
    expected = run_with_grads(naive_recurrence, q, k, v, log_decay, state)
    for fn in (chunked_recurrence, fused_recurrent):
        assert_close(run_with_grads(fn, q, k, v, log_decay, state), expected, what=fn.__name__)


def test_state_carries_across_calls():
    """Splitting a sequence and passing the final state on equals one call (what prefill + decoding relies on)."""
    q, k, v, log_decay, state = make_inputs("vector", 50)
    whole, s_whole = naive_recurrence(q, k, v, log_decay, initial_state=state, output_final_state=True)
    o1, s1 = chunked_recurrence(q[:, :33], k[:, :33], v[:, :33], log_decay[:, :33], initial_state=state,
                                output_final_state=True)
    o2, s2 = fused_recurrent(q[:, 33:], k[:, 33:], v[:, 33:], log_decay[:, 33:], initial_state=s1,
                             output_final_state=True)
    assert relative_error(torch.cat([o1, o2], 1), whole) <= TOL
    assert relative_error(s2, s_whole) <= TOL


# ---------------------------------------------------------------------------------------------------------------
# Stability: very strong decays
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length,chunk_size", [(13, None), (150, 24), (150, 16), (150, 36)],
                         ids=["short-all-pairs", "3-sub-chunks", "2-sub-chunks", "36-all-pairs"])
def test_strong_vector_chunks_of_any_length(length, chunk_size):
    """Strong chunks in sub-chunks of rec.SUB_CHUNK tokens, or all pairs when the chunk length is no multiple of it."""
    q, k, v, log_decay, state = make_inputs("vector", length, seed=13, low=-30.0, high=0.0)
    expected = run_with_grads(naive_recurrence, q, k, v, log_decay, state)
    actual = run_with_grads(chunked_recurrence, q, k, v, log_decay, state, chunk_size=chunk_size)
    assert_close(actual, expected, what=f"T={length} chunk={chunk_size}")


@pytest.mark.parametrize("low,high", [(-50.0, 0.0), (-50.0, -49.0), (-5.0, 0.0)], ids=["uniform_0_-50", "all_-50",
                                                                                     "uniform_0_-5"])
@pytest.mark.parametrize("kind", ["vector", "scalar"])
@pytest.mark.parametrize("fn", [chunked_recurrence, fused_recurrent], ids=["chunked", "fused"])
def test_strong_decay_is_finite_and_correct(fn, kind, low, high):
    q, k, v, log_decay, state = make_inputs(kind, 150, seed=7, low=low, high=high)
    expected = run_with_grads(naive_recurrence, q, k, v, log_decay, state)
    actual = run_with_grads(fn, q, k, v, log_decay, state)
    o, s, grads = actual
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    assert all(torch.isfinite(g).all() for g in grads.values())
    # with λ ≤ e^-49 the state forgets everything but the current token: o_t ≈ scale·(q_t·k_t) v_t
    if high <= -49.0:
        local = torch.einsum("bthk,bthk->bth", q, k)[..., None] * v
        assert relative_error(o, local) <= 1e-6
    assert_close(actual, expected, what=f"{fn.__name__} {kind} log λ in [{low}, {high}]")


def test_vector_decay_mixing_mild_and_strong_chunks():
    """Chunks past the factorised form's limit take the pairwise form while the others keep the matmul form: a batch
    where one head decays mildly, one strongly, and one switches from mild to strong mid-sequence."""
    q, k, v, log_decay, state = make_inputs("vector", 150, seed=11, low=-0.3, high=0.0)
    log_decay[:, :, 1] -= 8.0  # ~ -8 per step: every 32-token chunk is far past the limit
    log_decay[:, 70:, 2] -= 4.0  # mild, then strong from token 70
    chunk_sums = log_decay[:, :128].reshape(B, 4, 32, H, K).sum(2).amin(-1)  # [B, chunks, H]
    limit = rec.FACTORISED_DECAY_LIMIT
    assert (chunk_sums < -limit).any() and (chunk_sums > -limit).any()  # both forms are really exercised
    expected = run_with_grads(naive_recurrence, q, k, v, log_decay, state)
    assert_close(run_with_grads(chunked_recurrence, q, k, v, log_decay, state), expected, what="mixed chunks")


# ---------------------------------------------------------------------------------------------------------------
# Reduced precision inputs
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)], ids=["fp16", "bf16"])
@pytest.mark.parametrize("kind", ["vector", "scalar", "static"])
@pytest.mark.parametrize("fn", [chunked_recurrence, fused_recurrent, naive_recurrence], ids=lambda f: f.__name__)
def test_half_precision_inputs(fn, kind, dtype, tol):
    q, k, v, log_decay, state = make_inputs(kind, 70, seed=11)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    log_decay = log_decay.to(dtype)
    o, final = fn(q, k, v, log_decay, initial_state=state, output_final_state=True)
    assert o.dtype == dtype
    assert final.dtype == torch.float32
    # reference: the same (rounded) inputs in fp32
    o_ref, s_ref = naive_recurrence(q.float(), k.float(), v.float(), log_decay.float(), initial_state=state,
                                    output_final_state=True)
    assert torch.isfinite(o).all()
    assert relative_error(o, o_ref) <= tol
    assert relative_error(final, s_ref) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_gradients(dtype):
    q, k, v, log_decay, state = make_inputs("vector", 40, seed=12)
    q, k, v, log_decay = (t.to(dtype) for t in (q, k, v, log_decay))
    ref = run_with_grads(naive_recurrence, *(t.float() for t in (q, k, v, log_decay)), state)
    o, s, grads = run_with_grads(chunked_recurrence, q, k, v, log_decay, state)
    for name in ("q", "k", "v", "log_decay"):
        assert grads[name].dtype == dtype
        assert relative_error(grads[name], ref[2][name]) <= 3e-2, name


@pytest.mark.parametrize("kind", ["vector", "scalar", "static"])
def test_chunked_under_bf16_autocast(kind):
    """Under torch.autocast(bfloat16) (Trainer's --bf16 on CPU) with decays down to −20 per step, where strong
    vector chunks take the sub-chunk form: the chunked path still computes in fp32, so outputs and gradients equal
    the fp32 oracle's on the same inputs."""
    q, k, v, log_decay, state = make_inputs(kind, 70, seed=13, low=-20.0)

    def under_autocast(*args, **kwargs):  # the forward under autocast, the backward outside it, as Trainer does
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return chunked_recurrence(*args, **kwargs)

    o, s, grads = run_with_grads(under_autocast, q, k, v, log_decay, state)
    expected = run_with_grads(naive_recurrence, q, k, v, log_decay, state)
    assert o.dtype == torch.float32
    assert_close((o, s, grads), expected, tol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Backend selection
# ---------------------------------------------------------------------------------------------------------------


def test_bogus_backend_raises_value_error(monkeypatch):
    monkeypatch.setenv("LINEAR_DECAY_BACKEND", "bogus")
    q, k, v, log_decay, _ = make_inputs("scalar", 4)
    with pytest.raises(ValueError, match="bogus"):
        linear_decay_attention(q, k, v, log_decay)


def test_triton_backend_without_kernels_raises_runtime_error(monkeypatch):
    monkeypatch.delitem(rec.BACKENDS, "triton", raising=False)
    monkeypatch.setenv("LINEAR_DECAY_BACKEND", "triton")
    q, k, v, log_decay, _ = make_inputs("scalar", 4)
    with pytest.raises(RuntimeError, match="triton"):
        linear_decay_attention(q, k, v, log_decay)


def test_backend_errors_surface_through_the_model(monkeypatch):
    from linear_decay import LinearDecayForCausalLM

    from conftest import tiny_config

    model = LinearDecayForCausalLM(tiny_config())
    ids = torch.zeros(1, 12, dtype=torch.long)
    monkeypatch.setenv("LINEAR_DECAY_BACKEND", "bogus")
    with pytest.raises(ValueError, match="LINEAR_DECAY_BACKEND"):
        model(ids, use_cache=False)
    monkeypatch.delitem(rec.BACKENDS, "triton", raising=False)
    monkeypatch.setenv("LINEAR_DECAY_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="triton"):
        model(ids, use_cache=False)


@pytest.mark.parametrize("env,expected", [("naive", "naive"), ("torch", "torch"), ("auto", "torch"), (None, "torch")])
def test_backend_selection_routes_calls(monkeypatch, env, expected):
    """The environment variable really picks the implementation (the model-level equivalence tests rely on it)."""
    calls = []
    for name in ("naive", "torch"):
        original = rec.BACKENDS[name]

        def spy(*args, _name=name, _fn=original, **kwargs):
            calls.append(_name)
            return _fn(*args, **kwargs)

        monkeypatch.setitem(rec.BACKENDS, name, spy)
    monkeypatch.delitem(rec.BACKENDS, "triton", raising=False)
    if env is None:
        monkeypatch.delenv("LINEAR_DECAY_BACKEND", raising=False)
    else:
        monkeypatch.setenv("LINEAR_DECAY_BACKEND", env)
    q, k, v, log_decay, _ = make_inputs("vector", 9)
    o, _ = linear_decay_attention(q, k, v, log_decay)
    assert calls == [expected]
    assert relative_error(o, parallel_form(q, k, v, log_decay)) <= 1e-6
