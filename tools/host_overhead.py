"""Host (CPU) time per call of the model's pieces on the GPU: what an eager training step costs the Python side.

At the whole model's training shapes our eager steps can be host-bound (the host finishes issuing a step within a few
ms of the GPU finishing it). This measures each piece at a tiny shape (1×64 tokens), where the device work is a few
µs per kernel and the wall time per call is the host's: mean µs per call over `--calls` calls after a warm-up, one
synchronisation at the end ("wall µs"), and the time until the host had issued them ("issued µs"; equal to the wall
time when the piece is host-bound).

Rows: single torch ops and Triton launches (through `JITFunction[grid]` and the compiled kernel's own launcher), each
fused piece forward (+ backward), one 410m block per decay and transformers' Llama decoder layer forward + backward —
each block also with its backward on the calling thread (`torch.autograd.set_multithreading_enabled(False)`) instead
of autograd's CUDA worker thread — then cProfile of the blocks' forwards. `--block-profile` adds the host time inside each of our autograd functions per block and torch.profiler's
CPU table. `--device cpu --quick` is a smoke run of the code paths (the kernels under TRITON_INTERPRET=1).

    PYTHONPATH=. python3 tools/host_overhead.py [--calls 300] [--block-profile] [--json host.json]
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F

from linear_decay.ops_chunk import triton_chunked_recurrence
from linear_decay.ops_decay import softplus_decay
from linear_decay.ops_norm import _gated_rms_norm_forward_kernel, _launch_options, rms_norm
from linear_decay.ops_swiglu import swiglu

LAYER = dict(tokens=64, hidden=1024, heads=16, head_dim=64, mlp=2816)  # the 410m preset's layer, 1×64 tokens
QUICK_LAYER = dict(tokens=16, hidden=64, heads=2, head_dim=32, mlp=128)  # --quick: a smoke run of the code paths


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, calls):
    """(wall µs per call of `fn`, µs until the host had issued them all, per call)."""
    for _ in range(min(10, calls)):
        fn()
    synchronize()
    begin = time.perf_counter()
    for _ in range(calls):
        fn()
    issued = time.perf_counter()
    synchronize()
    return (time.perf_counter() - begin) / calls * 1e6, (issued - begin) / calls * 1e6


def with_backward(fn, leaves, grad_out):
    """fn's forward and backward (grad_out into its output), the leaves' gradients dropped after each call."""
    def run():
        out = fn()
        out = out[0] if isinstance(out, tuple) else out
        out.backward(grad_out)
        for leaf in leaves:
            leaf.grad = None
    return run


def without_grad(fn):
    def run():
        with torch.no_grad():
            return fn()
    return run


def cases(device, tokens, hidden, heads, head_dim, mlp):
    dtype = torch.bfloat16
    make = lambda *shape, grad=False, dt=dtype: torch.randn(*shape, device=device, dtype=dt, requires_grad=grad)
    x, w = make(1, tokens, hidden), make(hidden, hidden)
    norm_weight = torch.ones(hidden, device=device, dtype=dtype, requires_grad=True)
    xg = make(1, tokens, hidden, grad=True)
    gate, up = make(1, tokens, mlp, grad=True), make(1, tokens, mlp, grad=True)
    z = make(1, tokens, hidden, grad=True)
    a_log = torch.zeros(hidden, device=device, requires_grad=True)
    dt_bias = torch.zeros(hidden, device=device, requires_grad=True)
    q, k, v = (make(1, tokens, heads, head_dim, grad=True) for _ in range(3))
    log_vector = (-torch.rand(1, tokens, heads, head_dim, device=device) * 0.1).requires_grad_()
    log_scalar = (-torch.rand(1, tokens, heads, device=device) * 0.1).requires_grad_()
    disabled = torch.compiler.disable(lambda t: t)

    yield "aten add (one launch)", lambda: x.add(1.0)
    yield "torch.empty", lambda: torch.empty(tokens, hidden, device=device, dtype=dtype)
    yield "F.linear 1024x1024", lambda: F.linear(x, w)
    yield "torch.compiler.disable'd identity", lambda: disabled(x)
    yield "x * 2 fwd+bwd (one backward() call's own cost)", with_backward(lambda: xg * 2, [xg], x)
    if device == "cuda":  # the launch rows need a compiled kernel (none under the interpreter)
        yield from launch_cases(x, norm_weight, hidden)
    yield "rms_norm forward (no grad)", without_grad(lambda: rms_norm(x, norm_weight))
    yield "rms_norm fwd+bwd", with_backward(lambda: rms_norm(xg, norm_weight), [xg, norm_weight], x)
    yield "swiglu fwd+bwd", with_backward(lambda: swiglu(gate, up), [gate, up], gate.detach())
    yield "softplus_decay fwd+bwd", with_backward(lambda: softplus_decay(z, a_log.exp(), dt_bias), [z, a_log, dt_bias],
                                                  z.detach().float())
    for name, log_decay in (("vector", log_vector), ("scalar", log_scalar)):
        leaves = [q, k, v, log_decay]
        yield f"recurrence {name} forward (no grad)", without_grad(
            lambda ld=log_decay: triton_chunked_recurrence(q, k, v, ld, scale=head_dim**-0.5))
        yield f"recurrence {name} fwd+bwd", with_backward(
            lambda ld=log_decay: triton_chunked_recurrence(q, k, v, ld, scale=head_dim**-0.5), leaves, v.detach())


def launch_cases(x, norm_weight, hidden):
    """The norm's forward kernel launched through Triton's JIT path and through the compiled kernel's launcher."""
    from linear_decay.ops_norm import _TORCH_TO_TRITON

    rows = x.view(-1, hidden)
    y = torch.empty_like(rows)
    rstd = torch.empty(rows.shape[0], device=x.device)
    norm_args = (rows, rows, norm_weight, y, rstd, hidden, 1e-5, rows.stride(0), rows.stride(0), y.stride(0))
    norm_kwargs = dict(NORMALISED_DTYPE=_TORCH_TO_TRITON[x.dtype], HAS_GATE=False, **_launch_options(hidden))
    grid = (rows.shape[0], 1, 1)
    jit = _gated_rms_norm_forward_kernel
    runner = jit[grid](*norm_args, **norm_kwargs)[grid]
    all_args = [*norm_args, *(norm_kwargs[name] for name in jit.arg_names[len(norm_args):])]
    yield "get_device_properties().multi_processor_count", (
        lambda: torch.cuda.get_device_properties(x.device).multi_processor_count)
    yield "Triton norm kernel: JITFunction[grid](...)", lambda: jit[grid](*norm_args, **norm_kwargs)
    yield "Triton norm kernel: CompiledKernel[grid](...)", lambda: runner(*all_args)


