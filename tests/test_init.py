"""Initialisation (DESIGN §1–2) and the decay formulas of §2–3, measured on the decay units of freshly built models.

log λ is captured with forward hooks on each layer's `DecayParameterization` (`layers[i].attn.decay`), whose forward
gets the decay logits z (and HGRN2's lower bound as `context`) and returns log λ. Expected values are the DESIGN
formulas written out here.
"""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import linear_decay.recurrence as rec
from linear_decay import LinearDecayForCausalLM

from conftest import perturbed_model, relative_error, tiny_config


def build(seed=0, **overrides):
    torch.manual_seed(seed)
    return LinearDecayForCausalLM(tiny_config(**overrides))


def token_ids(batch=2, length=48, seed=0, vocab=64):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def capture_decays(model, input_ids=None):
    """Run the model once; per layer the decay unit's input z, output log λ and the lower bound it was given."""
    input_ids = token_ids(vocab=model.config.vocab_size) if input_ids is None else input_ids
    records = [None] * len(model.model.layers)
    handles = []
    for index, layer in enumerate(model.model.layers):
        def hook(module, args, kwargs, output, index=index):
            z = args[0] if args else kwargs.get("z")
            records[index] = dict(z=None if z is None else z.detach().double(), log_decay=output.detach().double(),
                                  lower_bound=kwargs.get("context"))

        handles.append(layer.attn.decay.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    assert all(r is not None for r in records)
    return records


def median_decay(record):
    return float(record["log_decay"].exp().median())


# ---------------------------------------------------------------------------------------------------------------
# Simple Decay, GLA: λ starts at p and 0.5
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["vector", "scalar"])
@pytest.mark.parametrize("p", [0.8, 0.9, 0.95, 0.99])
def test_simple_decay_starts_at_p(p, granularity):
    model = build(decay_type="simple", decay_granularity=granularity, simple_decay_init=p)
    width = 32 if granularity == "vector" else 2
    for layer in model.model.layers:
        delta = layer.attn.decay.delta
        assert delta.shape == (width,)
        torch.testing.assert_close(delta.double(), torch.full((width,), math.log(p / (1 - p)), dtype=torch.float64),
                                   rtol=1e-6, atol=1e-6)
    for record in capture_decays(model):
        assert float(record["z"].abs().max()) < 0.5  # z is near 0 at init
        assert abs(median_decay(record) - p) <= 0.05 * (1 - p), (median_decay(record), p)


@pytest.mark.parametrize("granularity", ["vector", "scalar"])
def test_gla_starts_at_one_half(granularity):
    for record in capture_decays(build(decay_type="gla", decay_granularity=granularity)):
        assert abs(median_decay(record) - 0.5) <= 2e-3


# ---------------------------------------------------------------------------------------------------------------
# TNL and TNL-L: static per-head decays
# ---------------------------------------------------------------------------------------------------------------


def tnl_formula(layer, num_layers, num_heads):
    """−(1/n_h)(1 − l/(L−1) + 1e-5), n_h = 2·128^{h/(H−1)}; with L = 1 (or H = 1) the ratio l/(L−1) (h/(H−1)) is 0."""
    values = []
    for head in range(num_heads):
        head_ratio = head / (num_heads - 1) if num_heads > 1 else 0.0
        layer_ratio = layer / (num_layers - 1) if num_layers > 1 else 0.0
        n_h = 2.0 * 128.0 ** head_ratio
        values.append(-(1.0 / n_h) * (1.0 - layer_ratio + 1e-5))
    return torch.tensor(values, dtype=torch.float64)


TNL_SHAPES = [(4, 4), (2, 2), (1, 2), (3, 1), (1, 1)]


@pytest.mark.parametrize("position", ["none", "tpe"])
@pytest.mark.parametrize("layers,heads", TNL_SHAPES, ids=[f"L{l}-H{h}" for l, h in TNL_SHAPES])
def test_tnl_decay_formula(layers, heads, position):
    model = build(decay_type="tnl", num_hidden_layers=layers, num_heads=heads, position_encoding=position)
    assert not any("decay." in name for name, _ in model.named_parameters())  # nothing trainable
    for index, record in enumerate(capture_decays(model)):
        assert record["z"] is None
        expected = tnl_formula(index, layers, heads)
        log_decay = record["log_decay"]
        assert log_decay.shape == (heads,)
        torch.testing.assert_close(log_decay, expected, rtol=1e-6, atol=0)
        assert bool((log_decay < 0).all())  # λ < 1 in every layer (also with TPE: no shifted layer index)


