"""PyTorch HyperSteer: a hypernetwork that turns a natural-language steering prompt into a steering vector for a
frozen causal LM, described in "HyperSteer: Activation Steering at Scale with Hypernetworks" (Sun et al., 2025,
https://huggingface.co/papers/2506.03292).

For a batch row with steering prompt `s`, user prompt `x` and factor `a`, the hypernetwork `H` returns

    v = H(s, x) in R^hidden_size,    h_t <- h_t + a * g_t * v    after decoder layer `steering_layer`,

where `g_t = 1`, or with `token_gate=True`, `g_t = sigmoid(w^T (RMSNorm(h_t) * v / rms(v)) + b)`.

The file is one model in one file of small classes, each readable alone, in the order a call meets them:

1. Layers that own parameters and math (as PEFT's `lora/layer.py`): `HyperSteerRMSNorm`, `HyperSteerCrossAttention`,
   `HyperSteerTokenGate`, `HyperSteerRunningCenter`, the training-free priors (`HyperSteerLexicalPrior`,
   `HyperSteerResidualPrior`), the prior's scalar map `HyperSteerPriorScale`, and `HyperSteerHypernetwork`, which
   also builds its blocks' inputs.
2. `HyperSteerCausalLMOutputWithPast`.
3. Steering requests: `HyperSteerRequestBuilder` validates one call's steering arguments and shapes them into a
   `_SteeringRequest`.
4. `HyperSteerSteeringInjector`: the hook that adds the vectors to the base's residual for one call (PEFT's tuner
   layer, kept apart from the model wrapper).
5. `HyperSteerPreTrainedModel`: the checkpoint (initialisation, and saving and loading the hypernetwork only).
6. The config-driven wiring (as PEFT's `lora/model.py`): `HyperSteerModel` freezes the base, builds the parts above
   and runs `forward`, `generate` and `compute_steering_vectors` through them. Start reading there.
7. Base-model helpers (`decoder_layers_of`, `positions_from_mask`, `steering_layer_output`) and private helpers.

This module and `configuration_hypersteer.py` are copied next to saved weights as remote code, so they import
only torch, transformers and each other.
"""

import copy
import inspect
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, GenerationMixin, PreTrainedModel
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import load_state_dict
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, cached_file, logging
from transformers.utils.hub import get_checkpoint_shard_files

from .configuration_hypersteer import HyperSteerConfig


logger = logging.get_logger(__name__)

REMOTE_CODE_FILES = ("configuration_hypersteer.py", "modeling_hypersteer.py")
AUTO_MAP = {
    "AutoConfig": "configuration_hypersteer.HyperSteerConfig",
    "AutoModel": "modeling_hypersteer.HyperSteerModel",
    "AutoModelForCausalLM": "modeling_hypersteer.HyperSteerModel",
}
# Keyword arguments that `AutoModel*.from_pretrained` hands to a remote-code class and that concern the HyperSteer
# folder itself, never the base model's load.
_AUTO_CLASS_ONLY_KWARGS = ("trust_remote_code", "_from_auto", "adapter_kwargs", "code_revision", "_commit_hash")


def _cache_name(parameters) -> str:
    """transformers 5.24 renamed the key/value cache from `past_key_values` to `cache` (the old name warns until its
    removal in 5.40). This file is frozen into every saved checkpoint, so it uses whichever name the installed version
    declares instead of either one alone."""
    return "cache" if "cache" in parameters else "past_key_values"


# Resolved once at import: the keyword of the mask builders and the base's forward, and the cache field of outputs.
_CACHE_KWARG = _cache_name(inspect.signature(create_causal_mask).parameters)
_CACHE_NAMES = ("cache", "past_key_values")
_CACHE_FIELD = _cache_name(CausalLMOutputWithPast.__dataclass_fields__)


