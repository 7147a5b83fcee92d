"""The chunk kernels against flash-linear-attention (FLA) across decay strengths, on one GPU, in one process.

    python benchmarks/bench_decay_strengths.py precision [--kinds vector,scalar,static]
    python benchmarks/bench_decay_strengths.py speed [--kinds vector,static] [--strengths mild,u6,u20]
        [--grads accumulate|fresh] [--impls ours,fla] [--shapes 2x16384x16x128]
    python benchmarks/bench_decay_strengths.py profile [--kinds ...] [--strengths u6] [--shapes ...]

Inputs (bf16): q, k = silu(randn), v = randn, scale K^-1/2, a random bf16 output cotangent, no initial or final state;
log λ in fp32 by strength (vector [B, T, H, K], scalar [B, T, H]):
  mild        logsigmoid(z) / 16
  mamba2      −A · softplus(z + dt_bias), Mamba2's initial A ~ U[1, 16] and dt ~ exp(U[ln 1e-3, ln 0.1]) per channel
  logsigmoid  logsigmoid(z)
  u6, u20     uniform(−6, 0), uniform(−20, 0)   (trained models reach log λ ≈ −4.8, RESULTS.md)
static decay: TNL's slopes of a first layer, −1 / (2 · 128^{h / (H − 1)}).

precision  B×T×H×K = 2×1000×3×128: ‖x − ref‖ / ‖ref‖ of o, dq, dk, dv, d log λ for ours and FLA (chunk_gla,
           chunk_simple_gla) on the same inputs, ref the float64 token-by-token recurrence (naive_recurrence on float64
           copies) with autograd. One JSON line per case.
speed      forward and forward+backward ms (median of triton.testing.do_bench) and the peak memory of a
           forward+backward above the inputs, ours and FLA, at 8×2048×16×128, 2×16384×16×128 and 1×16384×16×64; then
           torch's SDPA (causal, default backend selection) forward+backward at the same shapes. One JSON line per case.
profile    device time of each kernel in one forward+backward (`.grad = None`), the mean of 10 under torch.profiler,
           ours and FLA, at the same shapes: where the time goes. Kernels on two streams overlap, so the sum of their
           times is not the step's: beside it the device span of a step, each stream's busy time and the last step's
           timeline (kernel, stream, start and duration, ms) and each kernel's registers a thread, from the profiler's
           trace. One JSON line per case and implementation, printed as soon as it is measured.

FLA is optional (`pip install flash-linear-attention==0.6.0`); a case FLA refuses (chunk_simple_gla with a
data-dependent g on Hopper with Triton < 3.7.1) prints its message instead of numbers.
"""

import argparse
import json
import math
import os
import sys
import tempfile

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from linear_decay.recurrence import naive_recurrence  # noqa: E402

STRENGTHS = ("mild", "mamba2", "logsigmoid", "u6", "u20")
SHAPES = ((8, 2048, 16, 128), (2, 16384, 16, 128), (1, 16384, 16, 64))


def log_decay(strength, shape, generator):
    z = torch.randn(shape, generator=generator)
    if strength == "mild":
        return F.logsigmoid(z) / 16
    if strength == "logsigmoid":
        return F.logsigmoid(z)
    if strength == "mamba2":
        channels = shape[2:]
        a = 1 + 15 * torch.rand(channels, generator=generator)
        dt = torch.exp(math.log(1e-3) + (math.log(0.1) - math.log(1e-3)) * torch.rand(channels, generator=generator))
        return -a * F.softplus(z + dt + torch.log(-torch.expm1(-dt)))
    return {"u6": -6.0, "u20": -20.0}[strength] * torch.rand(shape, generator=generator)


def make_inputs(kind, strength, batch, length, heads, dim, seed=0, device="cuda", dtype=torch.bfloat16):
    """[q, k, v, log λ, output cotangent] on `device`: q, k, v and the cotangent in `dtype`, log λ fp32."""
    generator = torch.Generator().manual_seed(seed)
    q = F.silu(torch.randn(batch, length, heads, dim, generator=generator)).to(dtype)
    k = F.silu(torch.randn(batch, length, heads, dim, generator=generator)).to(dtype)
    v = torch.randn(batch, length, heads, dim, generator=generator).to(dtype)
    if kind == "static":
        g = -(1 / (2 * 128 ** (torch.arange(heads) / (heads - 1))))
    else:
        g = log_decay(strength, (batch, length, heads, dim) if kind == "vector" else (batch, length, heads), generator)
    do = torch.randn(batch, length, heads, dim, generator=generator).to(dtype)
    return [x.to(device) for x in (q, k, v, g, do)]


def implementations():
    from linear_decay.ops_chunk import triton_chunked_recurrence

    found = {"ours": lambda kind, q, k, v, g, scale: triton_chunked_recurrence(q, k, v, g, scale=scale)[0]}
    try:
        from fla.ops.gla import chunk_gla
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError as error:
        print(f"FLA not available: {error}", flush=True)
        return found

    def fla(kind, q, k, v, g, scale):
        if kind == "vector":
            return chunk_gla(q, k, v, g, scale=scale)[0]
        if kind == "scalar":
            return chunk_simple_gla(q, k, v, g=g, scale=scale)[0]
        return chunk_simple_gla(q, k, v, g_gamma=g, scale=scale)[0]

    found["fla"] = fla
    return found


