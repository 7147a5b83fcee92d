"""Decay statistics (DESIGN §5) of models whose decays are known in closed form, the padding mask, and the CLI.

With the decay-logit projection zeroed (z = 0) every parameterization of DESIGN §2 gives a λ computable by hand:
simple SD-p → p, gla → 1/2, hgrn2 → γ_l + (1 − γ_l)/2 with γ_l = l/L, lightnet → t/(t+1) at position t, mamba2 →
exp(−A·softplus(dt_bias)) per channel, tnl → exp(−(1/n_h)(1 − l/(L−1) + 1e-5)) per head.
"""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from linear_decay import LinearDecayForCausalLM
from linear_decay.analysis import (STATISTICS, decay_figure, decay_statistics, first_tokens, format_statistics,
                                   held_out_text, main, missing_folder)

from conftest import tiny_config

LENGTH = 24
REPO_ROOT = Path(__file__).resolve().parent.parent


def model_with_zero_logits(**overrides):
    torch.manual_seed(0)
    model = LinearDecayForCausalLM(tiny_config(num_hidden_layers=3, **overrides)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            if layer.attn.decay_proj is not None:
                for param in layer.attn.decay_proj.parameters():
                    param.zero_()
    return model


def summary(values):
    """The statistics of a list of λ values, computed here independently of the package."""
    values = sorted(values)

    def quantile(q):  # linear interpolation between order statistics, as torch.quantile / numpy do
        position = q * (len(values) - 1)
        low = math.floor(position)
        high = min(low + 1, len(values) - 1)
        return values[low] + (values[high] - values[low]) * (position - low)

    return dict(median=quantile(0.5), p25=quantile(0.25), p75=quantile(0.75), mean=sum(values) / len(values),
                min=values[0], max=values[-1])


def assert_matches(stats, expected_by_layer, tolerance=1e-6):
    assert [row["layer"] for row in stats] == list(range(len(expected_by_layer)))
    for row, expected in zip(stats, expected_by_layer):
        for name in STATISTICS:
            assert row[name] == pytest.approx(expected[name], abs=tolerance), (row["layer"], name)


def ids(batch=1, length=LENGTH, seed=0):
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("p", [0.8, 0.95])
def test_simple_decay_sits_at_p(p):
    stats = decay_statistics(model_with_zero_logits(decay_type="simple", simple_decay_init=p), ids())
    assert_matches(stats, [summary([p])] * 3)


@pytest.mark.parametrize("granularity", ["vector", "scalar"])
def test_gla_starts_at_one_half(granularity):
    stats = decay_statistics(model_with_zero_logits(decay_type="gla", decay_granularity=granularity), ids())
    assert_matches(stats, [summary([0.5])] * 3)
    assert all(row["count"] == LENGTH * (32 if granularity == "vector" else 2) for row in stats)


def test_hgrn2_lower_bound():
    stats = decay_statistics(model_with_zero_logits(decay_type="hgrn2"), ids())
    layers = 3
    assert_matches(stats, [summary([l / layers + (1 - l / layers) / 2]) for l in range(layers)])


def test_lightnet_position_dependent_decay():
    stats = decay_statistics(model_with_zero_logits(decay_type="lightnet"), ids())
    assert_matches(stats, [summary([t / (t + 1) for t in range(1, LENGTH + 1)])] * 3)


def test_tnl_static_decay():
    layers, heads = 3, 2
    stats = decay_statistics(model_with_zero_logits(decay_type="tnl", decay_granularity="scalar"), ids())
    expected = []
    for layer in range(layers):
        per_head = [math.exp(-(1 - layer / (layers - 1) + 1e-5) / (2 * 128 ** (h / (heads - 1))))
                    for h in range(heads)]
        expected.append(summary(per_head * LENGTH))
    assert_matches(stats, expected)


def test_mamba2_decay_from_its_parameters():
    model = model_with_zero_logits(decay_type="mamba2")
    stats = decay_statistics(model, ids())
    expected = []
    for layer in model.model.layers:
        a = [math.exp(x) for x in layer.attn.decay.A_log.tolist()]
        dt = [math.log1p(math.exp(x)) for x in layer.attn.decay.dt_bias.tolist()]
        expected.append(summary([math.exp(-ai * di) for ai, di in zip(a, dt)]))
    assert_matches(stats, expected, tolerance=1e-5)


@pytest.mark.parametrize("decay_type", ["mamba2", "lightnet", "tnl"])
def test_padding_is_left_out(decay_type):
    """A left-padded row gives the statistics of the same row without padding."""
    granularity = "scalar" if decay_type == "tnl" else "vector"
    torch.manual_seed(1)
    model = LinearDecayForCausalLM(tiny_config(decay_type=decay_type, decay_granularity=granularity)).eval()
    row = ids(length=15, seed=3)
    padded = torch.cat([torch.zeros(1, 9, dtype=torch.long), row], dim=1)
    mask = torch.cat([torch.zeros(1, 9, dtype=torch.long), torch.ones(1, 15, dtype=torch.long)], dim=1)
    expected = decay_statistics(model, row)
    actual = decay_statistics(model, padded, attention_mask=mask)
    for a, e in zip(actual, expected):
        assert a["count"] == e["count"]
        for name in STATISTICS:
            assert a[name] == pytest.approx(e[name], abs=1e-6), name


def test_format_statistics_lists_every_layer():
    stats = decay_statistics(model_with_zero_logits(decay_type="gla"), ids())
    lines = format_statistics(stats).splitlines()
    assert len(lines) == 4 and "median" in lines[0] and "0.5000" in lines[1]


def test_command_line_compares_models_in_one_figure(tmp_path):
    pytest.importorskip("matplotlib")
    folders = []
    for p in (0.8, 0.95):
        folder = tmp_path / f"sd-{p}"
        model_with_zero_logits(decay_type="simple", simple_decay_init=p, vocab_size=8192).save_pretrained(folder)
        folders.append(str(folder))
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 20)
    figure, stats_file = tmp_path / "decay.png", tmp_path / "stats.json"
    result = subprocess.run([sys.executable, "-m", "linear_decay.analysis", *folders, "--text", str(text),
                             "--tokens", "64", "--labels", "SD-0.8,SD-0.95", "--plot", str(figure),
                             "--json", str(stats_file)], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    assert "SD-0.8" in result.stdout and "median" in result.stdout
    stats = json.loads(stats_file.read_text())
    assert list(stats) == ["SD-0.8", "SD-0.95"]
    assert [row["median"] for row in stats["SD-0.8"]] == pytest.approx([0.8] * 3, abs=1e-6)
    assert [row["median"] for row in stats["SD-0.95"]] == pytest.approx([0.95] * 3, abs=1e-6)
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure.stat().st_size > 10_000


def test_command_line_errors(tmp_path):
    result = subprocess.run([sys.executable, "-m", "linear_decay.analysis", str(tmp_path), "--text",
                             str(tmp_path / "missing.txt")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no such file" in result.stderr and "Traceback" not in result.stderr


def run_cli(*args, cwd=None, timeout=240):
    return subprocess.run([sys.executable, "-m", "linear_decay.analysis", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})


def test_a_missing_local_folder_fails_at_once_with_one_line(tmp_path):
    (tmp_path / "outputs").mkdir()
    started = time.monotonic()
    result = run_cli("outputs/nope", cwd=tmp_path, timeout=60)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == ["linear_decay.analysis: error: no such folder: outputs/nope"]
    assert time.monotonic() - started < 30  # no Hub retries (those take 30 s and more offline)


@pytest.mark.parametrize("name", ["./nope", "nope", "outputs/run/checkpoint-5", "ABSOLUTE"])
def test_missing_local_folders_are_never_looked_up(tmp_path, monkeypatch, name):
    import transformers

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *args, **kwargs: pytest.fail(f"from_pretrained{args} was called"))
    name = str(tmp_path / "nope") if name == "ABSOLUTE" else name
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path), name])  # the existing folder first: every argument is checked before any load
    assert str(exit_info.value) == f"linear_decay.analysis: error: no such folder: {name}"


