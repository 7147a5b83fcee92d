"""GPU benchmark of the Triton kernels against flash-linear-attention (FLA) 0.6.0 and torch SDPA.

One run on one GPU (H100 or H200), inputs bf16 unless said otherwise. Sections, run in this order:

  ceilings   device-to-device copy GB/s and an 8192³ bf16 matmul TFLOP/s (what the machine can do at best)
  precision  B×T×H×K = 2×1000×3×128 (K = V), no initial or final state, a random bf16 output cotangent: relative
             errors ‖x − ref‖/‖ref‖ of o, dq, dk, dv and d log λ, ours and FLA on the same inputs, against a float64
             token-by-token oracle (linear_decay.recurrence.naive_recurrence on float64 copies of the
             bf16-rounded inputs, gradients by torch.autograd.grad); vector and scalar decay at every decay strength,
             and the static decay; one more line at 2×333×3×64 (T=333, K=V=64) for vector decay, strength mild.
             An FLA op that raises (chunk_simple_gla's backward with g refuses Hopper with Triton >= 3.4, < 3.7.1, see
             below) is reported as "refused: <reason>".
  chunk      training kernels at B×T×H×D = 8×2048×16×128, 2×16384×16×128 and 1×16384×16×64 (a layer of the 410m
             model at B=1, T=16384); 4×4096×32×64 on request (--shape 2). Forward and forward+backward, median ms of
             triton.testing.do_bench (warmup 25 ms, rep 100 ms unless --warmup/--rep), inputs rotated over several
             sets that together exceed L2:
               ours vector decay  vs FLA chunk_gla                          at every decay strength
               ours scalar decay  vs FLA chunk_simple_gla(g=...)            at every decay strength
               ours static decay  vs FLA chunk_simple_gla(g_gamma=...)      TNL-like slopes, one per head
               SDPA (default backend): F.scaled_dot_product_attention(q, k, v, is_causal=True), [B,H,T,D], torch's
                 own backend choice (the CUDA kernels it launched are recorded), and SDPA (forced FLASH_ATTENTION)
                 beside it: the softmax-attention yardsticks
             peak memory of one forward+backward above what was allocated before (inputs excluded), and a
             correctness line per shape and decay (--check first: at the first strength only; all: every strength;
             none): relative errors ours~FLA and each against an fp32 reference (the PyTorch chunked path of this
             package on fp32 copies of the same inputs, with an initial state and a final-state cotangent)
  decode     one decoding step at batch 64, H=16, D=128, T=1 on a fp32 state: ours (state updated in place) vs FLA
             fused_recurrent_gla / fused_recurrent_simple_gla, with the state bandwidth achieved (log λ of strength
             mild for vector decay, mamba2 for scalar decay)
  model      LinearDecayForCausalLM 410m preset (24 layers, d1024), bf16 on CUDA: time from model creation to the end
             of the first forward+backward of a batch 8×2048 with the Triton backend (cold: compilation and autotuning
             happen inside it, in a child process with an empty Triton cache), then the next steps; the same model on
             the PyTorch backend for scale

Inputs of precision and chunk: q, k = silu(randn) (non-negative like the model's keys), v = randn, all bf16; log λ
fp32; scale K**-0.5 passed explicitly to every implementation. Decay strengths (--strengths, comma list, default all),
each a generator of log λ for vector decay [B,T,H,K] and scalar decay [B,T,H] (z ~ randn of that shape):
  mild        logsigmoid(z) / 16                                   (GLA's parameterisation, λ ≈ 0.95)
  mamba2      −A · softplus(0.5·z + dt_bias), the Mamba2 init (DESIGN.md §2): per channel for vector decay, per head
              for scalar decay, A ~ U[1, 16], dt = exp(U[ln 1e-3, ln 0.1]) clamped ≥ 1e-4, dt_bias = dt +
              ln(−expm1(−dt)) (inverse softplus, so softplus(dt_bias) = dt). The 0.5·z stands in for the decay
              projection's output: it makes the per-token step dt_t ≈ dt·exp(0.5·z_t) (log-normal around the
              channel's dt) while the channel's dt and A keep their init ranges; log λ from about −1e-4 to −7, median
              about −0.08.
  logsigmoid  logsigmoid(z)                                        (λ ≈ 0.5, log λ down to about −5)
  u6          U(−6, 0)                                             (strong decay, all of it in a few tokens)
  u20         U(−20, 0)                                            (extreme: a 64-token chunk's cumulative
                                                                   log λ reaches about −640, past fp32 exp's range)
The static decay (λ_h = 1 − 2^−(5+h), one per head) has no strength axis.

    python benchmarks/bench_kernels.py [--only ceilings|precision|chunk|decode|model ...] [--strengths LIST]
        [--shape I ...] [--quick] [--check first|all|none] [--no-fla] [--warmup MS] [--rep MS] [--deadline S]
        [--json PATH]
    python benchmarks/bench_kernels.py --from-json PATH     (the tables of an earlier --json, e.g. of a killed run)

Cold cost: Triton compiles each kernel variant on first use (ours: per decay kind, dtype, H, K, V; the strength
changes nothing). FLA autotunes many configs per kernel on its first call per key (mostly H, K, V, chunk size; not T,
so 8×2048×16×128 and 2×16384×16×128 share most of it; the precision section's H=3 has its own), minutes per op on a
fresh machine. FLA's autotuners keep their results in Triton's cache directory (cache_results=True), keyed by the
Triton and ptxas versions and the compute capability, not the card's name: a warm machine skips the tuning, and so
does a fresh one whose TRITON_CACHE_DIR holds the <hash>/*.autotune.json files of an earlier run on the same software
(sm90: H100 and H200 alike). do_bench's warmup absorbs compilation and autotuning, so they stay outside the timings.

--deadline S: no new case (shape × decay × strength, or precision line) starts once S seconds have passed since the
start; the skipped ones are listed, the tables and --json still come out. --json is rewritten after every case, so a
run killed from outside leaves what it had (--from-json prints its tables).

Output: progress lines while running, then at the very end a text summary (ceilings, correctness lines, model) and
markdown tables ready for BENCHMARKS.md: chunk timings (ours / FLA and their ratio per shape × decay ×
strength), SDPA, peak memory, precision, decode. --json writes everything (errors included). FLA missing, or a
kernel failing on one case, is reported and the run goes on.

FLA 0.6.0 API facts (read from the fla-core 0.6.0 wheel source; `fla.ops` lives in fla-core, flash-linear-attention
only adds fla.layers / fla.models):
  chunk_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, state_v_first=False,
            cu_seqlens=None, cu_seqlens_cpu=None) -> (o, final_state)
  chunk_simple_gla(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None, output_final_state=False,
            state_v_first=False, cu_seqlens=None, cu_seqlens_cpu=None, **kwargs(chunk_size)) -> (o, final_state)
  fused_recurrent_gla(q, k, v, gk=None, gv=None, scale=None, initial_state=None, output_final_state=False,
            reverse=False, state_v_first=False, cu_seqlens=None) -> (o, final_state)
  fused_recurrent_simple_gla(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None,
            output_final_state=False, reverse=False, state_v_first=False, cu_seqlens=None) -> (o, final_state)
  - Layout [B, T, H, K] / [B, T, H, V] only: `head_first` is gone (passing it raises). Varlen: B = 1 + cu_seqlens
    (LongTensor [N+1]), initial_state [N, H, K, V].
  - scale=None means K**-0.5 (ours defaults to 1.0), so the benchmark always passes scale explicitly.
  - g / gk / g_gamma are natural-log decays (log λ ≤ 0), exactly our log_decay: S_t = diag(exp(g_t)) S_{t-1} + k_t v_tᵀ,
    o_t = scale · S_tᵀ q_t (current token not decayed; see fla/ops/gla/naive.py). Internally FLA rescales by 1/ln 2
    and uses exp2. chunk_gla's g has q's shape [B,T,H,K]; simple GLA's g is [B,T,H], g_gamma is [H] (static, no
    gradient is returned for it). g may be fp32 with bf16 q/k/v.
  - State layout [N, H, K, V] fp32 (asserted for chunk_gla's initial_state); state_v_first=True gives [N, H, V, K].
  - chunk_gla: chunk 64 (16..64 for short T); its forward keeps the per-chunk states h in bf16 (states_in_fp32=False)
    and the backward recomputes them in fp32. chunk_simple_gla always chunk 64. o is returned in q's dtype.
  - chunk_simple_gla's backward with a data-dependent g (fla.ops.common.chunk_o.chunk_bwd_dqkwg) raises RuntimeError
    on Hopper with Triton >= 3.4.0 and < 3.7.1 (a Triton miscompile; FLA's way out is the tilelang backend); its
    forward and the g_gamma (static) backward run.
  - fused_recurrent_*: returns a NEW final state (not in place), o computed in fp32 then cast; it has a backward.
  - The wheels are pure Python (py3-none-any). flash-linear-attention needs fla-core==0.6.0 and transformers>=5.6.2,<6;
    fla-core needs einops (+ torch>=2.7, triton>=3.3 for the cuda extra).
"""

