"""LinearDecayConfig: validation of every field, the supported design space, presets, JSON round trip.

Expected values are derived here from DESIGN.md §1–§4, not read back from the package.
"""

import itertools
import math
import re

import pytest
import torch

from linear_decay import DECAY_TYPES, LinearDecayConfig, LinearDecayForCausalLM, valid_combinations
from linear_decay.configuration_linear_decay import combination_error

from conftest import tiny_config

# ---------------------------------------------------------------------------------------------------------------
# The design space, written out from DESIGN §2–§4
# ---------------------------------------------------------------------------------------------------------------

ALL_DECAYS = ("mamba2", "mamba2_no_a", "mamba2_no_dt", "mamba2_no_a_no_dt", "gla", "hgrn2", "lightnet", "tnl", "tnl_l",
              "simple", "none")
SCALAR_ONLY = {"tnl", "tnl_l", "none"}  # §2: tnl, tnl_l scalar only; `none` is scalar only in this implementation
SHAREABLE = {"mamba2", "gla", "hgrn2", "lightnet", "simple"}  # §3, vector only
GRANULARITIES = ("vector", "scalar")
POSITIONS = ("none", "rope", "lrpe", "tpe")  # §4: every position encoding with every decay


def expected_valid_set():
    valid = set()
    for decay, gran, share, pos in itertools.product(ALL_DECAYS, GRANULARITIES, (False, True), POSITIONS):
        if decay in SCALAR_ONLY and gran == "vector":
            continue
        if share and (decay not in SHAREABLE or gran != "vector"):
            continue
        valid.add((decay, gran, share, pos))
    return valid


def combo_kwargs(combo):
    decay, gran, share, pos = combo
    return dict(decay_type=decay, decay_granularity=gran, share_decay=share, position_encoding=pos)


def names(field, value):
    """Regex: the error message names the field and the value given (as repr)."""
    return re.escape(f"{field}={value!r}")


def test_decay_types_are_the_designed_ones():
    assert set(DECAY_TYPES) == set(ALL_DECAYS)


def test_valid_combinations_equals_design_space():
    combos = valid_combinations()
    assert len(combos) == len(set(combos)), "duplicates in valid_combinations()"
    assert set(combos) == expected_valid_set()
    # 8 data-dependent/learned types × 2 granularities + 3 scalar-only types, × 4 positions, + 5 shareable × 4
    assert len(combos) == (8 * 2 + 3) * 4 + 5 * 4


@pytest.mark.parametrize("combo", sorted(expected_valid_set()), ids=lambda c: "-".join(map(str, c)))
def test_every_valid_combination_builds(combo):
    config = tiny_config(**combo_kwargs(combo))
    assert (config.decay_type, config.decay_granularity, config.share_decay, config.position_encoding) == combo
    assert combination_error(*combo) is None


def invalid_combinations():
    grid = itertools.product(ALL_DECAYS, GRANULARITIES, (False, True), POSITIONS)
    return [c for c in grid if c not in expected_valid_set()]


@pytest.mark.parametrize("combo", invalid_combinations(), ids=lambda c: "-".join(map(str, c)))
def test_every_invalid_combination_raises(combo):
    decay, gran, share, pos = combo
    expected = []
    if decay in SCALAR_ONLY and gran == "vector":
        expected.append(names("decay_granularity", gran))
    if share and (decay not in SHAREABLE or gran != "vector"):
        expected.append(names("share_decay", share))
    assert expected
    with pytest.raises(ValueError, match="|".join(expected)):
        tiny_config(**combo_kwargs(combo))


# ---------------------------------------------------------------------------------------------------------------
# Field-by-field validation: each bad value raises ValueError naming the field and the value
# ---------------------------------------------------------------------------------------------------------------