def block_cases(device, tokens, hidden, heads, head_dim, mlp):
    """One 410m block of each of our decays and transformers' Llama decoder layer: forward + backward, and the
    forward alone under cProfile (the main thread's Python; the backward runs on autograd's device thread)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from linear_decay import LinearDecayConfig
    from linear_decay.modeling_linear_decay import LinearDecayBlock

    dtype = torch.bfloat16
    x = torch.randn(1, tokens, hidden, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    for decay in ("mamba2:vector", "gla:vector", "simple:scalar"):
        decay_type, _, granularity = decay.partition(":")
        config = LinearDecayConfig.from_preset("410m", hidden_size=hidden, num_heads=heads, intermediate_size=mlp,
                                               decay_type=decay_type, decay_granularity=granularity)
        block = LinearDecayBlock(config, 1).to(device=device, dtype=dtype)
        leaves = [x, *block.parameters()]
        yield f"block {decay} fwd+bwd", with_backward(lambda b=block: b(x), leaves, grad), lambda b=block: b(x)
        yield f"block {decay} attention fwd+bwd", with_backward(lambda b=block: b.attn(x), leaves, grad), None
        yield f"block {decay} mlp fwd+bwd", with_backward(lambda b=block: b.mlp(x), leaves, grad), None
    config = LlamaConfig(hidden_size=hidden, intermediate_size=mlp, num_attention_heads=heads,
                         num_key_value_heads=heads, num_hidden_layers=1, attn_implementation="sdpa")
    layer = LlamaDecoderLayer(config, 0).to(device=device, dtype=dtype)
    positions = torch.arange(tokens, device=device)[None]
    with torch.no_grad():
        rotary = LlamaRotaryEmbedding(config).to(device)(x, positions)
    run = lambda: layer(x, position_embeddings=rotary, position_ids=positions)
    yield "Llama decoder layer fwd+bwd", with_backward(run, [x, *layer.parameters()], grad), run


def instrument_functions():
    """Wrap the forward and backward of our autograd functions with host timers (the backward runs on autograd's
    device thread, which cProfile does not see). Returns ({name: [seconds, calls]}, a function that unwraps them)."""
    from linear_decay.ops_chunk import _EagerChunkedRecurrence
    from linear_decay.ops_decay import SoftplusDecayFunction
    from linear_decay.ops_norm import GatedRMSNormFunction
    from linear_decay.ops_swiglu import SwiGLUFunction

    totals, originals = {}, []

    def wrap(cls, method):
        inner = getattr(cls, method)
        originals.append((cls, method, cls.__dict__[method]))
        entry = totals.setdefault(f"{cls.__name__}.{method}", [0.0, 0])

        def timed_method(*args):
            begin = time.perf_counter()
            try:
                return inner(*args)
            finally:
                entry[0] += time.perf_counter() - begin
                entry[1] += 1
        setattr(cls, method, staticmethod(timed_method))

    for cls in (_EagerChunkedRecurrence, SoftplusDecayFunction, GatedRMSNormFunction, SwiGLUFunction):
        wrap(cls, "forward")
        wrap(cls, "backward")

    def unwrap():
        for cls, method, original in originals:
            setattr(cls, method, original)
    return totals, unwrap


def profile_block(name, fn, calls):
    """Host time inside our autograd functions per block call, and torch.profiler's CPU-only table (both threads)."""
    from torch.profiler import ProfilerActivity, profile

    totals, unwrap = instrument_functions()
    try:
        for _ in range(calls):
            fn()
        synchronize()
    finally:
        unwrap()
    print(f"\n-- host µs per block call inside our autograd functions: {name}")
    for key, (seconds, count) in totals.items():
        if count:
            print(f"   {key:<40} {seconds / calls * 1e6:8.1f} µs per block ({count // calls} calls)")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
        synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=28, max_name_column_width=60))