def tokenize_steering_prompts(tokenizer, steering_prompts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    """Tokenise steering prompts the same way for training and inference.

    Prompts are plain text (no chat template) with the tokenizer's own special tokens, right-padded and truncated to
    `max_length` tokens.

    Returns:
        `dict` with `steering_input_ids` and `steering_attention_mask`, both `torch.LongTensor` of shape
        `(batch_size, steering_sequence_length)`.
    """
    if isinstance(steering_prompts, str):
        steering_prompts = [steering_prompts]
    for index, prompt in enumerate(steering_prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(
                f"Steering prompt {index} is {prompt!r}; every row needs a non-empty natural-language steering prompt "
                "such as 'references to legal terminology'."
            )
    if tokenizer is None:
        raise ValueError(
            "Text steering prompts need a tokenizer: pass `tokenizer=` to `from_base_model`/`from_pretrained`, or pass "
            "`steering_input_ids`/`steering_attention_mask` tensors instead."
        )
    if tokenizer.pad_token_id is None:
        raise ValueError(
            f"The tokenizer {type(tokenizer).__name__} has no pad token; set one (e.g. `tokenizer.pad_token = "
            "tokenizer.eos_token`) so steering prompts of different lengths can be batched."
        )
    encoding = tokenizer(
        list(steering_prompts),
        add_special_tokens=True,
        truncation=True,
        max_length=max_length,
        padding=True,
        padding_side="right",
        return_tensors="pt",
    )
    return {"steering_input_ids": encoding["input_ids"], "steering_attention_mask": encoding["attention_mask"]}


# ---------------------------------------------------------------------------------------------------------------
# Layers: parameters, initialisation and math
# ---------------------------------------------------------------------------------------------------------------


class HyperSteerRMSNorm(nn.Module):
    """RMS norm computed in float32 (bf16-safe): `y = x / sqrt(mean(x^2) + eps) * weight`."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        hidden_states = hidden_states * torch.rsqrt(
            hidden_states.pow(2).mean(-1, keepdim=True) + self.variance_epsilon
        )
        return (self.weight.to(torch.float32) * hidden_states).to(input_dtype)


class HyperSteerCrossAttention(nn.Module):
    """Pre-norm multi-head cross-attention from hypernetwork states to the base residual at the steering layer.

    Both sides are RMS-normalised before their projections: base residual norms grow with depth and the BOS
    position is an outlier, so unnormalised keys would let one position dominate the softmax.

        h <- h + W_o softmax((W_q norm_q(h)) (W_k norm_c(c))^T / sqrt(d)) W_v norm_c(c)
    """

    def __init__(self, config: HyperSteerConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        inner_size = self.num_heads * self.head_dim
        self.query_norm = HyperSteerRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.context_norm = HyperSteerRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.q_proj = nn.Linear(config.hidden_size, inner_size, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, inner_size, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, inner_size, bias=False)
        self.o_proj = nn.Linear(inner_size, config.hidden_size, bias=False)

    def forward(
        self, hidden_states: torch.Tensor, context_states: torch.Tensor, context_mask: torch.Tensor
    ) -> torch.Tensor:
        """
        Args:
            hidden_states (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`):
                Hypernetwork states (queries).
            context_states (`torch.FloatTensor` of shape `(batch_size, context_length, hidden_size)`):
                Base residual at the steering layer (keys and values).
            context_mask (`torch.BoolTensor` of shape `(batch_size, context_length)`):
                `True` where a context position may be attended (the user's prompt, never padding or labels).

        Returns:
            `torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`: the updated residual.
        """
        batch_size, sequence_length, _ = hidden_states.shape
        context_length = context_states.shape[1]
        # (batch_size, length, hidden_size) -> (batch_size, num_heads, length, head_dim)
        query = self.q_proj(self.query_norm(hidden_states))
        query = query.view(batch_size, sequence_length, self.num_heads, self.head_dim).transpose(1, 2)
        normed_context = self.context_norm(context_states)
        key = (
            self.k_proj(normed_context).view(batch_size, context_length, self.num_heads, self.head_dim).transpose(1, 2)
        )
        value = (
            self.v_proj(normed_context).view(batch_size, context_length, self.num_heads, self.head_dim).transpose(1, 2)
        )
        # A row with no attendable context would give NaN softmax rows (and NaN gradients); let such a row attend
        # everywhere and discard its result instead.
        has_context = context_mask.any(dim=-1)
        attend = context_mask | ~has_context[:, None]
        attention = F.scaled_dot_product_attention(query, key, value, attn_mask=attend[:, None, None, :])
        attention = attention * has_context[:, None, None, None].to(attention.dtype)
        # (batch_size, num_heads, sequence_length, head_dim) -> (batch_size, sequence_length, num_heads * head_dim)
        attention = attention.transpose(1, 2).reshape(batch_size, sequence_length, self.num_heads * self.head_dim)
        return hidden_states + self.o_proj(attention)


class HyperSteerTokenGate(nn.Module):
    """Per-token steering coefficient read from the base activation at each position (PSR-style token gating):

        g_t = sigmoid(w^T (RMSNorm(h_t) * v / rms(v)) + b),    g_t in [0, 1].

    The elementwise product lets the gate depend on how each token's state aligns with the steering direction.
    """

    def __init__(self, config: HyperSteerConfig):
        super().__init__()
        self.norm = HyperSteerRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.proj = nn.Linear(config.hidden_size, 1, bias=True)
        self.eps = config.rms_norm_eps

    def forward(self, hidden_states: torch.Tensor, steering_vectors: torch.Tensor) -> torch.Tensor:
        """
        Args:
            hidden_states (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`): base residual.
            steering_vectors (`torch.FloatTensor` of shape `(batch_size, hidden_size)`).

        Returns:
            `torch.FloatTensor` of shape `(batch_size, sequence_length)` with values in [0, 1].
        """
        vectors = steering_vectors.to(torch.float32)
        direction = vectors * torch.rsqrt(vectors.pow(2).mean(-1, keepdim=True) + self.eps)
        features = self.norm(hidden_states.to(self.proj.weight.dtype)) * direction[:, None, :].to(
            self.proj.weight.dtype
        )
        return torch.sigmoid(self.proj(features).squeeze(-1))


class HyperSteerRunningCenter(nn.Module):
    """Subtract a running mean of its inputs, `y = x - m`, or with `scale=True` also divide every coordinate by its
    running standard deviation, `y = (x - m) / sqrt(s + eps)`. At every training step,
    `m <- m + r (mean_batch(x) - m)` and `s <- s + r (mean_batch((x - m)^2) - s)`, where
    `r = max(1 / (t + 1), momentum)` after `t` updates (an exact average first, then an exponential one).

    Rules that keep the statistics a property of the checkpoint rather than of how it was used:

    - Only a training step updates them: training mode *and* gradients enabled. Evaluation, generation, `no_grad`
      metrics and a model left in training mode by some other `Trainer` read them without moving them.
    - They are float32 buffers whatever the module's dtype (casting the module leaves them float32), and they are
      applied in float32: in half precision an update of rate `1 / t` would round away.
    - Under `torch.distributed`, the batch moments (sum, sum of squares, count) are summed over processes before the
      update, as `SyncBatchNorm` does, so every process holds the same statistics, those of the global batch. Every
      process must then run the training step, as DDP requires anyway.
    - `statistics_mask` selects the rows that count (e.g. not the contrast rows of a joint call). A batch whose rows
      share one concept shows nothing about how concepts differ, and the caller masks it out: its batch variance is
      zero, and an exact first average would divide by it.

    The statistics are persistent buffers, so a saved model transforms exactly as it did at the end of training.
    """

    def __init__(self, hidden_size: int, momentum: float, scale: bool = False, eps: float = 1e-6):
        super().__init__()
        self.momentum = momentum
        self.eps = eps
        self.register_buffer("running_mean", torch.zeros(hidden_size))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        # Registered only when used, so checkpoints of centring-only models keep their exact set of tensors.
        if scale:
            self.register_buffer("running_variance", torch.ones(hidden_size))
        else:
            self.running_variance = None

    def _apply(self, fn, recurse=True):
        # `.to(dtype)`, `.half()` and `.bfloat16()` cast every floating buffer; these stay float32 (moved only).
        statistics = {name: buffer for name, buffer in self._buffers.items() if buffer is not None}
        super()._apply(fn, recurse)
        for name, before in statistics.items():
            after = self._buffers[name]
            if after is not None and after.dtype != before.dtype:
                self._buffers[name] = before.to(after.device)
        return self

    def forward(self, features: torch.Tensor, statistics_mask: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            features (`torch.FloatTensor` of shape `(batch_size, hidden_size)`).
            statistics_mask (`torch.BoolTensor` of shape `(batch_size,)`, *optional*): the rows a training step
                updates the statistics from (all rows by default; none skips the update).

        Returns:
            `torch.FloatTensor` of the shape and dtype of `features`.
        """
        if self.training and torch.is_grad_enabled():
            self._update(features.detach(), statistics_mask)
        centred = features.float() - self.running_mean
        if self.running_variance is not None:
            centred = centred * torch.rsqrt(self.running_variance + self.eps)
        return centred.to(features.dtype)

    @torch.no_grad()
    def _update(self, features: torch.Tensor, statistics_mask: torch.Tensor | None) -> None:
        # Moments in float64: the variance is recovered from sums of squares, which float32 would cancel away.
        batch = features.double()
        weights = batch.new_ones(batch.shape[0]) if statistics_mask is None else statistics_mask.to(batch)
        moments = torch.cat([weights @ batch, weights @ batch.pow(2), weights.sum()[None]])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_world_size() > 1:
                torch.distributed.all_reduce(moments)
        hidden_size = self.running_mean.shape[0]
        total, total_of_squares, count = moments.split([hidden_size, hidden_size, 1])
        # Computed on the buffer's device, with no branch on the count: reading it on the host would sync every step.
        counted = count > 0
        batch_mean = total / count.clamp(min=1)
        rate = (1.0 / (self.num_updates + 1).double()).clamp(min=self.momentum) * counted
        mean = self.running_mean.double()
        mean = mean + rate * (batch_mean - mean)
        self.running_mean.copy_(mean)
        if self.running_variance is not None:
            # mean_batch((x - m)^2) about the updated mean m.
            batch_variance = (total_of_squares / count.clamp(min=1) - 2 * mean * batch_mean + mean.pow(2)).clamp(min=0)
            variance = self.running_variance.double()
            self.running_variance.copy_(variance + rate * (batch_variance - variance))
        self.num_updates.add_(counted.long().squeeze(0))


class HyperSteerPrior(nn.Module):
    """The training-free concept direction `u(s)` of the prior term (`steering_prior`), read from the frozen base.

    A prior holds no trainable weight: the learned map `A` of `A u(s)` and, for `"residual"`, the running centre of
    `u(s)` belong to [`HyperSteerHypernetwork`] (`prior_projection`, `prior_center`), where checkpoints keep them.
    Subclasses implement `forward(steering_input_ids, steering_attention_mask, language_model, steering_layer)`.
    """

    @staticmethod
    def from_config(config: HyperSteerConfig, language_model: PreTrainedModel) -> "HyperSteerPrior | None":
        """The prior `config.steering_prior` names (`None` for `"none"`)."""
        if config.steering_prior == "lexical":
            return HyperSteerLexicalPrior(language_model.get_output_embeddings().weight)
        if config.steering_prior == "residual":
            return HyperSteerResidualPrior()
        return None

    @staticmethod
    def concept_token_mask(language_model, steering_input_ids, steering_attention_mask) -> torch.Tensor:
        """Real steering-prompt tokens other than the base's BOS/EOS/PAD, which carry no concept (all real tokens for a
        prompt made only of special tokens): `torch.BoolTensor` of shape `(batch_size, steering_sequence_length)`."""
        real = steering_attention_mask.bool()
        token_mask = real.clone()
        base_config = language_model.config.get_text_config()
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            special = getattr(base_config, name, None)
            for token_id in special if isinstance(special, (list, tuple)) else [special]:
                if token_id is not None:
                    token_mask &= steering_input_ids != token_id
        return torch.where(token_mask.any(dim=-1, keepdim=True), token_mask, real)


class HyperSteerLexicalPrior(HyperSteerPrior):
    """`u(s)`: the unit-norm mean output embedding of the steering prompt's concept tokens, centred on the vocabulary
    mean (the centre of the output-embedding cloud: every token shares it, so it says nothing about a concept).

    Args:
        output_embeddings (`torch.FloatTensor` of shape `(vocab_size, hidden_size)`): the base's LM-head weight; only
            its mean is kept, as a non-persistent buffer (checkpoints never store it).
    """

    def __init__(self, output_embeddings: torch.Tensor):
        super().__init__()
        self.register_buffer(
            "vocabulary_mean_embedding", output_embeddings.detach().float().mean(dim=0), persistent=False
        )

    @torch.no_grad()
    def forward(
        self, steering_input_ids, steering_attention_mask, language_model, steering_layer=None
    ) -> torch.Tensor:
        """
        Returns:
            `torch.FloatTensor` of shape `(batch_size, hidden_size)` in float32, on the output embeddings' device.
        """
        output_embeddings = language_model.get_output_embeddings().weight
        device = output_embeddings.device
        steering_input_ids = steering_input_ids.to(device)
        token_mask = self.concept_token_mask(language_model, steering_input_ids, steering_attention_mask.to(device))
        weights = token_mask.float()[..., None]
        mean_embedding = (output_embeddings[steering_input_ids].float() * weights).sum(1) / weights.sum(1).clamp(min=1)
        centred = mean_embedding - self.vocabulary_mean_embedding.to(device)
        return centred / centred.norm(dim=-1, keepdim=True).clamp(min=1e-6)


class HyperSteerResidualPrior(HyperSteerPrior):
    """`u(s)` before centring: the base's residual after the steering layer, averaged over the steering prompt's
    concept tokens, with the base run on the steering prompt alone and stopped at that layer. The hypernetwork centres
    it on a running mean (`prior_center`) and normalises it.

    It may run while the steering hook of a request is registered on the same layer: the stop hook is put in front of
    it (see [`steering_layer_output`]), so this pass is never steered.
    """

    @torch.no_grad()
    def forward(self, steering_input_ids, steering_attention_mask, language_model, steering_layer) -> torch.Tensor:
        """
        Returns:
            `torch.FloatTensor` of shape `(batch_size, hidden_size)` in float32.
        """
        device = language_model.get_input_embeddings().weight.device
        steering_input_ids = steering_input_ids.to(device)
        steering_attention_mask = steering_attention_mask.to(device)
        hidden_states = steering_layer_output(
            language_model, steering_layer, steering_input_ids, steering_attention_mask
        ).float()
        token_mask = self.concept_token_mask(language_model, steering_input_ids, steering_attention_mask)
        weights = token_mask.float()[..., None]
        return (hidden_states * weights.to(hidden_states.device)).sum(1) / weights.sum(1).clamp(min=1).to(
            hidden_states.device
        )


class HyperSteerPriorScale(nn.Module):
    """The prior term's map `A = a * I` (`steering_prior_map="scalar"`): one learned scale of the prior direction."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))

    def forward(self, prior_directions: torch.Tensor) -> torch.Tensor:
        """
        Args:
            prior_directions (`torch.FloatTensor` of shape `(batch_size, hidden_size)`): unit-norm directions `u(s)`.

        Returns:
            `torch.FloatTensor` of shape `(batch_size, hidden_size)`: `a * u(s)`.
        """
        return prior_directions * self.weight


class HyperSteerHypernetwork(nn.Module):
    """The trainable part of HyperSteer: decoder blocks over the steering prompt, optional cross-attention to the
    base residual, pooling (last token or mean), a final norm and an output projection, plus two optional terms:

        v = W_o norm(pool(blocks(s, x)) [- m])  [+ b]  [+ A u(s)]

    (with `readout_norm`, the first term is rescaled to that norm)

    `m` is a running mean of the pooled features (`center_pooled_features`; with `standardize_pooled_features` every
    coordinate is also divided by its running standard deviation), `b` a learned concept-free offset
    (`shared_steering_offset`) and `A u(s)` the prior term (`steering_prior`): `u(s)` is a unit-norm, training-free
    concept direction read from the frozen base by `prior` (a [`HyperSteerPrior`]), and `A` a learned map starting at
    `steering_prior_init_norm * I` (a full matrix, or one scale with `steering_prior_map="scalar"`).

    [`~HyperSteerHypernetwork.vectors_from_tokens`] builds the blocks' inputs from token ids (embeddings, packing,
    causal masks and rotary embeddings, with the base's own embedding and rotary modules passed in); `forward` takes
    them ready-made; in a training step it hides each steering-prompt token from the blocks with probability
    `steering_prompt_token_dropout` (the prior term always reads the whole prompt).

    The decoder blocks are of the base's own architecture, so `hypernet_init="base"` can start from the base's first
    pretrained layers. With `hypernet_type="cross_attention"`, a cross-attention sublayer precedes every decoder
    block (as gated cross-attention layers are interleaved with a frozen LM in Flamingo), which keeps each pretrained
    block intact. The output projection starts at zero, so an untrained model steers by exactly zero.
    """

    def __init__(
        self,
        config: HyperSteerConfig,
        decoder_layers: Sequence[nn.Module],
        layer_types: Sequence[str] | None = None,
        prior: "HyperSteerPrior | None" = None,
    ):
        super().__init__()
        self.layers = nn.ModuleList(decoder_layers)
        # The attention type of each block ("full_attention" or "sliding_attention"), which picks its mask and rotary.
        self.layer_types = list(layer_types) if layer_types is not None else ["full_attention"] * len(decoder_layers)
        if config.hypernet_type == "cross_attention":
            self.cross_attentions = nn.ModuleList(HyperSteerCrossAttention(config) for _ in decoder_layers)
        else:
            self.cross_attentions = None
        self.norm = HyperSteerRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.output_projection = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.token_gate = HyperSteerTokenGate(config) if config.token_gate else None
        self.pooling = config.hypernet_pooling
        self.token_dropout = config.steering_prompt_token_dropout
        self.readout_norm = config.readout_norm
        if config.center_pooled_features:
            self.feature_center = HyperSteerRunningCenter(
                config.hidden_size,
                config.pooled_feature_momentum,
                scale=config.standardize_pooled_features,
                eps=config.rms_norm_eps,
            )
        else:
            self.feature_center = None
        self.steering_offset = nn.Parameter(torch.zeros(config.hidden_size)) if config.shared_steering_offset else None
        if config.steering_prior != "none" and config.steering_prior_map == "scalar":
            self.prior_projection = HyperSteerPriorScale()
        elif config.steering_prior != "none":
            self.prior_projection = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        else:
            self.prior_projection = None
        if config.steering_prior == "residual":
            self.prior_center = HyperSteerRunningCenter(config.hidden_size, config.pooled_feature_momentum)
        else:
            self.prior_center = None
        # Registered last: it holds no parameter, and only a non-persistent buffer (the lexical prior's centre).
        self.prior = prior

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        layer_attention_masks: Sequence[torch.Tensor | None],
        layer_position_embeddings: Sequence[tuple[torch.Tensor, torch.Tensor]],
        position_ids: torch.LongTensor,
        context_states: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        prior_directions: torch.Tensor | None = None,
        statistics_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            inputs_embeds (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`):
                Embedded hypernetwork input, real tokens packed to the left (right padding only).
            attention_mask (`torch.BoolTensor` of shape `(batch_size, sequence_length)`): real-token mask.
            layer_attention_masks (`list`): the causal mask each decoder block expects (per its attention type).
            layer_position_embeddings (`list`): the rotary `(cos, sin)` each decoder block expects.
            position_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`).
            context_states (`torch.FloatTensor` of shape `(batch_size, context_length, hidden_size)`, *optional*):
                Base residual at the steering layer, for `hypernet_type="cross_attention"`.
            context_mask (`torch.BoolTensor` of shape `(batch_size, context_length)`, *optional*).
            prior_directions (`torch.FloatTensor` of shape `(batch_size, hidden_size)`, *optional*):
                The training-free concept directions of the prior term (unit norm for `"lexical"`; the uncentred mean
                residual for `"residual"`, centred and normalised here); required when the term exists.
            statistics_mask (`torch.BoolTensor` of shape `(batch_size,)`, *optional*): the rows a training step
                updates the running statistics from (see [`HyperSteerRunningCenter`]); all rows by default.

        Returns:
            `torch.FloatTensor` of shape `(batch_size, hidden_size)`: the steering vectors `v`.
        """
        hidden_states = inputs_embeds
        for index, layer in enumerate(self.layers):
            if self.cross_attentions is not None:
                hidden_states = self.cross_attentions[index](hidden_states, context_states, context_mask)
            layer_output = layer(
                hidden_states,
                attention_mask=layer_attention_masks[index],
                position_ids=position_ids,
                position_embeddings=layer_position_embeddings[index],
                use_cache=False,
            )
            hidden_states = layer_output[0] if isinstance(layer_output, tuple) else layer_output
        if self.pooling == "mean":
            weights = attention_mask.to(hidden_states.dtype)[..., None]
            pooled = (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
        else:
            # Packed inputs put the last real token at index `length - 1` in every row.
            last_index = attention_mask.sum(dim=-1) - 1
            pooled = hidden_states[torch.arange(hidden_states.shape[0], device=hidden_states.device), last_index]
        if self.feature_center is not None:
            pooled = self.feature_center(pooled, statistics_mask)
        vectors = self.output_projection(self.norm(pooled))
        if self.readout_norm is not None:
            vectors = self.readout_norm * F.normalize(vectors, dim=-1)
        if self.steering_offset is not None:
            vectors = vectors + self.steering_offset
        if self.prior_projection is not None:
            if prior_directions is None:
                raise ValueError("This hypernetwork has a prior term: pass `prior_directions`.")
            if self.prior_center is not None:
                # Centred in float32, before the cast to the hypernetwork's dtype.
                prior_directions = F.normalize(self.prior_center(prior_directions.float(), statistics_mask), dim=-1)
            prior_directions = prior_directions.to(vectors.dtype)
            vectors = vectors + self.prior_projection(prior_directions)
        return vectors

    def vectors_from_tokens(
        self,
        steering_input_ids: torch.LongTensor,
        steering_attention_mask: torch.Tensor,
        input_embeddings: nn.Module,
        rotary_embedding: nn.Module,
        base_config,
        context_states: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        context_input_ids: torch.LongTensor | None = None,
        prior_directions: torch.Tensor | None = None,
        num_statistics_rows: int | None = None,
    ) -> torch.Tensor:
        """Embed the hypernetwork's input with the frozen base embeddings, build its blocks' arguments and run it.

        A training step updates the running statistics (if any) from the first `num_statistics_rows` rows (all by
        default), and only when they hold at least two different steering prompts: rows of a single concept show
        nothing about how concepts differ, and their features' batch variance is (near) zero.

        Args:
            steering_input_ids, steering_attention_mask (`torch.LongTensor` of shape
                `(batch_size, steering_sequence_length)`): the tokenised steering prompts.
            input_embeddings (`nn.Module`): the base's (frozen) input embeddings.
            rotary_embedding (`nn.Module`): the base's rotary embedding (`model.model.rotary_emb`).
            base_config: the base's text config, for its causal-mask builders.
            context_states, context_mask: as in `forward`.
            context_input_ids (`torch.LongTensor` of shape `(batch_size, context_length)`, *optional*): the user's
                prompt, read as text after the steering prompt (`hypernet_type="in_context"`); `context_mask` selects
                its tokens.
            prior_directions: as in `forward`.

        Returns:
            `torch.FloatTensor` of shape `(batch_size, hidden_size)` in the hypernetwork's dtype.
        """
        parameter = self.output_projection.weight
        with torch.no_grad():
            inputs_embeds = input_embeddings(steering_input_ids).to(parameter)
        token_mask = steering_attention_mask.bool().to(parameter.device)
        if self.training and torch.is_grad_enabled() and self.token_dropout > 0:
            token_mask = _drop_tokens(token_mask, self.token_dropout)
        if context_input_ids is not None:
            with torch.no_grad():
                context_embeds = input_embeddings(context_input_ids).to(parameter)
            inputs_embeds, token_mask = _pack_left(
                inputs_embeds, token_mask, context_embeds, context_mask.to(parameter.device)
            )
        else:
            inputs_embeds, token_mask = _pack_left(inputs_embeds, token_mask)
        batch_size, sequence_length = token_mask.shape
        position_ids = torch.arange(sequence_length, device=parameter.device).expand(batch_size, -1)
        layer_masks, layer_positions = self.layer_arguments(
            inputs_embeds, token_mask, position_ids, rotary_embedding, base_config
        )
        if context_states is not None:
            context_states = context_states.to(parameter)
            context_mask = context_mask.to(parameter.device)
        else:
            context_mask = None
        statistics_mask = None
        if self.training and torch.is_grad_enabled():
            statistics_mask = _statistics_mask(steering_input_ids, steering_attention_mask, num_statistics_rows)
            statistics_mask = statistics_mask.to(parameter.device)
        return self(
            inputs_embeds,
            token_mask,
            layer_masks,
            layer_positions,
            position_ids,
            context_states=context_states,
            context_mask=context_mask,
            prior_directions=prior_directions,
            statistics_mask=statistics_mask,
        )

    def layer_arguments(self, inputs_embeds, token_mask, position_ids, rotary_embedding, base_config):
        """Causal masks and rotary embeddings for the decoder blocks, built the way the base builds them for its own
        layers (per attention type: full or sliding window).

        Returns:
            `(layer_masks, layer_position_embeddings)`: two lists with one entry per block.
        """
        mask_kwargs = {
            "config": base_config,
            "inputs_embeds": inputs_embeds,
            "attention_mask": token_mask.long(),
            _CACHE_KWARG: None,
            "position_ids": position_ids,
        }
        masks = {"full_attention": create_causal_mask(**mask_kwargs)}
        if "sliding_attention" in self.layer_types:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)
        rotary_device = next(rotary_embedding.buffers()).device
        takes_layer_type = "layer_type" in inspect.signature(rotary_embedding.forward).parameters
        positions = {}
        for layer_type in set(self.layer_types):
            extra = (layer_type,) if takes_layer_type else ()
            cos, sin = rotary_embedding(inputs_embeds.to(rotary_device), position_ids.to(rotary_device), *extra)
            positions[layer_type] = (cos.to(inputs_embeds.device), sin.to(inputs_embeds.device))
        layer_masks = [masks.get(layer_type, masks["full_attention"]) for layer_type in self.layer_types]
        layer_positions = [positions[layer_type] for layer_type in self.layer_types]
        return layer_masks, layer_positions


# ---------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class HyperSteerCausalLMOutputWithPast(CausalLMOutputWithPast):
    r"""
    Base model outputs with the steering that produced them.

    loss (`torch.FloatTensor` of shape `(1,)`, *optional*, returned when `labels` is provided):
        Language-modelling loss of the steered base on the label tokens.
    logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, vocab_size)`):
        Steered prediction scores.
    cache (`Cache`, *optional*): the base's key/value cache (the field is `past_key_values` before transformers 5.24).
    hidden_states (`tuple(torch.FloatTensor)`, *optional*): the base's hidden states (steered from the steering
        layer on).
    attentions (`tuple(torch.FloatTensor)`, *optional*): the base's attention weights.
    steering_vectors (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
        The vectors `v` added at the steering layer (before the steering factor).
    steering_gates (`torch.FloatTensor` of shape `(batch_size, sequence_length)`, *optional*):
        The per-token gate `g_t` when `token_gate=True`. With composed steering, one row per (row, concept) pair in
        row-major order, shape `(num_concepts, sequence_length)`; `steering_vectors` then holds each row's
        `sum_k factor_k * v_k`.
    contrast_logits (`torch.FloatTensor` of shape `(batch_size, kept_length, vocab_size)`, *optional*):
        Logits of the same rows steered by the vectors of `contrast_steering_input_ids` (training objectives that
        compare the right concept with a wrong one); positions as in `logits`.
    """

    steering_vectors: torch.FloatTensor | None = None
    steering_gates: torch.FloatTensor | None = None
    contrast_logits: torch.FloatTensor | None = None


# ---------------------------------------------------------------------------------------------------------------
# Steering requests: validation and shaping
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _SteeringRequest:
    """Everything one `forward`/`generate`/`compute_steering_vectors` call steers with; it lives for that call only.

    `steering_vectors` is filled at the first pass through the steering layer (the prefill, for generation) and
    reused by every later decoding step of the same request.

    With composed steering (several concepts per row) the steering tensors (`steering_input_ids`,
    `steering_attention_mask`, `steering_factor`, `context_mask`, `context_input_ids`, `steering_vectors`,
    `steering_gates`) hold one entry per concept, flattened row-major, and `concept_rows[k]` is the batch row of
    concept `k`; `label_mask` stays per row. Without composition `concept_rows` is `None` and every entry is a row.
    """

    steering_input_ids: torch.LongTensor | None
    steering_attention_mask: torch.Tensor | None
    steering_factor: torch.Tensor
    context_mask: torch.Tensor | None
    context_input_ids: torch.LongTensor | None = None
    label_mask: torch.Tensor | None = None
    steering_vectors: torch.Tensor | None = None
    steering_gates: torch.Tensor | None = None
    is_generation: bool = False
    decoding_from_cache: bool = False
    prompt_last_position: torch.Tensor | None = None
    passes: int = 0
    contrast_steering_input_ids: torch.LongTensor | None = None
    contrast_steering_attention_mask: torch.Tensor | None = None
    contrast_vectors: torch.Tensor | None = None
    contrast_residual: torch.Tensor | None = None
    contrast_position_ids: torch.LongTensor | None = None
    upper_layer_inputs: dict = field(default_factory=dict)
    concept_rows: torch.LongTensor | None = None
    num_rows: int | None = None

    def row_vectors(self) -> torch.Tensor | None:
        """The vector each batch row is steered by, `(batch_size, hidden_size)`: `v` itself, or for composed
        steering `sum_k factor_k * v_k` over the row's concepts (factors folded in)."""
        if self.concept_rows is None or self.steering_vectors is None:
            return self.steering_vectors
        return _compose_rows(self.steering_vectors, self.steering_factor, self.concept_rows, self.num_rows)

    def hypernetwork_inputs(self, context_states: torch.Tensor | None) -> tuple[tuple, int]:
        """The positional inputs of one hypernetwork call for this request, and how many rows are the steering
        prompts' own (the first ones; contrast prompts follow).

        Args:
            context_states (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`, *optional*):
                the residual at the steering layer, for `hypernet_type="cross_attention"`.

        Returns:
            `((steering_input_ids, steering_attention_mask, context_states, context_mask, context_input_ids),
            num_rows)`.
        """
        if context_states is not None and self.concept_rows is not None:
            # Composition: every concept reads its own row's context.
            context_states = context_states.index_select(0, self.concept_rows.to(context_states.device))
        hypernetwork_inputs = (
            self.steering_input_ids,
            self.steering_attention_mask,
            context_states,
            self.context_mask,
            self.context_input_ids,
        )
        num_rows = self.steering_input_ids.shape[0]
        if self.contrast_steering_input_ids is not None:
            # The right and the contrast prompts go through one hypernetwork call, each on its row's context: a
            # training step then updates the running statistics once, from the right rows only (those the
            # model is steered by, as without contrast), and both halves are normalised by the same statistics.
            hypernetwork_inputs = _concatenate_rows(
                hypernetwork_inputs,
                (
                    self.contrast_steering_input_ids,
                    self.contrast_steering_attention_mask,
                    context_states,
                    self.context_mask,
                    self.context_input_ids,
                ),
            )
        return hypernetwork_inputs, num_rows

    def expand_to(self, batch_size: int) -> None:
        """Repeat per-row inputs for beam search / `num_return_sequences`, which expand the batch before prefill."""
        current = self.num_rows if self.concept_rows is not None else self.steering_factor.shape[0]
        if batch_size == current:
            return
        if current == 0 or batch_size % current != 0:
            raise ValueError(
                f"The base model ran a batch of {batch_size} rows, which is not a multiple of the {current} steering "
                "rows given; pass one steering prompt/factor per input row."
            )
        repeats = batch_size // current
        if self.concept_rows is not None:
            # Concept k of row r serves the expanded rows r * repeats + j, j = 0 .. repeats - 1.
            offsets = torch.arange(repeats, device=self.concept_rows.device).repeat(self.concept_rows.shape[0])
            self.concept_rows = self.concept_rows.repeat_interleave(repeats) * repeats + offsets
            self.num_rows = batch_size
        for name in (
            "steering_input_ids",
            "steering_attention_mask",
            "steering_factor",
            "context_mask",
            "context_input_ids",
            "label_mask",
            "steering_vectors",
        ):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.repeat_interleave(repeats, dim=0))


class HyperSteerRequestBuilder:
    """Validate one call's steering arguments at the boundary and shape them into a [`_SteeringRequest`].

    It accepts every form `forward`, `generate` and `compute_steering_vectors` take: text prompts (one per row, or
    one for all rows), tokenised prompts, precomputed vectors, and composed prompts (one list of concepts per row,
    flattened row-major); factors as a number, one per row or one per concept. It holds no state of its own beyond
    what it is built with, so a new one per call is cheap.

    Args:
        config ([`HyperSteerConfig`]): the model's config.
        tokenizer (*optional*): the base's tokenizer, needed for text steering prompts.
        device (`torch.device`): where steering token ids go (the base's input embeddings).
        bos_token_id (`int`, *optional*): the base's BOS, dropped from the user's prompt when the steering prompt
            already opens with it (`hypernet_type="in_context"`).
        vector_template (`torch.Tensor`): a tensor of the hypernetwork's dtype and device, for empty vector batches.
    """

    def __init__(self, config: HyperSteerConfig, tokenizer, device, bos_token_id: int | None, vector_template):
        self.config = config
        self.tokenizer = tokenizer
        self.device = device
        self.bos_token_id = bos_token_id
        self.vector_template = vector_template

    def build(
        self,
        batch_size: int,
        input_ids: torch.LongTensor | None,
        attention_mask: torch.Tensor,
        labels: torch.LongTensor | None,
        steering_prompt,
        steering_input_ids,
        steering_attention_mask,
        steering_vectors,
        steering_factor,
    ) -> _SteeringRequest:
        """Validate one call's steering inputs at the boundary and collect them for the hook."""
        device = attention_mask.device
        real_tokens = attention_mask.bool()
        label_mask = labels.ne(-100) & real_tokens if labels is not None else None
        context_mask = real_tokens & ~label_mask if label_mask is not None else real_tokens
        if _is_composed(steering_prompt):
            return self._build_composed(
                batch_size,
                input_ids,
                context_mask,
                label_mask,
                steering_prompt,
                steering_factor,
                steering_input_ids,
                steering_vectors,
            )
        if steering_vectors is not None:
            if steering_prompt is not None or steering_input_ids is not None:
                raise ValueError("Pass either `steering_vectors` or a steering prompt, not both.")
            if steering_vectors.dim() != 2 or steering_vectors.shape != (batch_size, self.config.hidden_size):
                raise ValueError(
                    f"`steering_vectors` must have shape (batch_size, hidden_size) = ({batch_size}, "
                    f"{self.config.hidden_size}), got {tuple(steering_vectors.shape)}."
                )
            ids = mask = None
        else:
            ids, mask = self.steering_inputs(batch_size, steering_prompt, steering_input_ids, steering_attention_mask)
        context_input_ids = None
        if self.config.hypernet_type == "in_context" and steering_vectors is None:
            if input_ids is None:
                raise ValueError("`hypernet_type='in_context'` reads the user's prompt as text: pass `input_ids`.")
            context_input_ids = input_ids
            # The steering prompt and the chat-templated user prompt may both open with BOS; keep only the first.
            context_mask = context_mask & ~_repeated_bos(input_ids, context_mask, ids, mask, self.bos_token_id)
        return _SteeringRequest(
            steering_input_ids=ids,
            steering_attention_mask=mask,
            steering_factor=self.steering_factors(batch_size, steering_factor, device),
            context_mask=context_mask,
            context_input_ids=context_input_ids,
            label_mask=label_mask,
            steering_vectors=steering_vectors,
        )

    def _build_composed(
        self,
        batch_size,
        input_ids,
        context_mask,
        label_mask,
        steering_prompt,
        steering_factor,
        steering_input_ids,
        steering_vectors,
    ) -> _SteeringRequest:
        """The request for composed steering: one list of concepts (and of factors) per row, flattened row-major so
        the hypernetwork runs once over every (row, concept) pair; rows with an empty list are not steered."""
        if steering_input_ids is not None or steering_vectors is not None:
            raise ValueError(
                "Composed steering (one list of steering prompts per row) takes text prompts only; do not also pass "
                "`steering_input_ids` or `steering_vectors`."
            )
        prompts, factors, rows = self.flatten_composition(batch_size, steering_prompt, steering_factor)
        device = context_mask.device
        concept_rows = torch.tensor(rows, dtype=torch.long, device=device)
        steering_vectors = None
        if prompts:
            ids, mask = self.steering_inputs(len(prompts), prompts, None, None)
        else:
            # No row names a concept: nothing to run the hypernetwork on, and every row is steered by zero.
            ids = mask = None
            steering_vectors = self.vector_template.new_zeros(0, self.config.hidden_size)
        context_input_ids = None
        if self.config.hypernet_type == "in_context":
            if input_ids is None:
                raise ValueError("`hypernet_type='in_context'` reads the user's prompt as text: pass `input_ids`.")
            context_input_ids = input_ids.index_select(0, concept_rows.to(input_ids.device))
        context_mask = context_mask.index_select(0, concept_rows)
        if context_input_ids is not None and ids is not None:
            # As for single prompts: the steering prompt and the chat-templated user prompt keep one BOS between them.
            context_mask = context_mask & ~_repeated_bos(context_input_ids, context_mask, ids, mask, self.bos_token_id)
        return _SteeringRequest(
            steering_input_ids=ids,
            steering_attention_mask=mask,
            steering_factor=torch.tensor(factors, dtype=torch.float32, device=device),
            context_mask=context_mask,
            context_input_ids=context_input_ids,
            label_mask=label_mask,
            steering_vectors=steering_vectors,
            concept_rows=concept_rows,
            num_rows=batch_size,
        )

    def flatten_composition(self, batch_size, steering_prompt, steering_factor):
        """Validate composed steering prompts/factors and flatten them row-major.

        Returns:
            `(prompts, factors, rows)`: three lists with one entry per (row, concept) pair.
        """
        rows_of_prompts = list(steering_prompt)
        if batch_size is not None and len(rows_of_prompts) != batch_size:
            raise ValueError(
                f"Got {len(rows_of_prompts)} lists of steering prompts for {batch_size} input rows; composed steering "
                "takes one list of steering prompts per row (an empty list leaves that row unsteered)."
            )
        for row, concepts in enumerate(rows_of_prompts):
            if not isinstance(concepts, (list, tuple)):
                raise ValueError(
                    f"Composed steering needs a list of steering prompts for every row, but row {row} is {concepts!r}; "
                    f"write it as [{concepts!r}]."
                )
        if steering_factor is None or isinstance(steering_factor, (int, float)):
            value = self.config.default_steering_factor if steering_factor is None else float(steering_factor)
            rows_of_factors = [[value] * len(concepts) for concepts in rows_of_prompts]
        elif isinstance(steering_factor, (list, tuple)) and all(
            isinstance(factors, (list, tuple)) for factors in steering_factor
        ):
            rows_of_factors = [list(factors) for factors in steering_factor]
        else:
            raise ValueError(
                f"With composed steering prompts, `steering_factor` must be one number for every concept or one list "
                f"of factors per row (the shape of `steering_prompt`), got {steering_factor!r}."
            )
        shape = [len(concepts) for concepts in rows_of_prompts]
        if [len(factors) for factors in rows_of_factors] != shape:
            raise ValueError(
                f"`steering_factor` lists have lengths {[len(factors) for factors in rows_of_factors]} but the "
                f"steering prompt lists have lengths {shape}; pass one factor per concept."
            )
        prompts, factors, rows = [], [], []
        for row, (concepts, row_factors) in enumerate(zip(rows_of_prompts, rows_of_factors)):
            for concept, factor in zip(concepts, row_factors):
                if not isinstance(factor, (int, float)) or not abs(float(factor)) < float("inf"):
                    raise ValueError(f"Steering factors must be finite numbers, got {factor!r} in row {row}.")
                prompts.append(concept)
                factors.append(float(factor))
                rows.append(row)
        return prompts, factors, rows

    def steering_inputs(self, batch_size, steering_prompt, steering_input_ids, steering_attention_mask):
        """Return `(steering_input_ids, steering_attention_mask)` of shape `(batch_size, steering_sequence_length)`."""
        if steering_prompt is not None:
            if steering_input_ids is not None:
                raise ValueError("Pass either `steering_prompt` or `steering_input_ids`, not both.")
            prompts = (
                [steering_prompt] * (batch_size or 1) if isinstance(steering_prompt, str) else list(steering_prompt)
            )
            encoding = tokenize_steering_prompts(self.tokenizer, prompts, self.config.max_steering_prompt_length)
            steering_input_ids = encoding["steering_input_ids"]
            steering_attention_mask = encoding["steering_attention_mask"]
        if steering_input_ids is None:
            raise ValueError(
                "No steering prompt given: pass `steering_prompt=` (text, one per row), `steering_input_ids=` or "
                "`steering_vectors=`. For unsteered outputs use `steering_factor=0` or `model.language_model`."
            )
        if steering_attention_mask is None:
            steering_attention_mask = torch.ones_like(steering_input_ids)
        if batch_size is not None and steering_input_ids.shape[0] != batch_size:
            raise ValueError(
                f"Got {steering_input_ids.shape[0]} steering prompts for {batch_size} input rows; pass one steering "
                "prompt per row (or a single string for all rows)."
            )
        if steering_attention_mask.shape != steering_input_ids.shape:
            raise ValueError(
                f"`steering_attention_mask` has shape {tuple(steering_attention_mask.shape)} but `steering_input_ids` "
                f"has {tuple(steering_input_ids.shape)}."
            )
        if steering_input_ids.shape[1] == 0:
            raise ValueError("The steering prompts are empty (0 tokens); pass non-empty steering prompts.")
        return steering_input_ids.to(self.device), steering_attention_mask.to(self.device)

    def steering_factors(self, batch_size: int, steering_factor, device) -> torch.Tensor:
        """Return the per-row factors as a float32 tensor of shape `(batch_size,)`."""
        if steering_factor is None:
            steering_factor = self.config.default_steering_factor
        if isinstance(steering_factor, torch.Tensor):
            factors = steering_factor.to(device=device, dtype=torch.float32).reshape(-1)
        elif isinstance(steering_factor, (int, float)):
            factors = torch.full((batch_size,), float(steering_factor), device=device)
        else:
            factors = torch.tensor([float(value) for value in steering_factor], device=device)
        if factors.numel() == 1 and batch_size != 1:
            factors = factors.expand(batch_size)
        if factors.shape[0] != batch_size:
            raise ValueError(
                f"Got {factors.shape[0]} steering factors for {batch_size} input rows; pass one factor per row or a "
                "single number."
            )
        if not torch.isfinite(factors).all():
            raise ValueError(f"Steering factors must be finite numbers, got {steering_factor!r}.")
        return factors


def _is_composed(steering_prompt) -> bool:
    """Whether `steering_prompt` is in the composed form: a list with one list of steering prompts per row."""
    return isinstance(steering_prompt, (list, tuple)) and any(
        isinstance(concepts, (list, tuple)) for concepts in steering_prompt
    )


def _compose_rows(
    vectors: torch.Tensor, factors: torch.Tensor, concept_rows: torch.LongTensor, num_rows: int
) -> torch.Tensor:
    """Sum per-concept vectors into per-row vectors: `(num_concepts, hidden_size)` -> `(num_rows, hidden_size)`,
    row `r` holding `sum_k factors[k] * vectors[k]` over the concepts `k` with `concept_rows[k] == r`."""
    weighted = factors.to(vectors)[:, None] * vectors
    return weighted.new_zeros(num_rows, vectors.shape[-1]).index_add_(0, concept_rows.to(vectors.device), weighted)


def _first_real_token(token_ids: torch.LongTensor, mask: torch.Tensor) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Index and id of each row's first real token, whatever the padding side: two `(batch_size,)` tensors."""
    first = mask.long().argmax(dim=-1)
    return first, token_ids.gather(1, first[:, None]).squeeze(1)


def _repeated_bos(context_input_ids, context_mask, steering_input_ids, steering_attention_mask, bos_token_id):
    """`(batch_size, context_length)` mask, `True` at a row's first real context token when both it and the first
    real steering-prompt token are BOS: packed after the steering prompt, it would be a second BOS mid-sequence."""
    repeated = torch.zeros_like(context_mask, dtype=torch.bool)
    if bos_token_id is None:
        return repeated
    first, first_id = _first_real_token(context_input_ids, context_mask)
    device = first.device
    _, steering_first_id = _first_real_token(steering_input_ids.to(device), steering_attention_mask.to(device))
    both_bos = context_mask.any(dim=-1) & (first_id == bos_token_id) & (steering_first_id == bos_token_id)
    rows = torch.arange(repeated.shape[0], device=repeated.device)
    repeated[rows, first] = both_bos
    return repeated


# ---------------------------------------------------------------------------------------------------------------
# Steering injector: the hook on the steering layer
# ---------------------------------------------------------------------------------------------------------------


class HyperSteerSteeringInjector:
    """The steering hook: for one call, adds `factor * g_t * v` to the output residual of the base's steering layer.

    It is to [`HyperSteerModel`] what PEFT's tuner layer is to its model wrapper: it owns where and how the vectors
    enter the base (the hook, the positions `config.steering_positions` selects, the token gate, composed rows), while
    the model owns where the vectors come from. It holds no parameters; [`~HyperSteerSteeringInjector.attach`]
    registers its hooks for one call and removes them even if the call raises.

    Args:
        decoder_layers (`nn.ModuleList`): the base's decoder layers.
        steering_layer (`int`): the layer whose output is steered.
        steering_positions (`str`): `"all"`, `"prompt"` or `"generated"`.
        compute_vectors (`Callable`): `compute_vectors(request, hidden_states)` fills `request.steering_vectors` (and
            `request.contrast_vectors` when the request has contrast prompts) from the steering layer's output.
        token_gate ([`HyperSteerTokenGate`], *optional*): the per-token gate `g_t`.
    """

    def __init__(self, decoder_layers, steering_layer: int, steering_positions: str, compute_vectors, token_gate=None):
        self.decoder_layers = decoder_layers
        self.steering_layer = steering_layer
        self.steering_positions = steering_positions
        self.compute_vectors = compute_vectors
        self.token_gate = token_gate

    @contextmanager
    def attach(self, request: _SteeringRequest) -> Iterator[None]:
        """Register the steering hook on the steering layer for one call; it is removed even if the call raises."""
        layer = self.decoder_layers[self.steering_layer]

        def steer(module, args, kwargs, output):
            hidden_states = output[0] if isinstance(output, tuple) else output
            steered = self.steer(request, hidden_states, kwargs.get("position_ids"))
            if isinstance(output, tuple):
                return (steered,) + tuple(output[1:])
            return steered

        def record_layer_inputs(index):
            def record(module, args, kwargs):
                request.upper_layer_inputs[index] = (args[1:], kwargs)

            return record

        # `prepend=True` runs before the hooks transformers installs to record hidden states, so the recorded
        # state of the steering layer is the steered one.
        handles = [layer.register_forward_hook(steer, with_kwargs=True, prepend=True)]
        if request.contrast_steering_input_ids is not None:
            # The contrast pass re-runs the layers above the steering layer with the very arguments the base gave
            # them (masks per attention type, rotary embeddings), so it holds for every supported architecture.
            for index in range(self.steering_layer + 1, len(self.decoder_layers)):
                handles.append(
                    self.decoder_layers[index].register_forward_pre_hook(record_layer_inputs(index), with_kwargs=True)
                )
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def steer(
        self, request: _SteeringRequest, hidden_states: torch.Tensor, position_ids: torch.LongTensor | None
    ) -> torch.Tensor:
        """Compute `v` at the first pass of the request, then add `factor * g_t * v` at the selected positions.

        Args:
            hidden_states (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`): the output
                residual of the steering layer.
        Returns:
            `torch.FloatTensor` of the same shape and dtype.
        """
        first_pass = request.passes == 0
        request.passes += 1
        if first_pass:
            request.expand_to(hidden_states.shape[0])
            if position_ids is not None and request.is_generation:
                request.prompt_last_position = position_ids.max(dim=-1, keepdim=True).values
        contrast = first_pass and request.contrast_steering_input_ids is not None
        if request.steering_vectors is None:
            self.compute_vectors(request, hidden_states)
            if request.is_generation:
                _check_finite(request.steering_vectors)
        if contrast:
            request.contrast_residual = hidden_states
            request.contrast_position_ids = position_ids
        steered, gates = self.add_steering(
            request, hidden_states, request.steering_vectors, position_ids, first_pass, request.concept_rows
        )
        if first_pass:
            request.steering_gates = gates
        return steered

    def add_steering(self, request, hidden_states, vectors, position_ids, first_pass, concept_rows=None):
        """`h + factor * g_t * v` at the positions `config.steering_positions` selects.

        With composed steering, `vectors` and the request's factors hold one entry per concept and `concept_rows`
        (`torch.LongTensor` of shape `(num_concepts,)`) names each concept's batch row: every row gets the sum of its
        concepts' terms, each with its own gate.

        Returns:
            The steered `torch.FloatTensor` of the shape and dtype of `hidden_states`, and the gates `g_t` of shape
            `(batch_size, sequence_length)` (`(num_concepts, sequence_length)` when composed; `None` without
            `token_gate`).
        """
        vectors = vectors.to(device=hidden_states.device)
        rows = None if concept_rows is None else concept_rows.to(hidden_states.device)
        scale = request.steering_factor.to(hidden_states.device)[:, None, None]
        position_mask = self.position_mask(request, hidden_states, position_ids, first_pass)
        # Composition: per-row masks and states are gathered to one entry per concept.
        concept_states = hidden_states if rows is None else hidden_states.index_select(0, rows)
        if position_mask is not None:
            if rows is not None:
                position_mask = position_mask.index_select(0, rows)
            scale = scale * position_mask[..., None].to(scale.dtype)
        gates = None
        if self.token_gate is not None:
            gates = self.token_gate(concept_states.to(vectors.device), vectors).to(hidden_states.device)
            scale = scale * gates[..., None]
        update = scale * vectors[:, None, :]
        if rows is not None:
            # (num_concepts, length, hidden_size) -> (batch_size, length, hidden_size): sum each row's concepts.
            update = update.new_zeros(hidden_states.shape[0], *update.shape[1:]).index_add_(0, rows, update)
        return hidden_states + update.to(hidden_states.dtype), gates

    def contrast_logits(
        self, request: _SteeringRequest, language_model: PreTrainedModel, logits_to_keep: int | torch.Tensor
    ) -> torch.Tensor:
        """Logits of the same rows steered by the contrast vectors: the shared residual at the steering layer plus
        the contrast steering, through the layers above it (with the arguments `attach` recorded from the base's own
        pass), the final norm and the LM head. Training objectives that compare the right concept with a wrong one
        read it as `contrast_logits`; it stays inside `forward` so DDP sees every parameter it uses.

        Returns:
            `torch.FloatTensor` of shape `(batch_size, kept_length, vocab_size)`, positions as in `logits`.
        """
        hidden_states, _ = self.add_steering(
            request, request.contrast_residual, request.contrast_vectors, request.contrast_position_ids, True
        )
        decoder_layers = self.decoder_layers
        for index in range(self.steering_layer + 1, len(decoder_layers)):
            args, kwargs = request.upper_layer_inputs[index]
            # The base's own pass already wrote these layers' keys and values into the cache it returns; the contrast
            # pass must neither append to it nor attend to it (a contrast forward starts from an empty cache).
            kwargs = {**kwargs, "use_cache": False, **{name: None for name in _CACHE_NAMES if name in kwargs}}
            output = decoder_layers[index](hidden_states, *args, **kwargs)
            hidden_states = output[0] if isinstance(output, tuple) else output
        hidden_states = language_model.model.norm(hidden_states)
        if isinstance(logits_to_keep, int):
            hidden_states = hidden_states[:, -logits_to_keep:] if logits_to_keep > 0 else hidden_states
        else:
            hidden_states = hidden_states[:, logits_to_keep]
        logits = language_model.get_output_embeddings()(hidden_states)
        softcap = getattr(language_model.config.get_text_config(), "final_logit_softcapping", None)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    def position_mask(self, request, hidden_states, position_ids, first_pass) -> torch.Tensor | None:
        """`None` to steer every position, else a `(batch_size, sequence_length)` mask of positions to steer."""
        mode = self.steering_positions
        if mode == "all":
            return None
        batch_size, sequence_length = hidden_states.shape[:2]
        if request.is_generation:
            if first_pass or position_ids is None or request.prompt_last_position is None:
                # Prefill holds the prompt only; with a cache, every later pass holds generated tokens only.
                generated = torch.zeros(batch_size, sequence_length, dtype=torch.bool, device=hidden_states.device)
                if not first_pass:
                    generated = ~generated
            else:
                generated = position_ids.expand(batch_size, -1) > request.prompt_last_position.to(position_ids.device)
        elif request.decoding_from_cache:
            generated = torch.ones(batch_size, sequence_length, dtype=torch.bool, device=hidden_states.device)
        elif request.label_mask is not None:
            generated = request.label_mask
        else:
            generated = torch.zeros(batch_size, sequence_length, dtype=torch.bool, device=hidden_states.device)
        generated = generated.to(hidden_states.device)
        return generated if mode == "generated" else ~generated


# ---------------------------------------------------------------------------------------------------------------
# Wiring: base model, freezing, generation, saving and loading
# ---------------------------------------------------------------------------------------------------------------


class HyperSteerPreTrainedModel(PreTrainedModel):
    """What a HyperSteer checkpoint is: the config class, the initialisation of the hypernetwork's own modules, and the
    save/load format (hypernetwork weights only, config with `auto_map`, tokenizer and the remote-code files). The
    base is never saved; `from_pretrained` loads the one the config names, or takes a loaded one.
    """

    config_class = HyperSteerConfig
    config: HyperSteerConfig
    base_model_prefix = "language_model"
    supports_gradient_checkpointing = True
    _no_split_modules = []
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        """Initialise the hypernetwork's own modules; decoder blocks are initialised when built (copied from the base
        or drawn by the base architecture's own initialiser) and the frozen base is never touched."""
        std = self.config.initializer_range
        if isinstance(module, HyperSteerRMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, HyperSteerHypernetwork) and module.steering_offset is not None:
            nn.init.zeros_(module.steering_offset)
        elif isinstance(module, HyperSteerPriorScale):
            nn.init.constant_(module.weight, self.config.steering_prior_init_norm)
        elif isinstance(module, nn.Linear):
            if module is self.hypernetwork.output_projection:
                # Zero output projection (as LoRA zeroes `lora_B`): at step 0 the steered model equals the base.
                nn.init.zeros_(module.weight)
            elif module is self.hypernetwork.prior_projection:
                # The prior term starts as the training-free direction itself, at the configured norm.
                with torch.no_grad():
                    module.weight.copy_(torch.eye(module.weight.shape[0]) * self.config.steering_prior_init_norm)
            else:
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    # ----- the checkpoint: hypernetwork weights, config, tokenizer and remote code -----------------------------

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args,
        base_model: PreTrainedModel | None = None,
        tokenizer=None,
        config: HyperSteerConfig | None = None,
        cache_dir: str | os.PathLike | None = None,
        force_download: bool = False,
        local_files_only: bool = False,
        token: str | bool | None = None,
        revision: str | None = None,
        subfolder: str = "",
        hypernet_dtype: torch.dtype | None = None,
        **base_model_kwargs,
    ) -> "HyperSteerModel":
        """Load a saved HyperSteer: the config and hypernetwork weights from `pretrained_model_name_or_path`, the
        frozen base from `config.base_model_name_or_path` (at `config.base_model_revision`) unless `base_model` is given.

        Remaining keyword arguments (`dtype`, `device_map`, `attn_implementation`, ...) go to the base's
        `AutoModelForCausalLM.from_pretrained`. `revision` refers to the HyperSteer repository, never to the base.
        """
        if model_args:
            raise TypeError(f"HyperSteerModel.from_pretrained takes no extra positional arguments, got {model_args}.")
        for name in _AUTO_CLASS_ONLY_KWARGS:
            base_model_kwargs.pop(name, None)
        hub_kwargs = {
            "cache_dir": cache_dir,
            "force_download": force_download,
            "local_files_only": local_files_only,
            "token": token,
            "revision": revision,
            "subfolder": subfolder,
        }
        if config is None:
            config = HyperSteerConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        if base_model is None:
            if not config.base_model_name_or_path:
                raise ValueError(
                    f"The config in {pretrained_model_name_or_path} names no `base_model_name_or_path`; pass the loaded "
                    "base with `base_model=`."
                )
            base_model = AutoModelForCausalLM.from_pretrained(
                config.base_model_name_or_path,
                revision=config.base_model_revision,
                **_base_hub_kwargs(hub_kwargs),
                **base_model_kwargs,
            )
        elif base_model_kwargs:
            logger.warning(
                f"Ignoring base-model loading arguments {sorted(base_model_kwargs)} because `base_model` was given."
            )
        if tokenizer is None:
            tokenizer = _load_tokenizer(pretrained_model_name_or_path, config, hub_kwargs)
        model = cls(config, base_model, tokenizer=tokenizer, hypernet_dtype=hypernet_dtype)
        model.load_hypernetwork_state_dict(_load_hypernetwork_weights(pretrained_model_name_or_path, hub_kwargs))
        model.eval()
        return model

    def load_hypernetwork_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load hypernetwork weights saved by `save_pretrained` (keys prefixed `hypernetwork.`), strictly."""
        prefix = "hypernetwork."
        foreign = sorted(key for key in state_dict if not key.startswith(prefix))
        if foreign:
            raise ValueError(
                f"The checkpoint holds keys outside the hypernetwork ({foreign[:5]}...); a HyperSteer checkpoint stores "
                "only `hypernetwork.*` weights."
            )
        expected = self.hypernetwork.state_dict()
        weights = {key[len(prefix) :]: value for key, value in state_dict.items()}
        for key, value in weights.items():
            if key in expected and expected[key].shape != value.shape:
                raise ValueError(
                    f"Checkpoint tensor `{prefix}{key}` has shape {tuple(value.shape)} but this model expects "
                    f"{tuple(expected[key].shape)}: the checkpoint was trained for a base of another hidden size or "
                    "architecture than the one given."
                )
        result = self.hypernetwork.load_state_dict(weights, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(
                f"Checkpoint does not match the hypernetwork: missing {result.missing_keys[:5]}, unexpected "
                f"{result.unexpected_keys[:5]}. Was it saved with another `hypernet_type`/`hypernet_num_layers`?"
            )

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *args,
        state_dict: dict | None = None,
        is_main_process: bool = True,
        **kwargs,
    ) -> None:
        """Save the config (with `auto_map`), the hypernetwork weights (never the base), the generation config, the
        tokenizer and the two remote-code files, so `AutoModelForCausalLM.from_pretrained(dir,
        trust_remote_code=True)` works where this package is not installed."""
        if state_dict is None:
            state_dict = {f"hypernetwork.{key}": value for key, value in self.hypernetwork.state_dict().items()}
        else:
            state_dict = {key: value for key, value in state_dict.items() if key.startswith("hypernetwork.")}
        self.config.auto_map = dict(AUTO_MAP)
        super().save_pretrained(
            save_directory, *args, state_dict=state_dict, is_main_process=is_main_process, **kwargs
        )
        if not is_main_process:
            return
        self.save_remote_code(save_directory)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(save_directory)

    @staticmethod
    def save_remote_code(save_directory: str | os.PathLike) -> None:
        """Copy the two files `auto_map` points to (`configuration_hypersteer.py`, `modeling_hypersteer.py`) into
        `save_directory`, e.g. before a Trainer pushes checkpoints that must load with `trust_remote_code=True`."""
        os.makedirs(save_directory, exist_ok=True)
        source_dir = Path(__file__).resolve().parent
        for file_name in REMOTE_CODE_FILES:
            if Path(save_directory, file_name).resolve() != (source_dir / file_name):
                shutil.copyfile(source_dir / file_name, Path(save_directory, file_name))


class HyperSteerModel(HyperSteerPreTrainedModel, GenerationMixin):
    """Steer a frozen causal LM with vectors produced from natural-language steering prompts by a hypernetwork,
    described in detail in https://huggingface.co/papers/2506.03292.

    The base LM (`language_model`) is frozen and never saved; only `hypernetwork` is trained and saved. The steering
    vector is computed *inside* the base forward, at the steering layer, from the very residual it is added to (one
    base pass), by a forward hook that exists only for the duration of one call.

    Args:
        config ([`HyperSteerConfig`]): the architecture.
        language_model ([`PreTrainedModel`]): a decoder-only causal LM exposing `model.layers` (Gemma-2, Gemma-3
            text, Llama/SmolLM2, Qwen2/3, ...).
        tokenizer (*optional*): the base's tokenizer, needed for text steering prompts.
        hypernet_dtype (`torch.dtype`, *optional*, defaults to `torch.float32`): dtype of the trainable weights;
            float32 master weights keep training stable under `--bf16` autocast with a bf16 base.

    ```python
    >>> from transformers import AutoModelForCausalLM, AutoTokenizer
    >>> from modeling_hypersteer import HyperSteerModel

    >>> base = AutoModelForCausalLM.from_pretrained("google/gemma-2-2b-it")
    >>> tokenizer = AutoTokenizer.from_pretrained("google/gemma-2-2b-it")
    >>> model = HyperSteerModel.from_base_model(base, tokenizer=tokenizer, steering_layer=20)
    >>> inputs = tokenizer.apply_chat_template(
    ...     [[{"role": "user", "content": "Explain sorting."}]], add_generation_prompt=True, return_tensors="pt",
    ...     return_dict=True)
    >>> output_ids = model.generate(**inputs, steering_prompt="legal terminology", max_new_tokens=32)
    ```
    """

    def __init__(
        self,
        config: HyperSteerConfig,
        language_model: PreTrainedModel | None = None,
        tokenizer=None,
        hypernet_dtype: torch.dtype | None = None,
    ):
        super().__init__(config)
        if language_model is None:
            raise ValueError(
                "HyperSteerModel wraps a frozen base model: build it with `HyperSteerModel.from_base_model(base, ...)` "
                "or load it with `HyperSteerModel.from_pretrained(path)`, which loads the base named in the config."
            )
        decoder_layers = decoder_layers_of(language_model)
        _check_base_matches_config(language_model, config)
        base_config = language_model.config.get_text_config()
        # The model generates with the base's special tokens; recording them here also gives Trainer's tokenizer/config
        # alignment nothing to update (it warns about every token it has to fill in).
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(config, name, None) is None and getattr(base_config, name, None) is not None:
                setattr(config, name, getattr(base_config, name))
        layer_types = [
            _layer_type(base_config, index % len(decoder_layers)) for index in range(config.hypernet_num_layers)
        ]
        hypernet_layers = [
            _hypernet_decoder_layer(language_model, decoder_layers, index, config.hypernet_init)
            for index in range(config.hypernet_num_layers)
        ]
        self.hypernetwork = HyperSteerHypernetwork(
            config, hypernet_layers, layer_types=layer_types, prior=HyperSteerPrior.from_config(config, language_model)
        )
        self.post_init()
        # Attached after `post_init` so weight initialisation and tied-weight bookkeeping never see the base.
        self.language_model = language_model
        language_model.requires_grad_(False)
        language_model.eval()
        steering_device = _module_device(decoder_layers[config.steering_layer])
        self.hypernetwork.to(device=steering_device, dtype=hypernet_dtype or torch.float32)
        # The checkpoint holds the hypernetwork only; declaring the base keys as never-saved also keeps Trainer's
        # checkpoint reload from warning about them.
        self._keys_to_ignore_on_save = {f"language_model.{name}" for name in language_model.state_dict()}
        self.tokenizer = tokenizer
        self.generation_config = copy.deepcopy(language_model.generation_config)

    # ----- construction ----------------------------------------------------------------------------------------

    @classmethod
    def from_base_model(
        cls, base_model: PreTrainedModel, tokenizer=None, hypernet_dtype: torch.dtype | None = None, **config_kwargs
    ) -> "HyperSteerModel":
        """Build an untrained HyperSteer around a loaded base model; `config_kwargs` are [`HyperSteerConfig`] fields.

        The base's shape (hidden size, heads, layers) is read from the base itself.
        """
        decoder_layers_of(base_model)
        base_config = base_model.config.get_text_config()
        hidden_size = base_config.hidden_size
        num_heads = base_config.num_attention_heads
        shape = {
            "hidden_size": hidden_size,
            "num_attention_heads": num_heads,
            "head_dim": getattr(base_config, "head_dim", None) or hidden_size // num_heads,
            "base_num_hidden_layers": base_config.num_hidden_layers,
            "rms_norm_eps": getattr(base_config, "rms_norm_eps", None) or 1e-6,
        }
        for name, value in shape.items():
            config_kwargs.setdefault(name, value)
        config_kwargs.setdefault("base_model_name_or_path", base_model.name_or_path or None)
        config = HyperSteerConfig(**config_kwargs)
        return cls(config, base_model, tokenizer=tokenizer, hypernet_dtype=hypernet_dtype)

    # ----- parameters -------------------------------------------------------------------------------------------

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """Return `(trainable parameters, all parameters)`, counting the frozen base too."""
        trainable = sum(parameter.numel() for parameter in self.parameters() if parameter.requires_grad)
        return trainable, sum(parameter.numel() for parameter in self.parameters())

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        logger.warning(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict | None = None, every_n_layers: int = 1, offload: bool = False
    ) -> None:
        """Checkpoint the base's and the hypernetwork's decoder layers (non-reentrant only).

        The frozen base receives inputs that do not require grad, so reentrant checkpointing would cut the gradient
        path from the loss back to the hypernetwork.
        """
        activation_checkpointing_kwargs = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        if activation_checkpointing_kwargs["use_reentrant"]:
            raise ValueError(
                "HyperSteer needs non-reentrant checkpointing: the frozen base's inputs do not require grad, so "
                "`use_reentrant=True` would stop gradients from reaching the hypernetwork. Pass "
                "`{'use_reentrant': False}` (the default)."
            )
        super().activation_checkpointing_enable(activation_checkpointing_kwargs, every_n_layers, offload)

    def enable_input_require_grads(self) -> None:
        """Deliberately a no-op.

        `PreTrainedModel` makes the input embeddings require grad when checkpointing, for adapters that live inside
        checkpointed layers. Here no trainable weight sits below the steering layer, and embeddings that require
        grad would make every frozen layer below it build an autograd graph for nothing.
        """

    # ----- steering ---------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        steering_input_ids: torch.LongTensor | None = None,
        steering_attention_mask: torch.Tensor | None = None,
        steering_vectors: torch.FloatTensor | None = None,
        steering_factor: float | Sequence[float] | torch.Tensor | None = None,
        steering_prompt: str | Sequence[str] | Sequence[Sequence[str]] | None = None,
        contrast_steering_input_ids: torch.LongTensor | None = None,
        contrast_steering_attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> HyperSteerCausalLMOutputWithPast:
        r"""
        Run the base model once, steered at `config.steering_layer`.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`): prompt (and response) tokens.
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`): 1 for real tokens, 0 for padding.
                Left or right padding gives the same result: positions are derived from this mask. With a non-empty
                `cache`, it covers the cached tokens and the new ones, `(batch_size, past_length + sequence_length)`.
            cache (`Cache`, *optional*): the base's key/value cache, as returned by a previous call with
                `use_cache=True` (also accepted as `past_key_values`, its name before transformers 5.24). A non-empty
                cache needs `steering_vectors`: the new tokens alone cannot give the `v` of the whole prompt.
            labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*): response tokens, -100
                elsewhere. The hypernetwork only reads positions that are real and not labels, so it never sees the
                response it is trained to produce.
            steering_input_ids (`torch.LongTensor` of shape `(batch_size, steering_sequence_length)`, *optional*):
                Tokenised steering prompts (see `tokenize_steering_prompts`).
            steering_attention_mask (`torch.Tensor` of shape `(batch_size, steering_sequence_length)`, *optional*).
            steering_vectors (`torch.FloatTensor` of shape `(batch_size, hidden_size)`, *optional*): precomputed
                vectors to add instead of running the hypernetwork.
            steering_factor (`float`, list of floats or `torch.Tensor` of shape `(batch_size,)`, *optional*):
                Per-row factors; defaults to `config.default_steering_factor`. 0 reproduces the base exactly.
            steering_prompt (`str` or list of `str`, *optional*): text steering prompts (needs the tokenizer). A list
                of lists (one list of concepts per row, with `steering_factor` of the same shape) composes concepts
                as described in `generate`.
            logits_to_keep (`int` or `torch.Tensor`, *optional*, defaults to 0): as in the base: keep the logits of
                the last `logits_to_keep` positions only (0 keeps all). With `labels`, the loss covers the kept
                positions, so training that keeps the positions from the one before the first label on computes the
                LM head only where labels are.
            contrast_steering_input_ids (`torch.LongTensor` of shape `(batch_size, contrast_sequence_length)`,
                *optional*): other steering prompts (e.g. a wrong concept per row). Their vectors are made on each
                row's own context, in the same hypernetwork call as the steering prompts' (a training step updates
                the running statistics once, from the steering prompts' rows), and applied to the same residual at
                the steering layer; only the layers above it run again, without the cache, and `contrast_logits`
                holds the result.
            contrast_steering_attention_mask (`torch.Tensor` of shape `(batch_size, contrast_sequence_length)`,
                *optional*).

        Returns:
            [`HyperSteerCausalLMOutputWithPast`] with `steering_vectors` of shape `(batch_size, hidden_size)` (for
            composed steering, `sum_k factor_k * v_k` per row).
        """
        if input_ids is None and inputs_embeds is None:
            raise ValueError("Pass `input_ids` or `inputs_embeds`.")
        if "past_key_values" in kwargs:
            if cache is not None:
                raise ValueError("Pass the key/value cache once, as `cache` (or `past_key_values`), not both.")
            cache = kwargs.pop("past_key_values")
        batch_size, sequence_length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        device = (input_ids if input_ids is not None else inputs_embeds).device
        past_length = cache.get_seq_length() if cache is not None else 0
        decoding_from_cache = past_length > 0
        if decoding_from_cache and steering_vectors is None:
            raise ValueError(
                f"`forward` got a cache of {past_length} tokens, so it sees only the {sequence_length} new tokens and "
                "cannot compute the prompt's steering vectors from them. Pass the vectors of the first call, "
                "`steering_vectors=outputs.steering_vectors`, or use `generate`, which caches them itself."
            )
        if attention_mask is None:
            attention_mask = torch.ones(batch_size, past_length + sequence_length, dtype=torch.long, device=device)
        if attention_mask.shape[-1] != past_length + sequence_length:
            raise ValueError(
                f"`attention_mask` has {attention_mask.shape[-1]} columns, but the cache holds {past_length} tokens and "
                f"{sequence_length} are new: pass the mask of all {past_length + sequence_length} tokens."
            )
        if position_ids is None:
            # Positions count real tokens only, also past a left-padded cached prompt.
            position_ids = positions_from_mask(attention_mask)[:, past_length:]
        requests = self._requests()
        request = requests.build(
            batch_size=batch_size,
            input_ids=input_ids,
            attention_mask=attention_mask[:, past_length:],
            labels=labels,
            steering_prompt=steering_prompt,
            steering_input_ids=steering_input_ids,
            steering_attention_mask=steering_attention_mask,
            steering_vectors=steering_vectors,
            steering_factor=steering_factor,
        )
        request.decoding_from_cache = decoding_from_cache
        if contrast_steering_input_ids is not None:
            if steering_vectors is not None or request.concept_rows is not None:
                raise ValueError(
                    "`contrast_steering_input_ids` needs one (uncomposed) steering prompt per row, not "
                    "`steering_vectors` or composed steering prompts."
                )
            request.contrast_steering_input_ids, request.contrast_steering_attention_mask = requests.steering_inputs(
                batch_size, None, contrast_steering_input_ids, contrast_steering_attention_mask
            )
        if labels is not None and isinstance(logits_to_keep, int) and logits_to_keep > 0:
            # The base's loss pairs logits with labels position by position: give it the kept window only.
            labels = labels[:, -logits_to_keep:]
        if use_cache is None and labels is not None and cache is None:
            # A training forward would otherwise fill a key/value cache that nothing reads.
            use_cache = False
        injector = self._injector()
        with injector.attach(request):
            outputs = self.language_model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                labels=labels,
                use_cache=use_cache,
                logits_to_keep=logits_to_keep,
                **{_CACHE_KWARG: cache},
                **kwargs,
            )
        contrast_logits = None
        if request.contrast_vectors is not None:
            contrast_logits = injector.contrast_logits(request, self.language_model, logits_to_keep)
        return HyperSteerCausalLMOutputWithPast(
            loss=outputs.loss,
            logits=outputs.logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            steering_vectors=request.row_vectors(),
            steering_gates=request.steering_gates,
            contrast_logits=contrast_logits,
            **{_CACHE_FIELD: getattr(outputs, _CACHE_FIELD)},
        )

    @torch.no_grad()
    def generate(
        self,
        inputs: torch.Tensor | None = None,
        steering_prompt: str | Sequence[str] | Sequence[Sequence[str]] | None = None,
        steering_factor: float | Sequence[float] | Sequence[Sequence[float]] | torch.Tensor | None = None,
        steering_input_ids: torch.LongTensor | None = None,
        steering_attention_mask: torch.Tensor | None = None,
        steering_vectors: torch.FloatTensor | None = None,
        **kwargs,
    ):
        """Generate with the base's own `generate` (every decoding strategy, cache and stopping rule), steered.

        `v` is computed once at the prefill from the prompt's residual and reused at every decoding step, where it is
        added according to `config.steering_positions`. Per-row steering prompts and factors share one batch; beam
        search and `num_return_sequences` repeat them to match. All other arguments are the base's `generate`
        arguments; the return value is the base's.

        Composition: `steering_prompt=[["legal terms", "pirate speech"], []]` with
        `steering_factor=[[1.0, 0.5], []]` gives each row its own list of concepts (an empty list leaves the row
        unsteered). The hypernetwork runs once per (row, concept) pair, and the row is steered by

            h_t <- h_t + sum_k factor_k * g_t(v_k) * v_k     (g_t = 1 without `token_gate`, so v_row = sum_k factor_k v_k)

        where `v_k` is what the hypernetwork makes from concept `k` for that row: for `"no_context"` the concept's
        own vector (independent of the row), for `"in_context"` the concept read together with the row's prompt, and
        for `"cross_attention"` the concept cross-attending to the row's own residual; the row's context is
        repeated once per concept. A single concept in list form steers exactly like the plain form.
        """
        input_ids = inputs if inputs is not None else kwargs.get("input_ids")
        inputs_embeds = kwargs.get("inputs_embeds")
        reference = input_ids if input_ids is not None else inputs_embeds
        if reference is None:
            raise ValueError("Pass the prompt as `input_ids` (or `inputs_embeds`) to steer generation.")
        batch_size, sequence_length = reference.shape[:2]
        attention_mask = kwargs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones(batch_size, sequence_length, dtype=torch.long, device=reference.device)
        if kwargs.get("use_cache") is False and self.config.steering_positions != "all":
            # Without a cache every step re-runs the whole sequence; prompt/generated positions are still told
            # apart by position id, which the hook reads from the decoder layer's arguments.
            logger.warning_once("Generating with `use_cache=False` re-runs the prompt at every step; this is slow.")
        request = self._requests().build(
            batch_size=batch_size,
            input_ids=input_ids if input_ids is not None and input_ids.dim() == 2 else None,
            attention_mask=attention_mask,
            labels=None,
            steering_prompt=steering_prompt,
            steering_input_ids=steering_input_ids,
            steering_attention_mask=steering_attention_mask,
            steering_vectors=steering_vectors,
            steering_factor=steering_factor,
        )
        request.is_generation = True
        with self._injector().attach(request):
            return self.language_model.generate(inputs, **kwargs)

    def compute_steering_vectors(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        steering_prompt: str | Sequence[str] | Sequence[Sequence[str]] | None = None,
        steering_input_ids: torch.LongTensor | None = None,
        steering_attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        steering_factor: float | Sequence[Sequence[float]] | None = None,
    ) -> torch.FloatTensor:
        """Return the steering vectors `v` without generating.

        For `"no_context"` no base pass is needed (`input_ids` may be omitted) and the result can be cached per
        steering prompt and passed to `generate(steering_vectors=...)`. Otherwise the base runs only up to the
        steering layer.

        With composed steering prompts (one list per row, see `generate`), each row's vector is
        `sum_k steering_factor[row][k] * v_k` (factors default to `config.default_steering_factor`); without a token
        gate, `generate(steering_vectors=it, steering_factor=1.0)` then steers exactly as the composed prompts do.
        `steering_factor` is accepted only with composed prompts: a plain `v` is returned before any factor.

        Returns:
            `torch.FloatTensor` of shape `(batch_size, hidden_size)`.
        """
        composed = _is_composed(steering_prompt)
        if steering_factor is not None and not composed:
            raise ValueError(
                "`steering_factor` applies to composed steering prompts only (one list of prompts per row); plain "
                "steering vectors are returned before any factor, so scale them yourself or pass the factor to "
                "`generate`."
            )
        requests = self._requests()
        if self.config.hypernet_type == "no_context" and input_ids is None:
            if composed:
                prompts, factors, rows = requests.flatten_composition(None, steering_prompt, steering_factor)
                ids, mask = requests.steering_inputs(len(prompts), prompts, None, None) if prompts else (None, None)
            else:
                ids, mask = requests.steering_inputs(
                    None, steering_prompt, steering_input_ids, steering_attention_mask
                )
            if ids is None:
                vectors = self.hypernetwork.output_projection.weight.new_zeros(0, self.config.hidden_size)
            else:
                vectors = self._run_hypernetwork(ids, mask, None, None, None)
            _check_finite(vectors)
            if composed:
                return _compose_rows(vectors, torch.tensor(factors), torch.tensor(rows), len(steering_prompt))
            return vectors
        if input_ids is None:
            raise ValueError(
                f"`hypernet_type={self.config.hypernet_type!r}` reads the user's prompt: pass `input_ids` and "
                "`attention_mask` as well as the steering prompt."
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        request = requests.build(
            batch_size=input_ids.shape[0],
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=labels,
            steering_prompt=steering_prompt,
            steering_input_ids=steering_input_ids,
            steering_attention_mask=steering_attention_mask,
            steering_vectors=None,
            steering_factor=steering_factor,
        )
        hidden_states = steering_layer_output(
            self.language_model, self.config.steering_layer, input_ids, attention_mask
        )
        request.expand_to(hidden_states.shape[0])
        if request.steering_vectors is None:
            self._compute_vectors(request, hidden_states)
        _check_finite(request.steering_vectors)
        return request.row_vectors()

    # ----- the parts one call is made of --------------------------------------------------------------------------

    def _bos_token_id(self) -> int | None:
        if self.tokenizer is not None:
            return self.tokenizer.bos_token_id
        return self.language_model.config.get_text_config().bos_token_id

    def _requests(self) -> HyperSteerRequestBuilder:
        """The request builder for one call (see [`HyperSteerRequestBuilder`])."""
        return HyperSteerRequestBuilder(
            self.config,
            self.tokenizer,
            device=self.get_input_embeddings().weight.device,
            bos_token_id=self._bos_token_id(),
            vector_template=self.hypernetwork.output_projection.weight,
        )

    def _injector(self) -> HyperSteerSteeringInjector:
        """The steering hook for one call (see [`HyperSteerSteeringInjector`])."""
        return HyperSteerSteeringInjector(
            decoder_layers_of(self.language_model),
            self.config.steering_layer,
            self.config.steering_positions,
            compute_vectors=self._compute_vectors,
            token_gate=self.hypernetwork.token_gate,
        )

    def _compute_vectors(self, request: _SteeringRequest, hidden_states: torch.Tensor) -> None:
        """Fill `request.steering_vectors` (and `request.contrast_vectors`) from the steering layer's output.

        Args:
            hidden_states (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`): the residual
                the vectors are added to, which `hypernet_type="cross_attention"` reads.
        """
        hypernetwork_inputs, num_rows = request.hypernetwork_inputs(
            hidden_states if self.config.hypernet_type == "cross_attention" else None
        )
        vectors = self._run_hypernetwork(*hypernetwork_inputs, num_statistics_rows=num_rows)
        request.steering_vectors = vectors[:num_rows]
        if request.contrast_steering_input_ids is not None:
            request.contrast_vectors = vectors[num_rows:]

    def _run_hypernetwork(
        self,
        steering_input_ids,
        steering_attention_mask,
        context_states,
        context_mask,
        context_input_ids,
        num_statistics_rows: int | None = None,
    ) -> torch.Tensor:
        """Run the hypernetwork on tokenised steering prompts, with the base's embeddings, rotary embedding and prior
        directions (see [`~HyperSteerHypernetwork.vectors_from_tokens`]).

        Returns:
            `torch.FloatTensor` of shape `(batch_size, hidden_size)` in the hypernetwork's dtype.
        """
        prior_directions = None
        if self.hypernetwork.prior is not None:
            prior_directions = self.hypernetwork.prior(
                steering_input_ids, steering_attention_mask, self.language_model, self.config.steering_layer
            ).to(self.hypernetwork.output_projection.weight.device)
        return self.hypernetwork.vectors_from_tokens(
            steering_input_ids,
            steering_attention_mask,
            input_embeddings=self.get_input_embeddings(),
            rotary_embedding=self.language_model.model.rotary_emb,
            base_config=self.language_model.config.get_text_config(),
            context_states=context_states,
            context_mask=context_mask,
            context_input_ids=context_input_ids,
            prior_directions=prior_directions,
            num_statistics_rows=num_statistics_rows,
        )

    def _residual_directions(self, steering_input_ids, steering_attention_mask) -> torch.Tensor:
        """The `"residual"` prior's uncentred directions (see [`HyperSteerResidualPrior`]), on the hypernetwork's
        device: `torch.FloatTensor` of shape `(batch_size, hidden_size)` in float32."""
        directions = HyperSteerResidualPrior()(
            steering_input_ids, steering_attention_mask, self.language_model, self.config.steering_layer
        )
        return directions.to(self.hypernetwork.output_projection.weight.device)


# ---------------------------------------------------------------------------------------------------------------
# Base-model helpers
# ---------------------------------------------------------------------------------------------------------------


def decoder_layers_of(language_model: nn.Module) -> nn.ModuleList:
    """The base's decoder layers, or a `ValueError` naming what is supported."""
    inner = getattr(language_model, "model", None)
    layers = getattr(inner, "layers", None)
    config = getattr(language_model, "config", None)
    if (
        not isinstance(layers, nn.ModuleList)
        or len(layers) == 0
        or getattr(config, "is_encoder_decoder", False)
        or not hasattr(inner, "rotary_emb")
    ):
        raise ValueError(
            f"HyperSteer supports decoder-only causal LMs with rotary positions that expose `model.model.layers` "
            f"(Gemma-2, Gemma-3 text, Llama/SmolLM2, Qwen2/3); got {type(language_model).__name__}. For multimodal "
            "checkpoints pass the text-only causal LM."
        )
    return layers


def positions_from_mask(attention_mask: torch.Tensor) -> torch.LongTensor:
    """Position ids that count only real tokens, so left and right padding give the same positions."""
    position_ids = attention_mask.long().cumsum(-1) - 1
    return position_ids.clamp(min=0)


class _StopAtSteeringLayer(Exception):
    """Raised by the hook of [`steering_layer_output`] once the steering layer's output is recorded."""


def steering_layer_output(
    language_model: PreTrainedModel,
    steering_layer: int,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor,
) -> torch.FloatTensor:
    """Run the base up to decoder layer `steering_layer` and stop there: the layers above it never run.

    The recording hook is put in front of every other hook on that layer, a steering hook of a running request
    included, so the residual it returns is never steered. Positions are derived from the mask (padding-invariant).

    Args:
        language_model ([`PreTrainedModel`]): the base causal LM (see [`decoder_layers_of`]).
        steering_layer (`int`): the decoder layer whose output is returned.
        input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`).
        attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`).

    Returns:
        `torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`: the layer's output residual.
    """
    recorded = {}

    def stop(module, args, output):
        recorded["hidden_states"] = output[0] if isinstance(output, tuple) else output
        raise _StopAtSteeringLayer()

    handle = decoder_layers_of(language_model)[steering_layer].register_forward_hook(stop, prepend=True)
    try:
        language_model.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions_from_mask(attention_mask),
            use_cache=False,
        )
    except _StopAtSteeringLayer:
        pass
    finally:
        handle.remove()
    return recorded["hidden_states"]


# ---------------------------------------------------------------------------------------------------------------
# Private helpers
# ---------------------------------------------------------------------------------------------------------------


def _check_base_matches_config(language_model: PreTrainedModel, config: HyperSteerConfig) -> None:
    base_config = language_model.config.get_text_config()
    if config.hidden_size is None or config.num_attention_heads is None or config.head_dim is None:
        raise ValueError(
            "The config does not record the base model's shape (`hidden_size`, `num_attention_heads`, `head_dim`); "
            "build the model with `HyperSteerModel.from_base_model(base, ...)`."
        )
    if config.hidden_size != base_config.hidden_size:
        raise ValueError(
            f"Hidden-size mismatch: the HyperSteer config/checkpoint expects a base with hidden_size="
            f"{config.hidden_size}, but {type(language_model).__name__} has hidden_size={base_config.hidden_size}. "
            f"Load it with the base it was trained on ({config.base_model_name_or_path!r})."
        )
    num_layers = base_config.num_hidden_layers
    if config.base_num_hidden_layers is not None and config.base_num_hidden_layers != num_layers:
        raise ValueError(
            f"The HyperSteer config expects a base with {config.base_num_hidden_layers} layers, but the given base has "
            f"{num_layers}. Load it with the base it was trained on ({config.base_model_name_or_path!r})."
        )
    if not 0 <= config.steering_layer < num_layers:
        raise ValueError(
            f"`steering_layer={config.steering_layer}` is out of range for a base with {num_layers} layers; choose "
            f"0..{num_layers - 1}."
        )
    if config.hypernet_init == "base" and config.hypernet_num_layers > num_layers:
        raise ValueError(
            f"`hypernet_init='base'` needs `hypernet_num_layers` <= {num_layers} (the base's depth), got "
            f"{config.hypernet_num_layers}; lower it or use `hypernet_init='random'`."
        )


def _layer_type(base_config, layer_index: int) -> str:
    layer_types = getattr(base_config, "layer_types", None)
    return layer_types[layer_index] if layer_types else "full_attention"


def _hypernet_decoder_layer(language_model, decoder_layers, index: int, init: str) -> nn.Module:
    """A decoder block of the base's architecture: a copy of base layer `index` (`init="base"`) or the same block
    freshly drawn by the base architecture's own initialiser (`init="random"`)."""
    layer = copy.deepcopy(decoder_layers[index % len(decoder_layers)])
    _remove_copied_hooks(layer)
    offloaded = [name for name, parameter in layer.named_parameters() if parameter.device.type == "meta"]
    if offloaded:
        raise ValueError(
            f"Base layer {index % len(decoder_layers)} is offloaded (parameters {offloaded[:3]} are on the meta "
            "device), so the hypernetwork cannot copy it; load the base without disk/CPU offloading in its "
            "`device_map`."
        )
    layer.requires_grad_(True)
    if init == "random":
        with torch.no_grad():
            for module in layer.modules():
                module.__dict__.pop("_is_hf_initialized", None)
                for tensor in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
                    tensor.__dict__.pop("_is_hf_initialized", None)
                language_model._init_weights(module)
    # Mark the block as initialised so `post_init` leaves it as built.
    for module in layer.modules():
        module._is_hf_initialized = True
    return layer


def _remove_copied_hooks(layer: nn.Module) -> None:
    """Strip the hooks a copied base layer brings along, so none of them fires inside the hypernetwork.

    These are transformers' output-recording hooks and, for a base loaded with `device_map`, accelerate's dispatch
    hook: accelerate stores it as `_hf_hook` and replaces the instance's `forward` with a wrapper (keeping the original
    as `_old_forward`). Dropping the instance-level `forward` restores the class's own method.
    """
    for module in layer.modules():
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
        module._forward_hooks_with_kwargs.clear()
        module._forward_pre_hooks_with_kwargs.clear()
        if "_hf_hook" in module.__dict__ or "_old_forward" in module.__dict__:
            for name in ("_hf_hook", "_old_forward", "forward"):
                module.__dict__.pop(name, None)


def _module_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _concatenate_rows(first: Sequence, second: Sequence) -> tuple:
    """Concatenate two tuples of per-row tensors (or `None`s) along the batch, padding 2-D tensors on the right to a
    common length (with zeros: a pad id under a zero mask, or a masked-out mask entry)."""
    joined = []
    for a, b in zip(first, second):
        if a is None:
            joined.append(None)
            continue
        if a.dim() == 2 and a.shape[1] != b.shape[1]:
            length = max(a.shape[1], b.shape[1])
            a, b = (F.pad(value, (0, length - value.shape[1])) for value in (a, b))
        joined.append(torch.cat([a, b.to(a.device)], dim=0))
    return tuple(joined)


def _statistics_mask(
    steering_input_ids: torch.LongTensor, steering_attention_mask: torch.Tensor, num_rows: int | None
) -> torch.BoolTensor:
    """The rows a training step updates the running statistics from: the first `num_rows` (all by default), and none
    when those share one steering prompt. Computed on the device (no host sync).

    Returns:
        `torch.BoolTensor` of shape `(batch_size,)`.
    """
    batch_size = steering_input_ids.shape[0]
    num_rows = batch_size if num_rows is None else num_rows
    prompts = steering_input_ids[:num_rows].masked_fill(~steering_attention_mask[:num_rows].bool(), -1)
    several_concepts = (prompts != prompts[:1]).any()
    rows = torch.arange(batch_size, device=steering_input_ids.device) < num_rows
    return rows & several_concepts


def _drop_tokens(token_mask: torch.BoolTensor, probability: float) -> torch.BoolTensor:
    """Hide each real token with `probability`; a row that would lose all of them keeps them all.

    Args:
        token_mask (`torch.BoolTensor` of shape `(batch_size, sequence_length)`): real-token mask.

    Returns:
        `torch.BoolTensor` of the same shape, a subset of `token_mask`.
    """
    kept = token_mask & (torch.rand(token_mask.shape, device=token_mask.device) >= probability)
    return torch.where(kept.any(dim=-1, keepdim=True), kept, token_mask)


def _pack_left(first_embeds, first_mask, second_embeds=None, second_mask=None):
    """Concatenate two padded sequences and move every real token to the left, in order.

    Args:
        first_embeds (`torch.FloatTensor` of shape `(batch_size, first_length, hidden_size)`), first_mask (`torch.BoolTensor`
        of shape `(batch_size, first_length)`), and optionally the same for a second sequence.

    Returns:
        `(embeds, mask)` of shapes `(batch_size, first_length + second_length, hidden_size)` and
        `(batch_size, first_length + second_length)`: row `b` holds its real tokens at positions
        `0 .. n_b - 1` and zeros after, whatever the padding side of the inputs.
    """
    embeds, mask = first_embeds, first_mask.bool()
    if second_embeds is not None:
        embeds = torch.cat([embeds, second_embeds], dim=1)
        mask = torch.cat([mask, second_mask.bool()], dim=1)
    num_real = mask.sum(dim=-1, keepdim=True)
    target = torch.where(mask, mask.cumsum(-1) - 1, num_real + (~mask).cumsum(-1) - 1)
    packed = torch.zeros_like(embeds).scatter(1, target[..., None].expand_as(embeds), embeds)
    packed_mask = torch.arange(mask.shape[1], device=mask.device)[None, :] < num_real
    return packed * packed_mask[..., None].to(packed.dtype), packed_mask


def per_row_causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over each row's label tokens.

    Args:
        logits (`torch.FloatTensor` of shape `(batch_size, kept_length, vocab_size)`): the logits of the last
            `kept_length` positions (all positions, or a `logits_to_keep` window).
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`): -100 where there is no label.

    Returns:
        `torch.FloatTensor` of shape `(batch_size,)` in float32 (0 for a row without labels).
    """
    labels = labels[:, labels.shape[1] - logits.shape[1] :].to(logits.device)
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    losses = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels, ignore_index=-100, reduction="none")
    return losses.sum(-1) / shift_labels.ne(-100).sum(-1).clamp(min=1)


def _check_finite(vectors: torch.Tensor) -> None:
    if not torch.isfinite(vectors).all():
        raise ValueError(
            "The hypernetwork produced NaN/inf steering vectors; the checkpoint is corrupt or training diverged "
            "(try a lower learning rate or float32 hypernetwork weights)."
        )


def _base_hub_kwargs(hub_kwargs: dict) -> dict:
    """The download settings that also apply to the base's files; `revision` and `subfolder` name places in the
    HyperSteer repository only (the base's revision is `config.base_model_revision`)."""
    return {key: value for key, value in hub_kwargs.items() if key not in ("revision", "subfolder")}


def _optional_file(pretrained_model_name_or_path, file_name: str, hub_kwargs: dict) -> str | None:
    """Resolve `file_name` in a folder or Hub repository; `None` only when the file does not exist there (network and
    permission errors still raise)."""
    return cached_file(
        pretrained_model_name_or_path, file_name, _raise_exceptions_for_missing_entries=False, **hub_kwargs
    )


def _load_hypernetwork_weights(pretrained_model_name_or_path, hub_kwargs: dict) -> dict[str, torch.Tensor]:
    """The saved hypernetwork state dict, from `model.safetensors` or from the shards that
    `model.safetensors.index.json` lists (as `save_pretrained(..., max_shard_size=...)` writes them)."""
    weights_file = _optional_file(pretrained_model_name_or_path, SAFE_WEIGHTS_NAME, hub_kwargs)
    if weights_file is not None:
        return load_state_dict(weights_file)
    index_file = _optional_file(pretrained_model_name_or_path, SAFE_WEIGHTS_INDEX_NAME, hub_kwargs)
    if index_file is None:
        raise OSError(
            f"{pretrained_model_name_or_path} holds neither {SAFE_WEIGHTS_NAME} nor {SAFE_WEIGHTS_INDEX_NAME}; it is "
            "not a folder written by `HyperSteerModel.save_pretrained`."
        )
    shard_files, _ = get_checkpoint_shard_files(pretrained_model_name_or_path, index_file, **hub_kwargs)
    state_dict = {}
    for shard_file in shard_files:
        state_dict.update(load_state_dict(shard_file))
    return state_dict


# Any of these next to the weights means a tokenizer was saved there (`save_pretrained` always writes the config).
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")


def _load_tokenizer(pretrained_model_name_or_path, config: HyperSteerConfig, hub_kwargs: dict):
    """The tokenizer saved next to the hypernetwork; the base's only when no tokenizer file was saved at all.

    A saved tokenizer that fails to load raises: falling back would silently swap in a tokenizer the checkpoint was
    not trained with (other special tokens, chat template or padding).
    """
    if any(_optional_file(pretrained_model_name_or_path, name, hub_kwargs) for name in _TOKENIZER_FILES):
        try:
            return AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        except (OSError, ValueError) as error:
            raise OSError(
                f"The tokenizer saved in {pretrained_model_name_or_path} does not load ({error}). Repair or delete its "
                "files, or pass a loaded tokenizer with `tokenizer=`."
            ) from error
    logger.warning(
        f"No tokenizer was saved in {pretrained_model_name_or_path}; loading the base model's from "
        f"{config.base_model_name_or_path!r}. Pass `tokenizer=` to choose another."
    )
    return AutoTokenizer.from_pretrained(
        config.base_model_name_or_path, revision=config.base_model_revision, **_base_hub_kwargs(hub_kwargs)
    )


AutoModel.register(HyperSteerConfig, HyperSteerModel, exist_ok=True)
AutoModelForCausalLM.register(HyperSteerConfig, HyperSteerModel, exist_ok=True)


__all__ = [
    "HyperSteerModel",
    "HyperSteerPreTrainedModel",
    "HyperSteerHypernetwork",
    "HyperSteerPrior",
    "HyperSteerLexicalPrior",
    "HyperSteerResidualPrior",
    "HyperSteerRequestBuilder",
    "HyperSteerSteeringInjector",
    "HyperSteerCausalLMOutputWithPast",
    "decoder_layers_of",
    "per_row_causal_lm_loss",
    "positions_from_mask",
    "steering_layer_output",
    "tokenize_steering_prompts",
]