BAD_FIELDS = [
    # unknown names
    ("decay_type", dict(decay_type="mamba3"), "decay_type", "mamba3"),
    ("decay_type_case", dict(decay_type="GLA"), "decay_type", "GLA"),
    ("decay_type_none", dict(decay_type=None), "decay_type", None),
    ("decay_type_list", dict(decay_type=["gla"]), "decay_type", ["gla"]),
    ("granularity", dict(decay_granularity="matrix"), "decay_granularity", "matrix"),
    ("granularity_int", dict(decay_granularity=1), "decay_granularity", 1),
    ("position", dict(position_encoding="alibi"), "position_encoding", "alibi"),
    ("position_none_obj", dict(position_encoding=None), "position_encoding", None),
    # sharing with a non-shareable type or scalar granularity (DESIGN §3)
    *[(f"share_{t}", dict(decay_type=t, share_decay=True), "share_decay", True)
      for t in ("mamba2_no_a", "mamba2_no_dt", "mamba2_no_a_no_dt")],
    *[(f"share_{t}_scalar", dict(decay_type=t, decay_granularity="scalar", share_decay=True), "share_decay", True)
      for t in ("tnl", "tnl_l", "none")],
    *[(f"share_scalar_{t}", dict(decay_type=t, decay_granularity="scalar", share_decay=True), "share_decay", True)
      for t in sorted(SHAREABLE)],
    # static decays with vector granularity
    *[(f"vector_{t}", dict(decay_type=t, decay_granularity="vector"), "decay_granularity", "vector")
      for t in sorted(SCALAR_ONLY)],
    # shapes
    ("heads_not_dividing", dict(num_heads=3), "num_heads", 3),
    ("heads_not_dividing_5", dict(hidden_size=32, num_heads=5), "num_heads", 5),
    ("heads_more_than_hidden", dict(hidden_size=32, num_heads=64), "num_heads", 64),
    ("head_dim_small", dict(head_dim=8), "head_dim", 8),
    ("head_dim_large", dict(head_dim=32), "head_dim", 32),
    ("hidden_zero", dict(hidden_size=0), "hidden_size", 0),
    ("hidden_float", dict(hidden_size=32.0), "hidden_size", 32.0),
    ("heads_zero", dict(num_heads=0), "num_heads", 0),
    ("heads_negative", dict(num_heads=-2), "num_heads", -2),
    ("heads_bool", dict(num_heads=True), "num_heads", True),
    ("layers_zero", dict(num_hidden_layers=0), "num_hidden_layers", 0),
    ("vocab_negative", dict(vocab_size=-1), "vocab_size", -1),
    ("intermediate_zero", dict(intermediate_size=0), "intermediate_size", 0),
    ("rank_zero", dict(decay_rank=0), "decay_rank", 0),
    ("rank_float", dict(decay_rank=4.5), "decay_rank", 4.5),
    # Simple Decay p in (0, 1)
    *[(f"simple_p_{p}", dict(decay_type="simple", simple_decay_init=p), "simple_decay_init", p)
      for p in (0, 1, -0.1, 1.5, 0.0, 1.0)],
    ("simple_p_nan", dict(simple_decay_init=float("nan")), "simple_decay_init", float("nan")),
    ("simple_p_str", dict(simple_decay_init="0.9"), "simple_decay_init", "0.9"),
    # GLA denominator > 0
    *[(f"gla_den_{d}", dict(decay_type="gla", gla_denominator=d), "gla_denominator", d) for d in (0, -16.0)],
    ("gla_den_inf", dict(gla_denominator=float("inf")), "gla_denominator", float("inf")),
    # mamba2 ranges
    ("a_range_reversed", dict(mamba2_a_init_range=(16.0, 1.0)), "mamba2_a_init_range", (16.0, 1.0)),
    ("a_range_zero", dict(mamba2_a_init_range=(0.0, 16.0)), "mamba2_a_init_range", (0.0, 16.0)),
    ("a_range_negative", dict(mamba2_a_init_range=(-1.0, 16.0)), "mamba2_a_init_range", (-1.0, 16.0)),
    ("a_range_len1", dict(mamba2_a_init_range=(1.0,)), "mamba2_a_init_range", (1.0,)),
    ("a_range_len3", dict(mamba2_a_init_range=(1.0, 2.0, 3.0)), "mamba2_a_init_range", (1.0, 2.0, 3.0)),
    ("a_range_scalar", dict(mamba2_a_init_range=5), "mamba2_a_init_range", 5),
    ("dt_min_zero", dict(mamba2_dt_min=0.0), "mamba2_dt_min", 0.0),
    ("dt_min_above_max", dict(mamba2_dt_min=0.5, mamba2_dt_max=0.1), "mamba2_dt_min", 0.5),
    ("dt_max_negative", dict(mamba2_dt_max=-1.0), "mamba2_dt_max", -1.0),
    ("dt_floor_zero", dict(mamba2_dt_init_floor=0.0), "mamba2_dt_init_floor", 0.0),
    ("dt_floor_negative", dict(mamba2_dt_init_floor=-1e-4), "mamba2_dt_init_floor", -1e-4),
    # flags must be bools
    ("share_int", dict(share_decay=1), "share_decay", 1),
    ("share_str", dict(share_decay="True"), "share_decay", "True"),
    ("hgrn2_bound_int", dict(hgrn2_lower_bound=0), "hgrn2_lower_bound", 0),
    ("hgrn2_bound_none", dict(hgrn2_lower_bound=None), "hgrn2_lower_bound", None),
    ("gate_str", dict(use_output_gate="yes"), "use_output_gate", "yes"),
    ("use_cache_int", dict(use_cache=1), "use_cache", 1),
    ("tie_str", dict(tie_word_embeddings="yes"), "tie_word_embeddings", "yes"),
    # position encoding parameters
    ("rope_theta_one", dict(rope_theta=1.0), "rope_theta", 1.0),
    ("rope_theta_negative", dict(rope_theta=-10000.0), "rope_theta", -10000.0),
    ("rope_fraction_zero", dict(rope_fraction=0.0), "rope_fraction", 0.0),
    ("rope_fraction_above_one", dict(rope_fraction=1.5), "rope_fraction", 1.5),
    ("rope_fraction_no_channel", dict(position_encoding="rope", rope_fraction=0.05), "rope_fraction", 0.05),
    # positive numbers
    ("attention_scale_zero", dict(attention_scale=0.0), "attention_scale", 0.0),
    ("rms_eps_negative", dict(rms_norm_eps=-1e-5), "rms_norm_eps", -1e-5),
    ("loss_chunk_negative", dict(loss_chunk_size=-1), "loss_chunk_size", -1),
    ("loss_chunk_float", dict(loss_chunk_size=0.5), "loss_chunk_size", 0.5),
    ("init_range_zero", dict(initializer_range=0.0), "initializer_range", 0.0),
    # fast paths
    ("kernel_backend_unknown", dict(kernel_backend="cuda"), "kernel_backend", "cuda"),
    ("fuse_norm_int", dict(fuse_norm=1), "fuse_norm", 1),
    ("fuse_cross_entropy_none", dict(fuse_cross_entropy=None), "fuse_cross_entropy", None),
]