import argparse
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, REPO)

SHAPES = [(8, 2048, 16, 128), (2, 16384, 16, 128), (4, 4096, 32, 64), (1, 16384, 16, 64)]
DEFAULT_SHAPES = (0, 1, 3)  # 4×4096×32×64 only when asked (--shape 2)
DECAYS = ("vector", "scalar", "static")
STRENGTHS = ("mild", "mamba2", "logsigmoid", "u6", "u20")
DEFAULT_STRENGTH = {"vector": "mild", "scalar": "mamba2"}  # decode, and callers that name no strength
MAMBA2_Z_STD = 0.5  # spread of the stand-in for the decay projection's output in the mamba2 strength
FLA_NAME = {"vector": "chunk_gla", "scalar": "chunk_simple_gla(g)", "static": "chunk_simple_gla(g_gamma)"}
FLA_DECODE_NAME = {"vector": "fused_recurrent_gla", "scalar": "fused_recurrent_simple_gla(g)",
                   "static": "fused_recurrent_simple_gla(g_gamma)"}
SDPA_LABEL = {"sdpa_default": "SDPA (default backend)", "sdpa_flash": "SDPA (forced FLASH_ATTENTION)"}
PRECISION_SHAPE = (2, 1000, 3, 128)
PRECISION_EXTRA = ("vector", "mild", (2, 333, 3, 64))  # the second line at T=333, K=V=64
PRECISION_KEYS = ("o", "dq", "dk", "dv", "dg")
PRECISION_LABEL = {"o": "o", "dq": "dq", "dk": "dk", "dv": "dv", "dg": "dlogλ"}
DECODE_SHAPE = (64, 16, 128)  # batch, heads, head dim
MODEL_BATCH, MODEL_LENGTH = 8, 2048
DTYPE = torch.bfloat16
DEVICE = "cuda"  # the precision and chunk sections' device (the CPU smoke test of this script sets "cpu")
MiB = 2 ** 20


def err_text(error):
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"[:300]


_SEEN_ERRORS = set()


def report_error(error, where=""):
    """Print the traceback of the first occurrence of each distinct error, one line for a repeat."""
    text = err_text(error)
    if text in _SEEN_ERRORS:
        print(f"  error {where}: {text} (seen before)", flush=True)
    else:
        _SEEN_ERRORS.add(text)
        traceback.print_exc()
    return text


def shape_text(batch, length, heads, dim):
    return f"{batch}x{length}x{heads}x{dim}"


class Deadline:
    """No new case starts once `seconds` have passed since the start (None: no limit)."""

    def __init__(self, seconds, start=None):
        self.seconds = seconds
        self.start = time.perf_counter() if start is None else start

    def passed(self):
        return self.seconds is not None and time.perf_counter() - self.start > self.seconds


# ----------------------------------------------------------------------------------------------------------------
# Implementations under test (each import guarded: a missing or broken one is reported, the rest still run)

def load_ours():
    found, errors = {}, {}
    try:
        from linear_decay.ops_chunk import triton_chunked_recurrence
        found["chunk"] = triton_chunked_recurrence
    except Exception as error:  # noqa: BLE001  (any import failure is a result to report)
        errors["chunk"] = err_text(error)
    try:
        from linear_decay.ops_recurrent import triton_fused_recurrent
        found["decode"] = triton_fused_recurrent
    except Exception as error:  # noqa: BLE001
        errors["decode"] = err_text(error)
    return found, errors


def load_fla():
    try:
        import fla
        from fla.ops.gla import chunk_gla, fused_recurrent_gla
        from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla
    except Exception as error:  # noqa: BLE001
        return None, err_text(error)
    return dict(version=getattr(fla, "__version__", "?"), chunk_gla=chunk_gla, chunk_simple_gla=chunk_simple_gla,
                fused_recurrent_gla=fused_recurrent_gla,
                fused_recurrent_simple_gla=fused_recurrent_simple_gla), None


# ----------------------------------------------------------------------------------------------------------------
# Inputs

def static_log_decay(heads, device):
    """TNL-like per-head static decay λ_h = 1 − 2^−(5+h) (the paper's ALiBi-style slopes), as log λ in fp32."""
    exponent = 5.0 + torch.arange(heads, dtype=torch.float64, device=device)
    return torch.log1p(-torch.exp2(-exponent)).float()


def mamba2_log_decay(shape, channels, device, generator):
    """−A · softplus(0.5·z + dt_bias) with the Mamba2 init (DESIGN.md §2) per channel: `channels` is the trailing
    part of `shape` that owns an A and a dt ([H, K] for vector decay, [H] for scalar decay)."""
    a = 1 + 15 * torch.rand(channels, device=device, generator=generator)                    # A ~ U[1, 16]
    low, high = math.log(1e-3), math.log(0.1)
    dt = torch.exp(low + (high - low) * torch.rand(channels, device=device, generator=generator)).clamp(min=1e-4)
    dt_bias = dt + torch.log(-torch.expm1(-dt))                                               # softplus(dt_bias) = dt
    z = MAMBA2_Z_STD * torch.randn(shape, device=device, generator=generator)
    return -a * F.softplus(z + dt_bias)