def profile_forward(name, forward, calls):
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    with torch.no_grad():
        profiler.enable()
        for _ in range(calls):
            forward()
        profiler.disable()
    synchronize()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(18)
    print(f"\n-- cProfile of {calls} forwards (no grad): {name}\n" + text.getvalue().split("\n\n", 1)[-1].strip())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--quick", action="store_true", help="a tiny layer (a smoke run of every code path)")
    parser.add_argument("--json")
    parser.add_argument("--block-profile", action="store_true",
                        help="also the host time inside our autograd functions and torch.profiler's CPU table "
                             "per block")
    args = parser.parse_args(argv)
    return measure(args, QUICK_LAYER if args.quick else LAYER)


def measure(args, layer):
    """Every row of the module docstring at `layer`'s sizes: printed, returned, and written to --json."""
    rows = []
    print(f"{'piece':<50} {'wall µs':>9} {'issued µs':>10}")
    for name, fn in cases(args.device, **layer):
        wall, issued = timed(fn, args.calls)
        rows.append(dict(piece=name, wall_us=round(wall, 1), issued_us=round(issued, 1)))
        print(f"{name:<50} {wall:9.1f} {issued:10.1f}")
    profiled = []
    for name, fn, forward in block_cases(args.device, **layer):
        wall, issued = timed(fn, args.calls)
        rows.append(dict(piece=name, wall_us=round(wall, 1), issued_us=round(issued, 1)))
        print(f"{name:<50} {wall:9.1f} {issued:10.1f}")
        with torch.autograd.set_multithreading_enabled(False):  # the backward on this thread
            wall, issued = timed(fn, args.calls)
        piece = name + ", caller-thread backward"
        rows.append(dict(piece=piece, wall_us=round(wall, 1), issued_us=round(issued, 1)))
        print(f"{piece:<50} {wall:9.1f} {issued:10.1f}")
        if forward is not None:
            wall, issued = timed(forward, args.calls)  # with grad: the graph is built, then dropped
            rows.append(dict(piece=name.replace("fwd+bwd", "forward"), wall_us=round(wall, 1),
                             issued_us=round(issued, 1)))
            print(f"{name.replace('fwd+bwd', 'forward (graph built)'):<50} {wall:9.1f} {issued:10.1f}")
            profiled.append((name, fn, forward))
    for name, fn, forward in profiled:
        profile_forward(name, forward, min(50, args.calls))
    if args.block_profile:
        for name, fn, _ in profiled:
            if name.startswith("block"):
                profile_block(name, fn, min(30, args.calls))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