@pytest.mark.parametrize("overrides,field,value", [c[1:] for c in BAD_FIELDS], ids=[c[0] for c in BAD_FIELDS])
def test_bad_field_raises_value_error_naming_field_and_value(overrides, field, value):
    with pytest.raises(ValueError, match=names(field, value)):
        tiny_config(**overrides)


@pytest.mark.parametrize("p", [1e-6, 0.5, 0.8, 0.9, 0.95, 0.99, 1 - 1e-6])
def test_simple_decay_init_inside_open_interval_is_accepted(p):
    assert tiny_config(decay_type="simple", simple_decay_init=p).simple_decay_init == p


def test_defaults_resolved_from_design():
    config = tiny_config()
    assert config.head_dim == 32 // 2
    assert config.decay_type == "mamba2" and config.decay_granularity == "vector"
    assert config.share_decay is False and config.position_encoding == "none"
    assert config.simple_decay_init == 0.99 and config.gla_denominator == 16.0
    assert tuple(config.mamba2_a_init_range) == (1.0, 16.0)
    assert (config.mamba2_dt_min, config.mamba2_dt_max, config.mamba2_dt_init_floor) == (1e-3, 0.1, 1e-4)
    assert config.attention_scale == 1.0 and config.rms_norm_eps == 1e-5 and config.initializer_range == 0.02
    assert config.tie_word_embeddings is False
    # static decays default to their only granularity
    for decay in SCALAR_ONLY:
        assert tiny_config(decay_type=decay).decay_granularity == "scalar"
    # decay rank defaults to the head dim (DESIGN §1: r = e)
    assert LinearDecayConfig(hidden_size=64, num_heads=4, num_hidden_layers=1, vocab_size=16).decay_rank == 16