def leaves(kind, q, k, v, g, dtype=None):
    """Fresh leaves; the static decay (one fixed value per head) gets no gradient."""
    return [x.detach().to(dtype or x.dtype).requires_grad_(kind != "static" or index < 3)
            for index, x in enumerate((q, k, v, g))]


def output_and_grads(fn, kind, inputs, scale, dtype=None):
    *tensors, do = inputs
    xs = leaves(kind, *tensors, dtype=dtype)
    o = fn(kind, *xs, scale)
    wrt = [x for x in xs if x.requires_grad]
    loss_dtype = dtype or torch.float32
    return [o, *torch.autograd.grad((o.to(loss_dtype) * do.to(loss_dtype)).sum(), wrt)]


def relative_error(actual, expected):
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).norm() / expected.norm())


PRECISION_SHAPE = (2, 1000, 3, 128)


def errors(impls, kind, strength, device="cuda", dtype=torch.bfloat16, shape=PRECISION_SHAPE):
    """{name: [‖x − ref‖ / ‖ref‖ of o, dq, dk, dv(, d log λ)], or the message of a refusal} of each implementation,
    ref the float64 token-by-token oracle on the same inputs."""
    oracle = lambda kind, q, k, v, g, scale: naive_recurrence(q, k, v, g, scale=scale)[0]  # noqa: E731
    inputs = make_inputs(kind, strength, *shape, seed=1, device=device, dtype=dtype)
    scale = shape[-1] ** -0.5
    reference = output_and_grads(oracle, kind, inputs, scale, dtype=torch.float64)
    found = {}
    for name, fn in impls.items():
        try:
            found[name] = [relative_error(a, e) for a, e in zip(output_and_grads(fn, kind, inputs, scale), reference)]
        except Exception as error:  # noqa: BLE001 (a refusal is a result)
            found[name] = str(error).splitlines()[0][:120]
    return found


def precision_row(impls, kind, strength, *args):
    """`errors` (same arguments) as one row: kind, strength, the columns' names and each implementation's errors."""
    columns = ["o", "dq", "dk", "dv"] + (["dlogλ"] if kind != "static" else [])  # static: no gradient
    return {"kind": kind, "strength": strength, "columns": columns, **errors(impls, kind, strength, *args)}


def precision(args, impls):
    for kind in args.kinds:
        for strength in (args.strengths if kind != "static" else ["tnl"]):
            print("precision", json.dumps(precision_row(impls, kind, strength)), flush=True)


def cases(args):
    """(shape, kind, strength, inputs) of the speed and profile sections: every shape × kind × strength (static decay:
    TNL's slopes only)."""
    for shape in args.shapes:
        for kind in args.kinds:
            for strength in (args.strengths if kind != "static" else ["tnl"]):
                yield shape, kind, strength, make_inputs(kind, strength, *shape)


def speed(args, impls):
    import triton

    for shape, kind, strength, inputs in cases(args):
        scale, do = shape[-1] ** -0.5, inputs[-1]
        row = {"shape": shape, "kind": kind, "strength": strength, "columns": ["fwd ms", "fwd+bwd ms", "MiB"]}
        for name, fn in impls.items():
            xs = leaves(kind, *inputs[:4])

            def forward_backward():
                fn(kind, *xs, scale).backward(do)

            fresh = dict(grad_to_none=[x for x in xs if x.requires_grad]) if args.grads == "fresh" else {}

            try:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                forward = triton.testing.do_bench(lambda: fn(kind, *xs, scale), warmup=25, rep=100,
                                                  return_mode="median")
                both = triton.testing.do_bench(forward_backward, warmup=25, rep=100, return_mode="median", **fresh)
                peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
                row[name] = [round(forward, 3), round(both, 3), round(peak)]
            except Exception as error:  # noqa: BLE001
                row[name] = str(error).splitlines()[0][:120]
        print("speed", json.dumps(row), flush=True)
    for batch, length, heads, dim in args.shapes:
        q, k, v = (torch.randn(batch, heads, length, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))

        def sdpa():
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            o.backward(torch.ones_like(o))

        fresh = dict(grad_to_none=[q, k, v]) if args.grads == "fresh" else {}
        ms = triton.testing.do_bench(sdpa, warmup=25, rep=100, return_mode="median", **fresh)
        print("sdpa", json.dumps({"shape": [batch, length, heads, dim], "fwd+bwd ms": round(ms, 3)}), flush=True)


PROFILED_STEPS = 10


