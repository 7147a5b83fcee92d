"""linear-decay: the decay design space of linear attention as a Hugging Face Transformers model family.

`import linear_decay` registers `LinearDecayConfig` with AutoConfig and the models with AutoModel /
AutoModelForCausalLM. Spec: DESIGN.md (shipped beside the repository as shared/DESIGN.md).
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_linear_decay import (
    DECAY_TYPES,
    PRESETS,
    LinearDecayConfig,
    combination_error,
    valid_combinations,
)
from .modeling_linear_decay import (
    LinearDecayCache,
    LinearDecayForCausalLM,
    LinearDecayModel,
    LinearDecayPreTrainedModel,
)

AutoConfig.register(LinearDecayConfig.model_type, LinearDecayConfig, exist_ok=True)
AutoModel.register(LinearDecayConfig, LinearDecayModel, exist_ok=True)
AutoModelForCausalLM.register(LinearDecayConfig, LinearDecayForCausalLM, exist_ok=True)

__version__ = "0.1.0"

__all__ = [
    "DECAY_TYPES",
    "PRESETS",
    "LinearDecayCache",
    "LinearDecayConfig",
    "LinearDecayForCausalLM",
    "LinearDecayModel",
    "LinearDecayPreTrainedModel",
    "combination_error",
    "valid_combinations",
]
