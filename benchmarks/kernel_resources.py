"""Registers, spilled stack and shared memory of every chunk-kernel launch, compiled for an NVIDIA target on any
machine, no GPU needed: the first screen of a kernel change (spills and shared memory decide how many programs an SM
holds) before a GPU times it. BENCHMARKS.md's kernel section cites it.

    python benchmarks/kernel_resources.py [--kinds vector,scalar,static,static_learned,none] [--shapes 2x16384x16x128]
        [--dtype bf16] [--arch 90] [--sms 132] [--version VERSION] [--json FILE]

The chunk kernels' host code (`ops_chunk._chunk_forward`, `_chunk_backward`) runs on meta tensors with every kernel
launch recorded instead of run, so the launches are exactly the host code's (grid aside: segment plans use `--sms`
multiprocessors); each distinct launch is then compiled by Triton for sm_<arch> and its cubin read with the
`cuobjdump` Triton ships. One JSON line per launch: kernel, decay, warps, stages, registers per thread, stack bytes
per thread (spills), shared memory bytes. `--version` screens another version of the kernels instead of this
checkout's (a directory or launch-setting overrides, as `compare_kernels.py` takes them). Needs a Triton whose
NVIDIA backend carries ptxas and cuobjdump (PyPI's wheels do); numbers are for that Triton's code generation, which
may differ from another version's.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, not the interpreter's functions

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_decay_strengths as strengths  # noqa: E402
import compare_kernels  # noqa: E402
from linear_decay import ops_chunk as checkout_kernels  # noqa: E402

POINTER_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int32: "*i32",
                 torch.int64: "*i64"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class LaunchRecorder:
    """Stands in for a kernel in `ops_chunk`: `kernel[grid](*args, **kwargs)` appends (kernel, args, kwargs)."""

    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.kernel, args, kwargs))


def record_launches(ops_chunk, kind, shape, dtype, sms):
    """The launches of one forward and one backward (every input requiring a gradient) of the chunk kernels' host
    code (module `ops_chunk`) at `shape` (B, T, H, D) for decay `kind`: `static` as in the timing scripts, TNL's
    fixed slopes without d log λ; `static_learned` with it (a learned rate, `tnl_l`, `simple`)."""
    batch, length, heads, dim = shape
    launches = []
    saved = dict(vars(ops_chunk))
    kernels = {name: value for name, value in saved.items() if isinstance(value, triton.runtime.JITFunction)}
    try:
        for name, kernel in kernels.items():
            setattr(ops_chunk, name, LaunchRecorder(kernel, launches))
        ops_chunk._multiprocessors = lambda device: sms
        q, k, v, do = (torch.empty(batch, length, heads, dim, device="meta", dtype=dtype) for _ in range(4))
        log_decay = {"vector": torch.empty(batch, length, heads, dim, device="meta"),
                     "scalar": torch.empty(batch, length, heads, device="meta"),
                     "static": torch.empty(heads, device="meta"), "static_learned": torch.empty(heads, device="meta"),
                     "none": None}[kind]
        decay_grad = log_decay is not None and kind != "static"
        exact_states = decay_grad and kind != "vector"  # as `triton_chunked_recurrence` chooses them
        _, _, *kept = ops_chunk._chunk_forward(q, k, v, log_decay, None, None, dim ** -0.5, False, True,
                                               exact_states)
        ops_chunk._chunk_backward(do, None, q, k, v, log_decay, None, *kept, None, dim ** -0.5, decay_grad, False)
    finally:
        for name in kernels:
            setattr(ops_chunk, name, saved[name])
        ops_chunk._multiprocessors = saved["_multiprocessors"]
    return launches


def source(kernel, args, kwargs):
    """(ASTSource, launch options) of one recorded launch, specialised much as Triton's launcher does: constexprs and
    None arguments as constants, tensors by dtype and 16-byte alignment, integers divisible by 16 marked so."""
    options = {key: kwargs[key] for key in ("num_warps", "num_stages", *compare_kernels.LAUNCH_OPTIONS)
               if key in kwargs}
    signature, constants, attrs = {}, {}, {}
    for index, param in enumerate(kernel.params):
        value = args[index] if index < len(args) else kwargs[param.name]
        if param.is_constexpr or value is None:
            signature[param.name] = "constexpr"
            constants[param.name] = value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = POINTER_TYPES[value.dtype]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            signature[param.name] = "i32" if abs(value) < 2 ** 31 else "i64"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[param.name] = "fp32"
    return ASTSource(kernel, signature, constants, attrs), options


def resource_usage(cubin):
    """{'REG': registers per thread, 'STACK': stack bytes per thread, ...} from `cuobjdump --dump-resource-usage`."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        text = subprocess.run([tool, "--dump-resource-usage", file.name], capture_output=True, text=True,
                              check=True).stdout
    line = next(line for line in text.splitlines() if "REG:" in line)
    return {key: int(value) for key, value in (item.split(":") for item in line.split() if ":" in item)
            if value.isdigit()}


def constant_text(value):
    return value if isinstance(value, (bool, int, float, str)) or value is None else str(value)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default="vector,scalar,static,static_learned")
    parser.add_argument("--shapes", default="2x16384x16x128")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for Hopper")
    parser.add_argument("--sms", type=int, default=132, help="multiprocessors the segment plans assume")
    parser.add_argument("--version", help="another version of the kernels, as compare_kernels.py takes it")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as root:
        kernels = checkout_kernels
        if args.version:
            sys.path.insert(0, root)
            kernels = compare_kernels.load_version(args.version, root)[1]
        rows = screen(kernels, args)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(rows, file, indent=1)
    return 0


def screen(kernels, args):
    """One row per launch of module `kernels`' host code at every shape and kind of `args`, printed as it comes."""
    target = GPUTarget("cuda", args.arch, 32)
    rows, compiled = [], {}
    for shape in strengths.parse_shapes(args.shapes):
        for kind in args.kinds.split(","):
            for kernel, launch_args, kwargs in record_launches(kernels, kind, shape, DTYPES[args.dtype], args.sms):
                src, options = source(kernel, launch_args, kwargs)
                key = src.hash() + json.dumps(options, sort_keys=True)
                if key not in compiled:
                    binary = triton.compile(src, target=target, options=options)
                    compiled[key] = dict(resource_usage(binary.asm["cubin"]), shared=binary.metadata.shared)
                usage = compiled[key]
                constants = {name: constant_text(value) for (index,), value in src.constants.items()
                             for name in [kernel.params[index].name] if name.isupper()}
                row = {"shape": list(shape), "kind": kind, "kernel": kernel.__name__, **options,
                       "registers": usage["REG"], "stack_bytes": usage["STACK"], "shared_bytes": usage["shared"],
                       "constants": constants}
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    sys.exit(main())
