"""Decay parameterizations: the `decay_type` switch of DESIGN.md §2 (and the key sharing of §3).

Every parameterization is one small module registered in `DECAY_REGISTRY` with what it supports. A unit maps decay
logits `z` (fp32, last dim = decay width D: d for vector decay, H for scalar) to log λ of the same shape, or, for the
static decays (`tnl`, `tnl_l`, `none`), to one log λ per head. A unit owns everything its parameterization needs
beyond the logits: its parameters, parameters shared by all layers' units (`model_parameters`, held by the backbone,
e.g. HGRN2's lower bounds) and the state it carries from one call to the next (`state_name`, held by the cache, e.g.
LightNet's normaliser). Adding a variant means adding one class here.

All decay arithmetic is fp32 (DESIGN §2).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class DecaySpec:
    """What a decay type supports; `configuration_linear_decay` validates configs against it."""

    name: str
    module: type
    granularities: tuple  # subset of ("vector", "scalar"); the first one is the default
    shareable: bool  # may derive keys from the decay (DESIGN §3)
    data_dependent: bool  # needs the decay-logit projection f(x)


DECAY_REGISTRY: dict = {}


def register_decay(name, *, granularities=("vector", "scalar"), shareable=False, data_dependent=True):
    def wrap(cls):
        DECAY_REGISTRY[name] = DecaySpec(name, cls, tuple(granularities), shareable, data_dependent)
        cls.decay_type = name
        return cls

    return wrap


class DecayParameterization(nn.Module):
    """Base unit. `forward(z, mask, context, state_layer)` returns log λ; a subclass implements
    `log_decay(z, mask, context, state, device) -> (log λ, state)`.

    `z` comes in the projection's dtype; `log_decay` sees it in fp32.
    `mask` ([B, T] bool, True = real token) makes padded positions keep the state untouched: log λ = 0 there (DESIGN §1).
    `context`: this layer's share of the unit's model-level parameters (`layer_contexts`), None without any.
    `state`: the unit's recurrent state (`state_name`), read from and written back to the cache's `state_layer`; None
    when the unit keeps none or nothing came before.
    Static decays (no logits, `z=None`) return one log λ per head on `device`.
    `softplus_kernel` (the model passes ops_decay.softplus_decay on the GPU): units whose log λ has
    the form −c ⊙ softplus(z + b) (`softplus_form`: mamba2 and its ablations) compute it in that one fused kernel
    instead of `log_decay`.
    """

    decay_type = None
    position_dependent = False  # log λ_t depends on the tokens before t (restarts with each packed document)
    state_name = None  # the cache entry of the state the unit carries across calls (`log_decay`'s `state`)
    model_parameter_names = ()  # the backbone parameters `model_parameters` makes (checkpoint keys)

    @classmethod
    def model_parameters(cls, config):
        """{name: parameter or None} the backbone registers for every layer's unit of this type (`layer_contexts`
        splits them per layer); names as in `model_parameter_names`."""
        return {}

    @classmethod
    def layer_contexts(cls, model):
        """One `context` per layer, from the parameters `model_parameters` gave `model` (the backbone)."""
        return [None] * len(model.layers)

    @classmethod
    @torch.no_grad()
    def reset_model_parameters(cls, model, config):
        """Initialise the parameters of `model_parameters` on `model` (DESIGN §2); called from `_init_weights`."""

    def __init__(self, config, layer_idx, width):
        super().__init__()
        self.layer_idx = layer_idx
        self.width = width

    def log_decay(self, z, mask=None, context=None, state=None, device=None):
        raise NotImplementedError

    def softplus_form(self):
        """(c, b) with log λ = −c ⊙ softplus(z + b) (each [D] fp32, or None for 1 and 0), for units of that form;
        None otherwise."""
        return None

    def forward(self, z, mask=None, context=None, state_layer=None, device=None, softplus_kernel=None):
        form = self.softplus_form() if softplus_kernel is not None and z is not None else None
        if form is not None:
            log_decay = softplus_kernel(z, *form)
        else:
            z = z.float() if z is not None else None
            keeps_state = self.state_name is not None and state_layer is not None
            state = state_layer.get(self.state_name) if keeps_state else None
            log_decay, state = self.log_decay(z, mask=mask, context=context, state=state, device=device)
            if keeps_state:
                state_layer.set(self.state_name, state)
        if mask is not None:
            if log_decay.dim() == 1:  # static decay: padding needs per-token values, so expand only then
                if not torch.compiler.is_compiling() and bool(mask.all()):  # eager decides on the host; traced
                    return log_decay  # graphs read no device value and always expand
                log_decay = log_decay.expand(*mask.shape, -1)
            log_decay = log_decay.masked_fill(~_expand_mask(mask, log_decay), 0.0)
        return log_decay

    def shared_key(self, z, log_decay):
        """Key derived from the decay when `share_decay=True` (DESIGN §3): k = 1 − λ unless a unit says otherwise."""
        return -torch.expm1(log_decay)

    @torch.no_grad()
    def reset_parameters(self, config):
        """Initialise the unit's own parameters (DESIGN §2); called from `_init_weights`."""


