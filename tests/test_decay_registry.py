"""The decay registry is closed (DESIGN §2): a parameterization written in one place (here, this file) with its own
parameters, a parameter shared by every layer's unit and a state carried through the cache builds, trains, decodes
from the cache and round-trips a checkpoint, with nothing else changed."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from linear_decay import LinearDecayConfig, LinearDecayForCausalLM
from linear_decay.decay import DECAY_REGISTRY, DecayParameterization, register_decay
from linear_decay.modeling_linear_decay import CACHE_FIELD

from conftest import TINY, perturbed_model, relative_error


class CountedDecay(DecayParameterization):
    """log λ_t = −softplus(z_t + b) · r_l / (1 + n_t): b the unit's own bias, r_l = softplus(R_l) a rate per layer
    from one backbone parameter R [L], n_t the row's real tokens before t (the unit's state, carried by the cache)."""

    position_dependent = True
    state_name = "tokens_seen"
    model_parameter_names = ("counted_rate_logits",)

    def __init__(self, config, layer_idx, width):
        super().__init__(config, layer_idx, width)
        self.bias = nn.Parameter(torch.empty(width))

    @classmethod
    def model_parameters(cls, config):
        return {"counted_rate_logits": nn.Parameter(torch.empty(config.num_hidden_layers))}

    @classmethod
    def layer_contexts(cls, model):
        return list(F.softplus(model.counted_rate_logits.float()).unbind(0))

    @classmethod
    @torch.no_grad()
    def reset_model_parameters(cls, model, config):
        model.counted_rate_logits.fill_(0.5)

    @torch.no_grad()
    def reset_parameters(self, config):
        self.bias.fill_(-1.0)

    def log_decay(self, z, mask=None, context=None, state=None, device=None):
        real = torch.ones(z.shape[:2], device=z.device) if mask is None else mask.float()
        seen = real.new_zeros(z.shape[0]) if state is None else state
        before = seen[:, None] + torch.cumsum(real, dim=1) - real
        log_decay = -F.softplus(z + self.bias.float()) * context / (1.0 + before).view(*before.shape, 1)
        return log_decay, seen + real.sum(dim=1)


@pytest.fixture(autouse=True)
def counted_decay():
    register_decay("counted")(CountedDecay)
    yield
    del DECAY_REGISTRY["counted"]


def counted_model(seed=0, **overrides):
    return perturbed_model(LinearDecayConfig(**{**TINY, "decay_type": "counted", **overrides}), seed=seed)


@pytest.mark.parametrize("granularity", ["vector", "scalar"])
def test_new_decay_trains_every_parameter(granularity):
    model = counted_model(decay_granularity=granularity)
    assert model.model.counted_rate_logits.shape == (TINY["num_hidden_layers"],)
    ids = torch.randint(0, TINY["vocab_size"], (2, 20), generator=torch.Generator().manual_seed(1))
    model(ids, labels=ids).loss.backward()
    for name in ("model.counted_rate_logits", "model.layers.0.attn.decay.bias", "model.layers.1.attn.decay.bias"):
        grad = model.get_parameter(name).grad
        assert grad is not None and bool(grad.abs().sum() > 0), f"{name} got no gradient"


def test_new_decay_state_is_carried_by_the_cache():
    """Token-by-token decoding from the cache gives the uncached forward's logits: the unit's count of seen tokens
    (its state) went through the cache."""
    model = counted_model(seed=2).eval()
    ids = torch.randint(0, TINY["vocab_size"], (2, 14), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :6], use_cache=True)
        cache, steps = getattr(out, CACHE_FIELD), [out.logits]
        for t in range(6, ids.shape[1]):
            out = model(ids[:, t:t + 1], use_cache=True, **{CACHE_FIELD: cache})
            cache = getattr(out, CACHE_FIELD)
            steps.append(out.logits)
    assert relative_error(torch.cat(steps, dim=1), full) < 1e-5
    for layer in cache.layers:
        assert torch.equal(layer.get("tokens_seen"), torch.full((2,), float(ids.shape[1])))


def test_new_decay_checkpoint_round_trip(tmp_path):
    model = counted_model(seed=4).eval()
    model.save_pretrained(tmp_path)
    reloaded = LinearDecayForCausalLM.from_pretrained(tmp_path).eval()
    assert "model.counted_rate_logits" in reloaded.state_dict()
    ids = torch.randint(0, TINY["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
