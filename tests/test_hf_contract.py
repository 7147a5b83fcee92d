"""Parts of transformers' model contract (the behaviour its common model tests check): hidden states requested by the
config, a vocabulary resized with `resize_token_embeddings`, partial checkpoints, and export with transformers'
`DynamoExporter` (torch.export underneath).

References are independent of the path under test: the eager model, an explicit argument instead of the config's
default, `inputs_embeds` instead of ids, the saved tensors, the float64 step-by-step oracle.
"""

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from linear_decay import LinearDecayForCausalLM, LinearDecayModel
from linear_decay import recurrence as rec
from linear_decay.generation import LinearDecayCache
from linear_decay.modeling_linear_decay import CACHE_FIELD

from conftest import perturbed_model, relative_error, tiny_config

VOCAB = 64


def sample_ids(shape=(2, 9), seed=0, low=0, high=VOCAB):
    return torch.randint(low, high, shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------
# Hidden states: the forward argument defaults to config.output_hidden_states
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_class", [LinearDecayModel, LinearDecayForCausalLM], ids=lambda c: c.__name__)
def test_hidden_states_follow_the_config(model_class, tmp_path):
    perturbed_model(tiny_config(position_encoding="rope"), seed=2).save_pretrained(tmp_path)
    ids = sample_ids()
    plain = model_class.from_pretrained(tmp_path).eval()
    asking = model_class.from_pretrained(tmp_path, output_hidden_states=True).eval()
    assert asking.config.output_hidden_states and not plain.config.output_hidden_states
    with torch.no_grad():
        expected = plain(ids, use_cache=False, output_hidden_states=True).hidden_states  # the argument's path
        assert plain(ids, use_cache=False).hidden_states is None
        from_config = asking(ids, use_cache=False).hidden_states
        assert asking(ids, use_cache=False, output_hidden_states=False).hidden_states is None  # the argument wins
    assert len(from_config) == plain.config.num_hidden_layers + 1
    for actual, reference in zip(from_config, expected, strict=True):
        assert torch.equal(actual, reference)


@pytest.mark.parametrize("model_class", [LinearDecayModel, LinearDecayForCausalLM], ids=lambda c: c.__name__)
@pytest.mark.parametrize("position_encoding", ["none", "tpe"])
def test_retain_grad_on_hidden_states(model_class, position_encoding):
    """transformers' test_retain_grad_hidden_states_attentions: the first hidden state keeps its gradient."""
    config = tiny_config(position_encoding=position_encoding, decay_type="tnl_l", decay_granularity="scalar")
    config.output_hidden_states = True
    torch.manual_seed(0)
    model = model_class(config)
    outputs = model(sample_ids())
    hidden = outputs.hidden_states[0]
    hidden.retain_grad()
    outputs[0].flatten()[0].backward(retain_graph=True)
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all() and hidden.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------------
# resize_token_embeddings
# ---------------------------------------------------------------------------------------------------------------


def test_resized_vocabulary_takes_new_ids_and_rejects_ids_past_a_shrink():
    model = perturbed_model(tiny_config(), seed=3).eval()
    old_ids = sample_ids(seed=1)
    with torch.no_grad():
        before = model(old_ids, use_cache=False).logits

    model.resize_token_embeddings(VOCAB + 10, mean_resizing=False)
    assert model.config.vocab_size == VOCAB + 10
    new_ids = sample_ids(seed=2, low=VOCAB, high=VOCAB + 10)
    with torch.no_grad():
        logits = model(new_ids, use_cache=False).logits
        by_embeds = model(inputs_embeds=model.get_input_embeddings()(new_ids), use_cache=False).logits
        after = model(old_ids, use_cache=False).logits
    assert logits.shape == (2, 9, VOCAB + 10) and torch.isfinite(logits).all()
    assert torch.equal(logits, by_embeds)
    assert torch.equal(after[..., :VOCAB], before)  # the old rows of both embeddings are kept
    loss = model(new_ids, labels=new_ids, use_cache=False).loss  # labels in the new range are accepted
    assert torch.isfinite(loss)

    model.resize_token_embeddings(VOCAB - 14)
    assert model.config.vocab_size == VOCAB - 14
    with pytest.raises(ValueError, match=r"token id 55, outside the vocabulary \[0, 50\)"):
        model(torch.tensor([[3, 55]]), use_cache=False)


# ---------------------------------------------------------------------------------------------------------------
# Partial checkpoints load as transformers loads them; another design stays an error
# ---------------------------------------------------------------------------------------------------------------


def test_empty_state_dict_initialises_every_weight(monkeypatch):
    """transformers' test_can_init_all_missing_weights: from nothing, every weight is initialised by `_init_weights`
    as the constructor initialises it (each module's initialisation seeded alike, as that test does)."""
    from transformers import PreTrainedModel

    initialize = PreTrainedModel._initialize_weights

    def seeded(self, module, *args, **kwargs):
        torch.manual_seed(0)
        return initialize(self, module, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "_initialize_weights", seeded)
    config = tiny_config(decay_type="hgrn2", hgrn2_lower_bound=True, position_encoding="tpe")
    reference = LinearDecayForCausalLM(config)
    model, info = LinearDecayForCausalLM.from_pretrained(None, config=config, state_dict={}, output_loading_info=True)
    assert set(info["missing_keys"]) == set(reference.state_dict())
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def _rewrite_without(path, key):
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    del tensors[key]
    save_file(tensors, str(path), metadata=metadata)


@pytest.mark.parametrize("removed", ["model.layers.1.attn.v_proj.weight", "model.norm.weight"])
def test_checkpoint_missing_one_tensor_loads_the_rest(removed, tmp_path):
    model = perturbed_model(tiny_config(decay_type="mamba2"), seed=4)
    model.save_pretrained(tmp_path)
    _rewrite_without(tmp_path / "model.safetensors", removed)
    reloaded, info = LinearDecayForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert set(info["missing_keys"]) == {removed} and not info["unexpected_keys"]
    saved = model.state_dict()
    for key, value in reloaded.state_dict().items():
        if key != removed:
            assert torch.equal(value, saved[key]), key
    assert torch.isfinite(reloaded.state_dict()[removed]).all()


def test_checkpoint_of_another_design_is_still_an_error(tmp_path):
    perturbed_model(tiny_config(decay_type="mamba2"), seed=5).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "decay_type": "gla"}))
    with pytest.raises(ValueError, match="saved with decay_type='mamba2'"):
        LinearDecayForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    for depth in (1, 3):  # the depth is in no metadata: the layers the checkpoint lacks or adds tell
        with pytest.raises(ValueError, match="do not match its config"):
            LinearDecayForCausalLM.from_pretrained(tmp_path, num_hidden_layers=depth)


