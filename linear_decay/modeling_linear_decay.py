"""Decay linear attention language models (DESIGN.md): `LinearDecayModel`, `LinearDecayForCausalLM`.

Read top to bottom: norms and position encodings, the token mixer (§1–4), the SwiGLU block, the backbone and the
causal LM head. Beside it: the decay parameterizations (`decay`, one registry, §2), the recurrence (`recurrence`:
the float64 oracle, the chunked PyTorch path, the decoding step, and the seam where the Triton kernels of `ops_*`
plug in), the cache and CUDA-graph decoding (`generation`), the chunked loss (`loss`) and the design record that
checkpoints carry in their safetensors metadata (`checkpoint`).
"""

import math
import os
import tempfile

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .checkpoint import another_design, checkpoint_design_changes, mismatch_error, recording_design
from .configuration_linear_decay import LinearDecayConfig
from .decay import DECAY_REGISTRY, DecayParameterization
from .generation import DecodeGraph, LinearDecayCache
from .loss import causal_lm_targets, chunked_linear_cross_entropy
from .recurrence import linear_decay_attention, recurrent_step, resolve_backend

try:  # the fused (gated) RMSNorm, SwiGLU, decay and loss (Triton); CPU-only torch has no Triton and keeps the torch code
    from .ops_decay import softplus_decay
    from .ops_loss import cross_entropy
    from .ops_norm import gated_rms_norm, rms_norm
    from .ops_swiglu import swiglu
except ImportError:
    cross_entropy = gated_rms_norm = rms_norm = softplus_decay = swiglu = None


def _outside(ids, low, high):
    """Whether any id lies outside [low, high): one reduction and one device-to-host copy."""
    smallest, largest = torch.aminmax(ids)
    smallest, largest = torch.stack([smallest, largest]).tolist()
    return smallest < low or largest >= high


def use_fused_kernels(x, enabled=True, backend=None):
    """Whether a fused kernel (norm, SwiGLU, decay, loss) that the config has `enabled` (`fuse_norm`, ...) runs on
    `x`: where the recurrence runs on the Triton kernels (`resolve_backend` of `x`'s device and `backend`, the config's
    `kernel_backend`: auto on CUDA tensors; triton always, CPU tensors in Triton's interpreter). Under torch.compile
    the torch code is traced instead (Inductor fuses it)."""
    if not enabled or gated_rms_norm is None or torch.compiler.is_compiling():
        return False
    return resolve_backend(x.device.type, backend) == "triton"

# transformers renamed `past_key_values` to `cache` in 5.2x; read both, return the one the installed version uses.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

# A cached forward of at most this many tokens uses the token-by-token decoding step; longer ones the chunked form.
RECURRENT_MAX_TOKENS = 8


def run_recurrence(q, k, v, log_decay, scale, state_layer, mask=None, cu_seqlens=None, backend=None):
    """One recurrence call for a mixer or the TPE filter: the decoding step for short cached calls, else the chunked
    form; reads and writes the state in `state_layer` (a RecurrentStateLayer, or None without a cache).
    `cu_seqlens` (packed documents, see `document_boundaries`): the rows are flattened into one packed batch and
    every document starts from a zero state. `backend`: the config's `kernel_backend`."""
    if cu_seqlens is not None:
        batch, length = q.shape[:2]
        flat = [t.reshape(1, batch * length, *t.shape[2:]) for t in (q, k, v)]
        if log_decay is not None and log_decay.dim() > 1:
            log_decay = log_decay.reshape(1, batch * length, *log_decay.shape[2:])
        o, _ = linear_decay_attention(*flat, log_decay, scale=scale, cu_seqlens=cu_seqlens, backend=backend)
        return o.reshape(batch, length, *o.shape[2:])
    initial_state = state_layer.get("recurrent") if state_layer is not None else None
    if state_layer is not None and q.shape[1] <= RECURRENT_MAX_TOKENS:
        o, state = recurrent_step(q, k, v, log_decay, scale=scale, initial_state=initial_state,
                                  output_final_state=True, backend=backend)
    else:
        o, state = linear_decay_attention(q, k, v, log_decay, scale=scale, initial_state=initial_state,
                                          output_final_state=state_layer is not None, mask=mask, backend=backend)
    if state_layer is not None:
        state_layer.set("recurrent", state)
    return o


def document_boundaries(position_ids, batch, length):
    """Packed documents, the convention of transformers' DataCollatorWithFlattening: position_ids restart at 0 where
    a document starts inside a row. Returns int32 offsets [N + 1] of the N documents of the flattened batch (row
    starts included), or None when no row holds more than one document."""
    starts = (position_ids == 0).expand(batch, length).clone()
    if not bool(starts[:, 1:].any()):
        return None
    starts[:, 0] = True
    offsets = starts.reshape(-1).nonzero().squeeze(1)
    end = torch.tensor([batch * length], device=offsets.device)
    return torch.cat([offsets, end]).to(torch.int32)