def test_tnl_formula_values_spelled_out():
    """Anchor values: L = 4, H = 4, so n_h = 2, 2·128^{1/3}, 2·128^{2/3}, 256."""
    model = build(decay_type="tnl", num_hidden_layers=4, num_heads=4)
    records = capture_decays(model)
    torch.testing.assert_close(records[0]["log_decay"][0], torch.tensor(-(1 + 1e-5) / 2, dtype=torch.float64),
                               rtol=1e-6, atol=0)
    torch.testing.assert_close(records[3]["log_decay"][3], torch.tensor(-1e-5 / 256, dtype=torch.float64),
                               rtol=1e-4, atol=0)
    torch.testing.assert_close(records[1]["log_decay"][2],
                               torch.tensor(-(1 - 1 / 3 + 1e-5) / (2 * 128 ** (2 / 3)), dtype=torch.float64),
                               rtol=1e-6, atol=0)


@pytest.mark.parametrize("layers,heads", TNL_SHAPES, ids=[f"L{l}-H{h}" for l, h in TNL_SHAPES])
def test_tnl_l_starts_at_tnl_values(layers, heads):
    model = build(decay_type="tnl_l", num_hidden_layers=layers, num_heads=heads)
    records = capture_decays(model)
    for index, (layer, record) in enumerate(zip(model.model.layers, records)):
        expected = tnl_formula(index, layers, heads)
        params = dict(layer.attn.decay.named_parameters())
        assert len(params) == 1 and next(iter(params.values())).shape == (heads,)
        assert bool((record["log_decay"] != 0).all())  # not zeroed (the authors' bug)
        torch.testing.assert_close(record["log_decay"], expected, rtol=1e-5, atol=0)
        assert bool((record["log_decay"] <= 0).all())


def test_tnl_l_stays_non_positive_when_trained_towards_growth():
    """log λ is kept ≤ 0 whatever its parameter becomes."""
    model = build(decay_type="tnl_l")
    with torch.no_grad():
        for layer in model.model.layers:
            for param in layer.attn.decay.parameters():
                param.add_(torch.tensor([-30.0, 30.0]))
    for record in capture_decays(model):
        assert bool((record["log_decay"] <= 0).all()) and bool(torch.isfinite(record["log_decay"]).all())


# ---------------------------------------------------------------------------------------------------------------
# HGRN2: learned per-layer lower bound
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["vector", "scalar"])
def test_hgrn2_lower_bounds_at_init(granularity):
    layers = 4
    model = build(decay_type="hgrn2", decay_granularity=granularity, num_hidden_layers=layers)
    width = 32 if granularity == "vector" else 2
    assert model.model.lower_bound_logits.shape == (layers, width)
    bounds = model.model.decay_contexts()
    assert len(bounds) == layers
    for index, gamma in enumerate(bounds):
        expected = torch.full((width,), index / layers, dtype=torch.float64)
        got = torch.zeros(width, dtype=torch.float64) if gamma is None else gamma.detach().double()
        assert got.shape == (width,)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # at init z ≈ 0, so λ ≈ γ_l + (1 − γ_l)/2
    for index, record in enumerate(capture_decays(model)):
        gamma = index / layers
        assert abs(median_decay(record) - (gamma + (1 - gamma) / 2)) <= 2e-2


@pytest.mark.parametrize("granularity", ["vector", "scalar"])
def test_hgrn2_decay_respects_lower_bound(granularity):
    layers = 4
    model = perturbed_model(tiny_config(decay_type="hgrn2", decay_granularity=granularity, num_hidden_layers=layers))
    with torch.no_grad():  # push the logits far out so that the bound becomes active
        for layer in model.model.layers:
            for param in layer.attn.decay_proj.parameters():
                param.mul_(60.0)
    bounds = model.model.decay_contexts()
    for index, (record, gamma) in enumerate(zip(capture_decays(model), bounds)):
        decay = record["log_decay"].exp()
        gamma = torch.zeros(decay.shape[-1], dtype=torch.float64) if gamma is None else gamma.detach().double()
        assert bool((decay >= gamma * (1 - 1e-6)).all()), f"layer {index}: λ below its lower bound"
        # the bound is reached (some λ within 1% of 1 − γ above it) and not exceeded: λ = γ + (1 − γ)·σ(z)
        slack = (decay - gamma) / (1 - gamma)
        assert float(slack.min()) < 1e-2, f"layer {index}: the bound is never approached (min slack {slack.min()})"
        expected = gamma + (1 - gamma) * torch.sigmoid(record["z"])
        assert relative_error(decay, expected) <= 1e-6


