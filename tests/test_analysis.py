"""Decay statistics (DESIGN §5) of models whose decays are known in closed form, the padding mask, and the CLI.

With the decay-logit projection zeroed (z = 0) every parameterization of DESIGN §2 gives a λ computable by hand:
simple SD-p → p, gla → 1/2, hgrn2 → γ_l + (1 − γ_l)/2 with γ_l = l/L, lightnet → t/(t+1) at position t, mamba2 →
exp(−A·softplus(dt_bias)) per channel, tnl → exp(−(1/n_h)(1 − l/(L−1) + 1e-5)) per head.
"""

import json
import math
import subprocess
import sys

import pytest
import torch

from linear_decay import LinearDecayForCausalLM
from linear_decay.analysis import STATISTICS, decay_statistics, format_statistics

from conftest import tiny_config

LENGTH = 24


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