def test_lrpe_doubles_key_dim():
    assert tiny_config(position_encoding="lrpe").key_dim == 2 * 16
    for pos in ("none", "rope", "tpe"):
        assert tiny_config(position_encoding=pos).key_dim == 16


# ---------------------------------------------------------------------------------------------------------------
# Presets (DESIGN §1)
# ---------------------------------------------------------------------------------------------------------------


def swiglu_width(d):
    """8/3·d rounded up to a multiple of 256, in integer arithmetic."""
    return 256 * -(-8 * d // (3 * 256))


PAPER_SIZES = {"160m": (768, 12, 12), "410m": (1024, 24, 16), "1.45b": (2048, 24, 32), "tiny": (128, 4, 2)}


@pytest.mark.parametrize("name", list(PAPER_SIZES))
def test_presets_have_design_sizes(name):
    d, layers, heads = PAPER_SIZES[name]
    config = LinearDecayConfig.from_preset(name)
    assert (config.hidden_size, config.num_hidden_layers, config.num_heads) == (d, layers, heads)
    assert config.head_dim == 64
    assert config.hidden_size == config.num_heads * config.head_dim
    assert config.tie_word_embeddings is False
    assert config.intermediate_size == swiglu_width(d)
    assert config.intermediate_size % 256 == 0 and config.intermediate_size >= 8 * d / 3
    assert config.intermediate_size - 256 < 8 * d / 3
    if name != "tiny":
        assert 49_000 <= config.vocab_size <= 51_000  # "vocab ≈ 50k"


def test_swiglu_widths_spelled_out():
    assert [swiglu_width(d) for d in (768, 1024, 2048)] == [2048, 2816, 5632]
    assert [LinearDecayConfig.from_preset(n).intermediate_size for n in ("160m", "410m", "1.45b")] == [2048, 2816, 5632]


def test_preset_overrides_and_validation():
    config = LinearDecayConfig.from_preset("160m", decay_type="gla", num_hidden_layers=2, share_decay=True)
    assert (config.decay_type, config.num_hidden_layers, config.share_decay) == ("gla", 2, True)
    assert config.hidden_size == 768
    with pytest.raises(ValueError, match=names("num_heads", 7)):
        LinearDecayConfig.from_preset("410m", num_heads=7)
    with pytest.raises(ValueError, match=names("decay_type", "mamba3")):
        LinearDecayConfig.from_preset("tiny", decay_type="mamba3")


@pytest.mark.parametrize("name", ["bogus", "160M", "1.3b", ""])
def test_unknown_preset_raises(name):
    with pytest.raises(ValueError, match=names("preset", name)):
        LinearDecayConfig.from_preset(name)


def layer_param_count(d, e, r, ff, decay_params):
    return (4 * d * d  # q, k, v, o
            + (d * r + r * d)  # vector decay low rank d -> r -> d
            + (d * e + e * d)  # output gate d -> e -> d
            + 3 * d * ff  # SwiGLU
            + 3 * d  # attention norm, output norm, MLP norm
            + decay_params)


@pytest.mark.parametrize("tied", [False, True])
def test_160m_parameter_count(tied):
    config = LinearDecayConfig.from_preset("160m", tie_word_embeddings=tied)
    d, layers, vocab, e = 768, 12, config.vocab_size, 64
    per_layer = layer_param_count(d, e, r=64, ff=2048, decay_params=2 * d)  # mamba2 default: A_log, dt_bias of size d
    expected = layers * per_layer + vocab * d * (1 if tied else 2) + d  # embeddings, (untied) head, final norm
    with torch.device("meta"):
        model = LinearDecayForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == expected
    if not tied:
        assert 150e6 <= expected <= 175e6  # "160M" in the paper's counting (untied)


def test_scalar_decay_parameter_count():
    """Scalar decay: one Linear d -> H instead of the low rank pair; decay parameters of width H."""
    config = tiny_config(decay_type="mamba2", decay_granularity="scalar")
    d, h, e, vocab, ff, layers = 32, 2, 16, 64, 64, 2
    per_layer = 4 * d * d + d * h + 2 * d * e + 3 * d * ff + 3 * d + 2 * h
    with torch.device("meta"):
        model = LinearDecayForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == layers * per_layer + 2 * vocab * d + d


# ---------------------------------------------------------------------------------------------------------------
# Save / load round trip
# ---------------------------------------------------------------------------------------------------------------

FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "head_dim", "intermediate_size", "decay_type",
          "decay_granularity", "share_decay", "decay_rank", "simple_decay_init", "gla_denominator",
          "mamba2_a_init_range", "mamba2_dt_min", "mamba2_dt_max", "mamba2_dt_init_floor", "hgrn2_lower_bound",
          "position_encoding", "rope_theta", "rope_fraction", "use_output_gate", "attention_scale", "rms_norm_eps",
          "loss_chunk_size", "initializer_range", "tie_word_embeddings", "use_cache", "kernel_backend", "fuse_norm",
          "fuse_swiglu", "fuse_decay", "fuse_cross_entropy")