@pytest.mark.parametrize("granularity", ["vector", "scalar"])
def test_hgrn2_decay_never_exceeds_one(granularity):
    """λ = γ + (1 − γ)·σ(z) ≤ 1 for every z: log λ must not come out positive (L = 3 gives γ_2 = 2/3)."""
    model = perturbed_model(tiny_config(decay_type="hgrn2", decay_granularity=granularity, num_hidden_layers=3))
    with torch.no_grad():
        for layer in model.model.layers:
            for param in layer.attn.decay_proj.parameters():
                param.mul_(60.0)
    for index, record in enumerate(capture_decays(model, token_ids(4, 64))):
        worst = float(record["log_decay"].max())
        assert worst <= 0.0, f"layer {index}: log λ = {worst} > 0, i.e. λ > 1"


def test_hgrn2_without_lower_bound():
    model = build(decay_type="hgrn2", hgrn2_lower_bound=False, num_hidden_layers=3)
    assert model.model.lower_bound_logits is None
    assert not any("lower_bound" in name for name, _ in model.named_parameters())
    assert all(gamma is None for gamma in model.model.decay_contexts())
    for record in capture_decays(model):
        assert abs(median_decay(record) - 0.5) <= 2e-2  # λ = σ(z), z ≈ 0
        torch.testing.assert_close(record["log_decay"], F.logsigmoid(record["z"]), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# Mamba2 and its ablations
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["vector", "scalar"])
def test_mamba2_parameter_ranges(granularity):
    model = build(decay_type="mamba2", decay_granularity=granularity, hidden_size=128, num_heads=8,
                  num_hidden_layers=2)
    a = torch.cat([layer.attn.decay.A_log.detach().double().exp() for layer in model.model.layers])
    dt = torch.cat([F.softplus(layer.attn.decay.dt_bias.detach().double()) for layer in model.model.layers])
    assert a.numel() == dt.numel() == (256 if granularity == "vector" else 16)
    assert float(a.min()) >= 1.0 - 1e-5 and float(a.max()) <= 16.0 + 1e-4
    assert float(dt.min()) >= 1e-3 * (1 - 1e-4) and float(dt.max()) <= 0.1 * (1 + 1e-4)
    if granularity == "vector":  # spread over the ranges: A uniform on [1, 16], dt log-uniform on [1e-3, 0.1]
        assert float(a.min()) < 2.0 and float(a.max()) > 15.0
        assert abs(float(a.mean()) - 8.5) < 1.0
        assert float(dt.min()) < 1.5e-3 and float(dt.max()) > 0.07
        assert abs(float(dt.log().mean()) - math.log(1e-2)) < 0.4


def test_mamba2_custom_ranges_and_dt_floor():
    model = build(decay_type="mamba2", mamba2_a_init_range=(2.0, 3.0), mamba2_dt_min=0.01, mamba2_dt_max=0.02)
    for layer in model.model.layers:
        a = layer.attn.decay.A_log.detach().double().exp()
        dt = F.softplus(layer.attn.decay.dt_bias.detach().double())
        assert float(a.min()) >= 2.0 - 1e-5 and float(a.max()) <= 3.0 + 1e-5
        assert float(dt.min()) >= 0.01 * (1 - 1e-4) and float(dt.max()) <= 0.02 * (1 + 1e-4)
    # sampled dt below the floor is clamped to the floor (1e-4 by default)
    model = build(decay_type="mamba2", mamba2_dt_min=1e-6, mamba2_dt_max=1e-5)
    for layer in model.model.layers:
        dt = F.softplus(layer.attn.decay.dt_bias.detach().double())
        torch.testing.assert_close(dt, torch.full_like(dt, 1e-4), rtol=1e-3, atol=0)


ABLATIONS = {
    "mamba2": {"A_log", "dt_bias"},
    "mamba2_no_a": {"dt_bias"},
    "mamba2_no_dt": {"A_log"},
    "mamba2_no_a_no_dt": set(),
}


