"""The GPU benchmark scripts' code paths, run small on CPU so that a GPU session does not find their bugs: every
model, section and ratio of benchmarks/model.py, and every stage check of benchmarks/diagnose_chunk_kernels.py under
Triton's interpreter. (The numbers themselves mean nothing on CPU.)"""

import importlib.util
import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_model_benchmark_runs_every_row(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert load("model").main(["--device", "cpu", "--quick", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    models = {"ours mamba2:vector", "ours gla:vector", "ours simple:scalar", "llama sdpa"}
    assert {(r["section"], r["model"]) for r in rows} == {(s, m) for s in ("train", "generate") for m in models}
    for row in rows:
        assert "error" not in row, row
        if row["section"] == "generate":
            assert row["generated"] == row["new_tokens"] == 4  # exactly the asked number of new tokens
        else:
            assert row["tokens_per_s"] > 0 and row["params_M"] > 0
    printed = capsys.readouterr().out
    assert printed.count("ours/llama") == 12  # 3 decays × (2 train shapes + 2 prompts)


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
    assert torch._C._is_multithreading_enabled()
    assert load("model").main(["--device", "cpu", "--quick", "--sections", "train", "--decays", "simple:scalar",
                               "--single-thread-backward", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["autograd_multithreading"] for r in rows] == [False] * 4  # ours and the Llama, two shapes each
    assert torch._C._is_multithreading_enabled()
    assert load("model").main(["--device", "cpu", "--quick", "--sections", "train", "--decays", "simple:scalar",
                               "--no-llama", "--json", str(out)]) == 0
    assert [r["autograd_multithreading"] for r in json.loads(out.read_text())] == [True] * 2


# Vector decay's factorised scores compute the entries above the diagonal too and discard them; at spans up to 120
# (the "centred" and "halves" decays) those overflow (inf, and inf − inf), which numpy's matmul reports.
@pytest.mark.filterwarnings("ignore:overflow encountered in matmul:RuntimeWarning",
                            "ignore:invalid value encountered in matmul:RuntimeWarning")
def test_chunk_kernel_diagnosis_passes_under_the_interpreter():
    pytest.importorskip("triton")
    diagnose = load("diagnose_chunk_kernels")
    assert diagnose.main(["--cpu", "--length", "70", "--dims", "16", "--warps", "4"]) == 0


def test_host_overhead_benchmark_runs_on_cpu(tmp_path):
    """benchmarks/host_overhead.py's pieces, blocks and profiles (the kernels under the interpreter): every row timed,
    each block also with the calling-thread backward (ours also with the direct launch path, which the interpreter
    leaves to Triton), and the autograd functions unwrapped after --block-profile."""
    from linear_decay.kernels_norm_linear_decay import GatedRMSNormFunction

    forward, backward = GatedRMSNormFunction.forward, GatedRMSNormFunction.backward
    out = tmp_path / "host.json"
    rows = load("host_overhead").main(["--device", "cpu", "--quick", "--calls", "1", "--block-profile", "--json", str(out)])
    pieces = [row["piece"] for row in rows]
    assert pieces == [row["piece"] for row in json.loads(out.read_text())]
    assert all(row["wall_us"] > 0 and row["issued_us"] > 0 for row in rows)
    for block in ("block mamba2:vector fwd+bwd", "block simple:scalar fwd+bwd", "Llama decoder layer fwd+bwd"):
        assert block in pieces and block + ", caller-thread backward" in pieces
        assert (block + ", caller thread, fast launch" in pieces) == block.startswith("block")
    assert "recurrence vector fwd+bwd" in pieces and "softplus_decay fwd+bwd" in pieces
    assert (GatedRMSNormFunction.forward, GatedRMSNormFunction.backward) == (forward, backward)