def test_missing_folder_tells_local_paths_from_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    (tmp_path / "notes.txt").write_text("")
    assert missing_folder("outputs") is None and missing_folder(str(tmp_path / "outputs")) is None
    assert missing_folder("outputs/nope") == "no such folder: outputs/nope"  # `outputs` is here: a local path
    assert missing_folder("owner/name") is None and missing_folder("Org-1/model_v2.5") is None  # Hub ids
    for name in ("nope", "./owner/name", "../owner/name", "owner/name/sub", "~/nope", "owner/", "/owner/name"):
        assert missing_folder(name) == f"no such folder: {name}", name
    assert missing_folder("notes.txt") == "not a folder: notes.txt"


def test_a_hub_id_still_goes_to_from_pretrained(tmp_path, monkeypatch):
    import transformers

    monkeypatch.chdir(tmp_path)
    asked = []

    def from_pretrained(name, *args, **kwargs):
        asked.append(name)
        raise OSError(f"{name} is not a local folder nor a model on the Hub\n(second line)")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    with pytest.raises(SystemExit) as exit_info:
        main(["owner/name", "--tokens", "8"])
    assert asked == ["owner/name"]
    assert str(exit_info.value) == ("linear_decay.analysis: error: cannot load owner/name: owner/name is not a local "
                                    "folder nor a model on the Hub (second line)")


@pytest.mark.parametrize("layers", [2, 3, 12])
def test_the_plot_marks_whole_layers_only(layers):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    stats = [dict(layer=i, median=0.8, p25=0.7, p75=0.9) for i in range(layers)]
    figure = decay_figure({"a": stats, "b": stats[:-1]})
    try:
        axes = figure.axes[0]
        low, high = axes.get_xlim()
        ticks = [tick for tick in axes.get_xticks() if low <= tick <= high]
        assert len(ticks) >= 2 and all(float(tick).is_integer() for tick in ticks), ticks
        figure.canvas.draw()
        labels = [label.get_text() for label in axes.get_xticklabels() if label.get_text()]
        assert labels and all(label.lstrip("−-").isdigit() for label in labels), labels
    finally:
        plt.close(figure)


def test_long_text_is_cut_to_the_requested_tokens_without_a_length_warning(tmp_path):
    """The held-out text is ~21k tokens, the bundled tokenizer's model_max_length 2048: the model has no length
    limit and only the first --tokens tokens run, so nothing is to be warned about."""
    from transformers import AutoTokenizer

    from linear_decay.quickstart import TOKENIZER

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    text = held_out_text()
    full = tokenizer(text, verbose=False)["input_ids"]
    assert len(full) > 4 * tokenizer.model_max_length
    for count in (100, tokenizer.model_max_length, 3000):
        assert first_tokens(tokenizer, text, count)[0].tolist() == full[:count]

    folder = tmp_path / "gla"
    model_with_zero_logits(decay_type="gla", vocab_size=len(tokenizer)).save_pretrained(folder)
    result = run_cli(folder)  # the default text and --tokens 2048
    assert result.returncode == 0, result.stderr
    assert "2048 tokens" in result.stdout
    assert "longer than the specified maximum" not in result.stderr and "indexing errors" not in result.stderr