@pytest.mark.parametrize("granularity", ["vector", "scalar"])
@pytest.mark.parametrize("decay_type", list(ABLATIONS))
def test_mamba2_ablations_drop_exactly_their_parameters(decay_type, granularity):
    model = build(decay_type=decay_type, decay_granularity=granularity)
    width = 32 if granularity == "vector" else 2
    for layer in model.model.layers:
        params = dict(layer.attn.decay.named_parameters())
        assert set(params) == ABLATIONS[decay_type]
        assert all(p.shape == (width,) for p in params.values())
        assert layer.attn.decay_proj is not None  # f is kept by every ablation
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_parameters()}
    for dropped in {"A_log", "dt_bias"} - ABLATIONS[decay_type]:
        assert dropped not in names


# ---------------------------------------------------------------------------------------------------------------
# The decay formulas of DESIGN §2 on the unit's own inputs (perturbed weights, so z is far from 0)
# ---------------------------------------------------------------------------------------------------------------


def design_log_decay(decay_type, z, unit, lower_bound, config):
    if decay_type == "mamba2":
        return -unit.A_log.double().exp() * F.softplus(z + unit.dt_bias.double())
    if decay_type == "mamba2_no_a":
        return -F.softplus(z + unit.dt_bias.double())
    if decay_type == "mamba2_no_dt":
        return -unit.A_log.double().exp() * F.softplus(z)
    if decay_type == "mamba2_no_a_no_dt":
        return -F.softplus(z)
    if decay_type == "gla":
        return F.logsigmoid(z / config.gla_denominator)
    if decay_type == "simple":
        return F.logsigmoid(z + unit.delta.double())
    if decay_type == "hgrn2":
        gamma = 0.0 if lower_bound is None else lower_bound.detach().double()
        return torch.log(gamma + (1 - gamma) * torch.sigmoid(z))
    if decay_type == "lightnet":  # Z_t = log(e^0 + Σ_{s≤t} e^{z_s}), log λ_t = Z_{t−1} − Z_t
        running = torch.logcumsumexp(torch.cat([torch.zeros_like(z[:, :1]), z], 1), 1)
        return running[:, :-1] - running[:, 1:]
    raise AssertionError(decay_type)


DATA_DEPENDENT = ["mamba2", "mamba2_no_a", "mamba2_no_dt", "mamba2_no_a_no_dt", "gla", "simple", "hgrn2", "lightnet"]


@pytest.mark.parametrize("granularity", ["vector", "scalar"])
@pytest.mark.parametrize("decay_type", DATA_DEPENDENT)
def test_decay_formula_matches_design(decay_type, granularity):
    config = tiny_config(decay_type=decay_type, decay_granularity=granularity, gla_denominator=8.0,
                         simple_decay_init=0.9, num_hidden_layers=3)
    model = perturbed_model(config, scale=1.0)
    with torch.no_grad():
        for layer in model.model.layers:
            for param in layer.attn.decay_proj.parameters():
                param.mul_(20.0)
    for layer, record in zip(model.model.layers, capture_decays(model)):
        z = record["z"]
        assert z.shape == (2, 48, 32 if granularity == "vector" else 2)
        assert float(z.std()) > 0.3  # the check is not at z ≈ 0
        expected = design_log_decay(decay_type, z, layer.attn.decay, record["lower_bound"], config)
        assert relative_error(record["log_decay"], expected) <= 1e-5
        assert float(record["log_decay"].max()) <= 0.0, f"λ > 1: max log λ = {float(record['log_decay'].max())}"


SHAREABLE = ["mamba2", "gla", "hgrn2", "lightnet", "simple"]


