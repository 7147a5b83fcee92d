"""Sweep the launch settings of the chunked Triton kernels on the GPU (kernels_chunk_linear_decay.TUNING).

    python benchmarks/tune_chunk_kernels.py [--shape 8,2048,16,128] [--kinds vector,scalar] [--value-loop 0,1]
                                            [--json PATH]

For each decay kind and each candidate (value block, warps, stages) it runs forward+backward in bf16 under the
torch profiler and reads each kernel's own time, checks the result against the fp32 PyTorch chunked path (a wrong
variant is dropped), and prints the best setting per kernel: the values to write into TUNING / TUNING_OVERRIDES.

`--roofline` instead profiles the current TUNING once per decay kind and prints, per kernel, its time next to the
least bytes it must move and the matmul FLOPs it must do (`kernel_work`), as fractions of the measured copy bandwidth
and bf16 matmul rate (`--copy-gbps`, `--matmul-tflops`; bench_kernels.py --only ceilings measures them): where the
time of a forward+backward goes, and how far each kernel is from its bound.

`--segment-chunks auto,8,16,32` instead times every kernel of one forward+backward per decay kind (vector, scalar,
static) with the walks in segments of that many chunks (kernels.SEGMENT_CHUNKS; auto: `_segment_plan`'s rule).
"""

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from linear_decay import kernels_chunk_linear_decay as kernels  # noqa: E402
from linear_decay.recurrence_linear_decay import chunked_recurrence  # noqa: E402
from bench_kernels import static_log_decay  # noqa: E402

KERNELS = {"states": "_chunk_states_kernel", "output": "_chunk_output_kernel",
           "state_grads": "_chunk_state_grads_kernel", "dq": "_chunk_dq_kernel",
           "dk_dv": "_chunk_dk_dv_kernel"}
KIND_CODE = {"vector": kernels.DECAY_VECTOR, "scalar": kernels.DECAY_SCALAR, "static": kernels.DECAY_STATIC}
PROFILED = {"cumulative": "_cumulative_decay_kernel", **KERNELS, "combine": "_combine_segments_kernel",
            "finish": "_finish_grads_kernel", "segment_carry": "_add_segment_carry_kernel"}
# (cumulative, combine, finish and segment_carry have no launch settings to tune; combine and segment_carry run only
# when few sequences × heads make the sequence walks go in segments, kernels._segment_plan)


