"""Versions of the chunk kernels timed and checked against each other (and FLA) in one process.

Alternating forward+backward timings and errors against the float64 oracle, on the inputs of
`bench_decay_strengths.py`:

    python benchmarks/compare_kernels.py snapshot REV DIR     # a git revision's kernel modules into DIR
    python benchmarks/compare_kernels.py run VERSION [VERSION ...] [--kinds static,scalar@u20,vector@mild]
        [--shapes 8x2048x16x128,2x16384x16x128] [--rounds 2] [--profile] [--precision]
        [--precision-shape 2x1000x3x128] [--no-fla] [--device cuda]

A VERSION is `worktree` (this checkout's linear_decay/ops_*.py) or a directory holding such files (`snapshot` writes
one, for a machine whose copy of the tree has no git), optionally followed by `:kernel.field=value;...`, overrides
of its launch settings (`ops_chunk.TUNING`), e.g. `worktree:key_grads.block_k=32`, or a register cap a kernel's
settings lack (Triton's `maxnreg` launch option, e.g. `worktree:intra_grads.maxnreg=72`). Each version is loaded as a
package of its own (its custom ops get their own names, `ops_host.op_name`); the versions and FLA take turns in every
round, so that a drift of the machine's speed reaches them alike. A kind is `vector`, `scalar` or `static`,
optionally `@strength` (`bench_decay_strengths.STRENGTHS`; static decay: TNL's slopes). One JSON line per case:
fwd+bwd ms per round (median of `triton.testing.do_bench`, `.grad = None` each time; each time also on stderr as soon
as it is measured); with `--profile` after it one per version, where its forward+backward spends its time
(`bench_decay_strengths.profile_row`: each kernel's device time, each stream's busy time and the last step's
timeline), e.g. to see a kernel alone (`walk_stream.forward=0`) and beside the state walk; with `--precision` one
more per kind, the relative errors of o, dq, dk, dv and d log λ against the float64 oracle. `--device cpu` (fp32
inputs, with TRITON_INTERPRET=1) times one wall-clock call, which means nothing: it is for testing this script.
"""

import argparse
import importlib
import itertools
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import MappingProxyType

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import bench_decay_strengths as strengths  # noqa: E402

KERNEL_MODULES = "linear_decay/ops_*.py"
PACKAGE_NUMBERS = itertools.count()
LAUNCH_OPTIONS = {"maxnreg"}  # Triton launch options a version may set beyond TUNING's own fields


def snapshot(revision, directory):
    """Write `revision`'s kernel modules (git) into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = subprocess.run(["git", "-C", str(REPO_ROOT), "ls-tree", "--name-only", revision, "linear_decay/"],
                           check=True, capture_output=True, text=True).stdout.split()
    modules = [name for name in names if Path(name).match(KERNEL_MODULES)]
    for name in modules:
        text = subprocess.run(["git", "-C", str(REPO_ROOT), "show", f"{revision}:{name}"], check=True,
                              capture_output=True, text=True).stdout
        (directory / Path(name).name).write_text(text)
    return modules


def load_version(spec, root):
    """(label, ops_chunk module) of one VERSION, its modules copied into a package of its own under `root`, its
    launch-setting overrides applied to that package's `TUNING`."""
    source, _, overrides = spec.partition(":")
    files = sorted(REPO_ROOT.glob(KERNEL_MODULES)) if source == "worktree" else sorted(Path(source).glob("ops_*.py"))
    if not files:
        raise SystemExit(f"no kernel modules (ops_*.py) in {source!r}")
    package = f"kernels_version_{next(PACKAGE_NUMBERS)}"  # never a name already imported
    (Path(root) / package).mkdir()
    for file in files:
        shutil.copy(file, Path(root) / package / file.name)
    (Path(root) / package / "__init__.py").write_text('"""One version of the chunk kernels, for comparison."""\n')
    module = importlib.import_module(f"{package}.ops_chunk")
    settings = {}
    for item in filter(None, overrides.split(";")):
        key, value = item.split("=")
        kernel, field = key.split(".")
        settings.setdefault(kernel, {})[field] = int(value) if value.lstrip("-").isdigit() else value
    module.TUNING = with_settings(module, settings)  # this package's own: forward and backward launch with them
    return spec, module