def strength_log_decay(strength, kind, batch, length, heads, dim, device, generator):
    """fp32 log λ of one decay strength (module docstring): [B,T,H,K] for vector decay, [B,T,H] for scalar."""
    if kind == "vector":
        shape, channels = (batch, length, heads, dim), (heads, dim)
    elif kind == "scalar":
        shape, channels = (batch, length, heads), (heads,)
    else:
        raise ValueError(f"decay kind {kind!r} has no strength axis")
    if strength == "mild":
        return F.logsigmoid(torch.randn(shape, device=device, generator=generator)) / 16
    if strength == "mamba2":
        return mamba2_log_decay(shape, channels, device, generator)
    if strength == "logsigmoid":
        return F.logsigmoid(torch.randn(shape, device=device, generator=generator))
    if strength == "u6":
        return -6 * torch.rand(shape, device=device, generator=generator)
    if strength == "u20":
        return -20 * torch.rand(shape, device=device, generator=generator)
    raise ValueError(f"unknown decay strength {strength!r} (known: {', '.join(STRENGTHS)})")


def make_log_decay(kind, batch, length, heads, dim, device, generator, strength=None):
    if kind == "static":
        return static_log_decay(heads, device)
    return strength_log_decay(strength or DEFAULT_STRENGTH[kind], kind, batch, length, heads, dim, device, generator)


def parse_strengths(text):
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in STRENGTHS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown strength(s) {unknown}; choose from {','.join(STRENGTHS)}")
    return list(dict.fromkeys(names))


class InputSet:
    """q, k = silu(randn) (non-negative like the model's keys), v = randn, all bf16; log-decay fp32 (of `strength`
    for vector and scalar decay); a random bf16 output cotangent `do`; scale D^-1/2 for every implementation."""

    def __init__(self, kind, batch, length, heads, dim, seed, device=None, state=False, strength=None):
        device = device or DEVICE
        gen = torch.Generator(device).manual_seed(seed)
        shape = (batch, length, heads, dim)
        self.kind, self.strength = kind, None if kind == "static" else (strength or DEFAULT_STRENGTH[kind])
        self.q = F.silu(torch.randn(shape, device=device, generator=gen)).to(DTYPE).requires_grad_()
        self.k = F.silu(torch.randn(shape, device=device, generator=gen)).to(DTYPE).requires_grad_()
        self.v = torch.randn(shape, device=device, generator=gen).to(DTYPE).requires_grad_()
        self.g = make_log_decay(kind, batch, length, heads, dim, device, gen, self.strength)
        if kind != "static":  # a static decay (tnl) has no trainable parameter; FLA returns no grad for g_gamma
            self.g.requires_grad_()
        self.do = torch.randn(shape, device=device, generator=gen).to(DTYPE)
        self.scale = dim ** -0.5
        self.h0 = (torch.randn(batch, heads, dim, dim, device=device, generator=gen) * 0.5) if state else None
        self.dht = torch.randn(batch, heads, dim, dim, device=device, generator=gen) if state else None

    def grad_inputs(self):
        return [t for t in (self.q, self.k, self.v, self.g) if t.requires_grad]

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in (self.q, self.k, self.v, self.g, self.do))


def chunk_callables(kind, ours, fla):
    """(name, fn(input_set, with_state) -> (o, final_state)) for ours and FLA on this decay kind."""
    calls = []
    if ours is not None:
        def run_ours(s, with_state=False):
            return ours(s.q, s.k, s.v, s.g, scale=s.scale, initial_state=s.h0 if with_state else None,
                        output_final_state=with_state)
        calls.append(("ours", run_ours))
    if fla is not None:
        def run_fla(s, with_state=False):
            extra = dict(scale=s.scale, initial_state=s.h0 if with_state else None, output_final_state=with_state)
            if kind == "vector":
                return fla["chunk_gla"](s.q, s.k, s.v, s.g, **extra)
            if kind == "scalar":
                return fla["chunk_simple_gla"](s.q, s.k, s.v, g=s.g, **extra)
            return fla["chunk_simple_gla"](s.q, s.k, s.v, g_gamma=s.g, **extra)
        calls.append(("fla", run_fla))
    return calls


# ----------------------------------------------------------------------------------------------------------------
# Measurement helpers

def do_bench(fn, sets, warmup=25, rep=100):
    """Median ms of fn(set), cycling through the input sets (together they exceed L2; do_bench also flushes L2)."""
    import triton.testing
    cycle = itertools.cycle(sets)
    return float(triton.testing.do_bench(lambda: fn(next(cycle)), warmup=warmup, rep=rep, return_mode="median"))


