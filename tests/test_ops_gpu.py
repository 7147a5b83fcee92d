"""The Triton kernels on a CUDA GPU (skipped without one), each against an independent reference:

- `triton_chunked_recurrence` forward and every gradient (q, k, v, log λ, initial state, through the final state)
  against the float64 step-by-step oracle `naive_recurrence` run on float64 copies of the same (rounded) inputs, for
  vector, scalar, static and no decay; bf16 / fp16 / fp32; T ∈ {1, 63, 64, 65, 300, 1000} (one token, around the
  chunk size, several chunks); head dims 64, 128, 96 (not a power of two) and K ≠ V; a bf16 grid (K = V ∈ {64, 128,
  256}, T ∈ {63, 2048, 16384}) at 5e-3; every gradient at 3e-3 at five decay strengths from initialisation-like to
  uniform(−20, 0); strong decays (log λ down to −20 per step on some channels), weak ones (≈ 0) and channels with no
  decay at all; with and without initial / final states; non-contiguous and broadcast (stride-0) inputs as the
  model's TPE passes them.
- varlen: a packed batch with `cu_seqlens` equals each sequence run alone (outputs, final states, gradients) and the
  oracle.
- `triton_fused_recurrent` (decoding) against the oracle, with its in-place state update.
- Vector decay's state walks on a stream of their own (`ops_chunk._walk_stream`) change no bit of any result: from
  the default stream, a caller's stream and a CUDA graph.
- The whole model: a small LinearDecayForCausalLM on CUDA with LINEAR_DECAY_BACKEND=triton against =torch (logits and
  every parameter gradient, fp32 and bf16), cached decoding against a full forward, `torch.compile(model)` forward
  and backward against eager, and `torch.compile(fullgraph=True)` (the kernels as custom ops: no graph break) of a
  training step and a decoding step in bf16.

Compile time dominates: run with `-n 8` (pytest-xdist) on the GPU machine, see the note above LENGTH_CASES.

Tolerances are relative errors ||a − b|| / ||b|| over a whole tensor (conftest.relative_error), by input dtype:
fp32 5e-4 (the kernels may use tf32 dots), fp16 5e-3, bf16 2e-2; d log λ like every other gradient. Every output and
gradient must also be finite.
Inputs are fresh per check (a seed derived from the test's parameters), generated on the CPU so they are the same on
every machine.
"""

import copy
import math
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("the Triton kernel tests need a CUDA GPU", allow_module_level=True)

from linear_decay.generation import DecodeGraph  # noqa: E402
from linear_decay.modeling_linear_decay import CACHE_FIELD, RECURRENT_MAX_TOKENS  # noqa: E402
from linear_decay.recurrence import BACKENDS, naive_recurrence, resolve_backend  # noqa: E402

from conftest import perturbed_model, relative_error, tiny_config  # noqa: E402

