"""Stage-by-stage check of the chunked Triton kernels (DESIGN.md §1, §7): which kernel, under which launch settings,
dtype and decay strength, departs from the fp32 naive recurrence.

The end-to-end GPU tests (tests/test_kernels_gpu.py) say *that* vector decay is wrong for bf16 inputs on the H200
(BENCHMARKS.md, 2026-11-29); this script says *where*. For every case it checks separately:

- `states`: the chunk-start states of `_chunk_states_kernel` against the naive recurrence's state after each chunk
  prefix;
- `output`: `_chunk_output_kernel` fed with the *reference* chunk-start states (so an error here is the output
  kernel's own), o against the naive o;
- `end-to-end`: o, the final state and all gradients through `triton_chunked_recurrence` against the naive
  recurrence in fp32;

under each launch variant (warps of the sub-chunk-walking kernels; RELOAD_STATE on or off: the carried state fed to
the next dot through memory or straight from the dot accumulator, see `_carried_operand`), for vector and scalar decay, mild and mixed
(some channels with log λ down to −20 per step, which takes the pairwise branch) decays, fp32 / fp16 / bf16 inputs.
For vector decay with WHOLE_CHUNKS on, mild decays take each chunk in one factorised step, "centred" (−1.5 per step on
some channels) too with the factors centred on half the span, "halves" (−3) its two halves, mixed ones walk 16-token
sub-chunks (the three paths, see the kernels' docstring).
Relative errors ‖x − ref‖ / ‖ref‖ are printed with FAIL beyond 5e-4 (fp32), 5e-3 (fp16), 2e-2 (bf16).

    PYTHONPATH=. python3 benchmarks/diagnose_chunk_kernels.py [--length 200] [--dims 128]   (GPU)
    TRITON_INTERPRET=1 PYTHONPATH=. python3 benchmarks/diagnose_chunk_kernels.py --cpu --length 70 --dims 32
        (the interpreter on CPU: fp32 / fp16 only, whose dots it computes correctly)

Exits with status 1 if any check fails.
"""

import argparse
import itertools
import sys

import torch
import torch.nn.functional as F

from linear_decay import kernels_chunk_linear_decay as kernels
from linear_decay.recurrence_linear_decay import naive_recurrence

TOLERANCES = {torch.float32: 5e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
HEADS = 2


def relative_error(actual, expected):
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).norm() / expected.norm().clamp(min=1e-30))