# ----------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------


class LinearDecayRMSNorm(nn.Module):
    """RMSNorm; on the fused kernel where the recurrence runs on the Triton kernels, unless `fused` is False
    (`config.fuse_norm`; `backend`: `config.kernel_backend`)."""

    def __init__(self, dim, eps=1e-5, fused=True, backend=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.fused, self.backend = fused, backend

    def forward(self, x):
        if use_fused_kernels(x, self.fused, self.backend):
            return rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class ZeroInitLinear(nn.Linear):
    """A projection that starts at zero (SwiGLU down projection, TPE output; DESIGN §1, §4)."""


def apply_rope(x, positions, theta, fraction):
    """Rotary embedding on the first `fraction` of each head's channels (DESIGN §4). x [B, T, H, e]."""
    head_dim = x.shape[-1]
    rot = 2 * int(head_dim * fraction // 2)
    inv_freq = theta ** (-torch.arange(0, rot, 2, device=x.device, dtype=torch.float32) / rot)
    angles = positions.float().unsqueeze(-1) * inv_freq  # [B, T, rot/2]
    cos, sin = angles.cos().unsqueeze(2), angles.sin().unsqueeze(2)
    x_rot, x_pass = x[..., :rot].float(), x[..., rot:]
    x1, x2 = x_rot[..., : rot // 2], x_rot[..., rot // 2 :]
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
    return torch.cat([rotated, x_pass], dim=-1)


def apply_lrpe(x, positions, theta):
    """LRPE, the cosine form the authors ran as "RoPE" (DESIGN §4): x -> [x ⊙ cos(tθ), x ⊙ sin(tθ)], θ_i =
    theta^{−2i/e} on the first half of the channels and 0 on the rest, so the key dim doubles."""
    head_dim = x.shape[-1]
    index = torch.arange(head_dim, device=x.device, dtype=torch.float32)
    freq = torch.where(index < head_dim // 2, theta ** (-2 * index / head_dim), torch.zeros_like(index))
    angles = (positions.float().unsqueeze(-1) * freq).unsqueeze(2)  # [B, T, 1, e]
    xf = x.float()
    return torch.cat([xf * angles.cos(), xf * angles.sin()], dim=-1).to(x.dtype)


class LinearDecayTPE(nn.Module):
    """TPE (DESIGN §4): a learned per-head EMA filter over the token embeddings that replaces them.

    Per head h: λ_h = sigmoid(a_h) (static), static query/key vectors, values = the head's slice of the embedding;
    the filter output goes through a zero-initialised projection and is added to the embeddings (identity at init).
    Init: λ_h spread from 0.5 to 0.99 over heads; q_h = k_h = e^{-1/2}·1 so q·k = 1 (a unit-gain EMA).
    """

    def __init__(self, config):
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.decay_logit = nn.Parameter(torch.empty(self.num_heads))
        self.query = nn.Parameter(torch.empty(self.num_heads, self.head_dim))
        self.key = nn.Parameter(torch.empty(self.num_heads, self.head_dim))
        self.out_proj = ZeroInitLinear(config.hidden_size, config.hidden_size, bias=False)
        self.kernel_backend = config.kernel_backend

    @torch.no_grad()
    def reset_parameters(self):
        init.copy_(self.decay_logit, torch.linspace(0.0, math.log(99.0), self.num_heads))
        init.constant_(self.query, self.head_dim**-0.5)
        init.constant_(self.key, self.head_dim**-0.5)

    def forward(self, x, mask=None, state_layer=None, cu_seqlens=None):
        batch, length, _ = x.shape
        shape = (batch, length, self.num_heads, self.head_dim)
        q = self.query.to(x.dtype).expand(shape)
        k = self.key.to(x.dtype).expand(shape)
        log_decay = F.logsigmoid(self.decay_logit.float())
        if mask is not None:
            k = k * mask[:, :, None, None].to(x.dtype)
            log_decay = log_decay.expand(batch, length, -1).masked_fill(~mask[:, :, None], 0.0)
        o = run_recurrence(q, k, x.view(shape), log_decay, 1.0, state_layer, mask=mask, cu_seqlens=cu_seqlens,
                           backend=self.kernel_backend)
        return x + self.out_proj(o.reshape(batch, length, -1))


# ----------------------------------------------------------------------------------------------------------------
# The token mixer (DESIGN §1)
# ----------------------------------------------------------------------------------------------------------------


def fused_projections(x, layers, stacked=None):
    """[layer(x) for layer in layers]. While gradients are recorded (training), the layers that are plain bias-free
    `nn.Linear`s (`_plain_linear`) run as one matmul on their stacked weights: one GEMM, one weight-gradient GEMM and
    one input gradient instead of one each per projection plus their sum. Every other layer runs as itself, so that
    what it adds to its weight's product is kept: a LoRA / DoRA adapter (peft replaces the projection by a wrapper
    whose forward adds the adapter's output to the base layer's), a quantised, parametrised, subclassed or hooked
    layer. Inference runs each layer on its own (no weight copy per step), unless `stacked` holds those weights
    stacked already (`stacked_weight`, made once for the steps `DecodeGraph` replays)."""
    plain = [i for i, layer in enumerate(layers) if _plain_linear(layer)]
    if len(plain) < 2 or (stacked is None and not torch.is_grad_enabled()):
        return [layer(x) for layer in layers]
    weight = stacked if stacked is not None else torch.cat([layers[i].weight for i in plain])
    fused = dict(zip(plain, F.linear(x, weight).split([layers[i].out_features for i in plain], dim=-1)))
    return [fused[i] if i in fused else layer(x) for i, layer in enumerate(layers)]


def stacked_weight(layers):
    """The weights of the `_plain_linear` layers among `layers`, stacked in their order (what `fused_projections`
    multiplies by), or None where fewer than two are."""
    plain = [layer.weight for layer in layers if _plain_linear(layer)]
    return torch.cat(plain) if len(plain) >= 2 else None


def _plain_linear(layer):
    """Whether `layer(x)` is exactly `F.linear(x, layer.weight)`: an `nn.Linear` itself (not a subclass, not a peft
    adapter wrapping one, not a parametrised module, whose class torch swaps), no bias, a plain `nn.Parameter` weight
    (not a quantised tensor subclass), no forward or backward hooks and no instance-level forward."""
    return (type(layer) is nn.Linear and layer.bias is None and type(layer.weight) is nn.Parameter
            and not layer._forward_hooks and not layer._forward_pre_hooks and not layer._backward_hooks
            and not layer._backward_pre_hooks and "forward" not in vars(layer))


class LinearDecayAttention(nn.Module):
    """Decay linear attention: q = silu(W_q x), k = silu(W_k x) (or derived from the decay when shared), v = W_v x,
    log λ from the registered decay parameterization, o = recurrence, y = W_o RMSNorm(o ⊙ sigmoid(U_2 U_1 x))."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.scale = config.attention_scale
        self.share_decay = config.share_decay
        self.position_encoding = config.position_encoding
        self.rope_theta, self.rope_fraction = config.rope_theta, config.rope_fraction
        self.vector_decay = config.decay_granularity == "vector"
        self.kernel_backend, self.fuse_decay = config.kernel_backend, config.fuse_decay
        hidden = config.hidden_size
        spec = DECAY_REGISTRY[config.decay_type]

        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, hidden, bias=False)
        self.v_proj = nn.Linear(hidden, hidden, bias=False)
        decay_width = hidden if self.vector_decay else self.num_heads
        if spec.data_dependent and not self.share_decay:
            if self.vector_decay:  # low rank d -> r -> d, no nonlinearity in between
                self.decay_proj = nn.Sequential(
                    nn.Linear(hidden, config.decay_rank, bias=False), nn.Linear(config.decay_rank, hidden, bias=False)
                )
            else:
                self.decay_proj = nn.Linear(hidden, self.num_heads, bias=False)
        else:
            self.decay_proj = None
        self.decay = spec.module(config, layer_idx, decay_width)
        if config.use_output_gate:
            self.gate_proj = nn.Sequential(
                nn.Linear(hidden, config.head_dim, bias=False), nn.Linear(config.head_dim, hidden, bias=False)
            )
        else:
            self.gate_proj = None
        self.out_norm = LinearDecayRMSNorm(hidden, eps=config.rms_norm_eps, fused=config.fuse_norm,
                                           backend=config.kernel_backend)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)
        self.stacked_input_weight = None  # `input_projections`' weights stacked, while `DecodeGraph` runs a step

    def input_projections(self):
        """The layers that read x: W_q, W_k, W_v, the decay's (its first when low-rank) and the gate's first."""
        decay_first = self.decay_proj[0] if isinstance(self.decay_proj, nn.Sequential) else self.decay_proj
        gate_first = self.gate_proj[0] if self.gate_proj is not None else None
        return [self.q_proj, self.k_proj, self.v_proj] + [layer for layer in (decay_first, gate_first)
                                                          if layer is not None]

    def stacked_weight_of_inputs(self):
        """`input_projections`' weights stacked (`stacked_weight`): a copy, made once for `DecodeGraph`'s steps."""
        with torch.no_grad():
            return stacked_weight(self.input_projections())

    def forward(self, x, mask=None, positions=None, decay_context=None, state_layer=None, cu_seqlens=None):
        batch, length, hidden = x.shape
        heads, head_dim = self.num_heads, self.head_dim

        # every projection of x in one matmul (`fused_projections`)
        outputs = iter(fused_projections(x, self.input_projections(), self.stacked_input_weight))
        q, k, v = next(outputs), next(outputs), next(outputs)
        z = next(outputs) if self.decay_proj is not None else None
        z = self.decay_proj[1](z) if isinstance(self.decay_proj, nn.Sequential) else z
        gate_inner = next(outputs) if self.gate_proj is not None else None
        q = F.silu(q)
        if self.share_decay:  # DESIGN §3: z = W_k x, k derived from the decay
            z = k.float()
            log_decay = self._decay(z, mask, decay_context, state_layer, x.device, cu_seqlens)
            k = self.decay.shared_key(z, log_decay).to(x.dtype)
        else:
            k = F.silu(k)
            log_decay = self._decay(z, mask, decay_context, state_layer, x.device, cu_seqlens)
        if mask is not None:
            k = k * mask.unsqueeze(-1).to(k.dtype)

        q, k, v = (t.view(batch, length, heads, head_dim) for t in (q, k, v))
        if log_decay.dim() == 3 and self.vector_decay:
            log_decay = log_decay.view(batch, length, heads, head_dim)
        if self.position_encoding == "rope":
            q = apply_rope(q, positions, self.rope_theta, self.rope_fraction)
            k = apply_rope(k, positions, self.rope_theta, self.rope_fraction)
        elif self.position_encoding == "lrpe":
            q, k = apply_lrpe(q, positions, self.rope_theta), apply_lrpe(k, positions, self.rope_theta)
            if log_decay.dim() == 4:
                log_decay = torch.cat([log_decay, log_decay], dim=-1)

        o = run_recurrence(q, k, v, log_decay, self.scale, state_layer, mask=mask, cu_seqlens=cu_seqlens,
                           backend=self.kernel_backend)

        o = o.reshape(batch, length, hidden)
        if self.gate_proj is not None:
            gate_logits = self.gate_proj[1](gate_inner)
            if use_fused_kernels(o, self.out_norm.fused, self.kernel_backend):
                return self.o_proj(gated_rms_norm(o, gate_logits, self.out_norm.weight, self.out_norm.eps))
            o = o * torch.sigmoid(gate_logits)
        return self.o_proj(self.out_norm(o))

    def _decay(self, z, mask, context, state_layer, device, cu_seqlens):
        """The decay unit's log λ (its state, if any, read from and written to `state_layer`); with packed documents a
        position-dependent unit (LightNet's running normaliser) restarts at every document, so it runs document by
        document (packed documents keep no cache)."""
        if cu_seqlens is None or not self.decay.position_dependent:
            fused = z is not None and use_fused_kernels(z, self.fuse_decay, self.kernel_backend)
            kernel = softplus_decay if fused else None
            return self.decay(z, mask=mask, context=context, state_layer=state_layer, device=device,
                              softplus_kernel=kernel)
        flat = z.reshape(1, -1, z.shape[-1])
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        pieces = [self.decay(piece, context=context, device=device) for piece in flat.split(lengths, dim=1)]
        return torch.cat(pieces, dim=1).reshape(z.shape)


class LinearDecayMLP(nn.Module):
    """SwiGLU feed-forward."""

    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = ZeroInitLinear(config.intermediate_size, config.hidden_size, bias=False)
        self.fuse_swiglu, self.kernel_backend = config.fuse_swiglu, config.kernel_backend

    def forward(self, x):
        if use_fused_kernels(x, self.fuse_swiglu, self.kernel_backend):
            return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LinearDecayBlock(GradientCheckpointingLayer):
    """Pre-norm block: x += Mixer(RMSNorm(x)); x += SwiGLU(RMSNorm(x))."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn_norm = LinearDecayRMSNorm(config.hidden_size, eps=config.rms_norm_eps, fused=config.fuse_norm,
                                            backend=config.kernel_backend)
        self.attn = LinearDecayAttention(config, layer_idx)
        self.mlp_norm = LinearDecayRMSNorm(config.hidden_size, eps=config.rms_norm_eps, fused=config.fuse_norm,
                                           backend=config.kernel_backend)
        self.mlp = LinearDecayMLP(config)

    def forward(self, hidden_states, mask=None, positions=None, decay_context=None, state_layer=None,
                cu_seqlens=None):
        hidden_states = hidden_states + self.attn(
            self.attn_norm(hidden_states), mask=mask, positions=positions, decay_context=decay_context,
            state_layer=state_layer, cu_seqlens=cu_seqlens,
        )
        return hidden_states + self.mlp(self.mlp_norm(hidden_states))


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


class LinearDecayPreTrainedModel(PreTrainedModel):
    config_class = LinearDecayConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LinearDecayBlock"]
    _skip_keys_device_placement = ["cache", "past_key_values"]

    @torch.no_grad()
    def _init_weights(self, module):
        """DESIGN §1–2: truncated normal (std = initializer_range) for linears and embeddings, zero SwiGLU down
        projection and TPE output, norms 1, decay parameters by their unit, HGRN2 lower-bound logits 1."""
        std = self.config.initializer_range
        if isinstance(module, ZeroInitLinear):
            init.zeros_(module.weight)
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            init.trunc_normal_(module.weight, mean=0.0, std=std, a=-2 * std, b=2 * std)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, LinearDecayRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, DecayParameterization):
            module.reset_parameters(self.config)
        elif isinstance(module, LinearDecayTPE):
            module.reset_parameters()
        elif isinstance(module, LinearDecayModel):
            DECAY_REGISTRY[self.config.decay_type].module.reset_model_parameters(module, self.config)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, but a checkpoint whose config.json does not describe its weights is an
        error instead of a silently different model: parameters the config needs but the weights lack (which would be
        freshly initialised) or the weights hold but the config does not use (say `decay_type` edited after saving),
        and a design field (configuration_linear_decay.DESIGN_FIELDS, e.g. `position_encoding` none -> rope, which
        no weight shape shows) that contradicts the design `save_pretrained` recorded in the safetensors metadata.
        Only the LM head may be missing or extra (base model <-> causal LM); checkpoints saved without the design
        metadata are checked on their parameters only. A partial checkpoint of the same design (`another_design`
        finds no sign of another one: say one tensor removed, or `state_dict={}`) loads as transformers loads it: the
        missing parameters freshly initialised, a warning, and their names in `missing_keys`.
        `ignore_mismatched_sizes=True` loads anyway (missing parameters freshly initialised, the config's design used
        as it is)."""
        want_info = kwargs.pop("output_loading_info", False)
        strict = not kwargs.get("ignore_mismatched_sizes")
        name_or_path = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        try:
            model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        except (RuntimeError, ValueError) as error:  # e.g. a size mismatch: name the design field behind it, if any
            config = cls._requested_config(name_or_path, kwargs) if strict else None
            changed = checkpoint_design_changes(name_or_path, kwargs, config) if config is not None else []
            if changed:
                raise mismatch_error(name_or_path, config, changed, [], []) from error
            raise
        if strict:
            changed = checkpoint_design_changes(name_or_path, kwargs, model.config)
            missing = sorted(k for k in info["missing_keys"] if not k.startswith("lm_head"))
            unexpected = sorted(k for k in info["unexpected_keys"] if not k.startswith("lm_head"))
            if changed or ((missing or unexpected) and another_design(missing, unexpected, model.state_dict())):
                raise mismatch_error(model.name_or_path, model.config, changed, missing, unexpected)
        return (model, info) if want_info else model

    @classmethod
    def _requested_config(cls, name_or_path, kwargs):
        """The config `from_pretrained(name_or_path, **kwargs)` builds the model from, or None if it cannot be had."""
        if isinstance(kwargs.get("config"), LinearDecayConfig):
            return kwargs["config"]
        try:
            return cls.config_class.from_pretrained(name_or_path, return_unused_kwargs=True, **kwargs)[0]
        except Exception:  # noqa: BLE001 — the caller re-raises the original error
            return None

    # Hub: checkpoints carry a model card (README.md) describing their design choices; see `linear_decay.model_card`.

    def _write_model_card(self, save_directory, repo_id=None, tags=()):
        try:  # the card module ships with the package; code loaded as remote code alone writes no card
            from linear_decay.model_card import write_model_card
        except ImportError:
            return
        write_model_card(save_directory, self.config, repo_id=repo_id, base_model=self.name_or_path,
                         tags=[*(self.model_tags or []), *tags])

    def _save_with_design(self, save_directory, is_main_process=True, *args, **kwargs):
        """`PreTrainedModel.save_pretrained` with the design (`checkpoint.design_metadata`) in every weights file."""
        with recording_design(save_directory, self.config, kwargs.get("variant"), is_main_process):
            super().save_pretrained(save_directory, is_main_process, *args, **kwargs)

    def save_pretrained(self, save_directory, is_main_process=True, *args, push_to_hub=False, **kwargs):
        """`PreTrainedModel.save_pretrained`, plus the design in the safetensors metadata (checked again by
        `from_pretrained`) and the model card README.md; `push_to_hub=True` uploads through `push_to_hub` (so the Hub
        gets this card, not a generic one)."""
        hub_kwargs = {key: kwargs.pop(key) for key in ("repo_id", "commit_message", "create_pr", "private")
                      if key in kwargs}
        self._save_with_design(save_directory, is_main_process, *args, **kwargs)
        if is_main_process:
            self._write_model_card(save_directory, repo_id=hub_kwargs.get("repo_id"))
        if push_to_hub and is_main_process:
            repo_id = hub_kwargs.pop("repo_id", os.path.basename(os.path.normpath(os.fspath(save_directory))))
            self.push_to_hub(repo_id, token=kwargs.get("token"), max_shard_size=kwargs.get("max_shard_size", "50GB"),
                             **hub_kwargs)

    def push_to_hub(self, repo_id, *, commit_message=None, commit_description=None, private=None, token=None,
                    revision=None, create_pr=False, max_shard_size="50GB", tags=None):
        """Upload weights, config, code and this family's model card to the Hub (same arguments as transformers'
        `push_to_hub`). Returns the commit info."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as work_dir:
            self._save_with_design(work_dir, max_shard_size=max_shard_size)
            tags = [tags] if isinstance(tags, str) else list(tags or [])
            self._write_model_card(work_dir, repo_id=repo_id, tags=tags)
            return api.upload_folder(repo_id=repo_id, folder_path=work_dir, revision=revision, create_pr=create_pr,
                                     commit_message=commit_message or "Upload model",
                                     commit_description=commit_description)


class LinearDecayModel(LinearDecayPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.tpe = LinearDecayTPE(config) if config.position_encoding == "tpe" else None
        self.layers = nn.ModuleList([LinearDecayBlock(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LinearDecayRMSNorm(config.hidden_size, eps=config.rms_norm_eps, fused=config.fuse_norm,
                                       backend=config.kernel_backend)
        self.decay_unit = DECAY_REGISTRY[config.decay_type].module
        for name, parameter in self.decay_unit.model_parameters(config).items():  # e.g. HGRN2's lower bounds
            self.register_parameter(name, parameter)
        self.gradient_checkpointing = False
        self.tokens_checked = False  # set while a CUDA graph is captured: the caller has range-checked input_ids
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def embedding_rows(self):
        """The number of token ids the input embedding holds now (it follows `resize_token_embeddings`)."""
        embeddings = self.get_input_embeddings()
        rows = getattr(embeddings, "num_embeddings", None)
        return rows if rows is not None else embeddings.weight.shape[0]

    def decay_contexts(self):
        """Each layer's decay `context` from the backbone's decay parameters (`DecayParameterization.layer_contexts`:
        HGRN2's lower bounds γ_l, one [D] tensor per layer, None where γ is identically 0); None for most types."""
        return self.decay_unit.layer_contexts(self)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, cache=None,
                inputs_embeds=None, use_cache=None, output_hidden_states=None, return_dict=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, LinearDecayCache):
            raise TypeError(f"LinearDecayModel needs a LinearDecayCache, got {type(cache).__name__}")
        if output_hidden_states is None:  # transformers' convention: the argument defaults to the config's value
            output_hidden_states = self.config.output_hidden_states
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        cu_seqlens = self._packed_documents(position_ids, attention_mask, input_ids, inputs_embeds, cache, use_cache)
        if cu_seqlens is not None:
            use_cache = False  # a state that mixes documents would mean nothing to a continuation
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if use_cache and cache is None:
            cache = LinearDecayCache(self.config)
        elif not use_cache:
            cache = None
        past_length = cache.get_seq_length() if cache is not None else 0

        self._check_inputs(input_ids, inputs_embeds, attention_mask, past_length, position_ids)
        inputs_embeds = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, length = inputs_embeds.shape[:2]
        mask = None
        if attention_mask is not None:
            mask = attention_mask[:, -length:].bool()
            if not torch.compiler.is_compiling() and bool(mask.all()):  # a shortcut eager decides on the host
                mask = None

        positions = None
        if self.config.position_encoding in ("rope", "lrpe"):
            positions = self._positions(position_ids, mask, cache, batch, length, inputs_embeds.device)

        hidden_states = inputs_embeds
        if self.tpe is not None:
            hidden_states = self.tpe(hidden_states, mask, cache.model_state if cache is not None else None,
                                     cu_seqlens=cu_seqlens)
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        for layer, decay_context in zip(self.layers, self.decay_contexts()):
            state_layer = cache.layers[layer.attn.layer_idx] if cache is not None else None
            hidden_states = layer(hidden_states, mask=mask, positions=positions, decay_context=decay_context,
                                  state_layer=state_layer, cu_seqlens=cu_seqlens)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states = all_hidden_states[:-1] + (hidden_states,)
        if cache is not None:
            cache.seen_tokens += length
        output = BaseModelOutputWithPast(last_hidden_state=hidden_states, hidden_states=all_hidden_states,
                                         **{CACHE_FIELD: cache})
        return output if return_dict is not False else output.to_tuple()

    @staticmethod
    def _packed_documents(position_ids, attention_mask, input_ids, inputs_embeds, cache, use_cache):
        """cu_seqlens of packed documents (position_ids restarting at 0 inside a row, no padding mask), else None.
        With a padding mask, position_ids are positions only (left padding may repeat 0)."""
        if position_ids is None or position_ids.dim() != 2 or (input_ids is None and inputs_embeds is None):
            return None  # (missing inputs are reported by _check_inputs)
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            return None
        inputs = input_ids if input_ids is not None else inputs_embeds
        if inputs.dim() < 2:
            return None  # (reported by _check_inputs)
        batch, length = inputs.shape[:2]
        if position_ids.shape[-1] != length or position_ids.shape[0] not in (1, batch):
            return None  # (reported by _check_inputs)
        cu_seqlens = document_boundaries(position_ids, batch, length)
        if cu_seqlens is not None and (cache is not None or use_cache):
            raise ValueError("position_ids restart inside a row (packed documents), which runs without a cache: pass "
                             "use_cache=False, or one document per row for cached decoding")
        return cu_seqlens

    def _check_inputs(self, input_ids, inputs_embeds, attention_mask, past_length, position_ids=None):
        """Clear errors before any compute. Shapes are compared as Python ints, which costs nothing in eager mode and
        is a shape guard, not a graph break, under torch.compile / torch.export."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
            if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
                raise ValueError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
            vocab = self.embedding_rows()
            if (input_ids.numel() and not self.tokens_checked and not torch.compiler.is_compiling()
                    and _outside(input_ids, 0, vocab)):  # eager only: the check reads the ids on the host
                bad = input_ids[(input_ids < 0) | (input_ids >= vocab)][0].item()
                raise ValueError(f"input_ids contains token id {bad}, outside the vocabulary [0, {vocab})")
            batch, length = input_ids.shape
        else:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
                raise ValueError(f"inputs_embeds must be [batch, seq_len, {self.config.hidden_size}], got "
                                 f"{tuple(inputs_embeds.shape)}")
            batch, length = inputs_embeds.shape[:2]
        if length == 0 or batch == 0:
            raise ValueError(f"empty input: batch={batch}, seq_len={length}; at least one token is needed")
        if attention_mask is not None:
            allowed = {length, past_length + length}
            if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] not in allowed:
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}; expected [{batch}, {length}]"
                    + (f" or [{batch}, {past_length + length}] (past + new tokens)" if past_length else "")
                )
        if position_ids is not None:  # one position per new token: [seq_len], [1, seq_len] or [batch, seq_len]
            shape = tuple(position_ids.shape)
            if not shape or shape[-1] != length:
                raise ValueError(f"position_ids have length {shape[-1] if shape else 0} (shape {shape}), but the "
                                 f"input has sequence length {length}: pass one position per input token")
            if len(shape) > 2 or (len(shape) == 2 and shape[0] not in (1, batch)):
                raise ValueError(f"position_ids have shape {shape}; expected [{length}], [1, {length}] or "
                                 f"[{batch}, {length}]")

    @staticmethod
    def _positions(position_ids, mask, cache, batch, length, device):
        """Each token's index among its row's real tokens: rope/lrpe offsets that ignore left padding and continue
        from the cache, which keeps every row's count of real tokens."""
        state = cache.model_state if cache is not None else None
        seen = state.get("real_tokens") if state is not None else None
        if seen is None:
            seen = torch.zeros(batch, dtype=torch.long, device=device)
        real = mask.long() if mask is not None else torch.ones(batch, length, dtype=torch.long, device=device)
        if position_ids is None:
            positions = (seen.unsqueeze(-1) + real.cumsum(-1) - 1).clamp(min=0)
        else:
            positions = position_ids.expand(batch, length)
        if state is not None:
            state.set("real_tokens", seen + real.sum(-1))
        return positions


class LinearDecayForCausalLM(LinearDecayPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = LinearDecayModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def release_decode_graph(self):
        """Free the captured decoding step the model keeps for later generate() calls (config.decode_cuda_graphs):
        its state tensors, stacked weights and graph memory, once no cache holds them."""
        DecodeGraph.release(self)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """generate(): our recurrent cache instead of a DynamicCache, under the name this transformers reads."""
        for name in ("cache", "past_key_values"):
            if model_kwargs.get(name) is not None:
                if not isinstance(model_kwargs[name], LinearDecayCache):
                    raise TypeError(f"LinearDecayForCausalLM needs a LinearDecayCache, got {type(model_kwargs[name])}")
                return
        if generation_config.use_cache is not False:
            model_kwargs[CACHE_FIELD] = LinearDecayCache(self.config)

    def prepare_inputs_for_generation(self, input_ids, inputs_embeds=None, **kwargs):
        """generate() derives position_ids from the attention mask alone, which restarts at 0 when a call continues
        from a filled cache; the model's own positions (cache row counts + mask) are right in every case."""
        model_inputs = super().prepare_inputs_for_generation(input_ids, inputs_embeds=inputs_embeds, **kwargs)
        model_inputs.pop("position_ids", None)
        return model_inputs

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, cache=None,
                inputs_embeds=None, labels=None, use_cache=None, output_hidden_states=None, return_dict=None,
                logits_to_keep=0, **kwargs):
        cache = cache if cache is not None else past_key_values
        if output_hidden_states is None:  # transformers' convention: the argument defaults to the config's value
            output_hidden_states = self.config.output_hidden_states
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if self._graph_decodable(input_ids, attention_mask, position_ids, cache, inputs_embeds, labels, use_cache,
                                 output_hidden_states):
            self.model._check_inputs(input_ids, None, attention_mask, cache.get_seq_length())
            graph = DecodeGraph.for_step(self, cache, input_ids)
            output = CausalLMOutputWithPast(logits=graph(self, cache, input_ids), **{CACHE_FIELD: cache})
            return output if return_dict is not False else output.to_tuple()
        if labels is not None:
            expected = tuple((input_ids if input_ids is not None else inputs_embeds).shape[:2])
            if tuple(labels.shape) != expected:
                raise ValueError(f"labels have shape {tuple(labels.shape)}; expected {expected} like the inputs")
            classes = self._label_classes()
            bad = (labels != -100) & ((labels < 0) | (labels >= classes))
            if not torch.compiler.is_compiling() and bool(bad.any()):  # eager only: reads the labels on the host
                raise ValueError(f"labels contain {labels[bad][0].item()}, neither -100 nor in [0, {classes})")
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
            inputs_embeds=inputs_embeds, use_cache=use_cache, output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden_states = outputs.last_hidden_state
        logits = loss = None
        if labels is not None and self.training and self.config.loss_chunk_size:
            loss = chunked_linear_cross_entropy(hidden_states, self.lm_head.weight, labels,
                                                self.config.loss_chunk_size, kwargs.get("num_items_in_batch"))
        else:
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden_states[:, keep, :])
            if labels is not None:
                loss = self._loss(logits, labels, kwargs)
        output = CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                        **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)})
        return output if return_dict is not False else output.to_tuple()

    def _label_classes(self):
        """The number of classes the LM head scores now (it follows `resize_token_embeddings`)."""
        head = self.get_output_embeddings()
        classes = getattr(head, "out_features", None)
        return classes if classes is not None else self.config.get_text_config().vocab_size

    def _loss(self, logits, labels, kwargs):
        """transformers' causal-LM loss (`self.loss_function`); on the fused cross-entropy kernel (`ops_loss`) where
        the kernels run and the loss is that default one with no option but num_items_in_batch — the same numbers
        without the fp32 copies of the logits."""
        fused = use_fused_kernels(logits, self.config.fuse_cross_entropy, self.config.kernel_backend)
        if (cross_entropy is None or not fused or self.loss_function is not ForCausalLMLoss
                or not set(kwargs) <= {"num_items_in_batch"}):
            return self.loss_function(logits=logits, labels=labels, vocab_size=logits.shape[-1], **kwargs)
        targets, divisor = causal_lm_targets(labels, kwargs.get("num_items_in_batch"), logits.device)
        return cross_entropy(logits, targets, divisor)

    def _graph_decodable(self, input_ids, attention_mask, position_ids, cache, inputs_embeds, labels, use_cache,
                         output_hidden_states):
        """A one-token decoding step that `DecodeGraph` can replay: config.decode_cuda_graphs, CUDA, the model on one
        device (not split by a device map), not inside torch.compile or another capture, a filled cache, no
        gradients, nothing but the new tokens (whose mask column, if any, marks them real)."""
        if not (self.config.decode_cuda_graphs and DecodeGraph.enabled_on(input_ids)):
            return False
        if len(set((getattr(self, "hf_device_map", None) or {}).values())) > 1 or torch.compiler.is_compiling():
            return False
        if input_ids.is_cuda and torch.cuda.is_current_stream_capturing():
            return False
        if (inputs_embeds is not None or labels is not None or position_ids is not None or output_hidden_states
                or use_cache is False or self.training or torch.is_grad_enabled()):
            return False
        if not isinstance(cache, LinearDecayCache) or cache.seen_tokens == 0 or input_ids.shape[1] != 1:
            return False
        return attention_mask is None or bool(attention_mask[:, -1].bool().all())


LinearDecayModel.register_for_auto_class("AutoModel")
LinearDecayForCausalLM.register_for_auto_class("AutoModelForCausalLM")

# peft: `LoraConfig()` without `target_modules` takes the model type's defaults from peft's own tables
# (peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, and the tables of the adapters that copy
# it); peft has no other way for a model to declare them. This model type gets the entry peft gives llama: the query
# and value projections of every mixer.
PEFT_TARGET_MODULES = ("q_proj", "v_proj")


def register_peft_target_modules():
    """Enter PEFT_TARGET_MODULES for model_type "linear_decay" in each of peft's default-target tables that use the
    query / value convention (those whose llama entry is ["q_proj", "v_proj"]); an existing entry is kept. Runs on
    import; a no-op without peft."""
    try:
        from peft.utils import constants
    except Exception:  # noqa: BLE001 — peft is optional: missing, or an install that fails to import, changes nothing
        return
    for name, table in vars(constants).items():
        if (name.startswith("TRANSFORMERS_MODELS_TO_") and name.endswith("_TARGET_MODULES_MAPPING")
                and isinstance(table, dict) and table.get("llama") == ["q_proj", "v_proj"]):
            table.setdefault(LinearDecayConfig.model_type, list(PEFT_TARGET_MODULES))


register_peft_target_modules()

__all__ = ["LinearDecayModel", "LinearDecayForCausalLM", "LinearDecayPreTrainedModel", "LinearDecayCache"]