def field_values(config):
    values = {f: getattr(config, f) for f in FIELDS}
    values["mamba2_a_init_range"] = tuple(values["mamba2_a_init_range"])
    return values


NON_DEFAULT = dict(
    vocab_size=80, hidden_size=48, num_hidden_layers=3, num_heads=3, head_dim=16, intermediate_size=96,
    decay_type="simple", decay_granularity="vector", share_decay=True, decay_rank=5, simple_decay_init=0.9,
    gla_denominator=8.0, mamba2_a_init_range=(2.0, 8.0), mamba2_dt_min=2e-3, mamba2_dt_max=0.05,
    mamba2_dt_init_floor=2e-4, hgrn2_lower_bound=False, position_encoding="rope", rope_theta=500.0,
    rope_fraction=0.5, use_output_gate=False, attention_scale=0.125, rms_norm_eps=1e-6, loss_chunk_size=96,
    initializer_range=0.01,
    tie_word_embeddings=True, use_cache=False, kernel_backend="torch", fuse_norm=False, fuse_swiglu=False,
    fuse_decay=False, fuse_cross_entropy=False,
)


@pytest.mark.parametrize("overrides", [{}, NON_DEFAULT], ids=["defaults", "every_field_changed"])
def test_save_load_round_trip(tmp_path, overrides):
    config = LinearDecayConfig(**overrides)
    for field, value in overrides.items():
        got = getattr(config, field)
        assert (tuple(got) if field == "mamba2_a_init_range" else got) == value, field
    config.save_pretrained(tmp_path)
    loaded = LinearDecayConfig.from_pretrained(tmp_path)
    assert type(loaded) is LinearDecayConfig
    assert field_values(loaded) == field_values(config)
    # and through a plain JSON string
    again = LinearDecayConfig.from_json_file(str(tmp_path / "config.json"))
    assert field_values(again) == field_values(config)
    assert math.isclose(loaded.rope_theta, config.rope_theta)


def test_auto_config_round_trip(tmp_path):
    from transformers import AutoConfig

    config = tiny_config(decay_type="hgrn2", decay_granularity="scalar", position_encoding="lrpe")
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, LinearDecayConfig)
    assert field_values(loaded) == field_values(config)


def test_loading_an_invalid_json_raises(tmp_path):
    tiny_config().save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    path.write_text(path.read_text().replace('"decay_type": "mamba2"', '"decay_type": "mamba3"'))
    with pytest.raises(ValueError, match=names("decay_type", "mamba3")):
        LinearDecayConfig.from_pretrained(tmp_path)
