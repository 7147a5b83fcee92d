"""`LinearDecayConfig`: one config for every point of the decay design space (DESIGN.md §1–4).

Every field is validated when the config is built; an unsupported combination raises `ValueError` naming the field,
the value given and what is allowed. `valid_combinations()` enumerates every supported
(decay_type, decay_granularity, share_decay, position_encoding).
"""

import difflib
import itertools
import math

from transformers import PreTrainedConfig

from .decay import DECAY_REGISTRY

DECAY_TYPES = tuple(DECAY_REGISTRY)
DECAY_GRANULARITIES = ("vector", "scalar")
POSITION_ENCODINGS = ("none", "rope", "lrpe", "tpe")

# Paper sizes (DESIGN §1; vocab ≈ 50k, head dim 64, untied) and a tiny one for tests and the bundled CPU demo.
PRESETS = {
    "tiny": dict(vocab_size=8192, hidden_size=128, num_hidden_layers=4, num_heads=2),
    "160m": dict(vocab_size=50304, hidden_size=768, num_hidden_layers=12, num_heads=12),
    "410m": dict(vocab_size=50304, hidden_size=1024, num_hidden_layers=24, num_heads=16),
    "1.45b": dict(vocab_size=50304, hidden_size=2048, num_hidden_layers=24, num_heads=32),
}


# The design of a model: the fields that decide what its weights compute although the weights' names and shapes do not
# (or not reliably) show them — gla and lightnet, or rope and none, have exactly the same parameters.
# `save_pretrained` writes them into the safetensors metadata (key DESIGN_METADATA_KEY, a JSON object), and
# `from_pretrained` refuses a config that contradicts them. Left out: sizes (hidden_size, num_hidden_layers,
# vocab_size, intermediate_size, decay_rank), which the weights record themselves; initialisation-only fields
# (simple_decay_init, the mamba2_* ranges, initializer_range), which trained weights no longer depend on; run-time
# switches (loss_chunk_size, decode_cuda_graphs, kernel_backend, the fuse_* kernels, use_cache) and token ids, which
# change no logit beyond rounding.
KERNEL_BACKENDS = ("auto", "triton", "torch", "naive")  # `kernel_backend` (recurrence.resolve_backend)

DESIGN_FIELDS = (
    "decay_type", "decay_granularity", "share_decay", "position_encoding", "hgrn2_lower_bound", "gla_denominator",
    "num_heads", "rope_theta", "rope_fraction", "use_output_gate", "attention_scale", "rms_norm_eps",
    "tie_word_embeddings",
)
DESIGN_METADATA_KEY = "linear_decay_design"


DEFAULT_AUTO_MAP = {
    "AutoConfig": "configuration_linear_decay.LinearDecayConfig",
    "AutoModel": "modeling_linear_decay.LinearDecayModel",
    "AutoModelForCausalLM": "modeling_linear_decay.LinearDecayForCausalLM",
}


def _invalid(field, value, allowed):
    return ValueError(f"LinearDecayConfig: invalid {field}={value!r}; {allowed}.")


def combination_error(decay_type, decay_granularity, share_decay, position_encoding):
    """Why a (decay_type, granularity, sharing, position encoding) is unsupported, or None if it is supported."""
    if not isinstance(decay_type, str) or decay_type not in DECAY_REGISTRY:
        return _invalid("decay_type", decay_type, f"allowed: {', '.join(DECAY_TYPES)}")
    spec = DECAY_REGISTRY[decay_type]
    if not isinstance(decay_granularity, str) or decay_granularity not in DECAY_GRANULARITIES:
        return _invalid("decay_granularity", decay_granularity, f"allowed: {', '.join(DECAY_GRANULARITIES)}")
    if decay_granularity not in spec.granularities:
        return _invalid(
            "decay_granularity", decay_granularity, f"decay_type={decay_type!r} supports only {spec.granularities}"
        )
    if not isinstance(share_decay, bool):
        return _invalid("share_decay", share_decay, "allowed: True or False")
    if share_decay:
        shareable = [name for name, s in DECAY_REGISTRY.items() if s.shareable]
        if not spec.shareable:
            return _invalid("share_decay", share_decay, f"sharing (DESIGN §3) needs decay_type in {shareable}")
        if decay_granularity != "vector":
            return _invalid("share_decay", share_decay, "sharing (DESIGN §3) needs decay_granularity='vector'")
    if not isinstance(position_encoding, str) or position_encoding not in POSITION_ENCODINGS:
        return _invalid("position_encoding", position_encoding, f"allowed: {', '.join(POSITION_ENCODINGS)}")
    return None