def kernel_work(kind, shape, block_v, value_loop):
    """{kernel: (bytes, FLOPs)}: the least each kernel moves (every tensor it must read or write once; bf16 q, k, v,
    do, o and chunk states, fp32 log λ, dq / dk parts and d log λ) and the matmul FLOPs of the algorithm (intra-chunk
    scores and mixes over the CHUNK tokens of a chunk, state products over the key and value dims), for one forward +
    backward at `shape` = (B, T, H, D) with K = V = D; re-reads across value blocks are not counted (they are the
    kernels' choice, the bound is what any kernel must do)."""
    batch, length, heads, dim = shape
    tokens, chunk = batch * length, kernels.CHUNK
    chunks = tokens // chunk
    act = tokens * heads * dim * 2  # one bf16 [B, T, H, D] tensor
    decay = tokens * heads * (dim if kind == "vector" else 1) * 4 if kind != "static" else 0  # static: [H]
    states = chunks * heads * dim * dim * 2
    part = tokens * heads * dim * 4
    parts = part * (1 if value_loop else max(1, dim // block_v))  # fp32 dq or dk parts: one, or one per value block
    state_product = 2 * tokens * heads * dim * dim  # k^T v over all tokens, or q S
    intra = 2 * tokens * heads * chunk * dim  # scores (or their gradient) for every token against its chunk
    # segments (kernels._segment_plan, as the host code plans them on this GPU): the combination reads each segment's
    # end state and writes its start (fp32), twice per pass (states, state gradients); the finishing pass's carry
    # reads and writes d log λ of all but each sequence's last segment
    device = torch.device("cuda")
    walk_block_v = kernels._launch("states", dim, None)[0]
    walk_blocks = -(-dim // min(kernels._key_block(dim), kernels.STATE_KEY_BLOCK)) * -(-dim // walk_block_v)
    walk_segments, _ = kernels._segment_plan(batch * heads * walk_blocks, -(-length // chunk), device)
    finish_segments, _ = kernels._segment_plan(batch * heads, -(-length // chunk), device)
    combine = 2 * 2 * 2 * batch * heads * walk_segments * dim * dim * 4 if walk_segments > 1 else 0
    carry = 2 * decay * (finish_segments - 1) // finish_segments
    return {
        "cumulative": (2 * 2 * decay, 0),  # log λ in, its chunk-local cumulative sum out; forward and backward
        "states": (2 * act + decay + states, state_product),
        "output": (3 * act + decay + states + act, state_product + 2 * intra),
        "state_grads": (2 * act + decay + states, state_product),
        "dq": (3 * act + decay + states + parts, state_product + 2 * intra),
        "dk_dv": (4 * act + decay + states + parts + act, 2 * state_product + 4 * intra),
        "combine": (combine, 0),
        "finish": (2 * act + part + parts + 2 * act + decay, 0),  # dq's parts arrive summed (a torch sum before)
        "segment_carry": (carry, 0),
    }


def roofline(kinds, shape, copy_gbps, matmul_tflops):
    """Per kernel: measured ms, the byte- and FLOP-bound ms at the machine's ceilings, and the larger one's share."""
    for kind in kinds:
        times = profile(kind, shape)
        print(f"\n{kind} decay, shape {shape}, ceilings {copy_gbps:.0f} GB/s, {matmul_tflops:.0f} TFLOP/s")
        print(f"  {'kernel':12s} {'ms':>8s} {'MB':>9s} {'GFLOP':>8s} {'bytes ms':>9s} {'FLOP ms':>8s} {'bound':>6s}")
        total = 0.0
        for name, (nbytes, flops) in kernel_work(kind, shape, kernels.TUNING["dq"]["block_v"],
                                                    kernels.TUNING["dq"]["VALUE_LOOP"]).items():
            if name not in times and nbytes == 0:
                continue  # a segment kernel that this shape does not run
            ms = times.get(name, float("nan"))
            total += ms
            byte_ms, flop_ms = nbytes / copy_gbps / 1e6, flops / matmul_tflops / 1e9
            print(f"  {name:12s} {ms:8.3f} {nbytes / 1e6:9.1f} {flops / 1e9:8.1f} {byte_ms:9.3f} {flop_ms:8.3f} "
                  f"{max(byte_ms, flop_ms) / ms:6.0%}")
        print(f"  {'all':12s} {total:8.3f}")


def segment_sweep(kinds, shape, settings):
    """Per decay kind and segment length (kernels.SEGMENT_CHUNKS; "auto": `_segment_plan`'s rule): each kernel's
    time and their sum in one forward+backward, after a check against the fp32 reference: the walks' segment rule."""
    walked = ("states", "state_grads", "combine", "finish", "segment_carry")
    for kind in kinds:
        for setting in settings:
            kernels.SEGMENT_CHUNKS = None if setting == "auto" else int(setting)
            error = check(kind, shape[-1])
            times = profile(kind, shape)
            print(f"{kind:6s} segment_chunks={setting:>4s} err={error:.1e} all={sum(times.values()):.3f} "
                  + " ".join(f"{name}={times.get(name, 0.0):.3f}" for name in walked), flush=True)
    kernels.SEGMENT_CHUNKS = None


def settings_of(name, candidate):
    """The launch settings of kernel `name` in a candidate (VALUE_LOOP is the dq and dk/dv kernels' only)."""
    keys = ("block_v", "num_warps", "num_stages") + (("VALUE_LOOP",) if "VALUE_LOOP" in kernels.TUNING[name] else ())
    return {key: candidate[key] for key in keys}


def make_inputs(kind, batch, length, heads, dim, seed=0):
    torch.manual_seed(seed)
    q = F.silu(torch.randn(batch, length, heads, dim, device="cuda")).bfloat16().requires_grad_()
    k = F.silu(torch.randn(batch, length, heads, dim, device="cuda")).bfloat16().requires_grad_()
    v = torch.randn(batch, length, heads, dim, device="cuda").bfloat16().requires_grad_()
    if kind == "static":  # the benchmark's TNL-like per-head decay, without a gradient (as tnl)
        return q, k, v, static_log_decay(heads, "cuda")
    shape = (batch, length, heads, dim) if kind == "vector" else (batch, length, heads)
    g = (F.logsigmoid(torch.randn(shape, device="cuda")) / 16).requires_grad_()
    return q, k, v, g


def relative_error(a, b):
    a, b = a.detach(), b.detach()
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-12))


def check(kind, dim):
    """Relative errors of bf16 output and grads against the fp32 PyTorch chunked path on the same inputs."""
    q, k, v, g = make_inputs(kind, 2, 300, 4, dim, seed=1)
    do = torch.randn_like(v)
    o, _ = kernels.triton_chunked_recurrence(q, k, v, g, scale=dim ** -0.5)
    grads = torch.autograd.grad((o * do).sum(), [x for x in (q, k, v, g) if x.requires_grad])
    ref_inputs = [x.detach().float().requires_grad_(x.requires_grad) for x in (q, k, v, g)]
    ref_o, _ = chunked_recurrence(*ref_inputs, scale=dim ** -0.5)
    ref_grads = torch.autograd.grad((ref_o * do.float()).sum(), [x for x in ref_inputs if x.requires_grad])
    return max([relative_error(o, ref_o)] + [relative_error(a, b) for a, b in zip(grads, ref_grads)])


def profile(kind, shape, iterations=5):
    """Mean device time (ms) of each of our kernels in one forward+backward."""
    q, k, v, g = make_inputs(kind, *shape)
    do = torch.randn_like(v)

    def step():
        o, _ = kernels.triton_chunked_recurrence(q, k, v, g, scale=shape[-1] ** -0.5)
        torch.autograd.grad(o, [x for x in (q, k, v, g) if x.requires_grad], do)

    step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iterations):
            step()
        torch.cuda.synchronize()
    times = {}
    for event in prof.key_averages():
        time_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        for name, kernel in PROFILED.items():
            if kernel in event.key:
                times[name] = times.get(name, 0.0) + time_us / 1000 / iterations
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="8,2048,16,128", help="B,T,H,D")
    parser.add_argument("--kinds", default="vector,scalar")
    parser.add_argument("--block_v", default="32,64,128")
    parser.add_argument("--warps", default="4,8")
    parser.add_argument("--stages", default="1,2")
    parser.add_argument("--value-loop", default="0", help="VALUE_LOOP of the dq and dk/dv kernels to try: 0, 1 or 0,1")
    parser.add_argument("--json", default=None)
    parser.add_argument("--segment-chunks", default=None,
                        help="instead of the launch sweep: time the walks' segment lengths, e.g. auto,8,16,32,64")
    parser.add_argument("--roofline", action="store_true", help="time the current settings against the bounds")
    parser.add_argument("--copy-gbps", type=float, default=4218.0, help="measured device copy bandwidth")
    parser.add_argument("--matmul-tflops", type=float, default=678.0, help="measured bf16 matmul rate")
    args = parser.parse_args()
    shape = tuple(int(x) for x in args.shape.split(","))
    if args.roofline:
        roofline(args.kinds.split(","), shape, args.copy_gbps, args.matmul_tflops)
        return
    if args.segment_chunks:
        segment_sweep(args.kinds.split(","), shape, args.segment_chunks.split(","))
        return
    candidates = [dict(block_v=bv, num_warps=w, num_stages=s, VALUE_LOOP=bool(loop))
                  for bv, w, s, loop in itertools.product(*(map(int, values.split(",")) for values in (
                      args.block_v, args.warps, args.stages, args.value_loop)))]
    print(f"torch {torch.__version__}, triton {kernels.triton.__version__}, {torch.cuda.get_device_name()}, "
          f"shape {shape}", flush=True)
    results = []
    for kind in args.kinds.split(","):
        for candidate in candidates:
            for name in KERNELS:
                kernels.TUNING_OVERRIDES[(name, KIND_CODE[kind])] = settings_of(name, candidate)
            try:
                error = check(kind, shape[-1])
                times = profile(kind, shape)
            except Exception as failure:  # a setting that does not compile (shared memory, registers)
                print(f"{kind} {candidate}: failed: {str(failure).splitlines()[0][:150]}", flush=True)
                continue
            row = dict(kind=kind, **candidate, error=error, **times)
            results.append(row)
            print(f"{kind:6s} bv={candidate['block_v']:3d} w={candidate['num_warps']} s={candidate['num_stages']} "
                  f"loop={int(candidate['VALUE_LOOP'])} err={error:.1e} "
                  + " ".join(f"{n}={t:.3f}" for n, t in times.items()), flush=True)
    print("\nbest per kernel (ms):")
    for kind in args.kinds.split(","):
        for name in KERNELS:
            rows = [r for r in results if r["kind"] == kind and name in r and r["error"] < 2e-2]
            if rows:
                best = min(rows, key=lambda r: r[name])
                default = [r for r in rows if all(r[key] == value for key, value in kernels.TUNING[name].items()
                                                  if key in r)]
                print(f"  {kind:6s} {name:12s} " + " ".join(f"{key}={value}" for key, value in settings_of(
                    name, best).items()) + f": {best[name]:.3f} ms"
                      + (f" (default {default[0][name]:.3f})" if default else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