def _busy(intervals):
    """Length of the union of [start, end) intervals."""
    total, reach = 0.0, -math.inf
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def device_timeline(trace_events, steps):
    """From a torch.profiler Chrome trace's events (`export_chrome_trace`) of `steps` identical steps run back to back:
    the device span of a step (first start to last end over all steps / steps), each stream's busy time per step,
    and the last step's device activity as [name, stream, start, duration] relative to its first start; ms. With them
    each kernel's registers a thread, where the trace gives them (CUPTI's "registers per thread")."""
    device = sorted((event["ts"], event["dur"], event["args"]["stream"], event["name"]) for event in trace_events
                    if event.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in event)
    if not device:
        return {}
    per_step = len(device) // steps
    last = device[len(device) - per_step:]
    streams = sorted({stream for _, _, stream, _ in device})
    return {"device span ms": round((max(ts + dur for ts, dur, _, _ in device) - device[0][0]) / steps / 1000, 3),
            "stream busy ms": {str(stream): round(_busy([(ts, ts + dur) for ts, dur, s, _ in device if s == stream])
                                                  / steps / 1000, 3) for stream in streams},
            "last step": [[name[:40], stream, round((ts - last[0][0]) / 1000, 3), round(dur / 1000, 3)]
                          for ts, dur, stream, name in last],
            "registers": {event["name"][:40]: event["args"]["registers per thread"] for event in trace_events
                          if event.get("cat") == "kernel" and "registers per thread" in event.get("args", {})}}


def profile_row(fn, kind, xs, scale, do, device="cuda"):
    """Where one implementation's forward+backward (`.grad = None`) spends its time, `PROFILED_STEPS` steps under
    torch.profiler after three outside it: each kernel's mean device time per step and `device_timeline`'s span,
    stream busy times and last step, ms, and each kernel's registers a thread. On the CPU (for testing the scripts)
    the profile has no device kernels."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiled

    def forward_backward():
        for x in xs:
            x.grad = None
        fn(kind, *xs, scale).backward(do)

    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):  # compile and warm up outside the profile
        forward_backward()
    synchronize()
    activity = ProfilerActivity.CUDA if device == "cuda" else ProfilerActivity.CPU
    with profiled(activities=[activity]) as prof:
        for _ in range(PROFILED_STEPS):
            forward_backward()
        synchronize()
    kernels = sorted(((event.key, event.self_device_time_total / PROFILED_STEPS / 1000)
                      for event in prof.key_averages() if event.self_device_time_total > 0), key=lambda item: -item[1])
    with tempfile.TemporaryDirectory() as folder:
        prof.export_chrome_trace(os.path.join(folder, "trace.json"))
        with open(os.path.join(folder, "trace.json")) as trace:
            timeline = device_timeline(json.load(trace)["traceEvents"], PROFILED_STEPS)
    return {"total ms": round(sum(ms for _, ms in kernels), 3),
            "kernels": [[kernel[:60], round(ms, 3)] for kernel, ms in kernels], **timeline}


def profile(args, impls):
    for shape, kind, strength, inputs in cases(args):
        scale, do = shape[-1] ** -0.5, inputs[-1]
        for name, fn in impls.items():  # one line each, so a slow or failing implementation keeps the other's
            row = {"shape": shape, "kind": kind, "strength": strength, "impl": name}
            try:
                row.update(profile_row(fn, kind, leaves(kind, *inputs[:4]), scale, do))
            except Exception as error:  # noqa: BLE001 (a refusal is a result)
                row["refused"] = str(error).splitlines()[0][:120]
            print("profile", json.dumps(row), flush=True)


def parse_shapes(text):
    """'8x2048x16x128,1x16384x16x64' → ((8, 2048, 16, 128), (1, 16384, 16, 64)): B×T×H×D."""
    shapes = tuple(tuple(int(n) for n in item.split("x")) for item in text.split(","))
    if any(len(shape) != 4 for shape in shapes):
        raise argparse.ArgumentTypeError(f"shapes are BxTxHxD, comma-separated; got {text!r}")
    return shapes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("section", choices=("precision", "speed", "profile"))
    parser.add_argument("--kinds", default="vector,scalar,static")
    parser.add_argument("--strengths", default=",".join(STRENGTHS))
    parser.add_argument("--impls", default="ours,fla", help="which of ours, fla to run")
    parser.add_argument("--grads", default="accumulate", choices=("accumulate", "fresh"),
                        help="speed: each timed backward adds into the inputs' .grad (accumulate), or starts from "
                             ".grad = None as after zero_grad(set_to_none=True) in a training step (fresh)")
    parser.add_argument("--shapes", type=parse_shapes, default=SHAPES,
                        help="speed, profile: BxTxHxD, comma-separated (default: the three shapes above)")
    args = parser.parse_args(argv)
    args.kinds, args.strengths = args.kinds.split(","), args.strengths.split(",")
    if not torch.cuda.is_available():
        sys.exit("bench_decay_strengths.py needs a CUDA GPU")
    impls = {name: fn for name, fn in implementations().items() if name in args.impls.split(",")}
    {"precision": precision, "speed": speed, "profile": profile}[args.section](args, impls)


if __name__ == "__main__":
    main()
