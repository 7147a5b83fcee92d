"""The GPU benchmark scripts' code paths, run small on CPU so that a GPU run does not find their bugs: every model,
section and ratio of benchmarks/model.py and the pieces of tools/host_overhead.py. (The numbers themselves mean
nothing on CPU.)"""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the benchmark scripts end to end

REPO_ROOT = Path(__file__).resolve().parents[1]


def load(name, folder="benchmarks"):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", REPO_ROOT / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_model_benchmark_runs_every_row(tmp_path, capsys):
    out = tmp_path / "rows.json"
    benchmark = load("model")
    assert benchmark.main(["--device", "cpu", "--quick", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    models = {"ours mamba2:vector", "ours gla:vector", "ours simple:scalar", "llama sdpa"}
    assert {(r["section"], r["model"]) for r in rows} == (
        {(s, m) for s in ("train", "generate") for m in models}
        | {("generate", "llama static cache"), ("generate", benchmark.GENERATE_FLOOR)}
        | {("decode", m) for m in models if not m.startswith("llama")})
    for row in rows:
        assert "error" not in row, row
        if row["section"] == "generate":
            assert row["generated"] == row["new_tokens"] == 4  # exactly the asked number of new tokens
            assert (row.get("prefill_s", 0) > 0) == (not row["model"].startswith("llama")), row  # ours: prefill alone
        elif row["section"] == "decode":
            assert row["step_ms"] > 0 and row["floor_ms"] > 0 and row["state_GB"] > 0
            assert row["launches"] >= len(row["top_launches"]) > 0  # the step's ATen operators on CPU
        else:
            assert row["tokens_per_s"] > 0 and row["params_M"] > 0
    printed = capsys.readouterr().out
    assert len(re.findall(r"ours/llama \d", printed)) == 12  # 3 decays × (2 train shapes + 2 prompts)
    assert printed.count("ours/llama static cache") == 6  # 3 decays × 2 prompts


def test_model_benchmark_prompt_lengths(tmp_path):
    """--prompts sets the generate section's prompt lengths, and the decode section's prompt is the first."""
    out = tmp_path / "rows.json"
    assert load("model").main(["--device", "cpu", "--quick", "--sections", "generate,decode", "--decays",
                               "simple:scalar", "--prompts", "24", "--llama-caches", "dynamic", "--no-generate-floor",
                               "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert sorted((r["section"], r["model"], r["prompt"]) for r in rows) == [
        ("decode", "ours simple:scalar", 24), ("generate", "llama sdpa", 24), ("generate", "ours simple:scalar", 24)]


def test_model_benchmark_profile_and_overrides(tmp_path, monkeypatch):
    """--sections profile: one step per model under the profiler, its top operators recorded; --ours-overrides
    reaches our models' configs (here the chunked loss, seen by the model's loss function being called)."""
    import linear_decay.modeling_linear_decay as modeling

    chunked_calls = []
    original = modeling.chunked_linear_cross_entropy
    monkeypatch.setattr(modeling, "chunked_linear_cross_entropy",
                        lambda *args, **kwargs: chunked_calls.append(1) or original(*args, **kwargs))
    out = tmp_path / "rows.json"
    assert load("model").main(["--device", "cpu", "--quick", "--sections", "profile,train", "--decays",
                               "simple:scalar", "--ours-overrides", "loss_chunk_size=16", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    profiles = [r for r in rows if r["section"] == "profile"]
    assert [r["model"] for r in profiles] == ["ours simple:scalar", "llama sdpa"]
    assert all(r["top"] and all(t["self_cpu_ms"] > 0 for t in r["top"][:3]) for r in profiles)  # host-sorted on CPU
    assert chunked_calls  # our model trained with the chunked loss; the Llama has no such field
    for row in (r for r in rows if r["section"] == "train"):
        assert 0 < row["issue_ms"] <= row["step_ms"]  # the host's share of the step (all of it on CPU)


def test_model_benchmark_decay_ab_switches(tmp_path, monkeypatch):
    """--unfused-decay takes the fused decay kernel out of our models (the A/B of gpu_checks.sh decay_ab) and
    --no-llama leaves the reference out."""
    import linear_decay.modeling_linear_decay as modeling

    monkeypatch.setattr(modeling, "softplus_decay", modeling.softplus_decay)  # restored after the test
    out = tmp_path / "rows.json"
    assert load("model").main(["--device", "cpu", "--quick", "--sections", "train", "--decays", "mamba2:vector",
                               "--no-llama", "--unfused-decay", "--json", str(out)]) == 0
    assert modeling.softplus_decay is None
    assert {r["model"] for r in json.loads(out.read_text())} == {"ours mamba2:vector"}


def test_model_benchmark_backward_thread_switch(tmp_path):
    """--single-thread-backward runs every model's backward on the calling thread (recorded per row from autograd's
    own setting during the run) and leaves the thread's setting as it found it."""
    import torch

    out = tmp_path / "rows.json"
    assert torch.autograd.is_multithreading_enabled()
    assert load("model").main(["--device", "cpu", "--quick", "--sections", "train", "--decays", "simple:scalar",
                               "--single-thread-backward", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["autograd_multithreading"] for r in rows] == [False] * 4  # ours and the Llama, two shapes each
    assert torch.autograd.is_multithreading_enabled()
    assert load("model").main(["--device", "cpu", "--quick", "--sections", "train", "--decays", "simple:scalar",
                               "--no-llama", "--json", str(out)]) == 0
    assert [r["autograd_multithreading"] for r in json.loads(out.read_text())] == [True] * 2


def test_host_overhead_benchmark_runs_on_cpu(tmp_path):
    """tools/host_overhead.py's pieces, blocks and profiles (the kernels under the interpreter): every row timed,
    each block also with the calling-thread backward, and the autograd functions unwrapped after --block-profile."""
    from linear_decay.ops_norm import GatedRMSNormFunction

    forward, backward = GatedRMSNormFunction.forward, GatedRMSNormFunction.backward
    out = tmp_path / "host.json"
    rows = load("host_overhead", "tools").main(["--device", "cpu", "--quick", "--calls", "1", "--block-profile",
                                                "--json", str(out)])
    pieces = [row["piece"] for row in rows]
    assert pieces == [row["piece"] for row in json.loads(out.read_text())]
    assert all(row["wall_us"] > 0 and row["issued_us"] > 0 for row in rows)
    for block in ("block mamba2:vector fwd+bwd", "block simple:scalar fwd+bwd", "Llama decoder layer fwd+bwd"):
        assert block in pieces and block + ", caller-thread backward" in pieces
    assert "recurrence vector fwd+bwd" in pieces and "softplus_decay fwd+bwd" in pieces
    assert (GatedRMSNormFunction.forward, GatedRMSNormFunction.backward) == (forward, backward)


def test_kernel_benchmark_strengths_and_sections_on_cpu(tmp_path, monkeypatch, capsys):
    """benchmarks/bench_kernels.py's decay strengths, precision and chunk sections and markdown tables, small on CPU:
    the PyTorch chunked path stands in for our kernels and for FLA (whose scalar-decay backward refuses, as FLA's
    chunk_simple_gla(g) does on Hopper with Triton 3.6); timing and peak memory are stubbed."""
    import math

    import torch

    from linear_decay.recurrence import chunked_recurrence

    bench = load("bench_kernels")
    gen = torch.Generator().manual_seed(0)
    for kind, shape in (("vector", (2, 64, 3, 8)), ("scalar", (2, 64, 3))):
        for strength in bench.STRENGTHS:
            g = bench.strength_log_decay(strength, kind, 2, 64, 3, 8, "cpu", gen)
            assert g.shape == shape and g.dtype == torch.float32 and bool((g <= 0).all()), (kind, strength)
    assert float(bench.strength_log_decay("u20", "vector", 1, 4096, 2, 8, "cpu", gen).min()) < -19
    assert float(bench.strength_log_decay("mild", "vector", 1, 4096, 2, 8, "cpu", gen).min()) > -1
    # mamba2: per channel A ∈ [1, 16] and dt ∈ [1e-3, 0.1]: at z = 0, −log λ / A = dt
    a_dt = -bench.mamba2_log_decay((1, 1, 4, 8), (4, 8), "cpu", torch.Generator().manual_seed(1))
    assert bool((a_dt > 1e-3 * math.exp(-3)).all()) and bool((a_dt < 16 * 0.1 * math.exp(3)).all())
    assert bench.parse_strengths("u6,mild,u6") == ["u6", "mild"]

    class RefuseBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            raise RuntimeError("Triton >= 3.4.0 and < 3.7.1 on Hopper GPUs produces incorrect results")

    def simple_gla(q, k, v, g=None, g_gamma=None, **kwargs):
        o, final = chunked_recurrence(q, k, v, g if g is not None else g_gamma, **kwargs)
        return (RefuseBackward.apply(o) if g is not None else o), final

    fla = dict(chunk_gla=lambda q, k, v, g, **kwargs: chunked_recurrence(q, k, v, g, **kwargs),
               chunk_simple_gla=simple_gla)
    ours = dict(chunk=chunked_recurrence)
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "SHAPES", [(1, 40, 2, 16)] * 4)
    monkeypatch.setattr(bench, "PRECISION_SHAPE", (1, 40, 2, 16))
    monkeypatch.setattr(bench, "PRECISION_EXTRA", ("vector", "mild", (1, 17, 2, 8)))
    monkeypatch.setattr(bench, "do_bench", lambda fn, sets, warmup=0, rep=0: [fn(s) for s in sets] and 1.0)
    monkeypatch.setattr(bench, "peak_memory_mib", lambda fn, arg: fn(arg) and 2.0)
    args = bench.parse_args(["--only", "precision", "--only", "chunk", "--strengths", "mild,u20", "--shape", "0",
                             "--check", "all", "--json", str(tmp_path / "out.json")])
    results = dict(device="cpu", torch=torch.__version__, triton="-", fla_version="stub")
    bench.section_precision(results, args, ours, fla, bench.Deadline(None))
    bench.section_chunk(results, args, ours, fla, bench.Deadline(None))

    precision = results["precision"]
    assert [(r["decay"], r["strength"], r["shape"]) for r in precision] == [
        ("vector", "mild", "1x40x2x16"), ("vector", "u20", "1x40x2x16"), ("scalar", "mild", "1x40x2x16"),
        ("scalar", "u20", "1x40x2x16"), ("static", "-", "1x40x2x16"), ("vector", "mild", "1x17x2x8")]
    for row in precision:
        assert all(row["ours"][key] < 2e-2 for key in ("o", "dq", "dk", "dv")), row  # bf16 outputs vs float64
        assert (row["ours"]["dg"] is None) == (row["decay"] == "static")
        if row["decay"] == "scalar":
            assert row["fla"]["o"] < 2e-2 and row["fla"]["dq"].startswith("refused: RuntimeError: Triton >= 3.4.0")
        else:
            assert all(isinstance(row["fla"][key], float) for key in ("o", "dq", "dk", "dv"))

    chunk = results["chunk"]
    timed = [r for r in chunk if r["impl"] in ("ours", "fla")]
    assert len(timed) == 2 * 5 and {r["strength"] for r in timed} == {"mild", "u20", "-"}
    assert {r["impl"] for r in chunk} == {"ours", "fla", "sdpa_default", "sdpa_flash"}
    refused = [r for r in timed if "fwdbwd_error" in r]
    assert {(r["impl"], r["decay"]) for r in refused} == {("fla", "scalar")}
    assert all(r["fwd_ms"] == 1.0 for r in timed)
    assert len(results["correctness"]) == 5  # --check all: each kind at each strength, static once

    text = bench.markdown_tables(results)
    assert text.count("| 1×40×2×16 | vector | u20 |") == 1 and "### Precision" in text
    assert "| 1×17×2×8 |" in text and "refused: RuntimeError [1]" in text
    bench.write_json(results, args.json)
    assert json.loads((tmp_path / "out.json").read_text())["precision"][0]["decay"] == "vector"
    bench.print_table(results)
    printed = capsys.readouterr().out
    assert "### Peak memory" in printed
    bench.main(["--from-json", args.json])  # the same tables again from the JSON, no GPU needed
    assert capsys.readouterr().out.split("### Chunked")[1] == printed.split("### Chunked")[1]

    skipped = dict(device="cpu", torch="-", triton="-")
    args_deadline = bench.parse_args(["--only", "chunk", "--strengths", "mild", "--shape", "0"])
    bench.section_chunk(skipped, args_deadline, ours, fla, bench.Deadline(0.0, start=0.0))
    assert skipped["chunk"] and all(r.get("skipped") == "deadline" for r in skipped["chunk"])
    assert "Skipped after --deadline" in bench.markdown_tables(skipped)


def test_decay_strengths_profile_timeline_from_a_trace(tmp_path):
    """bench_decay_strengths.py profile's timeline: from a Chrome trace of two identical steps (a walk on a second
    stream overlapping two kernels of the first, host events beside them), the step's device span, each stream's busy
    time and the last step's kernels; and a real CPU trace's events, which hold no device work, give none."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    bench = load("bench_decay_strengths")
    assert bench._busy([(0, 10), (5, 15), (20, 30), (22, 24)]) == 25

    def kernel(name, stream, ts, dur):
        return {"cat": "kernel", "name": name, "ts": ts, "dur": dur,
                "args": {"stream": stream, "registers per thread": {"scores": 255, "walk": 168}.get(name, 80)}}

    events = [{"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 500, "args": {}}]
    for step in (0, 1):
        t0 = 5000 * step
        events += [kernel("scores", 7, t0, 1000), kernel("walk", 20, t0 + 500, 2000),
                   kernel("output", 7, t0 + 1200, 1000), kernel("output", 7, t0 + 3000, 1000)]
    timeline = bench.device_timeline(events, 2)
    assert timeline["device span ms"] == 4.5  # 0 … 9000 µs over two steps
    assert timeline["stream busy ms"] == {"7": 3.0, "20": 2.0}
    assert timeline["last step"] == [["scores", 7, 0.0, 1.0], ["walk", 20, 0.5, 2.0], ["output", 7, 1.2, 1.0],
                                     ["output", 7, 3.0, 1.0]]
    assert timeline["registers"] == {"scores": 255, "walk": 168, "output": 80}

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.ones(4, 4) @ torch.ones(4, 4)
    prof.export_chrome_trace(str(tmp_path / "trace.json"))
    assert bench.device_timeline(json.loads((tmp_path / "trace.json").read_text())["traceEvents"], 1) == {}


# the most shared memory one program may use on the GPUs BENCHMARKS.md measures (H100, H200: 227 KiB)
HOPPER_SHARED_BYTES = 227 * 1024


@pytest.mark.parametrize("dtype,kinds,version", [
    ("bf16", "vector,scalar,static,static_learned,none", []),
    ("bf16", "vector", ["--version", "worktree:key_grads_vector.block_k=64;key_grads_vector.maxnreg=128"]),
    ("fp32", "vector", [])])
def test_kernel_resources_every_launch_fits_hopper(tmp_path, dtype, kinds, version):
    """Every chunk-kernel launch the host code makes at the widest head dim, in the segmented walks too (two
    sequences × heads for 132 SMs), compiles for sm_90 and fits its shared memory: a launch that does not fails only
    on the GPU ("out of resources"), which the interpreter never sees. A version with a launch-setting override is
    screened with it, a register cap (Triton's `maxnreg`) included; TUNING's own cap holds for bf16 dot operands and
    is dropped for fp32 ones (`ops_chunk._launch`)."""
    pytest.importorskip("triton.backends.nvidia")
    from linear_decay import ops_chunk
    out = tmp_path / "launches.json"
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "kernel_resources.py"), "--kinds", kinds,
                             "--shapes", "1x4096x2x256", "--dtype", dtype, "--json", str(out), *version],
                            env=env, capture_output=True, text=True)
    if result.returncode != 0 and "cuobjdump" in result.stderr and "No such file" in result.stderr:
        pytest.skip("this Triton ships no cuobjdump")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())
    kernels = {row["kernel"] for row in rows}
    assert {"_chunk_states_kernel", "_combine_segments_kernel", "_chunk_output_kernel", "_chunk_key_grads_kernel",
            "_chunk_state_grads_kernel", "_chunk_value_grads_kernel"} <= kernels
    assert {row["kind"] for row in rows} == set(kinds.split(","))
    assert {row["constants"].get("WALK") for row in rows if row["kernel"] == "_chunk_states_kernel"} == {1, 2}
    for row in rows:
        assert 0 < row["registers"] <= 255 and row["shared_bytes"] <= HOPPER_SHARED_BYTES, row
    key_grads = [row for row in rows if row["kernel"] == "_chunk_key_grads_kernel"]
    vector_block = 64 if version else ops_chunk.TUNING["key_grads_vector"]["block_k"]
    assert {row["constants"]["BK"] for row in key_grads} == {vector_block} | ({64} if kinds != "vector" else set())
    capped = {"_chunk_key_grads_kernel": "key_grads_vector", "_chunk_intra_grads_kernel": "intra_grads"}
    for kernel, entry in capped.items():  # vector decay's kernels with a register cap in TUNING
        launches = [row for row in rows if row["kernel"] == kernel and row["kind"] == "vector"]
        if dtype == "fp32":
            cap = None  # `_launch` drops TUNING's cap for fp32 dot operands
        elif version and entry == "key_grads_vector":
            cap = 128
        else:
            cap = ops_chunk.TUNING[entry]["maxnreg"]
        assert launches and all(row.get("maxnreg") == cap for row in launches), launches  # the cap reaches the compiler
        assert all(row["registers"] <= (cap or 255) for row in launches), launches


def test_compare_kernels_versions_side_by_side(tmp_path, capsys, monkeypatch):
    """Two versions of the kernels (a git snapshot and the working tree with a launch-setting override) load as
    packages of their own and run through the same comparison and profile on CPU, each time also reported as it
    comes; their errors against the float64 oracle are fp32's (test_ops_chunk.py's 2e-5 at a mild decay); a register
    cap (`maxnreg`) may be added, an override of any other setting TUNING lacks is refused."""
    compare = load("compare_kernels")
    if subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True).returncode == 0:
        snapshot = tmp_path / "head"
        assert compare.main(["snapshot", "HEAD", str(snapshot)]) == 0
        assert (snapshot / "ops_chunk.py").exists() and (snapshot / "ops_host.py").exists()
    else:  # a copy of the tree without git: the working tree's modules stand in
        snapshot = "worktree"
    capsys.readouterr()
    assert compare.main(["run", str(snapshot), "worktree:key_grads.block_k=32;key_grads.num_warps=8", "--device",
                         "cpu", "--no-fla", "--kinds", "scalar@mild", "--shapes", "1x70x2x32", "--rounds", "1",
                         "--profile", "--precision", "--precision-shape", "1x70x2x32"]) == 0
    output = capsys.readouterr()
    timing, *profiles, errors = (json.loads(line) for line in output.out.splitlines())
    labels = [str(snapshot), "worktree:key_grads.block_k=32;key_grads.num_warps=8"]
    assert [row["version"] for row in profiles] == labels  # one profile each after the case's timings
    assert all(row["shape"] == [1, 70, 2, 32] and row["kind"] == "scalar" and "kernels" in row for row in profiles)
    progress = [line for line in output.err.splitlines() if line.startswith("1x70x2x32 scalar@mild round 1 ")]
    assert [line.split(" round 1 ")[1].rsplit(": ", 1)[0] for line in progress] == labels  # each time as it came
    assert sorted(timing["fwd+bwd ms"]) == sorted(labels) and all(ms[0] > 0 for ms in timing["fwd+bwd ms"].values())
    assert errors["columns"] == ["o", "dq", "dk", "dv", "dlogλ"]
    for label in labels:
        assert len(errors[label]) == 5 and max(errors[label]) <= 2e-5, errors
    from linear_decay import ops_chunk
    monkeypatch.syspath_prepend(str(tmp_path))
    _, module = compare.load_version("worktree:key_grads.block_k=32", tmp_path)  # in force for its backward too
    assert module is not ops_chunk and module.TUNING["key_grads"]["block_k"] == 32
    assert ops_chunk.TUNING["key_grads"]["block_k"] == 64
    _, capped = compare.load_version("worktree:value_grads.maxnreg=168", tmp_path)  # a launch option beyond TUNING's
    assert capped.TUNING["value_grads"]["maxnreg"] == 168 and "maxnreg" not in ops_chunk.TUNING["value_grads"]
    with pytest.raises(SystemExit, match="no launch setting"):
        compare.main(["run", "worktree:key_grads.blocks=32", "--device", "cpu", "--no-fla", "--kinds", "scalar",
                      "--shapes", "1x70x2x32", "--rounds", "1"])