def _expand_mask(mask, like):
    return mask.view(*mask.shape, *([1] * (like.dim() - mask.dim())))


def _inverse_softplus(x):
    return x + torch.log(-torch.expm1(-x))


@register_decay("mamba2", shareable=True)
class Mamba2Decay(DecayParameterization):
    """log λ = −exp(A_log)·softplus(z + dt_bias); the ablations drop A and/or dt_bias."""

    use_a = True
    use_dt_bias = True

    def __init__(self, config, layer_idx, width):
        super().__init__(config, layer_idx, width)
        if self.use_a:
            self.A_log = nn.Parameter(torch.empty(width))
        if self.use_dt_bias:
            self.dt_bias = nn.Parameter(torch.empty(width))

    def time_step(self, z):
        return F.softplus(z + self.dt_bias.float() if self.use_dt_bias else z)

    def log_decay(self, z, mask=None, context=None, state=None, device=None):
        dt = self.time_step(z)
        return (-torch.exp(self.A_log.float()) * dt if self.use_a else -dt), state

    def shared_key(self, z, log_decay):
        return self.time_step(z)

    def softplus_form(self):
        return (torch.exp(self.A_log.float()) if self.use_a else None,
                self.dt_bias.float() if self.use_dt_bias else None)

    @torch.no_grad()
    def reset_parameters(self, config):
        from transformers import initialization as init

        if self.use_a:
            low, high = config.mamba2_a_init_range
            init.copy_(self.A_log, torch.log(torch.empty(self.width).uniform_(low, high)))
        if self.use_dt_bias:
            log_min, log_max = math.log(config.mamba2_dt_min), math.log(config.mamba2_dt_max)
            dt = torch.exp(torch.empty(self.width).uniform_(log_min, log_max)).clamp(min=config.mamba2_dt_init_floor)
            init.copy_(self.dt_bias, _inverse_softplus(dt))


@register_decay("mamba2_no_a")
class Mamba2NoADecay(Mamba2Decay):
    """Mamba2 ablation without A: log λ = −softplus(z + dt_bias)."""

    use_a = False


@register_decay("mamba2_no_dt")
class Mamba2NoDtDecay(Mamba2Decay):
    """Mamba2 ablation without dt_bias: log λ = −exp(A_log)·softplus(z)."""

    use_dt_bias = False


@register_decay("mamba2_no_a_no_dt")
class Mamba2NoANoDtDecay(Mamba2Decay):
    """Mamba2 ablation without A and dt_bias: log λ = −softplus(z)."""

    use_a = False
    use_dt_bias = False


@register_decay("gla", shareable=True)
class GLADecay(DecayParameterization):
    """log λ = logsigmoid(z / gla_denominator): λ = 0.5 at z = 0."""

    def __init__(self, config, layer_idx, width):
        super().__init__(config, layer_idx, width)
        self.denominator = float(config.gla_denominator)

    def log_decay(self, z, mask=None, context=None, state=None, device=None):
        return F.logsigmoid(z / self.denominator), state


@register_decay("hgrn2", shareable=True)
class HGRN2Decay(DecayParameterization):
    """λ = γ + (1 − γ)·sigmoid(z), γ the layer's learned lower bound (`context`; None means γ = 0). With
    `hgrn2_lower_bound`, the bounds of all layers come from one backbone parameter P [L, D]: γ_l = cumsum_l
    softmax_l(P) − its layer-0 value, so γ_0 = 0 and γ rises with depth (γ_l = l/L at init, DESIGN §2)."""

    model_parameter_names = ("lower_bound_logits",)

    @classmethod
    def model_parameters(cls, config):
        if not config.hgrn2_lower_bound:
            return {"lower_bound_logits": None}
        width = config.hidden_size if config.decay_granularity == "vector" else config.num_heads
        return {"lower_bound_logits": nn.Parameter(torch.empty(config.num_hidden_layers, width))}

    @classmethod
    def layer_contexts(cls, model):
        if model.lower_bound_logits is None:
            return [None] * len(model.layers)
        cumulative = model.lower_bound_logits.float().softmax(dim=0).cumsum(dim=0)
        gamma = cumulative - cumulative[:1]
        return [None] + list(gamma[1:].unbind(0))

    @classmethod
    @torch.no_grad()
    def reset_model_parameters(cls, model, config):
        from transformers import initialization as init

        if model.lower_bound_logits is not None:
            init.ones_(model.lower_bound_logits)

    def log_decay(self, z, mask=None, context=None, state=None, device=None):
        if context is None:
            return F.logsigmoid(z), state
        # log(γ + (1 − γ)σ(z)) = log1p(−(1 − γ)σ(−z)): ≤ 0 by construction, exact near λ = 1
        return torch.log1p(-(1.0 - context.float()) * torch.sigmoid(-z)), state