def make_inputs(kind, strength, length, dim, dtype, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shape = (1, length, HEADS, dim)
    q, k, v = (torch.randn(shape, generator=generator) for _ in range(3))
    logits = torch.randn(shape if kind == "vector" else shape[:3], generator=generator) + 2.0
    log_decay = F.logsigmoid(logits)
    if strength == "mixed":  # a quarter of the channels (vector) or of the heads' steps (scalar) decay strongly
        if kind == "vector":
            log_decay[..., : dim // 4] *= 60.0
        else:
            log_decay[:, ::3] *= 60.0
    elif strength in ("centred", "halves"):  # on a quarter of the channels −1.5 per step: 96 over a chunk (one step,
        # factors centred on half the span), or −3: 192 over a chunk, 96 over each half (the halves in turn)
        rate = -1.5 if strength == "centred" else -3.0
        if kind == "vector":
            log_decay[..., : dim // 4] = rate
        else:
            log_decay[:] = rate
    initial = torch.randn(1, HEADS, dim, dim, generator=generator)
    cast = [x.to(dtype).to(device) for x in (q, k, v)]
    return (*cast, log_decay.to(device), initial.to(device))


def reference_chunk_states(q, k, v, log_decay, initial):
    """The state at the start of every CHUNK-token chunk (fp32), from the naive recurrence on each prefix."""
    length = q.shape[1]
    states = [initial.float()]
    for end in range(kernels.CHUNK, length, kernels.CHUNK):
        _, state = naive_recurrence(q[:, :end].float(), k[:, :end].float(), v[:, :end].float(), log_decay[:, :end],
                                    initial_state=initial, output_final_state=True)
        states.append(state)
    return torch.stack(states, dim=1)[0]  # [chunks, H, K, V]


def check_states(q, k, v, log_decay, initial, decay):
    layout = kernels._chunk_layout(None, 1, q.shape[1], q.device)
    b, _ = kernels._cumulative_decay(log_decay.float().contiguous(), layout, decay, HEADS, q.shape[-1])
    states, _ = kernels._forward_states(k, v, b, initial.float().contiguous(), layout, decay, HEADS, q.shape[-1],
                                        v.shape[-1], 1, kernels._longest_chunks(layout, 1, q.shape[1]), False)
    return relative_error(states.float(), reference_chunk_states(q, k, v, log_decay, initial))


def check_output(q, k, v, log_decay, initial, decay, scale):
    """o of the output kernel alone, given the reference chunk-start states (in the dtype the kernel reads)."""
    import triton

    length, dim, value_dim = q.shape[1], q.shape[-1], v.shape[-1]
    layout = kernels._chunk_layout(None, 1, length, q.device)
    dot_dtype, precision = kernels._dot_settings(q.dtype)
    states = reference_chunk_states(q, k, v, log_decay, initial)
    states = states.to(torch.bfloat16 if q.dtype == torch.bfloat16 else torch.float32).contiguous()
    o = torch.empty_like(v)
    block_v, launch = kernels._launch("output", value_dim, decay)
    grid = (triton.cdiv(value_dim, block_v), layout[2].numel(), HEADS)
    g = log_decay.float().contiguous()
    _, paths = kernels._cumulative_decay(g, layout, decay, HEADS, dim)
    carry = torch.empty_like(states)  # the walks' carried-state slots (the states stay as given)
    kernels._chunk_output_kernel[grid](q, k, v, g, paths, states, carry, o, layout[0], layout[2], layout[3], scale,
                                       HEADS, dim, value_dim, kernels._key_block(dim), block_v, kernels.CHUNK,
                                       kernels._sub_chunk(decay), decay, dot_dtype, precision, **launch)
    o_ref, _ = naive_recurrence(q.float(), k.float(), v.float(), log_decay, scale=scale, initial_state=initial)
    return relative_error(o, o_ref)


def check_end_to_end(q, k, v, log_decay, initial, scale):
    """{name: relative error} of o, final state and the gradients of a random projection of both."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, log_decay, initial)]
    reference = [x.detach().float().clone().requires_grad_() for x in (q, k, v, log_decay, initial)]
    generator = torch.Generator().manual_seed(1)
    results = []
    for fn, inputs in ((kernels.triton_chunked_recurrence, leaves), (naive_recurrence, reference)):
        o, final = fn(*inputs[:4], scale=scale, initial_state=inputs[4], output_final_state=True)
        if not results:
            weights = [torch.randn(o.shape, generator=generator).to(o.device),
                       torch.randn(final.shape, generator=generator).to(o.device)]
        loss = (o.float() * weights[0]).sum() + (final.float() * weights[1]).sum()
        results.append([o, final, *torch.autograd.grad(loss, inputs)])
    names = ("o", "final", "dq", "dk", "dv", "dlogλ", "dh0")
    return {name: relative_error(a, b) for name, a, b in zip(names, *results)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=200)
    parser.add_argument("--dims", type=int, default=128, help="K = V")
    parser.add_argument("--cpu", action="store_true", help="CPU tensors (needs TRITON_INTERPRET=1); no bf16")
    parser.add_argument("--warps", default="4,8", help="num_warps variants of the output / dq / dk_dv kernels")
    parser.add_argument("--reload", default="1,0", help="RELOAD_STATE variants of the same kernels (1 on, 0 off)")
    parser.add_argument("--whole-chunks", default="0,1",
                        help="WHOLE_CHUNKS variants of the same kernels (vector decay: whole chunks / halves where the "
                             "decay span allows, or always the 16-token walk)")
    parser.add_argument("--dtypes", help="comma list, e.g. bfloat16,float32 (default: float32,float16[,bfloat16 on "
                                         "the GPU]), checked in this order")
    args = parser.parse_args(argv)
    device = "cpu" if args.cpu else "cuda"
    dtypes = (torch.float32, torch.float16) if args.cpu else (torch.float32, torch.float16, torch.bfloat16)
    if args.dtypes:
        dtypes = tuple(getattr(torch, name) for name in args.dtypes.split(","))
        if args.cpu and torch.bfloat16 in dtypes:
            parser.error("bf16 dots are wrong under Triton's interpreter (DESIGN §7): use the GPU for bfloat16")
    warps = [int(w) for w in args.warps.split(",")]
    reloads = [bool(int(r)) for r in args.reload.split(",")]
    wholes = [bool(int(w)) for w in args.whole_chunks.split(",")]
    scale = args.dims ** -0.5
    failed = 0
    print(f"T={args.length}, H={HEADS}, K=V={args.dims}, device={device}, triton {kernels.triton.__version__}")
    print(f"{'decay':7s} {'strength':8s} {'dtype':9s} {'warps':5s} {'reload':6s} {'whole':6s} {'states':>9s} "
          f"{'output':>9s}  end-to-end")
    for dtype, kind, strength, num_warps, reload, whole in itertools.product(
            dtypes, ("vector", "scalar"), ("mild", "centred", "halves", "mixed"), warps, reloads, wholes):
        if kind == "scalar" and whole != wholes[0]:
            continue  # WHOLE_CHUNKS changes vector decay only
        decay = kernels.DECAY_VECTOR if kind == "vector" else kernels.DECAY_SCALAR
        saved = dict(kernels.TUNING_OVERRIDES)
        for kernel in ("output", "dq", "dk_dv"):
            kernels.TUNING_OVERRIDES[kernel, decay] = {**kernels.TUNING_OVERRIDES.get((kernel, decay), {}),
                                                       "num_warps": num_warps, "RELOAD_STATE": reload,
                                                       "WHOLE_CHUNKS": whole}
        try:
            q, k, v, log_decay, initial = make_inputs(kind, strength, args.length, args.dims, dtype, device)
            tolerance = TOLERANCES[dtype]
            states_error = check_states(q, k, v, log_decay, initial, decay)
            output_error = check_output(q, k, v, log_decay, initial, decay, scale)
            end_to_end = check_end_to_end(q, k, v, log_decay, initial, scale)
        finally:
            kernels.TUNING_OVERRIDES.clear()
            kernels.TUNING_OVERRIDES.update(saved)
        # d log λ cancels under strong decay (tests/test_kernels_gpu.py, decay_grad_scale): shown, not judged there
        judged = [states_error, output_error] + [e for n, e in end_to_end.items()
                                                 if not (n == "dlogλ" and strength == "mixed")]
        bad = any(not e <= tolerance for e in judged)
        failed += bad
        detail = " ".join(f"{n} {e:.1e}" for n, e in end_to_end.items())
        print(f"{kind:7s} {strength:8s} {str(dtype)[6:]:9s} {num_warps:<5d} {str(reload):6s} {str(whole):6s} "
              f"{states_error:9.1e} "
              f"{output_error:9.1e}  "
              f"{detail}{'  FAIL' if bad else ''}", flush=True)
    print(f"{failed} failing case(s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