def peak_memory_mib(fn, arg):
    """Peak allocation of one fn(arg) above everything allocated before it (so the inputs are excluded)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = fn(arg)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del result
    return peak / MiB


def forward_only(call):
    def run(s):
        with torch.no_grad():
            return call(s)[0]
    return run


def forward_backward(call):
    def run(s):
        o = call(s)[0]
        return torch.autograd.grad(o, s.grad_inputs(), s.do)
    return run


def rel(actual, expected):
    if actual is None or expected is None:
        return None
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).norm() / expected.norm().clamp(min=1e-30))


def run_with_grads(call, s, with_state=True):
    """o, final state and grads (q, k, v, g[, h0]) of <o, do> + <final state, dht>."""
    o, ht = call(s, with_state)
    leaves = [s.q, s.k, s.v, s.g] + ([s.h0] if with_state else [])
    wanted = [t for t in leaves if t.requires_grad]
    loss = (o.float() * s.do.float()).sum()
    if ht is not None:
        loss = loss + (ht.float() * s.dht).sum()
    grads = dict(zip(["dq", "dk", "dv", "dg", "dh0"], [None] * 5))
    got = torch.autograd.grad(loss, wanted, allow_unused=True)
    names = {id(s.q): "dq", id(s.k): "dk", id(s.v): "dv", id(s.g): "dg"}
    if with_state:
        names[id(s.h0)] = "dh0"
    for tensor, grad in zip(wanted, got):
        grads[names[id(tensor)]] = grad
    return dict(o=o.detach(), ht=None if ht is None else ht.detach(), **grads)


def fp32_copy(s):
    """The same inputs as fp32 leaves (the reference sees the bf16-rounded values)."""
    t = InputSet.__new__(InputSet)
    for name in ("q", "k", "v", "g"):
        src = getattr(s, name)
        setattr(t, name, src.detach().float().requires_grad_(src.requires_grad))
    t.do, t.scale, t.dht = s.do, s.scale, s.dht
    t.h0 = None if s.h0 is None else s.h0.detach().clone().requires_grad_()
    return t


# ----------------------------------------------------------------------------------------------------------------
# Precision against the float64 oracle

def oracle_is_float64(device="cpu"):
    """Whether naive_recurrence computes in float64 when given float64 inputs: 1 + 2^-40 survives float64 but
    rounds to 1 in fp32."""
    from linear_decay.recurrence import naive_recurrence
    one = torch.ones(1, 1, 1, 1, dtype=torch.float64, device=device)
    o, _ = naive_recurrence(one + 2.0 ** -40, one, one, None, scale=1.0)
    return bool(o.double().item() != 1.0)


def oracle_grads(s):
    """o and gradients (dq, dk, dv, dg) of <o, do> by the token-by-token recurrence on float64 copies of the
    (bf16-rounded) inputs."""
    from linear_decay.recurrence import naive_recurrence
    q, k, v = (t.detach().double().requires_grad_() for t in (s.q, s.k, s.v))
    g = s.g.detach().double().requires_grad_(s.g.requires_grad)
    o, _ = naive_recurrence(q, k, v, g, scale=s.scale)
    leaves = [q, k, v] + ([g] if g.requires_grad else [])
    got = torch.autograd.grad(o, leaves, s.do.double())
    out = dict(o=o.detach(), dq=got[0], dk=got[1], dv=got[2], dg=got[3] if g.requires_grad else None)
    return out


def refused(error):
    return f"refused: {err_text(error)}"


def precision_errors(call, s, ref):
    """{o, dq, dk, dv, dg: relative error to the oracle | "refused: reason" | None (no such gradient)} of one
    implementation; forward and backward are tried separately (an op may run forward and refuse backward)."""
    out = dict.fromkeys(PRECISION_KEYS)
    try:
        o = call(s)[0]
    except Exception as error:  # noqa: BLE001  (a refusal is a result)
        text = refused(error)
        return {key: (text if key != "dg" or ref["dg"] is not None else None) for key in PRECISION_KEYS}
    out["o"] = rel(o, ref["o"])
    try:
        grads = torch.autograd.grad(o, s.grad_inputs(), s.do.to(o.dtype), allow_unused=True)
    except Exception as error:  # noqa: BLE001
        text = refused(error)
        out.update(dq=text, dk=text, dv=text, dg=text if ref["dg"] is not None else None)
        return out
    for key, grad in zip(("dq", "dk", "dv", "dg"), grads):
        out[key] = rel(grad, ref[key]) if grad is not None else (None if ref[key] is None else "no gradient")
    return out


def precision_case(kind, strength, shape, impls, device=None, seed=2024):
    """One precision line: every (name, call) of `impls` (chunk_callables' form) on the same inputs against the
    float64 oracle."""
    batch, length, heads, dim = shape
    device = device or DEVICE
    s = InputSet(kind, batch, length, heads, dim, seed=seed, device=device, strength=strength)
    row = dict(decay=kind, strength=s.strength or "-", shape=shape_text(*shape))
    ref = oracle_grads(s)
    for name, call in impls:
        row[name] = precision_errors(call, s, ref)
    return row


def precision_plan(strengths):
    """(kind, strength, shape) of every precision line, in order."""
    plan = [(kind, strength, PRECISION_SHAPE) for kind in ("vector", "scalar") for strength in strengths]
    plan.append(("static", None, PRECISION_SHAPE))
    plan.append(PRECISION_EXTRA)
    return plan


def section_precision(results, args, ours, fla, deadline, save=lambda: None):
    rows = results.setdefault("precision", [])
    device = DEVICE
    try:
        results["precision_oracle_float64"] = oracle_is_float64(device)
    except Exception as error:  # noqa: BLE001
        results["precision_oracle_float64"] = err_text(error)
    if results["precision_oracle_float64"] is not True:
        print(f"[precision] WARNING: the oracle does not compute in float64 "
              f"({results['precision_oracle_float64']})", flush=True)
    for kind, strength, shape in precision_plan(args.strengths):
        if deadline.passed():
            rows.append(dict(decay=kind, strength=strength or "-", shape=shape_text(*shape), skipped="deadline"))
            continue
        try:
            row = precision_case(kind, strength, shape, chunk_callables(kind, ours.get("chunk"), fla), device)
        except Exception as error:  # noqa: BLE001
            row = dict(decay=kind, strength=strength or "-", shape=shape_text(*shape),
                       error=report_error(error, "precision"))
        rows.append(row)
        print(f"[precision] {row}", flush=True)
        torch.cuda.empty_cache()
        save()


# ----------------------------------------------------------------------------------------------------------------
# Sections

def section_ceilings(results, args):
    out = {}
    try:
        n = 2 ** 28  # 1 GiB of fp32 each way
        x = torch.empty(n, dtype=torch.float32, device="cuda").normal_()
        y = torch.empty_like(x)
        ms = do_bench(lambda _: y.copy_(x), [None], rep=300)
        out["copy_GBps"] = 2 * x.numel() * x.element_size() / (ms * 1e-3) / 1e9
        x = y = None  # free the GiB buffers
        n = 8192
        a = torch.randn(n, n, dtype=DTYPE, device="cuda")
        b = torch.randn(n, n, dtype=DTYPE, device="cuda")
        ms = do_bench(lambda _: a @ b, [None], rep=300)
        out["matmul_bf16_TFLOPs"] = 2 * n ** 3 / (ms * 1e-3) / 1e12
        a = b = None
    except Exception as error:  # noqa: BLE001
        out["error"] = err_text(error)
        traceback.print_exc()
    results["ceilings"] = out
    print(f"[ceilings] {out}", flush=True)


def cuda_kernel_names(fn, pattern=("flash", "fmha", "cudnn", "attention", "attn", "efficient", "sdpa")):
    """Names of the attention CUDA kernels one fn() launches (profiler), to say which backend torch chose."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.key for e in prof.key_averages() if any(p in e.key.lower() for p in pattern)]
    kernels = [name for name in names if not name.startswith(("aten::", "cuda", "cu"))] or names  # not host-side ops
    return [name[:120] for name in kernels][:4]


def bench_sdpa(batch, length, heads, dim, n_sets, args):
    """Rows for torch's default SDPA backend choice and for FLASH_ATTENTION forced, causal, [B,H,T,D] bf16."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    sets = []
    for i in range(n_sets):
        gen = torch.Generator(DEVICE).manual_seed(1000 + i)
        shape = (batch, heads, length, dim)
        q, k, v, do = (torch.randn(shape, device=DEVICE, generator=gen).to(DTYPE) for _ in range(4))
        sets.append((q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), do))

    def attention(s, forced):
        if forced:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(s[0], s[1], s[2], is_causal=True)
        return F.scaled_dot_product_attention(s[0], s[1], s[2], is_causal=True)

    rows = {}
    for impl, forced in (("sdpa_default", False), ("sdpa_flash", True)):
        row = rows[impl] = dict(label=SDPA_LABEL[impl])

        def fwd(s, forced=forced):
            with torch.no_grad():
                return attention(s, forced)

        def fwd_bwd(s, forced=forced):
            return torch.autograd.grad(attention(s, forced), s[:3], s[3])

        measure(row, "fwd_ms", lambda: do_bench(fwd, sets, args.warmup, args.rep), f"{impl} fwd")
        measure(row, "fwdbwd_ms", lambda: do_bench(fwd_bwd, sets, args.warmup, args.rep), f"{impl} fwd+bwd")
        if "fwdbwd_error" not in row:
            measure(row, "peak_MiB", lambda: peak_memory_mib(fwd_bwd, sets[0]), f"{impl} memory")
        if not forced:
            try:
                row["forward_kernels"] = cuda_kernel_names(lambda: fwd(sets[0]))
                row["backward_kernels"] = cuda_kernel_names(lambda: fwd_bwd(sets[0]))
            except Exception as error:  # noqa: BLE001
                row["kernels_error"] = err_text(error)
    return rows


def measure(row, key, fn, where=""):
    """row[key] = fn(), or row[<key without _ms/_MiB>_error] = the error."""
    try:
        row[key] = fn()
    except Exception as error:  # noqa: BLE001
        row[key.rsplit("_", 1)[0] + "_error"] = report_error(error, where)


def n_sets_for(batch, length, heads, dim):
    """Enough input sets that together they are ≥ 4× the 50 MB L2 (at least 2, at most 4)."""
    one = batch * length * heads * dim * (2 * 4 + 4)  # q, k, v, do bf16 + a vector decay fp32
    return max(2, min(4, math.ceil(4 * 50e6 / one)))


def chunk_plan(strengths):
    """(kind, strength) of every chunk case of one shape, in order."""
    return [(kind, strength) for kind in ("vector", "scalar") for strength in strengths] + [("static", None)]


def section_chunk(results, args, ours, fla, deadline, save=lambda: None):
    rows = results.setdefault("chunk", [])
    indices = args.shape or ([0] if args.quick else list(DEFAULT_SHAPES))
    for batch, length, heads, dim in (SHAPES[i] for i in indices):
        name_of_shape = shape_text(batch, length, heads, dim)
        n_sets = n_sets_for(batch, length, heads, dim)
        if deadline.passed():
            rows.append(dict(shape=name_of_shape, impl="sdpa_default", decay="-", strength="-", skipped="deadline"))
        else:
            try:
                sdpa = bench_sdpa(batch, length, heads, dim, n_sets, args)
            except Exception as error:  # noqa: BLE001
                sdpa = {impl: dict(label=SDPA_LABEL[impl], error=report_error(error, "sdpa")) for impl in SDPA_LABEL}
            for impl, row in sdpa.items():
                rows.append(dict(shape=name_of_shape, impl=impl, decay="-", strength="-", **row))
                print(f"[chunk] {name_of_shape} {impl} {row}", flush=True)
            torch.cuda.empty_cache()
            save()

        checked = set()
        for kind, strength in chunk_plan(args.strengths):
            label = strength or "-"
            if deadline.passed():
                for name, _ in chunk_callables(kind, ours.get("chunk"), fla):
                    rows.append(dict(shape=name_of_shape, impl=name, decay=kind, strength=label, skipped="deadline"))
                continue
            sets = [InputSet(kind, batch, length, heads, dim, seed=17 * i + 1, strength=strength)
                    for i in range(n_sets)]
            for name, call in chunk_callables(kind, ours.get("chunk"), fla):
                row = dict(shape=name_of_shape, impl=name, decay=kind, strength=label,
                           fla_op=FLA_NAME[kind] if name == "fla" else None)
                where = f"{name_of_shape} {kind} {label} {name}"
                measure(row, "fwd_ms", lambda: do_bench(forward_only(call), sets, args.warmup, args.rep),
                        where + " fwd")
                measure(row, "fwdbwd_ms", lambda: do_bench(forward_backward(call), sets, args.warmup, args.rep),
                        where + " fwd+bwd")
                if "fwdbwd_error" not in row:
                    measure(row, "peak_MiB", lambda: peak_memory_mib(forward_backward(call), sets[0]),
                            where + " memory")
                rows.append(row)
                print(f"[chunk] {where} {row}", flush=True)
                torch.cuda.empty_cache()
            if args.check == "all" or (args.check == "first" and kind not in checked):
                checked.add(kind)
                try:
                    line = check_chunk(name_of_shape, kind, sets[0], ours.get("chunk"), fla,
                                       reference=not args.no_reference)
                except Exception as error:  # noqa: BLE001
                    line = dict(shape=name_of_shape, decay=kind, error=report_error(error, "check"))
                line["strength"] = label
                results.setdefault("correctness", []).append(line)
                print(f"[check] {line}", flush=True)
            sets = None
            torch.cuda.empty_cache()
            save()


def check_chunk(shape_name, kind, s, ours, fla, reference=True):
    """Relative errors (bf16 runs, same inputs incl. an initial state and a final-state cotangent) of ours vs FLA and
    of each vs the fp32 PyTorch chunked path."""
    from linear_decay.recurrence import chunked_recurrence
    batch, _, heads, dim = s.q.shape
    gen = torch.Generator(DEVICE).manual_seed(4242)
    s.h0 = (torch.randn(batch, heads, dim, dim, device=DEVICE, generator=gen) * 0.5).requires_grad_()
    s.dht = torch.randn(batch, heads, dim, dim, device=DEVICE, generator=gen)
    outs = {}
    for name, call in chunk_callables(kind, ours, fla):
        try:
            outs[name] = run_with_grads(call, s)
        except Exception as error:  # noqa: BLE001
            outs[name] = dict(error=err_text(error))
    if reference:
        t = fp32_copy(s)
        outs["ref"] = run_with_grads(
            lambda x, w: chunked_recurrence(x.q, x.k, x.v, x.g, scale=x.scale, initial_state=x.h0,
                                            output_final_state=w), t)
    s.h0 = s.dht = None
    line = dict(shape=shape_name, decay=kind)
    keys = ("o", "ht", "dq", "dk", "dv", "dg", "dh0")
    for a, b in (("ours", "fla"), ("ours", "ref"), ("fla", "ref")):
        if a in outs and b in outs and "error" not in outs[a] and "error" not in outs[b]:
            line[f"{a}~{b}"] = {key: rel(outs[a][key], outs[b][key]) for key in keys
                                if outs[a].get(key) is not None and outs[b].get(key) is not None}
    for name, out in outs.items():
        if "error" in out:
            line[f"{name}_error"] = out["error"]
        elif any(v is not None and not bool(torch.isfinite(v).all()) for v in out.values()):
            line[f"{name}_nonfinite"] = True
    return line


def section_decode(results, args, ours, fla):
    rows = results.setdefault("decode", [])
    batch, heads, dim = DECODE_SHAPE
    state_bytes = batch * heads * dim * dim * 4
    n_sets = 4
    for kind in DECAYS:
        sets = []
        for i in range(n_sets):
            gen = torch.Generator("cuda").manual_seed(77 + i)
            shape = (batch, 1, heads, dim)
            s = dict(q=F.silu(torch.randn(shape, device="cuda", generator=gen)).to(DTYPE),
                     k=F.silu(torch.randn(shape, device="cuda", generator=gen)).to(DTYPE),
                     v=torch.randn(shape, device="cuda", generator=gen).to(DTYPE),
                     g=make_log_decay(kind, batch, 1, heads, dim, "cuda", gen),
                     h=torch.randn(batch, heads, dim, dim, device="cuda", generator=gen) * 0.5)
            sets.append(s)
        scale = dim ** -0.5
        calls = []
        if ours.get("decode") is not None:
            fn = ours["decode"]
            calls.append(("ours", lambda s: fn(s["q"], s["k"], s["v"], s["g"], scale=scale, initial_state=s["h"],
                                               output_final_state=True)))
        if fla is not None:
            if kind == "vector":
                calls.append(("fla", lambda s: fla["fused_recurrent_gla"](
                    s["q"], s["k"], s["v"], gk=s["g"], scale=scale, initial_state=s["h"], output_final_state=True)))
            elif kind == "scalar":
                calls.append(("fla", lambda s: fla["fused_recurrent_simple_gla"](
                    s["q"], s["k"], s["v"], g=s["g"], scale=scale, initial_state=s["h"], output_final_state=True)))
            else:
                calls.append(("fla", lambda s: fla["fused_recurrent_simple_gla"](
                    s["q"], s["k"], s["v"], g_gamma=s["g"], scale=scale, initial_state=s["h"],
                    output_final_state=True)))
        for name, call in calls:
            row = dict(shape=f"{batch}x1x{heads}x{dim}", impl=name, decay=kind,
                       fla_op=FLA_DECODE_NAME[kind] if name == "fla" else None)
            try:
                def step(s, call=call):
                    with torch.no_grad():
                        return call(s)
                row["step_ms"] = do_bench(step, sets, rep=100)
                row["state_GBps"] = 2 * state_bytes / (row["step_ms"] * 1e-3) / 1e9  # read + write of S
            except Exception as error:  # noqa: BLE001
                row["error"] = err_text(error)
                traceback.print_exc()
            rows.append(row)
            print(f"[decode] {row}", flush=True)
        # Correctness: ours and FLA vs the fp32 PyTorch step on the same (fresh) state.
        try:
            from linear_decay.recurrence import fused_recurrent
            s = sets[0]
            h_ref = s["h"].clone()
            o_ref, ht_ref = fused_recurrent(s["q"], s["k"], s["v"], s["g"], scale=scale, initial_state=h_ref,
                                            output_final_state=True)
            line = dict(shape=f"{batch}x1x{heads}x{dim}", decay=kind, section="decode")
            for name, call in calls:
                s_copy = dict(s, h=s["h"].clone())
                with torch.no_grad():
                    o, ht = call(s_copy)
                ht = s_copy["h"] if ht is None else ht
                line[f"{name}~ref"] = dict(o=rel(o, o_ref), ht=rel(ht, ht_ref))
                if name == "ours":
                    line["ours_in_place"] = rel(s_copy["h"], ht_ref)
            results.setdefault("correctness", []).append(line)
            print(f"[check] {line}", flush=True)
        except Exception as error:  # noqa: BLE001
            results.setdefault("correctness", []).append(dict(section="decode", decay=kind, error=err_text(error)))
            traceback.print_exc()
        sets = None
        torch.cuda.empty_cache()


def section_model(results, args):
    """Each backend in a child process: a cold process and an empty Triton cache, so compilation and autotuning of
    every kernel fall inside the measured first step."""
    out = results.setdefault("model", [])
    for backend in args.model_backends.split(","):
        with tempfile.TemporaryDirectory() as cache_dir, tempfile.NamedTemporaryFile(suffix=".json") as result_file:
            env = dict(os.environ, TRITON_CACHE_DIR=cache_dir)
            command = [sys.executable, os.path.abspath(__file__), "--model-child", result_file.name,
                       "--model-preset", args.model_preset, "--model-decay", args.model_decay,
                       "--model-backends", backend]
            start = time.perf_counter()
            proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.model_timeout)
            row = dict(backend=backend, preset=args.model_preset, decay=args.model_decay,
                       child_wall_s=time.perf_counter() - start)
            try:
                row.update(json.load(open(result_file.name)))
            except Exception:  # noqa: BLE001
                row["error"] = f"child rc={proc.returncode}: " + (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
            if proc.returncode != 0 and "error" not in row:
                row["error"] = f"child rc={proc.returncode}"
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr[-4000:])
        out.append(row)
        print(f"[model] {row}", flush=True)


def model_child(path, preset, decay, backend):
    """Runs in a fresh process: model creation -> first forward+backward (cold) -> more steps, on the recurrence
    backend `backend` (the config's `kernel_backend`)."""
    row = {}
    try:
        decay_type, _, granularity = decay.partition(":")
        import linear_decay  # noqa: F401  (import time is not part of the measurement)
        from linear_decay import LinearDecayConfig, LinearDecayForCausalLM
        from linear_decay.recurrence import resolve_backend
        row["backend_resolved"] = resolve_backend("cuda", backend)
        config = LinearDecayConfig.from_preset(preset, decay_type=decay_type, kernel_backend=backend,
                                               **({"decay_granularity": granularity} if granularity else {}))
        torch.manual_seed(0)
        ids = torch.randint(0, config.vocab_size, (MODEL_BATCH, MODEL_LENGTH), device="cuda")
        torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            with torch.device("cuda"):
                model = LinearDecayForCausalLM(config)
        except Exception:  # noqa: BLE001  (an init that cannot run on the GPU: build on CPU, then move)
            model = LinearDecayForCausalLM(config).cuda()
        model = model.to(DTYPE).train()
        torch.cuda.synchronize()
        row["create_s"] = time.perf_counter() - start
        row["params_M"] = sum(p.numel() for p in model.parameters()) / 1e6
        steps = []
        for _ in range(5):
            t0 = time.perf_counter()
            model.zero_grad(set_to_none=True)
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            torch.cuda.synchronize()
            steps.append(time.perf_counter() - t0)
            row["loss"] = float(loss)
            if len(steps) == 1:
                row["create_to_first_step_end_s"] = time.perf_counter() - start
        row["first_step_s"] = steps[0]
        row["second_step_s"] = steps[1]
        row["steady_step_s"] = statistics.median(steps[2:])
        row["tokens_per_s"] = MODEL_BATCH * MODEL_LENGTH / row["steady_step_s"]
        row["peak_GiB"] = torch.cuda.max_memory_allocated() / 2 ** 30
    except Exception as error:  # noqa: BLE001
        row["error"] = err_text(error)
        traceback.print_exc()
    with open(path, "w") as handle:
        json.dump(row, handle)


# ----------------------------------------------------------------------------------------------------------------
# Report

def fmt(x, spec=".3f"):
    return "-" if x is None else str(x) if isinstance(x, str) else format(x, spec)


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


class Notes:
    """Numbered footnotes under a markdown table (the full error texts, each once)."""

    def __init__(self):
        self.texts = {}

    def ref(self, text):
        return self.texts.setdefault(text, len(self.texts) + 1)

    def lines(self):
        return [f"[{n}] {text}" for text, n in self.texts.items()]


def md_table(header, body, left=3):
    """Markdown table; the first `left` columns are labels (left-aligned), the rest numbers."""
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i < left else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    return lines


def timing_cell(row, key, notes, spec=".3f"):
    """A measured value, or why there is none."""
    if not row:
        return "-"
    if row.get("skipped"):
        return "skipped"
    error = row.get(key.rsplit("_", 1)[0] + "_error") or row.get("error")
    if row.get(key) is None and error:
        return f"failed [{notes.ref(error)}]"
    return fmt(row.get(key), spec)


def precision_cell(value, notes):
    if value is None:
        return "-"
    if isinstance(value, str):
        if value.startswith("refused: "):
            reason = value[len("refused: "):]
            return f"refused: {reason.split(':', 1)[0]} [{notes.ref(reason)}]"
        return value
    return format(value, ".1e")


def markdown_chunk(results):
    rows = [r for r in results.get("chunk") or [] if r["impl"] in ("ours", "fla")]
    if not rows:
        return []
    by = {(r["shape"], r["impl"], r["decay"], r["strength"]): r for r in rows}
    sdpa = {(r["shape"], r["impl"]): r for r in results.get("chunk") or [] if r["impl"] in SDPA_LABEL}
    notes, body = Notes(), []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        default = sdpa.get((shape, "sdpa_default"), {})
        for kind, strength in dict.fromkeys((r["decay"], r["strength"]) for r in rows if r["shape"] == shape):
            o, f = by.get((shape, "ours", kind, strength), {}), by.get((shape, "fla", kind, strength), {})
            body.append([shape.replace("x", "×"), kind, strength,
                         timing_cell(o, "fwd_ms", notes), timing_cell(f, "fwd_ms", notes),
                         fmt(ratio(o.get("fwd_ms"), f.get("fwd_ms")), ".2f"),
                         timing_cell(o, "fwdbwd_ms", notes), timing_cell(f, "fwdbwd_ms", notes),
                         fmt(ratio(o.get("fwdbwd_ms"), f.get("fwdbwd_ms")), ".2f"),
                         fmt(ratio(default.get("fwdbwd_ms"), o.get("fwdbwd_ms")), ".2f")])
    lines = ["", "### Chunked recurrence: ms (median of triton.testing.do_bench), bf16",
             "", "ours/FLA < 1: ours faster. FLA ops: vector chunk_gla, scalar chunk_simple_gla(g=), static "
             "chunk_simple_gla(g_gamma=). SDPA/ours > 1: ours faster than SDPA (default backend).", ""]
    lines += md_table(["shape B×T×H×D", "decay", "strength", "ours fwd", "FLA fwd", "ours/FLA fwd",
                       "ours fwd+bwd", "FLA fwd+bwd", "ours/FLA fwd+bwd", "SDPA/ours fwd+bwd"], body)
    return lines + notes.lines()


def markdown_sdpa(results):
    rows = [r for r in results.get("chunk") or [] if r["impl"] in SDPA_LABEL]
    if not rows:
        return []
    by = {(r["shape"], r["impl"]): r for r in rows}
    notes, body = Notes(), []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        d, f = by.get((shape, "sdpa_default"), {}), by.get((shape, "sdpa_flash"), {})
        kernels = ", ".join(f"`{k}`" for k in (d.get("forward_kernels") or [])[:2]) or "-"
        body.append([shape.replace("x", "×"), timing_cell(d, "fwd_ms", notes), timing_cell(d, "fwdbwd_ms", notes),
                     timing_cell(d, "peak_MiB", notes, ".0f"), timing_cell(f, "fwd_ms", notes),
                     timing_cell(f, "fwdbwd_ms", notes), timing_cell(f, "peak_MiB", notes, ".0f"), kernels])
    lines = ["", "### SDPA, causal, [B,H,T,D] bf16: ms (median), peak MiB of fwd+bwd", ""]
    lines += md_table(["shape B×T×H×D", f"{SDPA_LABEL['sdpa_default']} fwd", "fwd+bwd", "peak MiB",
                       f"{SDPA_LABEL['sdpa_flash']} fwd", "fwd+bwd", "peak MiB", "default backend's forward kernels"],
                      body, left=1)
    return lines + notes.lines()


def markdown_memory(results):
    rows = [r for r in results.get("chunk") or [] if r["impl"] in ("ours", "fla")]
    if not rows:
        return []
    notes, body = Notes(), []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        for kind in dict.fromkeys(r["decay"] for r in rows if r["shape"] == shape):
            cells = []
            peaks = {}
            for impl in ("ours", "fla"):
                mine = [r for r in rows if (r["shape"], r["decay"], r["impl"]) == (shape, kind, impl)]
                values = [r["peak_MiB"] for r in mine if r.get("peak_MiB") is not None]
                peaks[impl] = max(values) if values else None
                if values:
                    cells.append(fmt(peaks[impl], ".0f"))
                else:
                    errors = [r.get("peak_error") or r.get("fwdbwd_error") or r.get("error") for r in mine]
                    errors = [e for e in errors if e]
                    cells.append(f"failed [{notes.ref(errors[0])}]" if errors else "-")
            body.append([shape.replace("x", "×"), kind, *cells, fmt(ratio(peaks["ours"], peaks["fla"]), ".2f")])
    lines = ["", "### Peak memory of one forward+backward above the inputs, MiB (max over the decay strengths)", ""]
    lines += md_table(["shape B×T×H×D", "decay", "ours", "FLA", "ours/FLA"], body, left=2)
    return lines + notes.lines()


def markdown_precision(results):
    rows = results.get("precision") or []
    if not rows:
        return []
    notes, body = Notes(), []
    for r in rows:
        cells = []
        for key in PRECISION_KEYS:
            for impl in ("ours", "fla"):
                if r.get("skipped"):
                    cells.append("skipped")
                elif r.get("error"):
                    cells.append(f"failed [{notes.ref(r['error'])}]")
                elif impl not in r:
                    cells.append("-")
                else:
                    cells.append(precision_cell(r[impl].get(key), notes))
        body.append([r["decay"], r["strength"], r["shape"].replace("x", "×"), *cells])
    oracle = results.get("precision_oracle_float64")
    lines = ["", "### Precision: relative error ‖x − ref‖/‖ref‖, ref = float64 token-by-token recurrence on the same "
             "bf16-rounded inputs" + ("" if oracle is True else f" (WARNING: oracle float64 check: {oracle})"), "",
             "bf16 q, k, v, fp32 log λ, scale K^-1/2, random bf16 output cotangent, no initial or final state. FLA: "
             "chunk_gla (vector), chunk_simple_gla g= (scalar) / g_gamma= (static; no gradient for it).", ""]
    header = ["decay", "strength", "B×T×H×K"] + [f"{PRECISION_LABEL[key]} {name}" for key in PRECISION_KEYS
                                                 for name in ("ours", "FLA")]
    lines += md_table(header, body)
    return lines + notes.lines()


def markdown_decode(results):
    rows = results.get("decode") or []
    if not rows:
        return []
    by = {(r["impl"], r["decay"]): r for r in rows}
    notes, body = Notes(), []
    for kind in DECAYS:
        o, f = by.get(("ours", kind), {}), by.get(("fla", kind), {})
        if not o and not f:
            continue
        body.append([kind, timing_cell(o, "step_ms", notes, ".4f"), fmt(o.get("state_GBps"), ".0f"),
                     FLA_DECODE_NAME[kind], timing_cell(f, "step_ms", notes, ".4f"), fmt(f.get("state_GBps"), ".0f"),
                     fmt(ratio(o.get("step_ms"), f.get("step_ms")), ".2f")])
    batch, heads, dim = DECODE_SHAPE
    lines = ["", f"### Decoding step, batch {batch}, H={heads}, K=V={dim}, T=1, fp32 state: ms, state GB/s "
             "(read+write)", ""]
    lines += md_table(["decay", "ours ms", "ours GB/s", "FLA op", "FLA ms", "FLA GB/s", "ours/FLA"], body, left=1)
    return lines + notes.lines()


def markdown_tables(results):
    lines = []
    for part in (markdown_chunk, markdown_sdpa, markdown_memory, markdown_precision, markdown_decode):
        lines += part(results)
    skipped = [r for key in ("chunk", "precision") for r in results.get(key) or [] if r.get("skipped")]
    if skipped:
        lines += ["", f"Skipped after --deadline: {len(skipped)} case(s): " + ", ".join(
            f"{r['shape']} {r.get('decay', '')} {r.get('strength', '')} {r.get('impl', '')}".strip()
            for r in skipped)]
    return "\n".join(lines)


def print_table(results):
    lines = ["", "=" * 118, f"bench_kernels  device={results['device']}  torch={results['torch']}  "
             f"triton={results['triton']}  fla={results.get('fla_version') or 'unavailable'}"]
    for key in ("ours_errors", "fla_error", "section_errors"):
        if results.get(key):
            lines.append(f"  {key}: {results[key]}")
    if results.get("section_seconds"):
        lines.append("  section seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in results["section_seconds"].items()))
    ceil = results.get("ceilings")
    if ceil:
        lines.append(f"ceilings: D2D copy {fmt(ceil.get('copy_GBps'), '.0f')} GB/s, 8192^3 bf16 matmul "
                     f"{fmt(ceil.get('matmul_bf16_TFLOPs'), '.0f')} TFLOP/s {ceil.get('error', '')}")
    checks = results.get("correctness") or []
    if checks:
        lines.append("")
        lines.append("correctness: relative error ||a-b||/||b|| on o, final state, dq, dk, dv, dlog_decay, dh0 "
                     "(ref = fp32 PyTorch chunked path on the same bf16-rounded inputs)")
        for c in checks:
            head = (f"{c.get('section', 'chunk'):<6}{c.get('shape', ''):<16}{c.get('decay', ''):<8}"
                    f"{c.get('strength', '-'):<11}")
            parts = []
            for pair in ("ours~fla", "ours~ref", "fla~ref"):
                if pair in c:
                    parts.append(pair + " " + " ".join(f"{k}={fmt(v, '.1e') if isinstance(v, float) else v}"
                                                       for k, v in c[pair].items() if v is not None))
            for k, v in c.items():
                if k.endswith("_error") or k.endswith("_nonfinite") or k in ("error", "ours_in_place"):
                    parts.append(f"{k}={v if not isinstance(v, float) else format(v, '.1e')}")
            lines.append(head + " | ".join(parts))
    for m in results.get("model") or []:
        lines.append("")
        lines.append(f"model {m.get('preset')} {m.get('decay')} backend={m.get('backend')} "
                     f"(resolved {m.get('backend_resolved')}) bf16 batch {MODEL_BATCH}x{MODEL_LENGTH}, "
                     f"{fmt(m.get('params_M'), '.0f')}M params:")
        if m.get("error"):
            lines.append(f"  error: {m['error']}")
        lines.append(f"  create {fmt(m.get('create_s'), '.2f')} s; creation -> end of first fwd+bwd (cold compile + "
                     f"autotune) {fmt(m.get('create_to_first_step_end_s'), '.2f')} s; first step "
                     f"{fmt(m.get('first_step_s'), '.2f')} s; second {fmt(m.get('second_step_s'), '.3f')} s; steady "
                     f"{fmt(m.get('steady_step_s'), '.3f')} s ({fmt(m.get('tokens_per_s'), '.0f')} tok/s); peak "
                     f"{fmt(m.get('peak_GiB'), '.1f')} GiB; loss {fmt(m.get('loss'), '.3f')}")
    lines.append(markdown_tables(results))
    lines.append("=" * 118)
    print("\n".join(lines), flush=True)


def json_safe(value):
    """NaN / inf as strings (strict JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(results, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as handle:
        json.dump(json_safe(results), handle, indent=1, default=str)
    os.replace(path + ".tmp", path)


SECTIONS = ("ceilings", "precision", "chunk", "decode", "model")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=SECTIONS, action="append",
                        help="run only this section (repeatable; sections run in the order " + ", ".join(SECTIONS)
                        + ")")
    parser.add_argument("--strengths", type=parse_strengths, default=list(STRENGTHS),
                        help="precision and chunk: comma list of decay strengths (default: " + ",".join(STRENGTHS)
                        + ")")
    parser.add_argument("--quick", action="store_true", help="chunk: one shape only (8x2048x16x128)")
    parser.add_argument("--shape", type=int, action="append", choices=range(len(SHAPES)),
                        help="chunk section: only SHAPES[i] (repeatable; 0: 8x2048x16x128, 1: 2x16384x16x128, "
                             "2: 4x4096x32x64, 3: 1x16384x16x64; default 0, 1, 3)")
    parser.add_argument("--json", help="write every result to this path (rewritten after every case)")
    parser.add_argument("--from-json", metavar="PATH",
                        help="run nothing: print the summary and markdown tables of a --json file (no GPU needed)")
    parser.add_argument("--check", choices=["first", "all", "none"], default="first",
                        help="chunk: correctness line per shape and decay at the first strength (default), at every "
                             "strength, or none")
    parser.add_argument("--no-check", dest="check", action="store_const", const="none", help="same as --check none")
    parser.add_argument("--no-fla", action="store_true",
                        help="ours and SDPA only (FLA's autotuning takes minutes per op and shape on a cold machine)")
    parser.add_argument("--no-reference", action="store_true", help="correctness: ours vs FLA only, no fp32 ref")
    parser.add_argument("--warmup", type=float, default=25, help="chunk: do_bench warmup, ms (default 25)")
    parser.add_argument("--rep", type=float, default=100, help="chunk: do_bench repetition time, ms (default 100)")
    parser.add_argument("--deadline", type=float,
                        help="seconds after the start past which no new precision / chunk case starts")
    parser.add_argument("--model-preset", default="410m")
    parser.add_argument("--model-decay", default="mamba2:vector", help="decay_type[:granularity] of the model")
    parser.add_argument("--model-backends", default="triton,torch", help="comma list of kernel_backend values (the config's)")
    parser.add_argument("--model-timeout", type=float, default=900)
    parser.add_argument("--model-child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    deadline = Deadline(args.deadline)

    if args.model_child:
        model_child(args.model_child, args.model_preset, args.model_decay, args.model_backends)
        return
    if args.from_json:
        with open(args.from_json) as handle:
            print_table(json.load(handle))
        return
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU")

    import triton
    sections = [s for s in SECTIONS if s in (args.only or SECTIONS)]
    results = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                   sections=sections, quick=args.quick, strengths=args.strengths,
                   do_bench=dict(warmup_ms=args.warmup, rep_ms=args.rep), deadline_s=args.deadline)
    ours, ours_errors = load_ours()
    results["ours_errors"] = ours_errors or None
    fla = None
    wants_fla = any(s in sections for s in ("precision", "chunk", "decode"))
    if wants_fla and args.no_fla:
        results["fla_error"] = "--no-fla"
    elif wants_fla:
        fla, fla_error = load_fla()
        results["fla_error"] = fla_error
        results["fla_version"] = fla["version"] if fla else None
        if fla_error:
            print(f"FLA unavailable ({fla_error}): comparing ours with SDPA only", flush=True)
    if ours_errors:
        print(f"our kernels unavailable: {ours_errors}", flush=True)

    def save():
        if args.json:
            write_json(results, args.json)

    started = time.perf_counter()
    for section in sections:
        t0 = time.perf_counter()
        try:
            if section == "ceilings":
                section_ceilings(results, args)
            elif section == "precision":
                section_precision(results, args, ours, fla, deadline, save)
            elif section == "chunk":
                section_chunk(results, args, ours, fla, deadline, save)
            elif section == "decode":
                section_decode(results, args, ours, fla)
            else:
                section_model(results, args)
        except Exception as error:  # noqa: BLE001
            results.setdefault("section_errors", {})[section] = err_text(error)
            traceback.print_exc()
        results.setdefault("section_seconds", {})[section] = time.perf_counter() - t0
        torch.cuda.empty_cache()
        save()
    results["total_seconds"] = time.perf_counter() - started
    save()
    print_table(results)


if __name__ == "__main__":
    main()