@register_decay("lightnet", shareable=True)
class LightNetDecay(DecayParameterization):
    """Z_t = logcumsumexp(0, z_1..z_t), log λ_t = Z_{t−1} − Z_t; position-dependent, so the cache carries Z."""

    position_dependent = True
    state_name = "normaliser"

    def log_decay(self, z, mask=None, context=None, state=None, device=None):
        if mask is not None:
            z = z.masked_fill(~_expand_mask(mask, z), float("-inf"))
        if state is None:
            state = z.new_zeros(z.shape[0], *z.shape[2:])
        running = torch.logcumsumexp(torch.cat([state.unsqueeze(1), z], dim=1), dim=1)
        return running[:, :-1] - running[:, 1:], running[:, -1]


def tnl_log_decay(layer_idx, num_layers, num_heads, device=None):
    """TNL's static per-head decay: −(1/n_h)(1 − l/(L−1) + 1e-5), n_h = 2·128^{h/(H−1)}; L = 1 or H = 1 safe."""
    layer_frac = layer_idx / (num_layers - 1) if num_layers > 1 else 0.0
    head_frac = torch.arange(num_heads, device=device, dtype=torch.float32) / max(num_heads - 1, 1)
    return -(1.0 - layer_frac + 1e-5) / (2.0 * 128.0**head_frac)


@register_decay("tnl", granularities=("scalar",), data_dependent=False)
class TNLDecay(DecayParameterization):
    """TNL's static per-head decay −(1/n_h)(1 − l/(L−1) + 1e-5), n_h = 2·128^{h/(H−1)}; nothing is trained."""

    def __init__(self, config, layer_idx, width):
        super().__init__(config, layer_idx, width)
        self.num_layers = config.num_hidden_layers

    def log_decay(self, z, mask=None, context=None, state=None, device=None):
        return tnl_log_decay(self.layer_idx, self.num_layers, self.width, device=device), state


@register_decay("tnl_l", granularities=("scalar",), data_dependent=False)
class LearnedTNLDecay(DecayParameterization):
    """Learnable per-head log λ = −exp(log_rate) ≤ 0, initialised to the `tnl` values (not zeroed)."""

    def __init__(self, config, layer_idx, width):
        super().__init__(config, layer_idx, width)
        self.num_layers = config.num_hidden_layers
        self.log_rate = nn.Parameter(torch.empty(width))

    def log_decay(self, z, mask=None, context=None, state=None, device=None):
        return -torch.exp(self.log_rate.float()), state

    @torch.no_grad()
    def reset_parameters(self, config):
        from transformers import initialization as init

        init.copy_(self.log_rate, torch.log(-tnl_log_decay(self.layer_idx, self.num_layers, self.width)))


@register_decay("simple", shareable=True)
class SimpleDecay(DecayParameterization):
    """Simple Decay SD-p: log λ = logsigmoid(z + Δ), Δ = ln(p / (1 − p)) per channel, so λ starts near p."""

    def __init__(self, config, layer_idx, width):
        super().__init__(config, layer_idx, width)
        self.delta = nn.Parameter(torch.empty(width))

    def log_decay(self, z, mask=None, context=None, state=None, device=None):
        return F.logsigmoid(z + self.delta.float()), state

    @torch.no_grad()
    def reset_parameters(self, config):
        from transformers import initialization as init

        p = config.simple_decay_init
        init.constant_(self.delta, math.log(p / (1.0 - p)))


@register_decay("none", granularities=("scalar",), data_dependent=False)
class NoDecay(DecayParameterization):
    """Plain linear attention: λ = 1."""

    def log_decay(self, z, mask=None, context=None, state=None, device=None):
        return torch.zeros(self.width, device=device), state