DEVICE = "cuda"
TOL = {torch.float32: 5e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
DTYPE_NAME = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
KINDS = ("vector", "scalar", "static", "none")


def chunk_kernel():
    from linear_decay.ops_chunk import triton_chunked_recurrence
    return triton_chunked_recurrence


def decode_kernel():
    from linear_decay.ops_recurrent import triton_fused_recurrent
    return triton_fused_recurrent


def seed_of(*parts):
    return zlib.crc32(repr(parts).encode())


def cpu_generator(*parts):
    return torch.Generator().manual_seed(seed_of(*parts))


def assert_close(actual, expected, tol, what):
    assert actual is not None, f"{what}: missing"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert bool(torch.isfinite(actual).all()), f"{what}: non-finite values"
    err = relative_error(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"
    return err


# ----------------------------------------------------------------------------------------------------------------
# Inputs


def make_log_decay(kind, batch, length, heads, key_dim, strength, gen):
    """log λ ≤ 0 in fp32 on the CPU. Per channel (vector: head × key channel; scalar, static: head) a rate r, and per
    token log λ = −r·u with u ~ U[0.5, 1.5] (static: −r).
      mixed:  r log-uniform in [1e-4, 13.3], one channel at the maximum (log λ down to −20 per step), one with r = 0
              (no decay) and about one in eight more with r = 0;
      strong: r log-uniform in [2, 13.3];   weak: r = 1e-3;
      spans:  r log-uniform in [0.3, 1.8] on even heads, [1, 3.5] on odd ones: a head's largest span over a chunk
              about 110–125 on even heads and 220–240 on odd ones, Mamba2-like."""
    if kind == "none":
        return None
    rate_shape = (heads, key_dim) if kind == "vector" else (heads,)
    if strength == "weak":
        rate = torch.full(rate_shape, 1e-3)
    elif strength == "spans":
        ranges = torch.tensor([[0.3, 1.8], [1.0, 3.5]]).log()[torch.arange(heads) % 2]  # [heads, 2]
        u = torch.rand(rate_shape, generator=gen)
        u = u if kind == "vector" else u[:, None]
        rate = (ranges[:, :1] + u * (ranges[:, 1:] - ranges[:, :1])).exp().view(rate_shape)
    else:
        low, high = (2.0, 13.3) if strength == "strong" else (1e-4, 13.3)
        rate = torch.empty(rate_shape).uniform_(float(torch.tensor(low).log()), float(torch.tensor(high).log()),
                                                generator=gen).exp()
        if strength == "mixed":
            flat = rate.view(-1)
            flat[torch.rand(flat.shape, generator=gen) < 0.125] = 0.0
            flat[0] = high
            if flat.numel() > 1:
                flat[1] = 0.0
    if kind == "static":
        return -rate
    token_shape = (batch, length) + rate_shape
    return -(rate * (0.5 + torch.rand(token_shape, generator=gen)))


def make_inputs(kind, batch, length, heads, key_dim, value_dim, dtype, strength, gen, init_state, final_state,
                scale):
    """q, k, v in `dtype`, log λ fp32, states fp32 and the cotangents, all on the GPU."""
    inputs = dict(
        q=torch.randn(batch, length, heads, key_dim, generator=gen),
        k=torch.randn(batch, length, heads, key_dim, generator=gen),
        v=torch.randn(batch, length, heads, value_dim, generator=gen),
    )
    inputs = {name: t.to(dtype) for name, t in inputs.items()}
    inputs["g"] = make_log_decay(kind, batch, length, heads, key_dim, strength, gen)
    inputs["h0"] = torch.randn(batch, heads, key_dim, value_dim, generator=gen) if init_state else None
    # o comes out in `dtype`, so its cotangent reaches the kernel rounded to `dtype`: give the oracle the same one.
    inputs["do"] = torch.randn(batch, length, heads, value_dim, generator=gen).to(dtype).float()
    inputs["dht"] = torch.randn(batch, heads, key_dim, value_dim, generator=gen) if final_state else None
    inputs = {name: (None if t is None else t.to(DEVICE)) for name, t in inputs.items()}
    inputs["scale"] = scale
    inputs["final_state"] = final_state
    return inputs


GRAD_NAMES = ("q", "k", "v", "g", "h0")


def run_with_grads(fn, inputs, upcast=False, frozen=(), **kwargs):
    """o, final state and the gradients of <o, do> + <final state, dht> w.r.t. every input tensor but the `frozen`
    ones (float64 leaves if `upcast`: the oracle sees exactly the values the kernel sees, and computes in float64)."""
    leaves = {}
    for name in GRAD_NAMES:
        t = inputs[name]
        if t is not None:
            t = t.detach().clone()
            t = t.double() if upcast else t
            leaves[name] = t if name in frozen else t.requires_grad_()
    o, ht = fn(leaves["q"], leaves["k"], leaves["v"], leaves.get("g"), scale=inputs["scale"],
               initial_state=leaves.get("h0"), output_final_state=inputs["final_state"], **kwargs)
    loss = (o.double() * inputs["do"].double()).sum()
    if inputs["final_state"]:
        assert ht is not None, "output_final_state=True returned no final state"
        loss = loss + (ht.double() * inputs["dht"].double()).sum()
    names = [name for name in leaves if name not in frozen]
    grads = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
    return dict(o=o.detach(), ht=None if ht is None else ht.detach(), **{"d" + n: g for n, g in zip(names, grads)})


def compare_to_oracle(inputs, dtype, reference=naive_recurrence, tol=None, frozen=(), **kwargs):
    """Run the kernel and the float64 `reference` (the step-by-step oracle unless given); check dtypes, shapes, the
    inputs untouched and every result within `tol` (TOL by dtype unless given); no gradients of the `frozen` inputs.
    Returns the relative errors."""
    h0_before = None if inputs["h0"] is None else inputs["h0"].clone()
    ours = run_with_grads(chunk_kernel(), inputs, frozen=frozen, **kwargs)
    ref = run_with_grads(reference, inputs, upcast=True, frozen=frozen)
    tol = TOL[dtype] if tol is None else tol
    assert ours["o"].dtype == dtype, f"o has dtype {ours['o'].dtype}, expected v's dtype {dtype}"
    if inputs["final_state"]:
        assert ours["ht"].dtype == torch.float32, f"final state has dtype {ours['ht'].dtype}"
    else:
        assert ours["ht"] is None, "output_final_state=False returned a final state"
    if h0_before is not None:
        assert torch.equal(inputs["h0"], h0_before), "initial_state was modified"
    errors = {}
    for key in ("o", "ht", "dq", "dk", "dv", "dg", "dh0"):
        if ref.get(key) is None:
            continue
        errors[key] = assert_close(ours.get(key), ref[key], tol, key)
    return errors


# ----------------------------------------------------------------------------------------------------------------
# Chunked kernel vs the oracle

# Compile cost. Every distinct (decay kind, dtype, H, K, V, initial-state / final-state flags) compiles its own
# kernels (the head count and dims are constexprs; the length is not), at tens of seconds each for forward+backward
# on the H200. So the grid below varies the length, decay strength and scale freely, but keeps H = HEADS and
# reuses few dims / flag combinations; run the file with `-n 8` (pytest-xdist) so that variants compile in parallel.
HEADS = 2
# Per input dtype the head dims of the full length sweep (bf16 at the model's 128).
DIMS_FOR_DTYPE = {torch.bfloat16: (128, 128), torch.float16: (64, 64), torch.float32: (64, 64)}
# (length, decay strength, scale): one token, around the chunk size (64), several chunks.
LENGTH_CASES = [(1, "mixed", 1.0), (63, "strong", None), (64, "weak", 1.0), (65, "mixed", None),
                (300, "mixed", 1.0), (1000, "mixed", None), (300, "spans", None), (1000, "spans", 1.0)]


def case_id(case):
    return f"T{case[0]}-{case[1]}"


@pytest.mark.parametrize("dtype", list(DIMS_FOR_DTYPE), ids=DTYPE_NAME.get)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", LENGTH_CASES, ids=case_id)
def test_chunk_matches_oracle(case, kind, dtype):
    """Forward and all gradients, with an initial state and a final-state gradient."""
    length, strength, scale = case
    key_dim, value_dim = DIMS_FOR_DTYPE[dtype]
    scale = key_dim ** -0.5 if scale is None else scale
    gen = cpu_generator("chunk", case, kind, str(dtype))
    inputs = make_inputs(kind, 2, length, HEADS, key_dim, value_dim, dtype, strength, gen, True, True, scale)
    compare_to_oracle(inputs, dtype)


# bf16 inputs at K = V ∈ {64, 128, 256} and T ∈ {63, 2048, 16384}, every output and gradient (d log λ included)
# within 5e-3 of a reference in higher precision: the float64 step-by-step oracle up to T = 2048 and the fp32 PyTorch
# chunked path at T = 16384 (itself checked against the oracle in tests/test_recurrence.py), where the oracle's
# autograd graph of 16384 steps would take minutes. Errors are printed: run with -rP to see them. Both ways of the
# sequence-walking kernels (`_segment_plan`): segments (what two heads of one or two sequences take on the GPU) and
# whole sequences (what the benchmark shapes take), the latter forced by counting a single SM.
ACCEPTANCE_TOL = 5e-3


@pytest.mark.parametrize("walks", ["segments", "whole"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("length", [63, 2048, 16384])
@pytest.mark.parametrize("kind", ["vector", "scalar", "static"])
def test_acceptance_grid_bf16(kind, length, head_dim, walks, monkeypatch):
    from linear_decay import ops_chunk as kernels

    if walks == "whole":
        if length <= kernels.CHUNK:
            pytest.skip("one chunk: no segments either way")
        monkeypatch.setattr(kernels, "_multiprocessors", lambda device: 1)
    batch = 2 if length <= 2048 else 1
    gen = cpu_generator("acceptance", kind, length, head_dim)
    inputs = make_inputs(kind, batch, length, HEADS, head_dim, head_dim, torch.bfloat16, "mixed", gen, True, True,
                         head_dim ** -0.5)
    reference = naive_recurrence if length <= 2048 else BACKENDS["torch"]
    errors = compare_to_oracle(inputs, torch.bfloat16, reference=reference, tol=ACCEPTANCE_TOL)
    print(f"acceptance {kind} T={length} K=V={head_dim} {walks}: "
          + " ".join(f"{k} {v:.1e}" for k, v in errors.items()))


@pytest.mark.parametrize("head_dim", [64, 128])
def test_exact_states_as_two_planes(head_dim):
    """Scalar decay with d log λ, bf16: from head dim 128 the forward keeps its chunk states as two bf16 planes whose
    first is the state rounded and whose second is what the rounding left, |low| ≤ half a bf16 unit of high (high is
    the nearest bf16 value; rounding high + low back may still give the other neighbour where low, itself rounded,
    lands on the halfway point), below it as fp32. How exact they are is the acceptance grid's part."""
    from linear_decay import ops_chunk as kernels

    gen = cpu_generator("planes", head_dim)
    inputs = make_inputs("scalar", 2, 200, HEADS, head_dim, head_dim, torch.bfloat16, "mixed", gen, True, True,
                         head_dim ** -0.5)
    states = kernels.chunk_forward(*(inputs[name] for name in ("q", "k", "v", "g", "h0")), None, head_dim ** -0.5,
                                   True, True, True)[2]
    if head_dim >= kernels.PLANES_FROM_HEAD_DIM:
        assert states.shape[0] == 2 and states.dtype == torch.bfloat16
        high, low = states[0].float(), states[1].float()
        half_unit = torch.ldexp(torch.ones_like(high), torch.frexp(high).exponent - 9)  # high = m·2^e, 0.5 ≤ |m| < 1
        assert bool((low.abs() <= torch.where(high != 0, half_unit, low.abs())).all())
        assert low.abs().max() > 0  # the fp32 states are not all bf16 values
    else:
        assert states.dtype == torch.float32 and states.dim() == 4


# Without an initial state and/or without the final state (training runs with neither), bf16 at the model's dims.
STATE_FLAGS = [(flags, kind) for flags in [(False, False), (True, False), (False, True)] for kind in KINDS
               if flags == (False, False) or kind in ("vector", "scalar")]


@pytest.mark.parametrize("flags,kind", STATE_FLAGS,
                         ids=[f"{'h0' if f[0] else 'noh0'}-{'ht' if f[1] else 'noht'}-{k}" for f, k in STATE_FLAGS])
def test_chunk_state_flags(flags, kind):
    init, final = flags
    gen = cpu_generator("flags", flags, kind)
    inputs = make_inputs(kind, 3, 200, HEADS, 64, 64, torch.bfloat16, "mixed", gen, init, final, 0.125)
    compare_to_oracle(inputs, torch.bfloat16)


# Key and value dims of several blocks in every kernel (K = 200, V = 136: the last blocks ragged), every kind and
# dtype, at several chunks with mixed decays.
@pytest.mark.parametrize("dtype", list(DIMS_FOR_DTYPE), ids=DTYPE_NAME.get)
@pytest.mark.parametrize("kind", KINDS)
def test_chunk_key_and_value_blocks_match_oracle(kind, dtype):
    key_dim, value_dim = 200, 136
    gen = cpu_generator("value-blocks", kind, str(dtype))
    inputs = make_inputs(kind, 2, 300, HEADS, key_dim, value_dim, dtype, "mixed", gen, True, True, key_dim ** -0.5)
    compare_to_oracle(inputs, dtype)


# A decay without a gradient (tnl's fixed one, or a frozen one): no d log λ is computed.
@pytest.mark.parametrize("dtype", list(DIMS_FOR_DTYPE), ids=DTYPE_NAME.get)
@pytest.mark.parametrize("kind", ["scalar", "static", "vector"])
def test_chunk_frozen_decay(kind, dtype):
    key_dim, value_dim = DIMS_FOR_DTYPE[dtype]
    gen = cpu_generator("frozen", kind, str(dtype))
    inputs = make_inputs(kind, 2, 300, HEADS, key_dim, value_dim, dtype, "spans", gen, True, True, key_dim ** -0.5)
    compare_to_oracle(inputs, dtype, frozen=("g",))


# Decays from initialisation-like to far stronger than trained models reach (RESULTS.md: layer medians of λ down to
# 0.008, log λ to −4.8 per token): bf16 q, k = silu(randn), v = randn, scale K^-1/2, K = V = 128, a random bf16
# output cotangent, against the float64 oracle. Every gradient, d log λ included, at bf16's level: within 3e-3.
STRENGTH_TOL = 3e-3


def log_decay_of_strength(kind, strength, shape, gen):
    """fp32 log λ of `shape` ([B, T, H, K] vector, [B, T, H] scalar): mild logsigmoid(z)/16; mamba2 −exp(A)·softplus(z
    + dt_bias) with Mamba2's initial A ~ U[1, 16] and dt ~ exp(U[ln 1e-3, ln 0.1]) per channel; logsigmoid(z);
    uniform(−6, 0); uniform(−20, 0)."""
    z = torch.randn(shape, generator=gen)
    if strength == "mild":
        return torch.nn.functional.logsigmoid(z) / 16
    if strength == "logsigmoid":
        return torch.nn.functional.logsigmoid(z)
    if strength == "mamba2":
        channels = shape[2:]
        a = 1 + 15 * torch.rand(channels, generator=gen)
        dt = torch.exp(math.log(1e-3) + (math.log(0.1) - math.log(1e-3)) * torch.rand(channels, generator=gen))
        dt_bias = dt + torch.log(-torch.expm1(-dt))
        return -a * torch.nn.functional.softplus(z + dt_bias)
    low = {"u6": -6.0, "u20": -20.0}[strength]
    return low * torch.rand(shape, generator=gen)


STRENGTHS = ["mild", "mamba2", "logsigmoid", "u6", "u20"]
STRENGTH_CASES = [(kind, strength) for kind in ("vector", "scalar") for strength in STRENGTHS] + [("static", "tnl")]


@pytest.mark.parametrize("kind,strength", STRENGTH_CASES, ids=[f"{k}-{s}" for k, s in STRENGTH_CASES])
def test_gradients_at_every_decay_strength(kind, strength):
    batch, length, heads, dim = 2, 1000, 3, 128
    gen = cpu_generator("strength", kind, strength)
    silu = torch.nn.functional.silu
    inputs = dict(q=silu(torch.randn(batch, length, heads, dim, generator=gen)).to(torch.bfloat16),
                  k=silu(torch.randn(batch, length, heads, dim, generator=gen)).to(torch.bfloat16),
                  v=torch.randn(batch, length, heads, dim, generator=gen).to(torch.bfloat16))
    if kind == "static":  # tnl's slopes of the first layer of 24
        slopes = 1 / (2 * 128 ** (torch.arange(heads) / (heads - 1)))
        inputs["g"] = -slopes * (1 + 1e-5)
    else:
        shape = (batch, length, heads, dim) if kind == "vector" else (batch, length, heads)
        inputs["g"] = log_decay_of_strength(kind, strength, shape, gen)
    inputs["h0"] = inputs["dht"] = None
    inputs["do"] = torch.randn(batch, length, heads, dim, generator=gen).to(torch.bfloat16).float()
    inputs = {name: (None if t is None else t.to(DEVICE)) for name, t in inputs.items()}
    inputs.update(scale=dim ** -0.5, final_state=False)
    errors = compare_to_oracle(inputs, torch.bfloat16, tol=STRENGTH_TOL)
    print(f"strength {kind} {strength}: " + " ".join(f"{k} {v:.1e}" for k, v in errors.items()))


# Head dims that are not a power of two, and K != V (lrpe doubles the key dim), at a length that is not a multiple
# of the chunk: (K, V, kinds, dtypes).
ODD_DIM_CASES = [
    (96, 96, KINDS, (torch.bfloat16,)),
    (96, 96, ("vector",), (torch.float32,)),
    (128, 64, ("vector", "static"), (torch.bfloat16,)),
    (64, 128, ("scalar",), (torch.bfloat16,)),
    (32, 48, ("vector",), (torch.bfloat16,)),
]
ODD_DIMS = [(k, v, kind, dtype) for k, v, kinds, dtypes in ODD_DIM_CASES for kind in kinds for dtype in dtypes]


@pytest.mark.parametrize("key_dim,value_dim,kind,dtype", ODD_DIMS,
                         ids=[f"K{k}-V{v}-{kind}-{DTYPE_NAME[d]}" for k, v, kind, d in ODD_DIMS])
def test_chunk_odd_head_dims(key_dim, value_dim, kind, dtype):
    gen = cpu_generator("odd", key_dim, value_dim, kind, str(dtype))
    inputs = make_inputs(kind, 2, 150, HEADS, key_dim, value_dim, dtype, "mixed", gen, True, True, key_dim ** -0.5)
    compare_to_oracle(inputs, dtype)


@pytest.mark.parametrize("kind", ["vector", "scalar", "static"])
def test_chunk_non_contiguous_inputs(kind):
    """q, k, v (and log λ) as views of [B, H, T, D] tensors, and q, k broadcast over batch and time (stride 0, as
    TPE passes its static query / key): the kernel must read them right (or copy them)."""
    dtype, (batch, length, heads, dim) = torch.bfloat16, (2, 130, HEADS, 128)
    gen = cpu_generator("noncontig", kind)
    base = make_inputs(kind, batch, length, heads, dim, dim, dtype, "mixed", gen, True, True, dim ** -0.5)
    ref = run_with_grads(naive_recurrence, base, upcast=True)
    # transposed views
    views = dict(base)
    for name in ("q", "k", "v"):
        views[name] = base[name].transpose(1, 2).contiguous().transpose(1, 2)
        assert not views[name].is_contiguous()
    if kind != "static":
        views["g"] = base["g"].transpose(1, 2).contiguous().transpose(1, 2)
    chunk = chunk_kernel()
    o, ht = chunk(views["q"], views["k"], views["v"], views["g"], scale=views["scale"], initial_state=views["h0"],
                  output_final_state=True)
    assert_close(o, ref["o"].to(dtype), TOL[dtype], "o (transposed views)")
    assert_close(ht, ref["ht"], TOL[dtype], "final state (transposed views)")
    # broadcast q, k: one vector per head, expanded over batch and time
    gen = cpu_generator("broadcast", kind)
    q_head = torch.randn(heads, dim, generator=gen).to(dtype).to(DEVICE)
    k_head = torch.randn(heads, dim, generator=gen).to(dtype).to(DEVICE)
    bcast = dict(base, q=q_head.expand(batch, length, heads, dim), k=k_head.expand(batch, length, heads, dim))
    o, ht = chunk(bcast["q"], bcast["k"], bcast["v"], bcast["g"], scale=bcast["scale"], initial_state=bcast["h0"],
                  output_final_state=True)
    o_ref, ht_ref = naive_recurrence(bcast["q"].float(), bcast["k"].float(), bcast["v"].float(), bcast["g"],
                                     scale=bcast["scale"], initial_state=bcast["h0"], output_final_state=True)
    assert_close(o, o_ref.to(dtype), TOL[dtype], "o (broadcast q, k)")
    assert_close(ht, ht_ref, TOL[dtype], "final state (broadcast q, k)")


def test_chunk_inference_mode_matches_autograd():
    """No-grad / inference-mode forward (prefill) gives the same output as the autograd forward."""
    dtype = torch.bfloat16
    gen = cpu_generator("inference")
    inputs = make_inputs("vector", 2, 200, HEADS, 128, 128, dtype, "mixed", gen, True, True, 0.125)
    chunk = chunk_kernel()
    with_grad = run_with_grads(chunk, inputs)
    with torch.inference_mode():
        o, ht = chunk(inputs["q"], inputs["k"], inputs["v"], inputs["g"], scale=0.125, initial_state=inputs["h0"],
                      output_final_state=True)
    assert_close(o, with_grad["o"], 1e-6, "o (inference mode)")
    assert_close(ht, with_grad["ht"], 1e-6, "final state (inference mode)")


def walk_stream_runs(inputs, capture=False):
    """`run_with_grads` of the chunk kernel on bf16 vector-decay inputs, eagerly or (`capture`) replayed from a CUDA
    graph captured after two warm-up runs on a side stream (torch's recipe for capturing a backward)."""
    if not capture:
        return run_with_grads(chunk_kernel(), inputs)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            run_with_grads(chunk_kernel(), inputs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        results = run_with_grads(chunk_kernel(), inputs)
    graph.replay()
    torch.cuda.synchronize()
    return results


@pytest.mark.parametrize("where", ["current stream", "user stream", "cuda graph"])
def test_walk_stream_changes_no_value(where, monkeypatch):
    """Vector decay's state walks on their own stream beside the stages that need no state (`_walk_stream`) give
    bit for bit the results of everything on one stream: a walk long enough that the two overlap, a missing wait
    would show. Run from the default stream, from a stream of the caller's, and captured in a CUDA graph."""
    from types import MappingProxyType

    from linear_decay import ops_chunk as kernels

    gen = cpu_generator("walk stream")
    inputs = make_inputs("vector", 1, 8192, HEADS, 128, 128, torch.bfloat16, "mixed", gen, True, True, 128 ** -0.5)
    runs = {}
    for on in (0, 1):
        settings = dict(kernels.TUNING["walk_stream"], forward=on, backward=on)
        monkeypatch.setattr(kernels, "TUNING", MappingProxyType({**kernels.TUNING,
                                                                 "walk_stream": MappingProxyType(settings)}))
        if where == "user stream" and on:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                runs[on] = walk_stream_runs(inputs)
            torch.cuda.current_stream().wait_stream(stream)
        else:
            runs[on] = walk_stream_runs(inputs, capture=where == "cuda graph" and on)
    torch.cuda.synchronize()
    for name, expected in runs[0].items():
        assert torch.equal(runs[1][name], expected), f"{name} differs with the walks on their own stream ({where})"


def test_backend_registered_on_cuda():
    assert "triton" in BACKENDS, "the Triton kernels did not register in recurrence.BACKENDS"
    assert resolve_backend("cuda", "auto") == "triton"


# ----------------------------------------------------------------------------------------------------------------
# Varlen (cu_seqlens)

VARLEN_LENGTHS = [1, 63, 64, 65, 300, 7, 130]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=DTYPE_NAME.get)
@pytest.mark.parametrize("kind", KINDS)
def test_varlen_equals_separate_runs(kind, dtype):
    heads, key_dim, value_dim = HEADS, *DIMS_FOR_DTYPE[dtype]
    n, total = len(VARLEN_LENGTHS), sum(VARLEN_LENGTHS)
    bounds = [0]
    for length in VARLEN_LENGTHS:
        bounds.append(bounds[-1] + length)
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device=DEVICE)
    gen = cpu_generator("varlen", kind, str(dtype))
    packed = make_inputs(kind, 1, total, heads, key_dim, value_dim, dtype, "mixed", gen, False, True, 0.125)
    packed["h0"] = torch.randn(n, heads, key_dim, value_dim, generator=gen).to(DEVICE)
    packed["dht"] = torch.randn(n, heads, key_dim, value_dim, generator=gen).to(DEVICE)
    tol = TOL[dtype]
    chunk = chunk_kernel()
    whole = run_with_grads(chunk, packed, cu_seqlens=cu_seqlens)
    assert whole["ht"].shape == (n, heads, key_dim, value_dim)

    parts, refs = [], []
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        one = dict(packed)
        for name in ("q", "k", "v", "do"):
            one[name] = packed[name][:, start:end]
        if kind in ("vector", "scalar"):
            one["g"] = packed["g"][:, start:end]
        one["h0"], one["dht"] = packed["h0"][i:i + 1], packed["dht"][i:i + 1]
        parts.append(run_with_grads(chunk, one))
        refs.append(run_with_grads(naive_recurrence, one, upcast=True))

    def joined(results, key):
        if key in ("ht", "dh0"):
            return torch.cat([r[key] for r in results], dim=0)
        if key == "dg" and kind == "static":  # one [H] parameter shared by every sequence
            return torch.stack([r[key] for r in results]).sum(0)
        return torch.cat([r[key] for r in results], dim=1)

    for key in ("o", "ht", "dq", "dk", "dv", "dg", "dh0"):
        if whole.get(key) is None and refs[0].get(key) is None:
            continue
        assert_close(whole.get(key), joined(parts, key), tol, f"{key}: packed vs separate runs")
        assert_close(whole[key], joined(refs, key), tol, f"{key}: packed vs oracle")


# ----------------------------------------------------------------------------------------------------------------
# Decoding kernel


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=DTYPE_NAME.get)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("length,dims", [(1, (128, 128)), (3, (64, 64)), (8, (96, 64))],
                         ids=["T1-K128", "T3-K64", "T8-K96V64"])
def test_decode_matches_oracle(length, dims, kind, dtype):
    key_dim, value_dim = dims
    gen = cpu_generator("decode", length, dims, kind, str(dtype))
    inputs = make_inputs(kind, 5, length, HEADS, key_dim, value_dim, dtype, "mixed", gen, True, True,
                         key_dim ** -0.5)
    state = inputs["h0"].clone()
    o_ref, ht_ref = naive_recurrence(inputs["q"].float(), inputs["k"].float(), inputs["v"].float(), inputs["g"],
                                     scale=inputs["scale"], initial_state=inputs["h0"], output_final_state=True)
    with torch.no_grad():
        o, ht = decode_kernel()(inputs["q"], inputs["k"], inputs["v"], inputs["g"], scale=inputs["scale"],
                                initial_state=state, output_final_state=True)
    assert o.dtype == dtype
    assert_close(o, o_ref.to(dtype), TOL[dtype], "o")
    assert_close(ht, ht_ref, 1e-4, "final state")
    assert_close(state, ht_ref, 1e-4, "state updated in place")
    # without an initial state
    with torch.no_grad():
        o, ht = decode_kernel()(inputs["q"], inputs["k"], inputs["v"], inputs["g"], scale=inputs["scale"],
                                initial_state=None, output_final_state=True)
    o_ref, ht_ref = naive_recurrence(inputs["q"].float(), inputs["k"].float(), inputs["v"].float(), inputs["g"],
                                     scale=inputs["scale"], output_final_state=True)
    assert_close(o, o_ref.to(dtype), TOL[dtype], "o (no initial state)")
    assert_close(ht, ht_ref, 1e-4, "final state (no initial state)")


# ----------------------------------------------------------------------------------------------------------------
# The whole model

# (decay_type, granularity, share_decay, position_encoding, head_dim): every decay shape the kernels see (vector,
# scalar, static, none), lightnet's position-dependent decay, sharing, K = 2·V (lrpe), TPE's broadcast q/k, a head
# dim that is not a power of two.
MODEL_COMBOS = [
    ("mamba2", "vector", False, "none", 64),
    ("gla", "scalar", False, "rope", 64),
    ("tnl", "scalar", False, "lrpe", 64),
    ("lightnet", "vector", False, "none", 64),
    ("simple", "vector", True, "tpe", 64),
    ("none", "scalar", False, "none", 64),
    ("hgrn2", "vector", False, "rope", 96),
]


def model_id(combo):
    return "-".join(str(part) for part in combo[:2]) + ("-shared" if combo[2] else "") + f"-{combo[3]}-e{combo[4]}"


def model_config(combo, **extra):
    decay_type, granularity, share, position, head_dim = combo
    hidden = 2 * head_dim
    return tiny_config(decay_type=decay_type, decay_granularity=granularity, share_decay=share,
                       position_encoding=position, hidden_size=hidden, num_heads=2, intermediate_size=2 * hidden,
                       decay_rank=16, **extra)


def model_batch(seed, length=150, vocab=64):
    """Two rows, the second left-padded by 20 tokens."""
    ids = torch.randint(1, vocab, (2, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, :20] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids.to(DEVICE), mask.to(DEVICE), labels.to(DEVICE)


def logits_and_grads(model, ids, mask, labels):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
    out.loss.backward()
    grads = {name: p.grad.detach().float().clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach().float(), grads


def global_error(actual, expected):
    keys = sorted(expected)
    a = torch.cat([actual[k].flatten() for k in keys])
    b = torch.cat([expected[k].flatten() for k in keys])
    return relative_error(a, b)


@pytest.mark.parametrize("combo", MODEL_COMBOS, ids=model_id)
def test_model_triton_matches_torch(combo, backend):
    """Same weights, backend triton vs torch. fp32: direct comparison. bf16: each bf16 backend against the fp32
    model; the triton path may be at most 3× further from it than the torch path (which runs the recurrence in fp32),
    with a floor for quantities where both are already within bf16 noise."""
    model = perturbed_model(model_config(combo), seed=seed_of("model", combo) % 2 ** 31).to(DEVICE)
    ids, mask, labels = model_batch(seed_of("batch", combo) % 2 ** 31)
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        model.to(dtype)
        for name in ("torch", "triton"):
            backend(name)
            results[dtype, name] = logits_and_grads(model, ids, mask, labels)
            logits, grads = results[dtype, name]
            assert bool(torch.isfinite(logits).all()), f"{name} {dtype}: non-finite logits"
            assert all(bool(torch.isfinite(g).all()) for g in grads.values()), f"{name} {dtype}: non-finite grads"
    model.float()

    ref_logits, ref_grads = results[torch.float32, "torch"]
    tri_logits, tri_grads = results[torch.float32, "triton"]
    assert set(tri_grads) == set(ref_grads)
    assert_close(tri_logits, ref_logits, 2e-3, "fp32 logits triton vs torch")
    assert global_error(tri_grads, ref_grads) <= 5e-3, f"fp32 grads: {global_error(tri_grads, ref_grads):.2e}"
    for name in ref_grads:
        err = relative_error(tri_grads[name], ref_grads[name])
        assert err <= 2e-2 or ref_grads[name].norm() < 1e-6, f"fp32 grad of {name}: relative error {err:.2e}"

    bf_torch_logits, bf_torch_grads = results[torch.bfloat16, "torch"]
    bf_tri_logits, bf_tri_grads = results[torch.bfloat16, "triton"]
    e_tri, e_torch = relative_error(bf_tri_logits, ref_logits), relative_error(bf_torch_logits, ref_logits)
    assert e_tri <= max(3 * e_torch, 1e-2), f"bf16 logits: triton {e_tri:.2e} vs torch {e_torch:.2e} from fp32"
    e_tri, e_torch = global_error(bf_tri_grads, ref_grads), global_error(bf_torch_grads, ref_grads)
    assert e_tri <= max(3 * e_torch, 3e-2), f"bf16 grads: triton {e_tri:.2e} vs torch {e_torch:.2e} from fp32"
    for name in ref_grads:
        e_tri = relative_error(bf_tri_grads[name], ref_grads[name])
        e_torch = relative_error(bf_torch_grads[name], ref_grads[name])
        assert e_tri <= max(3 * e_torch, 5e-2), f"bf16 grad of {name}: triton {e_tri:.2e} vs torch {e_torch:.2e}"


@pytest.mark.parametrize("combo", [MODEL_COMBOS[0], MODEL_COMBOS[2], MODEL_COMBOS[4]], ids=model_id)
def test_model_cached_decoding_on_triton(combo, backend):
    """Prefill (chunked kernel) then token-by-token steps (decoding kernel) with the cache equal one full forward
    on the PyTorch backend (fp32)."""
    model = perturbed_model(model_config(combo), seed=seed_of("decode-model", combo) % 2 ** 31).to(DEVICE).eval()
    ids = torch.randint(1, 64, (2, 90), generator=cpu_generator("decode-ids", combo)).to(DEVICE)
    backend("torch")
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
    backend("triton")
    with torch.no_grad():
        out = model(input_ids=ids[:, :70], use_cache=True)
        pieces, cache, position = [out.logits], getattr(out, CACHE_FIELD), 70
        for size in (1, 4, 2, 3, 1, 8, 1):  # every call on the decoding path
            assert size <= RECURRENT_MAX_TOKENS
            step = ids[:, position:position + size]
            out = model(input_ids=step, use_cache=True, **{CACHE_FIELD: cache})
            pieces.append(out.logits)
            cache, position = getattr(out, CACHE_FIELD), position + size
    cached = torch.cat(pieces, dim=1)
    assert_close(cached, full[:, :cached.shape[1]], 2e-3, "cached decoding (triton) vs full forward (torch)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_NAME.get)
def test_torch_compile_matches_eager(dtype, backend):
    """torch.compile(model) runs forward and backward with the Triton kernels and matches eager mode."""
    backend("triton")
    combo = MODEL_COMBOS[0]
    model = perturbed_model(model_config(combo), seed=seed_of("compile", str(dtype)) % 2 ** 31).to(DEVICE, dtype)
    ids, mask, labels = model_batch(seed_of("compile-batch", str(dtype)) % 2 ** 31, length=200)
    eager_logits, eager_grads = logits_and_grads(model, ids, mask, labels)
    torch._dynamo.reset()
    compiled = torch.compile(model)
    comp_logits, comp_grads = logits_and_grads(compiled, ids, mask, labels)
    comp_grads = {name.removeprefix("_orig_mod."): g for name, g in comp_grads.items()}
    assert set(comp_grads) == set(eager_grads)
    logits_tol, grads_tol = (1e-4, 1e-4) if dtype == torch.float32 else (3e-2, 5e-2)
    assert_close(comp_logits, eager_logits, logits_tol, "compiled logits")
    err = global_error(comp_grads, eager_grads)
    assert err <= grads_tol, f"compiled grads: relative error {err:.2e}"
    assert all(bool(torch.isfinite(g).all()) for g in comp_grads.values())


@pytest.mark.parametrize("combo", [MODEL_COMBOS[0], MODEL_COMBOS[4]], ids=model_id)
def test_fullgraph_compile_bf16(combo, backend):
    """torch.compile(fullgraph=True) with Inductor in bf16, through the kernels' custom ops: the training step
    (forward and backward, a left-padded row) and a cached one-token decoding step are each one graph
    (`torch._dynamo.explain`: no graph break) and match eager. Bounds as test_torch_compile_matches_eager's bf16 ones
    (3e-2 logits, 5e-2 gradients): the recurrence runs the same kernels, but Inductor fuses the norms, SwiGLU and the
    decay's torch forms (eager runs the fused kernels) and rounds their intermediates to bf16 (unit 2^-8 ≈ 3.9e-3)
    elsewhere, a few units per layer. The decoding step writes the cache's states in place, as eager does."""
    backend("triton")
    model = perturbed_model(model_config(combo), seed=seed_of("fullgraph", combo) % 2 ** 31).to(DEVICE, torch.bfloat16)
    ids, mask, labels = model_batch(seed_of("fullgraph-batch", combo) % 2 ** 31, length=200)
    eager_logits, eager_grads = logits_and_grads(model, ids, mask, labels)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    comp_logits, comp_grads = logits_and_grads(torch.compile(model, fullgraph=True), ids, mask, labels)
    comp_grads = {name.removeprefix("_orig_mod."): g for name, g in comp_grads.items()}
    assert set(comp_grads) == set(eager_grads)
    assert_close(comp_logits, eager_logits, 3e-2, "compiled logits (bf16)")
    err = global_error(comp_grads, eager_grads)
    assert err <= 5e-2, f"compiled grads (bf16): relative error {err:.2e}"

    model.eval().config.decode_cuda_graphs = False  # eager: the plain step, not its CUDA graph
    with torch.no_grad():
        prefill = getattr(model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True), CACHE_FIELD)

        def decoding_step(token, step_mask, cache):
            return model(input_ids=token, attention_mask=step_mask, use_cache=True, **{CACHE_FIELD: cache}).logits

        eager_cache, compiled_cache = copy.deepcopy(prefill), copy.deepcopy(prefill)
        states = [layer.tensors["recurrent"] for layer in compiled_cache.layers]
        eager_step = decoding_step(ids[:, -1:], mask, eager_cache)
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(decoding_step)(ids[:, -1:], mask, copy.deepcopy(prefill))
        assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
        compiled_step = torch.compile(decoding_step, fullgraph=True)(ids[:, -1:], mask, compiled_cache)
    assert_close(compiled_step.float(), eager_step.float(), 3e-2, "compiled decoding step (bf16)")
    assert all(a is b for a, b in zip((layer.tensors["recurrent"] for layer in compiled_cache.layers), states))
    for actual, expected in zip(compiled_cache.state_tensors(), eager_cache.state_tensors(), strict=True):
        assert_close(actual.float(), expected.float(), 3e-2, "compiled decoding step's states (bf16)")


@pytest.mark.parametrize("combo", [MODEL_COMBOS[0], MODEL_COMBOS[2], MODEL_COMBOS[4]], ids=model_id)
def test_cuda_graph_decoding_matches_eager(combo, backend):
    """config.decode_cuda_graphs: the captured and replayed decoding step gives the eager path's tokens and scores
    (beam search and greedy, a left-padded row, fp32), with one capture per batch size; a later call at the last
    batch size replays the model's graph without capturing, and reads weights changed in place in between."""
    backend("triton")
    model = perturbed_model(model_config(combo), seed=seed_of("graph-model", combo) % 2 ** 31).to(DEVICE).eval()
    ids = torch.randint(1, 64, (3, 40), generator=cpu_generator("graph-ids", combo)).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    captures = []
    original = DecodeGraph.__init__

    def counted(self, *args, **kwargs):
        captures.append(kwargs.get("capture", args[3] if len(args) > 3 else True))
        original(self, *args, **kwargs)

    DecodeGraph.__init__ = counted
    try:
        greedy, beam = dict(do_sample=False), dict(do_sample=False, num_beams=3)
        for options, change_weights, captured in ((beam, False, [True]), (greedy, False, [True]), (greedy, True, [])):
            if change_weights:
                with torch.no_grad():  # what an optimizer step between two calls does
                    for param in model.parameters():
                        param.mul_(0.9)
                ids = ids.flip(1)
            runs = []
            for graphs in (False, True):
                model.config.decode_cuda_graphs = graphs
                runs.append(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12,
                                           pad_token_id=0, output_scores=True, return_dict_in_generate=True,
                                           **options))
            assert captures == captured, options
            captures.clear()
            eager, graphed = runs
            assert torch.equal(eager.sequences, graphed.sequences), options
            for e, g in zip(eager.scores, graphed.scores):
                finite = torch.isfinite(e)
                assert torch.equal(finite, torch.isfinite(g))
                assert_close(g[finite], e[finite], 1e-5, "graph-replayed scores")
    finally:
        DecodeGraph.__init__ = original
        model.release_decode_graph()
        model.config.decode_cuda_graphs = False
