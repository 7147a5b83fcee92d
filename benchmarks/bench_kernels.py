"""GPU benchmark of the Triton kernels against flash-linear-attention (FLA) 0.6.0 and FlashAttention (torch SDPA).

One run on one GPU (written for the H200), everything in bf16:

  ceilings  device-to-device copy GB/s and an 8192³ bf16 matmul TFLOP/s (what the machine can do at best)
  chunk     training kernels at B×T×H×D = 8×2048×16×128, 2×16384×16×128, 4×4096×32×64 (the kernels issue's
            shapes) and 1×16384×16×64 (a layer of the 410m model at B=1, T=16384: few sequences × heads), forward and
            forward+backward (median of triton.testing.do_bench, inputs rotated over several sets):
              ours vector decay  vs FLA chunk_gla
              ours scalar decay  vs FLA chunk_simple_gla(g=...)        (data-dependent, per token and head)
              ours static decay  vs FLA chunk_simple_gla(g_gamma=...)  (per head, TNL-like)
              torch SDPA flash attention (causal), the softmax-attention yardstick
            peak memory of forward+backward above what was allocated before (inputs excluded), and a correctness
            line per shape and decay: relative errors ours~FLA and each against an fp32 reference (the PyTorch
            chunked path of this package on fp32 copies of the same inputs)
  decode    one decoding step at batch 64, H=16, D=128, T=1 on a fp32 state: ours (state updated in place) vs FLA
            fused_recurrent_gla / fused_recurrent_simple_gla, with the state bandwidth achieved
  model     LinearDecayForCausalLM 410m preset (24 layers, d1024), bf16 on CUDA: time from model creation to the end
            of the first forward+backward of a batch 8×2048 with the Triton backend (cold: compilation and autotuning
            happen inside it, in a child process with an empty Triton cache), then the next steps; the same model on
            the PyTorch backend for scale

    python benchmarks/bench_kernels.py [--only ceilings|chunk|decode|model] [--quick] [--shape I] [--json PATH]

Cold cost: Triton compiles each kernel variant on first use (ours: per decay kind, dtype, H, K, V; FLA also autotunes
many configs per kernel on its first call), so a first run on a fresh machine spends minutes outside the timed
regions (do_bench's warmup absorbs them). To stay under a 10-minute command limit, split it: e.g. `--only ceilings
--only decode`, `--only chunk --shape 0`, `--shape 1`, `--shape 2`, `--only model`, back to back on a warm machine
(the Triton cache on disk carries over).

The table goes to stdout at the very end; --json writes everything (errors included). FLA missing or a kernel failing
on one shape is reported and the run goes on.

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
DECAYS = ("vector", "scalar", "static")
FLA_NAME = {"vector": "chunk_gla", "scalar": "chunk_simple_gla(g)", "static": "chunk_simple_gla(g_gamma)"}
FLA_DECODE_NAME = {"vector": "fused_recurrent_gla", "scalar": "fused_recurrent_simple_gla(g)",
                   "static": "fused_recurrent_simple_gla(g_gamma)"}
DECODE_SHAPE = (64, 16, 128)  # batch, heads, head dim
MODEL_BATCH, MODEL_LENGTH = 8, 2048
DTYPE = torch.bfloat16
MiB = 2 ** 20


def err_text(error):
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"[:300]


# ----------------------------------------------------------------------------------------------------------------
# Implementations under test (each import guarded: a missing or broken one is reported, the rest still run)

def load_ours():
    found, errors = {}, {}
    try:
        from linear_decay.kernels_chunk_linear_decay import triton_chunked_recurrence
        found["chunk"] = triton_chunked_recurrence
    except Exception as error:  # noqa: BLE001  (any import failure is a result to report)
        errors["chunk"] = err_text(error)
    try:
        from linear_decay.kernels_recurrent_linear_decay import triton_fused_recurrent
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


def make_log_decay(kind, batch, length, heads, dim, device, generator):
    if kind == "vector":  # GLA-like: logsigmoid(z)/16
        return F.logsigmoid(torch.randn(batch, length, heads, dim, device=device, generator=generator)) / 16
    if kind == "scalar":  # Mamba2-like: −softplus(z)·0.1, λ ≈ 0.93 on average
        return -F.softplus(torch.randn(batch, length, heads, device=device, generator=generator)) * 0.1
    if kind == "static":
        return static_log_decay(heads, device)
    raise ValueError(kind)


class InputSet:
    """q, k = silu(randn) (non-negative like the model's keys), v = randn, all bf16; log-decay fp32; a random
    output cotangent `do`; scale D^-1/2 for every implementation."""

    def __init__(self, kind, batch, length, heads, dim, seed, device="cuda", state=False):
        gen = torch.Generator(device).manual_seed(seed)
        shape = (batch, length, heads, dim)
        self.q = F.silu(torch.randn(shape, device=device, generator=gen)).to(DTYPE).requires_grad_()
        self.k = F.silu(torch.randn(shape, device=device, generator=gen)).to(DTYPE).requires_grad_()
        self.v = torch.randn(shape, device=device, generator=gen).to(DTYPE).requires_grad_()
        self.g = make_log_decay(kind, batch, length, heads, dim, device, gen)
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

def do_bench(fn, sets, warmup=25, rep=200):
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
# Sections

def section_ceilings(results, args):
    out = {}
    try:
        n = 2 ** 28  # 1 GiB of fp32 each way
        x = torch.empty(n, dtype=torch.float32, device="cuda").normal_()
        y = torch.empty_like(x)
        ms = do_bench(lambda _: y.copy_(x), [None], rep=300)
        out["copy_GBps"] = 2 * x.numel() * x.element_size() / (ms * 1e-3) / 1e9
        del x, y
        n = 8192
        a = torch.randn(n, n, dtype=DTYPE, device="cuda")
        b = torch.randn(n, n, dtype=DTYPE, device="cuda")
        ms = do_bench(lambda _: a @ b, [None], rep=300)
        out["matmul_bf16_TFLOPs"] = 2 * n ** 3 / (ms * 1e-3) / 1e12
        del a, b
    except Exception as error:  # noqa: BLE001
        out["error"] = err_text(error)
        traceback.print_exc()
    results["ceilings"] = out
    print(f"[ceilings] {out}", flush=True)


def bench_sdpa(batch, length, heads, dim, n_sets):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    row = {}
    sets = []
    for i in range(n_sets):
        gen = torch.Generator("cuda").manual_seed(1000 + i)
        shape = (batch, heads, length, dim)
        q, k, v, do = (torch.randn(shape, device="cuda", generator=gen).to(DTYPE) for _ in range(4))
        sets.append((q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), do))

    def fwd(s):
        with torch.no_grad(), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(s[0], s[1], s[2], is_causal=True)

    def fwd_bwd(s):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            o = F.scaled_dot_product_attention(s[0], s[1], s[2], is_causal=True)
        return torch.autograd.grad(o, s[:3], s[3])

    row["fwd_ms"] = do_bench(fwd, sets)
    row["fwdbwd_ms"] = do_bench(fwd_bwd, sets)
    row["peak_MiB"] = peak_memory_mib(fwd_bwd, sets[0])
    return row


def n_sets_for(batch, length, heads, dim):
    """Enough input sets that together they are ≥ 4× the 50 MB L2 (at least 2, at most 4)."""
    one = batch * length * heads * dim * (2 * 4 + 4)  # q, k, v, do bf16 + a vector decay fp32
    return max(2, min(4, math.ceil(4 * 50e6 / one)))


def section_chunk(results, args, ours, fla):
    rows = results.setdefault("chunk", [])
    shapes = [SHAPES[i] for i in args.shape] if args.shape else (SHAPES[:1] if args.quick else SHAPES)
    for batch, length, heads, dim in shapes:
        shape_name = f"{batch}x{length}x{heads}x{dim}"
        n_sets = n_sets_for(batch, length, heads, dim)
        try:
            sdpa = bench_sdpa(batch, length, heads, dim, n_sets)
        except Exception as error:  # noqa: BLE001
            sdpa = dict(error=err_text(error))
            traceback.print_exc()
        rows.append(dict(shape=shape_name, impl="sdpa_flash", decay="-", **sdpa))
        print(f"[chunk] {shape_name} sdpa {sdpa}", flush=True)
        torch.cuda.empty_cache()

        for kind in DECAYS:
            sets = [InputSet(kind, batch, length, heads, dim, seed=17 * i + 1) for i in range(n_sets)]
            timing = {}
            for name, call in chunk_callables(kind, ours.get("chunk"), fla):
                row = dict(shape=shape_name, impl=name, decay=kind,
                           fla_op=FLA_NAME[kind] if name == "fla" else None)
                try:
                    row["fwd_ms"] = do_bench(forward_only(call), sets)
                    row["fwdbwd_ms"] = do_bench(forward_backward(call), sets)
                    row["peak_MiB"] = peak_memory_mib(forward_backward(call), sets[0])
                except Exception as error:  # noqa: BLE001
                    row["error"] = err_text(error)
                    traceback.print_exc()
                timing[name] = row
                rows.append(row)
                print(f"[chunk] {shape_name} {kind} {name} {row}", flush=True)
                torch.cuda.empty_cache()
            if args.no_check:
                continue
            try:
                results.setdefault("correctness", []).append(
                    check_chunk(shape_name, kind, sets[0], ours.get("chunk"), fla, reference=not args.no_reference))
                print(f"[check] {results['correctness'][-1]}", flush=True)
            except Exception as error:  # noqa: BLE001
                results.setdefault("correctness", []).append(dict(shape=shape_name, decay=kind,
                                                                  error=err_text(error)))
                traceback.print_exc()
            del sets
            torch.cuda.empty_cache()


def check_chunk(shape_name, kind, s, ours, fla, reference=True):
    """Relative errors (bf16 runs, same inputs incl. an initial state and a final-state cotangent) of ours vs FLA and
    of each vs the fp32 PyTorch chunked path."""
    from linear_decay.recurrence_linear_decay import chunked_recurrence
    batch, _, heads, dim = s.q.shape
    gen = torch.Generator("cuda").manual_seed(4242)
    s.h0 = (torch.randn(batch, heads, dim, dim, device="cuda", generator=gen) * 0.5).requires_grad_()
    s.dht = torch.randn(batch, heads, dim, dim, device="cuda", generator=gen)
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
            from linear_decay.recurrence_linear_decay import fused_recurrent
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
        del sets
        torch.cuda.empty_cache()


def section_model(results, args):
    """Each backend in a child process: a cold process and an empty Triton cache, so compilation and autotuning of
    every kernel fall inside the measured first step."""
    out = results.setdefault("model", [])
    for backend in args.model_backends.split(","):
        with tempfile.TemporaryDirectory() as cache_dir, tempfile.NamedTemporaryFile(suffix=".json") as result_file:
            env = dict(os.environ, TRITON_CACHE_DIR=cache_dir, LINEAR_DECAY_BACKEND=backend)
            command = [sys.executable, os.path.abspath(__file__), "--model-child", result_file.name,
                       "--model-preset", args.model_preset, "--model-decay", args.model_decay]
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


def model_child(path, preset, decay):
    """Runs in a fresh process: model creation -> first forward+backward (cold) -> more steps."""
    row = {}
    try:
        decay_type, _, granularity = decay.partition(":")
        import linear_decay  # noqa: F401  (import time is not part of the measurement)
        from linear_decay import LinearDecayConfig, LinearDecayForCausalLM
        from linear_decay.recurrence_linear_decay import resolve_backend
        row["backend_resolved"] = resolve_backend("cuda")
        config = LinearDecayConfig.from_preset(preset, decay_type=decay_type,
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
    return "-" if x is None else format(x, spec)


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def print_table(results):
    lines = ["", "=" * 118, f"bench_kernels  device={results['device']}  torch={results['torch']}  "
             f"triton={results['triton']}  fla={results.get('fla_version') or 'unavailable'}"]
    for key in ("ours_errors", "fla_error"):
        if results.get(key):
            lines.append(f"  {key}: {results[key]}")
    ceil = results.get("ceilings")
    if ceil:
        lines.append(f"ceilings: D2D copy {fmt(ceil.get('copy_GBps'), '.0f')} GB/s, 8192^3 bf16 matmul "
                     f"{fmt(ceil.get('matmul_bf16_TFLOPs'), '.0f')} TFLOP/s {ceil.get('error', '')}")
    rows = results.get("chunk") or []
    if rows:
        lines.append("")
        lines.append("chunked training, bf16, ms (median). r=ours/FLA (<1: ours faster); sdpa/ours (>1: ours faster); "
                     "peak MiB of fwd+bwd beyond inputs")
        lines.append(f"{'shape':<16}{'decay':<8}{'ours fwd':>9}{'FLA fwd':>9}{'r fwd':>7}{'ours f+b':>10}"
                     f"{'FLA f+b':>9}{'r f+b':>7}{'sdpa fwd':>9}{'sdpa f+b':>9}{'sdpa/ours f+b':>14}"
                     f"{'mem ours':>9}{'mem FLA':>9}")
        by = {(r["shape"], r["impl"], r["decay"]): r for r in rows}
        for shape in dict.fromkeys(r["shape"] for r in rows):
            sdpa = by.get((shape, "sdpa_flash", "-"), {})
            for kind in DECAYS:
                o, f = by.get((shape, "ours", kind), {}), by.get((shape, "fla", kind), {})
                if not o and not f:
                    continue
                lines.append(
                    f"{shape:<16}{kind:<8}{fmt(o.get('fwd_ms')):>9}{fmt(f.get('fwd_ms')):>9}"
                    f"{fmt(ratio(o.get('fwd_ms'), f.get('fwd_ms')), '.2f'):>7}{fmt(o.get('fwdbwd_ms')):>10}"
                    f"{fmt(f.get('fwdbwd_ms')):>9}{fmt(ratio(o.get('fwdbwd_ms'), f.get('fwdbwd_ms')), '.2f'):>7}"
                    f"{fmt(sdpa.get('fwd_ms')):>9}{fmt(sdpa.get('fwdbwd_ms')):>9}"
                    f"{fmt(ratio(sdpa.get('fwdbwd_ms'), o.get('fwdbwd_ms')), '.2f'):>14}"
                    f"{fmt(o.get('peak_MiB'), '.0f'):>9}{fmt(f.get('peak_MiB'), '.0f'):>9}")
                for name, r in (("ours", o), ("FLA", f)):
                    if r.get("error"):
                        lines.append(f"    {name} error: {r['error']}")
            if sdpa.get("error"):
                lines.append(f"    sdpa error: {sdpa['error']}")
            if sdpa.get("peak_MiB") is not None:
                lines.append(f"{shape:<16}sdpa peak fwd+bwd {sdpa['peak_MiB']:.0f} MiB")
    checks = results.get("correctness") or []
    if checks:
        lines.append("")
        lines.append("correctness: relative error ||a-b||/||b|| on o, final state, dq, dk, dv, dlog_decay, dh0 "
                     "(ref = fp32 PyTorch chunked path on the same bf16-rounded inputs)")
        for c in checks:
            head = f"{c.get('section', 'chunk'):<6}{c.get('shape', ''):<16}{c.get('decay', ''):<8}"
            parts = []
            for pair in ("ours~fla", "ours~ref", "fla~ref"):
                if pair in c:
                    parts.append(pair + " " + " ".join(f"{k}={v:.1e}" for k, v in c[pair].items() if v is not None))
            for k, v in c.items():
                if k.endswith("_error") or k.endswith("_nonfinite") or k in ("error", "ours_in_place"):
                    parts.append(f"{k}={v if not isinstance(v, float) else format(v, '.1e')}")
            lines.append(head + " | ".join(parts))
    dec = results.get("decode") or []
    if dec:
        lines.append("")
        lines.append("decode step (batch 64, H=16, D=128, fp32 state 64 MiB), ms, state GB/s (read+write)")
        by = {(r["impl"], r["decay"]): r for r in dec}
        for kind in DECAYS:
            o, f = by.get(("ours", kind), {}), by.get(("fla", kind), {})
            lines.append(f"  {kind:<8} ours {fmt(o.get('step_ms'), '.4f')} ms ({fmt(o.get('state_GBps'), '.0f')} GB/s)"
                         f"   FLA {FLA_DECODE_NAME[kind]} {fmt(f.get('step_ms'), '.4f')} ms "
                         f"({fmt(f.get('state_GBps'), '.0f')} GB/s)   ours/FLA "
                         f"{fmt(ratio(o.get('step_ms'), f.get('step_ms')), '.2f')}"
                         + "".join(f"   {n} error: {r['error']}" for n, r in (("ours", o), ("FLA", f))
                                   if r.get("error")))
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
    lines.append("=" * 118)
    print("\n".join(lines), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=["ceilings", "chunk", "decode", "model"], action="append",
                        help="run only this section (repeatable)")
    parser.add_argument("--quick", action="store_true", help="one shape only (8x2048x16x128)")
    parser.add_argument("--shape", type=int, action="append", choices=range(len(SHAPES)),
                        help="chunk section: only SHAPES[i] (repeatable; 0: 8x2048x16x128, 1: 2x16384x16x128, "
                             "2: 4x4096x32x64, 3: 1x16384x16x64)")
    parser.add_argument("--json", help="write every result to this path")
    parser.add_argument("--no-check", action="store_true", help="skip the correctness lines")
    parser.add_argument("--no-fla", action="store_true",
                        help="ours and SDPA only (FLA's autotuning takes minutes per op and shape on a cold machine)")
    parser.add_argument("--no-reference", action="store_true", help="correctness: ours vs FLA only, no fp32 ref")
    parser.add_argument("--model-preset", default="410m")
    parser.add_argument("--model-decay", default="mamba2:vector", help="decay_type[:granularity] of the model")
    parser.add_argument("--model-backends", default="triton,torch", help="comma list of LINEAR_DECAY_BACKEND values")
    parser.add_argument("--model-timeout", type=float, default=900)
    parser.add_argument("--model-child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.model_child:
        model_child(args.model_child, args.model_preset, args.model_decay)
        return
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU")

    import triton
    sections = args.only or ["ceilings", "chunk", "decode", "model"]
    results = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                   sections=sections, quick=args.quick)
    ours, ours_errors = load_ours()
    results["ours_errors"] = ours_errors or None
    fla = None
    if ("chunk" in sections or "decode" in sections) and args.no_fla:
        results["fla_error"] = "--no-fla"
    elif "chunk" in sections or "decode" in sections:
        fla, fla_error = load_fla()
        results["fla_error"] = fla_error
        results["fla_version"] = fla["version"] if fla else None
        if fla_error:
            print(f"FLA unavailable ({fla_error}): comparing ours with SDPA only", flush=True)
    if ours_errors:
        print(f"our kernels unavailable: {ours_errors}", flush=True)

    started = time.perf_counter()
    for section in ("ceilings", "chunk", "decode", "model"):
        if section not in sections:
            continue
        t0 = time.perf_counter()
        try:
            if section == "ceilings":
                section_ceilings(results, args)
            elif section == "chunk":
                section_chunk(results, args, ours, fla)
            elif section == "decode":
                section_decode(results, args, ours, fla)
            else:
                section_model(results, args)
        except Exception as error:  # noqa: BLE001
            results.setdefault("section_errors", {})[section] = err_text(error)
            traceback.print_exc()
        results.setdefault("section_seconds", {})[section] = time.perf_counter() - t0
        torch.cuda.empty_cache()
    results["total_seconds"] = time.perf_counter() - started

    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1, default=str)
    print_table(results)


if __name__ == "__main__":
    main()