def with_settings(module, settings):
    """`module.TUNING` with `settings` ({kernel: {field: value}}) applied over it; only its own kernels, and their own
    fields or `LAUNCH_OPTIONS`."""
    tuning = {name: dict(values) for name, values in module.TUNING.items()}
    for kernel, fields in settings.items():
        if kernel not in tuning or set(fields) - set(tuning[kernel]) - LAUNCH_OPTIONS:
            raise SystemExit(f"no launch setting {kernel}.{sorted(fields)}; TUNING has "
                             + ", ".join(f"{name}.{field}" for name, values in tuning.items() for field in values))
        tuning[kernel].update(fields)
    return MappingProxyType({name: MappingProxyType(values) for name, values in tuning.items()})


def implementation(module):
    """The version as `bench_decay_strengths`' implementations are called."""
    return lambda kind, q, k, v, g, scale: module.triton_chunked_recurrence(q, k, v, g, scale=scale)[0]


def timer(device):
    """fwd+bwd ms of a callable: `triton.testing.do_bench`'s median on CUDA, one wall-clock call on CPU."""
    if device == "cuda":
        import triton

        return lambda fn, grads: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median",
                                                         grad_to_none=grads)

    def wall(fn, grads):
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    return wall


def parse_kind(text):
    kind, _, strength = text.partition("@")
    if kind not in ("vector", "scalar", "static"):
        raise SystemExit(f"unknown kind {kind!r}")
    return kind, strength or ("tnl" if kind == "static" else "u20")


def runnable(impls, kind):
    """(label, implementation) of those that run `kind`: FLA 0.6 refuses scalar decay on Hopper with Triton < 3.7.1."""
    return [(label, fn) for label, fn in impls.items() if not (label == "fla" and kind == "scalar")]


def compare(versions, args):
    """Alternating timings (and errors) of the versions and FLA, one JSON line per shape and kind."""
    impls = {label: implementation(module) for label, module in versions}
    if args.fla:
        fla = strengths.implementations().get("fla")
        if fla is not None:
            impls["fla"] = fla
    bench = timer(args.device)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32  # the interpreter's bf16 dots are wrong
    for shape in args.shapes:
        for kind, strength in args.kinds:
            *tensors, do = strengths.make_inputs(kind, strength, *shape, device=args.device, dtype=dtype)
            scale = shape[-1] ** -0.5
            row = {"shape": list(shape), "kind": kind, "strength": strength, "fwd+bwd ms": {}}
            for round_index in range(args.rounds):
                for label, fn in runnable(impls, kind):
                    xs = strengths.leaves(kind, *tensors)

                    def forward_backward():
                        fn(kind, *xs, scale).backward(do)

                    ms = bench(forward_backward, [x for x in xs if x.requires_grad])
                    row["fwd+bwd ms"].setdefault(label, []).append(round(ms, 3))
                    print(f"{'x'.join(map(str, shape))} {kind}@{strength} round {round_index + 1} {label}: {ms:.3f} ms",
                          file=sys.stderr, flush=True)  # as it comes: a run stopped by a time limit keeps it
            print(json.dumps(row), flush=True)
            if args.profile:
                for label, fn in runnable(impls, kind):
                    xs = strengths.leaves(kind, *tensors)
                    print(json.dumps({**{key: row[key] for key in ("shape", "kind", "strength")}, "version": label,
                                      **strengths.profile_row(fn, kind, xs, scale, do, args.device)}), flush=True)
    if args.precision:
        for kind, strength in args.kinds:
            print(json.dumps(strengths.precision_row(impls, kind, strength, args.device, dtype, args.precision_shape)),
                  flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    snap = commands.add_parser("snapshot", help="a git revision's kernel modules into a directory")
    snap.add_argument("revision")
    snap.add_argument("directory")
    run = commands.add_parser("run", help="time (and check) versions against each other")
    run.add_argument("versions", nargs="+")
    run.add_argument("--kinds", type=lambda text: [parse_kind(item) for item in text.split(",")],
                     default=[parse_kind("static"), parse_kind("scalar"), parse_kind("vector")])
    run.add_argument("--shapes", type=strengths.parse_shapes, default=strengths.SHAPES)
    run.add_argument("--rounds", type=int, default=2)
    run.add_argument("--precision", action="store_true")
    run.add_argument("--precision-shape", type=lambda text: strengths.parse_shapes(text)[0],
                     default=strengths.PRECISION_SHAPE)
    run.add_argument("--profile", action="store_true")
    run.add_argument("--no-fla", dest="fla", action="store_false")
    run.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    args = parser.parse_args(argv)
    if args.command == "snapshot":
        for name in snapshot(args.revision, args.directory):
            print(name)
        return 0
    with tempfile.TemporaryDirectory() as root:
        sys.path.insert(0, root)
        try:
            compare([load_version(spec, root) for spec in args.versions], args)
        finally:
            sys.path.remove(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