@pytest.mark.parametrize("decay_type", SHAREABLE)
def test_shared_keys_follow_design(decay_type, monkeypatch):
    """DESIGN §3: z = W_k x (no silu) and k = 1 − λ (gla, hgrn2, simple, lightnet: exp(z_t − Z_t) = 1 − λ_t) or
    k = softplus(z + dt_bias) (mamba2); no separate decay projection."""
    model = perturbed_model(tiny_config(decay_type=decay_type, share_decay=True), scale=1.0)
    assert all(layer.attn.decay_proj is None for layer in model.model.layers)
    keys = []
    original = rec.BACKENDS["torch"]

    def spy(q, k, v, log_decay=None, **kwargs):
        keys.append(k.detach().double())
        return original(q, k, v, log_decay, **kwargs)

    monkeypatch.setitem(rec.BACKENDS, "torch", spy)
    monkeypatch.setenv("LINEAR_DECAY_BACKEND", "torch")
    x_inputs = []
    handles = [layer.attn.k_proj.register_forward_hook(lambda m, a, o: x_inputs.append((a[0].detach(), o.detach())))
               for layer in model.model.layers]
    records = capture_decays(model)
    for handle in handles:
        handle.remove()
    for layer, record, key, (x, k_out) in zip(model.model.layers, records, keys, x_inputs):
        z = record["z"]
        torch.testing.assert_close(z, (x.double() @ layer.attn.k_proj.weight.double().T), rtol=1e-5, atol=1e-5)
        if decay_type == "mamba2":
            expected = F.softplus(z + layer.attn.decay.dt_bias.double())
        elif decay_type == "lightnet":
            running = torch.logcumsumexp(torch.cat([torch.zeros_like(z[:, :1]), z], 1), 1)
            expected = torch.exp(z - running[:, 1:])
        else:
            expected = 1 - record["log_decay"].exp()
        assert relative_error(key.reshape(expected.shape), expected) <= 1e-5


# ---------------------------------------------------------------------------------------------------------------
# Linear layers, embeddings, norms, head (DESIGN §1)
# ---------------------------------------------------------------------------------------------------------------


def truncated_std(std):
    """Std of N(0, std²) truncated to [−2·std, 2·std]: std·sqrt(1 − 2·2·φ(2)/(2Φ(2) − 1))."""
    phi = math.exp(-2.0) / math.sqrt(2 * math.pi)
    mass = math.erf(2 / math.sqrt(2))
    return std * math.sqrt(1 - 4 * phi / mass)


@pytest.mark.parametrize("std", [0.02, 0.01])
def test_linear_and_embedding_weights_truncated_normal(std):
    overrides = dict(vocab_size=512, hidden_size=128, num_heads=2, num_hidden_layers=2, intermediate_size=None,
                     decay_rank=None, position_encoding="tpe")
    if std != 0.02:
        overrides["initializer_range"] = std
    model = build(**overrides)
    checked = 0
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Embedding)) or name.endswith(("down_proj", "tpe.out_proj")):
            continue
        w = module.weight.detach().double().flatten()
        assert float(w.abs().max()) <= 2 * std * (1 + 1e-6), f"{name}: outside ±2σ"
        assert float(w.abs().max()) > 1.8 * std, f"{name}: not reaching the truncation"
        assert abs(float(w.mean())) < 5 * std / math.sqrt(w.numel()), name
        assert abs(float(w.std()) / truncated_std(std) - 1) < 0.06, (name, float(w.std()))
        checked += 1
    # embeddings, head, and per layer q, k, v, o, decay low rank ×2, gate ×2, SwiGLU gate/up
    assert checked == 2 + 2 * 10


def test_zero_and_one_initialisations():
    model = build(position_encoding="tpe")
    for name, module in model.named_modules():
        if name.endswith("down_proj") or name.endswith("tpe.out_proj"):
            assert bool((module.weight == 0).all()), name
    norms = [(n, p) for n, p in model.named_parameters() if n.endswith("norm.weight")]
    assert len(norms) == 2 * 3 + 1  # attention norm, output norm, MLP norm per layer; final norm
    for name, param in norms:
        assert bool((param == 1).all()), name


def test_lm_head_untied_by_default():
    model = build(vocab_size=64)
    head, embed = model.lm_head.weight, model.model.embed_tokens.weight
    assert head.data_ptr() != embed.data_ptr()
    assert not torch.equal(head, embed)
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" in names and "model.embed_tokens.weight" in names
    with torch.no_grad():
        embed.add_(1.0)
    assert not torch.equal(head, embed)


def test_lm_head_tied_when_asked():
    model = build(vocab_size=64, tie_word_embeddings=True)
    head, embed = model.lm_head.weight, model.model.embed_tokens.weight
    assert head.data_ptr() == embed.data_ptr()
    with torch.no_grad():
        embed.add_(1.0)
    assert torch.equal(head, embed)
    untied = build(vocab_size=64)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(untied) - count(model) == 64 * 32