# ---------------------------------------------------------------------------------------------------------------
# Export (transformers' DynamoExporter, torch.export underneath)
# ---------------------------------------------------------------------------------------------------------------


def _export(model, inputs):
    from transformers.exporters.exporter_dynamo import DynamoConfig, DynamoExporter

    return DynamoExporter().export(model, inputs, DynamoConfig()).program.module()


EXPORTED = {
    "mamba2-vector-lrpe": dict(decay_type="mamba2", position_encoding="lrpe"),
    "tnl-scalar-padded": dict(decay_type="tnl", decay_granularity="scalar", position_encoding="rope"),
}


@pytest.mark.parametrize("use_cache", [False, True], ids=["no_cache", "cache"])
@pytest.mark.parametrize("name", list(EXPORTED))
def test_export_matches_eager(name, use_cache):
    model = perturbed_model(tiny_config(**EXPORTED[name]), seed=6).eval()
    inputs = {"input_ids": sample_ids(seed=7)}
    if name.endswith("padded"):
        mask = torch.ones(2, 9, dtype=torch.long)
        mask[0, :3] = 0
        inputs["attention_mask"] = mask
    program = _export(model, {**inputs, "use_cache": use_cache})
    exported = program(**inputs)
    with torch.no_grad():
        eager = model(**inputs, use_cache=use_cache)
    assert relative_error(exported.logits, eager.logits) <= 1e-5
    if use_cache:
        cache, reference = exported[CACHE_FIELD], eager[CACHE_FIELD]
        assert isinstance(cache, LinearDecayCache) and cache.seen_tokens == reference.seen_tokens == 9
        names = [sorted(layer.tensors) for layer in reference._all_layers()]
        assert [sorted(layer.tensors) for layer in cache._all_layers()] == names
        for actual, expected in zip(cache.state_tensors(), reference.state_tensors(), strict=True):
            assert relative_error(actual, expected) <= 1e-5
    else:
        assert CACHE_FIELD not in exported or exported[CACHE_FIELD] is None


def test_exported_decoding_step_continues_the_cache():
    """A one-token step exported with a cache as input: same logits and states as the eager step."""
    model = perturbed_model(tiny_config(decay_type="lightnet", position_encoding="rope"), seed=8).eval()
    ids = sample_ids(seed=9)
    with torch.no_grad():
        prefill = model(ids, use_cache=True)[CACHE_FIELD]
        program = _export(model, {"input_ids": ids[:, :1], "cache": copy.deepcopy(prefill), "use_cache": True})
        exported = program(input_ids=ids[:, 1:2], cache=copy.deepcopy(prefill))
        eager = model(ids[:, 1:2], cache=prefill, use_cache=True)
    assert relative_error(exported.logits, eager.logits) <= 1e-5
    for actual, expected in zip(exported[CACHE_FIELD].state_tensors(), eager[CACHE_FIELD].state_tensors(),
                                strict=True):
        assert relative_error(actual, expected) <= 1e-5


class _Recurrence(torch.nn.Module):
    def forward(self, q, k, v, log_decay):
        return rec.chunked_recurrence(q, k, v, log_decay, output_final_state=True)


def test_exported_recurrence_handles_strong_chunks():
    """Chunks past FACTORISED_DECAY_LIMIT next to mild ones: the traced selection (no host read) matches the float64
    oracle (DESIGN §1 recurrence)."""
    generator = torch.Generator().manual_seed(10)
    batch, length, heads, dim = 1, 96, 3, 8
    q, k, v = (torch.randn(batch, length, heads, dim, generator=generator) for _ in range(3))
    log_decay = -0.3 * torch.rand(batch, length, heads, dim, generator=generator)
    log_decay[:, :, 1] -= 8.0  # every chunk far past the limit
    log_decay[:, 50:, 2] -= 4.0  # mild, then strong
    program = torch.export.export(_Recurrence(), (q, k, v, log_decay)).module()
    o, state = program(q, k, v, log_decay)
    o_ref, state_ref = rec.naive_recurrence(q.double(), k.double(), v.double(), log_decay.double(),
                                            output_final_state=True)
    assert relative_error(o, o_ref) <= 1e-6 and relative_error(state, state_ref) <= 1e-6