def valid_combinations():
    """Every supported (decay_type, decay_granularity, share_decay, position_encoding)."""
    grid = itertools.product(DECAY_TYPES, DECAY_GRANULARITIES, (False, True), POSITION_ENCODINGS)
    return [combo for combo in grid if combination_error(*combo) is None]


class LinearDecayConfig(PreTrainedConfig):
    r"""Configuration of a decay linear attention language model (DESIGN.md).

    Args:
        vocab_size, hidden_size, num_hidden_layers, num_heads: the backbone (d = num_heads · head_dim).
        head_dim: per-head dimension; defaults to hidden_size // num_heads and must satisfy d = H·e.
        intermediate_size: SwiGLU width; defaults to 8/3·d rounded up to a multiple of 256.
        decay_type: one of DECAY_TYPES (DESIGN §2).
        decay_granularity: "vector" (one λ per key channel) or "scalar" (one per head); defaults to the first the
            decay type supports (vector, or scalar for tnl/tnl_l/none).
        share_decay: derive keys from the decay (DESIGN §3).
        decay_rank: rank r of the vector decay projection d -> r -> d (default head_dim).
        simple_decay_init: p of Simple Decay, in (0, 1).
        gla_denominator: GLA's logit divisor (> 0).
        mamba2_a_init_range, mamba2_dt_min, mamba2_dt_max, mamba2_dt_init_floor: Mamba2 initialisation ranges.
        hgrn2_lower_bound: learn HGRN2's per-layer lower bound γ_l (if False, γ = 0 everywhere).
        position_encoding: "none", "rope", "lrpe" or "tpe" (DESIGN §4).
        rope_theta: base of rope and lrpe frequencies. rope_fraction: rotated fraction of the head dim (rope only).
        use_output_gate: the low-rank sigmoid gate before the output norm (DESIGN §1).
        attention_scale: multiplies q·k (default 1).
        rms_norm_eps: epsilon of every RMSNorm.
        loss_chunk_size: 0, or the number of tokens per chunk of a chunked linear cross-entropy: a training-mode
            forward with labels then computes the loss and its gradients chunk by chunk and never holds the
            [B, T, vocab] logits (the output's `logits` is None); evaluation and generation are unaffected.
        kernel_backend: where the recurrence runs: "auto" (the Triton kernels on CUDA tensors, the chunked PyTorch
            path on CPU), "triton" (also on CPU tensors, in Triton's interpreter), "torch", or "naive" (the
            step-by-step oracle; slow). $LINEAR_DECAY_BACKEND overrides it, for debugging.
        fuse_norm, fuse_swiglu, fuse_decay, fuse_cross_entropy: where the recurrence runs on the Triton kernels, also
            run the (gated) RMSNorms, the SwiGLU, mamba2's decay and the training loss as fused Triton kernels; each
            False keeps that piece's torch code (what torch.compile traces anyway).
        decode_cuda_graphs: replay one-token decoding steps on CUDA as a captured CUDA graph, so that the host's
            per-step launch overhead of the layers disappears (BENCHMARKS.md, generation); on by default. The model
            keeps its latest graph (one batch size) for later generate() calls until its weights move or its config
            changes (`release_decode_graph()` frees it). CPU decoding, a model split over devices and decoding inside
            torch.compile run eagerly either way.
    """

    model_type = "linear_decay"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(
        self,
        vocab_size=50304,
        hidden_size=768,
        num_hidden_layers=12,
        num_heads=12,
        head_dim=None,
        intermediate_size=None,
        decay_type="mamba2",
        decay_granularity=None,
        share_decay=False,
        decay_rank=None,
        simple_decay_init=0.99,
        gla_denominator=16.0,
        mamba2_a_init_range=(1.0, 16.0),
        mamba2_dt_min=1e-3,
        mamba2_dt_max=0.1,
        mamba2_dt_init_floor=1e-4,
        hgrn2_lower_bound=True,
        position_encoding="none",
        rope_theta=10000.0,
        rope_fraction=1.0,
        use_output_gate=True,
        attention_scale=1.0,
        rms_norm_eps=1e-5,
        loss_chunk_size=0,
        kernel_backend="auto",
        fuse_norm=True,
        fuse_swiglu=True,
        fuse_decay=True,
        fuse_cross_entropy=True,
        decode_cuda_graphs=True,
        initializer_range=0.02,
        tie_word_embeddings=False,
        use_cache=True,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.intermediate_size = intermediate_size
        self.decay_type = decay_type
        self.decay_granularity = decay_granularity
        self.share_decay = share_decay
        self.decay_rank = decay_rank
        self.simple_decay_init = simple_decay_init
        self.gla_denominator = gla_denominator
        self.mamba2_a_init_range = (
            tuple(mamba2_a_init_range) if isinstance(mamba2_a_init_range, (list, tuple)) else mamba2_a_init_range
        )
        self.mamba2_dt_min = mamba2_dt_min
        self.mamba2_dt_max = mamba2_dt_max
        self.mamba2_dt_init_floor = mamba2_dt_init_floor
        self.hgrn2_lower_bound = hgrn2_lower_bound
        self.position_encoding = position_encoding
        self.rope_theta = rope_theta
        self.rope_fraction = rope_fraction
        self.use_output_gate = use_output_gate
        self.attention_scale = attention_scale
        self.rms_norm_eps = rms_norm_eps
        self.loss_chunk_size = loss_chunk_size
        self.kernel_backend = kernel_backend
        self.fuse_norm = fuse_norm
        self.fuse_swiglu = fuse_swiglu
        self.fuse_decay = fuse_decay
        self.fuse_cross_entropy = fuse_cross_entropy
        self.decode_cuda_graphs = decode_cuda_graphs
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        if not isinstance(tie_word_embeddings, bool):
            raise _invalid("tie_word_embeddings", tie_word_embeddings, "allowed: True or False")
        self._resolve_defaults()
        self.validate_linear_decay()
        # Every checkpoint names all its Auto classes, so remote code serves AutoModel as well as the causal LM.
        kwargs["auto_map"] = {**DEFAULT_AUTO_MAP, **(kwargs.get("auto_map") or {})}
        super().__init__(
            tie_word_embeddings=tie_word_embeddings,
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            **kwargs,
        )

    @classmethod
    def from_preset(cls, name, **overrides):
        """A paper size (`160m`, `410m`, `1.45b`) or `tiny`, with any field overridden."""
        if name not in PRESETS:
            raise _invalid("preset", name, f"allowed: {', '.join(PRESETS)}")
        known = cls().to_dict()
        for field in overrides:
            if field not in known:
                close = difflib.get_close_matches(field, known, n=3)
                hint = f"did you mean {', '.join(close)}?" if close else f"fields: {', '.join(sorted(known))}"
                raise ValueError(f"LinearDecayConfig has no field {field!r}; {hint}")
        return cls(**{**PRESETS[name], **overrides})

    def _resolve_defaults(self):
        """Fill the derived defaults (head_dim, intermediate_size, decay_rank, decay_granularity); sizes are checked
        here first so that a derived value never hides the field that was actually wrong. An unknown decay_type is
        reported by `combination_error`."""
        for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads"):
            value = getattr(self, field)
            if not _is_int(value) or value <= 0:
                raise _invalid(field, value, "must be a positive integer")
        if self.hidden_size % self.num_heads != 0:
            raise _invalid("num_heads", self.num_heads, f"must divide hidden_size={self.hidden_size}")
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_heads
        if self.intermediate_size is None:
            self.intermediate_size = 256 * math.ceil(8 * self.hidden_size / 3 / 256)
        if self.decay_rank is None:
            self.decay_rank = self.head_dim
        if self.decay_granularity is None and isinstance(self.decay_type, str) and self.decay_type in DECAY_REGISTRY:
            self.decay_granularity = DECAY_REGISTRY[self.decay_type].granularities[0]

    def validate_linear_decay(self):
        """Raise ValueError for any field outside its domain or any unsupported combination."""
        for field in ("head_dim", "intermediate_size", "decay_rank"):
            value = getattr(self, field)
            if not _is_int(value) or value <= 0:
                raise _invalid(field, value, "must be a positive integer")
        if self.head_dim * self.num_heads != self.hidden_size:
            raise _invalid(
                "head_dim", self.head_dim,
                f"must equal hidden_size / num_heads = {self.hidden_size // self.num_heads} (d = H·e, DESIGN §1)",
            )
        error = combination_error(self.decay_type, self.decay_granularity, self.share_decay, self.position_encoding)
        if error is not None:
            raise error
        if not (_is_real(self.simple_decay_init) and 0.0 < self.simple_decay_init < 1.0):
            raise _invalid("simple_decay_init", self.simple_decay_init, "p must lie in the open interval (0, 1)")
        if not (_is_real(self.gla_denominator) and self.gla_denominator > 0):
            raise _invalid("gla_denominator", self.gla_denominator, "must be a positive number")
        a_range = self.mamba2_a_init_range
        if not (isinstance(a_range, tuple) and len(a_range) == 2 and all(_is_real(a) for a in a_range)
                and 0 < a_range[0] <= a_range[1]):
            raise _invalid("mamba2_a_init_range", a_range, "must be (low, high) with 0 < low <= high")
        if not (_is_real(self.mamba2_dt_min) and _is_real(self.mamba2_dt_max)
                and 0 < self.mamba2_dt_min <= self.mamba2_dt_max):
            raise _invalid("mamba2_dt_min", self.mamba2_dt_min,
                           f"must satisfy 0 < mamba2_dt_min <= mamba2_dt_max={self.mamba2_dt_max}")
        if not (_is_real(self.mamba2_dt_init_floor) and self.mamba2_dt_init_floor > 0):
            raise _invalid("mamba2_dt_init_floor", self.mamba2_dt_init_floor, "must be a positive number")
        if self.kernel_backend not in KERNEL_BACKENDS:
            raise _invalid("kernel_backend", self.kernel_backend, f"allowed: {', '.join(KERNEL_BACKENDS)}")
        for field in ("hgrn2_lower_bound", "use_output_gate", "use_cache", "decode_cuda_graphs", "fuse_norm",
                      "fuse_swiglu", "fuse_decay", "fuse_cross_entropy"):
            if not isinstance(getattr(self, field), bool):
                raise _invalid(field, getattr(self, field), "allowed: True or False")
        if not (_is_real(self.rope_theta) and self.rope_theta > 1):
            raise _invalid("rope_theta", self.rope_theta, "must be a number > 1")
        if not (_is_real(self.rope_fraction) and 0 < self.rope_fraction <= 1):
            raise _invalid("rope_fraction", self.rope_fraction, "must lie in (0, 1]")
        if self.position_encoding == "rope" and 2 * int(self.head_dim * self.rope_fraction // 2) == 0:
            raise _invalid("rope_fraction", self.rope_fraction, f"rotates no channel of head_dim={self.head_dim}")
        for field in ("attention_scale", "rms_norm_eps", "initializer_range"):
            if not (_is_real(getattr(self, field)) and getattr(self, field) > 0):
                raise _invalid(field, getattr(self, field), "must be a positive number")
        if not (_is_int(self.loss_chunk_size) and self.loss_chunk_size >= 0):
            raise _invalid("loss_chunk_size", self.loss_chunk_size, "must be 0 (off) or a positive number of tokens")

    def design(self):
        """{field: value} of DESIGN_FIELDS: what the safetensors metadata of a saved checkpoint records."""
        return {field: getattr(self, field) for field in DESIGN_FIELDS}

    @property
    def key_dim(self):
        """Per-head key dim of the recurrent state (LRPE doubles it, DESIGN §4)."""
        return 2 * self.head_dim if self.position_encoding == "lrpe" else self.head_dim


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


LinearDecayConfig.register_for_auto_class()

__all__ = ["LinearDecayConfig", "PRESETS", "DECAY_TYPES", "DESIGN_FIELDS", "valid_combinations", "combination_error"]
