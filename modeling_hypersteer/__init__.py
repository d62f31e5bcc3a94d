"""HyperSteer: steering vectors from natural-language prompts with a hypernetwork, for any HF causal LM."""

from .configuration_hypersteer import HyperSteerConfig
from .modeling_hypersteer import (
    HyperSteerCausalLMOutputWithPast,
    HyperSteerHypernetwork,
    HyperSteerModel,
    HyperSteerPreTrainedModel,
    tokenize_steering_prompts,
)


__version__ = "0.1.0"

__all__ = [
    "HyperSteerConfig",
    "HyperSteerModel",
    "HyperSteerPreTrainedModel",
    "HyperSteerHypernetwork",
    "HyperSteerCausalLMOutputWithPast",
    "tokenize_steering_prompts",
]
