"""HyperSteer model configuration."""

import math

from transformers import AutoConfig, PreTrainedConfig
from transformers.utils import logging


logger = logging.get_logger(__name__)

HYPERNET_TYPES = ("cross_attention", "in_context", "no_context")
HYPERNET_INITS = ("base", "random")
STEERING_POSITIONS = ("all", "prompt", "generated")
HYPERNET_POOLINGS = ("last", "mean")
STEERING_PRIORS = ("none", "lexical", "residual")
STEERING_PRIOR_MAPS = ("matrix", "scalar")


class HyperSteerConfig(PreTrainedConfig):
    r"""
    Configuration of a [`HyperSteerModel`]: a hypernetwork that reads a natural-language steering prompt (and, for
    some variants, the frozen base LM's own activations on the user's prompt) and returns a steering vector `v`
    added to the base's residual stream after decoder layer `steering_layer`:

        h_t <- h_t + steering_factor * g_t * v,    with g_t = 1 unless `token_gate=True`.

    Described in "HyperSteer: Activation Steering at Scale with Hypernetworks" (Sun et al., 2025),
    https://huggingface.co/papers/2506.03292. The configuration holds the architecture only; optimiser and data
    settings live in the training arguments. The base model's shape fields (`hidden_size`, `num_attention_heads`,
    `head_dim`, `base_num_hidden_layers`) are filled in by [`HyperSteerModel.from_base_model`] and checked against the
    base every time a model is built, so a checkpoint cannot be attached to a base of another shape.

    Args:
        base_model_name_or_path (`str`, *optional*):
            Hub id or local path of the frozen base causal LM. `from_pretrained` loads it from here unless a loaded
            base is passed.
        base_model_revision (`str`, *optional*):
            Revision (branch, tag or commit) of the base model to load.
        steering_layer (`int`, *optional*, defaults to 20):
            Index of the base decoder layer whose output residual is read (cross-attention) and steered.
        hypernet_type (`str`, *optional*, defaults to `"cross_attention"`):
            `"cross_attention"`: the steering prompt cross-attends to the base residual at `steering_layer` over the
            user's prompt positions (the paper's best variant). `"in_context"`: the hypernetwork reads the steering
            prompt followed by the user's prompt as one text. `"no_context"`: the steering prompt only, so `v` depends
            on nothing else and can be computed once per prompt.
        hypernet_num_layers (`int`, *optional*, defaults to 8):
            Number of transformer blocks in the hypernetwork.
        hypernet_init (`str`, *optional*, defaults to `"base"`):
            `"base"` copies the base's first `hypernet_num_layers` decoder layers (pretrained weights) into the
            hypernetwork; `"random"` initialises blocks of the same architecture from scratch.
        steering_positions (`str`, *optional*, defaults to `"all"`):
            Where `v` is added: `"all"` positions, only the `"prompt"` (in training: non-label positions), or only
            `"generated"` tokens (in training: the response positions).
        token_gate (`bool`, *optional*, defaults to `False`):
            Learn a per-token coefficient `g_t = sigmoid(w^T (norm(h_t) * v / rms(v)) + b)` in [0, 1] from the base
            activation at each position, so steering can be strong on some tokens and near zero on others.
        default_steering_factor (`float`, *optional*, defaults to 1.0):
            Factor used when a call gives none.
        prompted_steering_factor (`float`, *optional*):
            Factor for adding the vector on top of a prompt that also asks for the concept
            (`evaluation.prompt_steering_turns`): the use that makes a description the model never trained on show in
            text. Usually smaller than `default_steering_factor`: the prompt already carries the concept. `None`
            until `train_hypersteer.py --calibrate_prompted_steering_factor` chooses it.
        hypernet_pooling (`str`, *optional*, defaults to `"last"`):
            How the hypernetwork's final states become one vector: the `"last"` real token (as a causal LM summarises
            a text), or the `"mean"` over all real tokens the hypernetwork reads.
        shared_steering_offset (`bool`, *optional*, defaults to `False`):
            Add a learned concept-free vector `b` to every steering vector, `v = b + H(s, x)`. Training on teacher
            outputs rewards a shift toward the teacher's style whatever the concept; `b` holds that shift once, so
            `H` does not have to repeat it in every concept's vector.
        center_pooled_features (`bool`, *optional*, defaults to `False`):
            Subtract a running mean of the pooled features (a float32 buffer kept in the checkpoint, updated once per
            training step from the steered rows, summed over processes under DDP, and skipped for a batch whose rows
            share one steering prompt) before the final norm and output projection. Pooled features of different steering prompts are nearly parallel
            (the shared part dominates); centring leaves what tells concepts apart, which the final norm then brings
            to unit scale.
        standardize_pooled_features (`bool`, *optional*, defaults to `False`):
            With `center_pooled_features`, also divide every coordinate of the centred features by its running
            standard deviation (same buffer rules). Without it one residual coordinate whose spread grows in
            training can hold nearly all of the features' variation; the final norm then squeezes every other
            coordinate to nothing and all concepts' vectors become parallel.
        pooled_feature_momentum (`float`, *optional*, defaults to 0.05):
            Update rate of the running statistics (a plain average over the first `1 / momentum` training batches
            that update them).
        steering_prior (`str`, *optional*, defaults to `"none"`):
            A training-free concept direction `u(s)` (unit norm) added through a learned map `A` that starts at
            `steering_prior_init_norm * I`, so the hypernetwork corrects a direction instead of inventing one:
            `"lexical"`: the steering prompt's mean output-token embedding centred on the vocabulary mean (for a
            tied-embedding base, a direction that raises the logits of the prompt's own words); `"residual"`: the
            base's own residual at `steering_layer` averaged over the steering prompt's tokens and centred on a running
            mean over training prompts (activation addition of the concept's description, read where it is added;
            it costs one frozen base pass over the short steering prompt up to that layer). `"none"` adds nothing.
        steering_prior_init_norm (`float`, *optional*, defaults to 16.0):
            Norm of the prior term at initialisation, on the scale of the residual stream at `steering_layer`.
        steering_prior_map (`str`, *optional*, defaults to `"matrix"`):
            The learned map `A` of the prior term: `"matrix"`, a full `hidden_size x hidden_size` matrix; `"scalar"`,
            `A = a * I` with one learned scale `a`. A scalar cannot learn which concepts it was trained on, so the
            prior's direction reaches a never-trained description exactly as it reaches a trained one.
        readout_norm (`float`, *optional*):
            When set, the concept part `W_o norm(pool(...))` of every vector is rescaled to this L2 norm before the
            shared offset and the prior are added. A linear readout shrinks the vector of a description unlike every
            training description toward the offset (ridge regression predicts the mean far from its data); at a fixed
            norm it keeps only the direction. `fit_readout` with `fit_readout_norm` sets it to the mean norm of the
            training concepts' targets about their mean.
        steering_prompt_token_dropout (`float`, *optional*, defaults to 0.0):
            In training only, the probability that each steering-prompt token is hidden from the hypernetwork's
            blocks (every row keeps at least one token). Each description is then seen as many partial descriptions,
            so the hypernetwork has to read its words rather than recognise the few descriptions it trains on.
            Inference always reads the whole prompt.
        max_steering_prompt_length (`int`, *optional*, defaults to 64):
            Steering prompts are truncated to this many tokens.
        hidden_size (`int`, *optional*):
            Hidden size of the base model (the size of `v`).
        num_attention_heads (`int`, *optional*):
            Number of heads of the hypernetwork's cross-attention (the base's by default).
        head_dim (`int`, *optional*):
            Per-head size of the hypernetwork's cross-attention (the base's by default).
        base_num_hidden_layers (`int`, *optional*):
            Number of decoder layers of the base model, to validate `steering_layer` and `hypernet_num_layers`.
        rms_norm_eps (`float`, *optional*, defaults to 1e-6):
            Epsilon of the hypernetwork's own RMS norms.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialiser of the hypernetwork's own linear layers.

    ```python
    >>> from transformers import AutoModelForCausalLM, AutoTokenizer
    >>> from modeling_hypersteer import HyperSteerConfig, HyperSteerModel

    >>> config = HyperSteerConfig(steering_layer=20, hypernet_type="cross_attention", hypernet_num_layers=8)
    >>> base = AutoModelForCausalLM.from_pretrained("google/gemma-2-2b-it")
    >>> tokenizer = AutoTokenizer.from_pretrained("google/gemma-2-2b-it")
    >>> model = HyperSteerModel.from_base_model(base, tokenizer=tokenizer, **config.to_diff_dict())
    ```"""

    model_type = "hypersteer"

    base_model_name_or_path: str | None = None
    base_model_revision: str | None = None
    steering_layer: int = 20
    hypernet_type: str = "cross_attention"
    hypernet_num_layers: int = 8
    hypernet_init: str = "base"
    steering_positions: str = "all"
    token_gate: bool = False
    hypernet_pooling: str = "last"
    shared_steering_offset: bool = False
    center_pooled_features: bool = False
    standardize_pooled_features: bool = False
    pooled_feature_momentum: float = 0.05
    steering_prior: str = "none"
    steering_prior_init_norm: float = 16.0
    steering_prior_map: str = "matrix"
    readout_norm: float | None = None
    steering_prompt_token_dropout: float = 0.0
    default_steering_factor: float = 1.0
    prompted_steering_factor: float | None = None
    max_steering_prompt_length: int = 64
    hidden_size: int | None = None
    num_attention_heads: int | None = None
    head_dim: int | None = None
    base_num_hidden_layers: int | None = None
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.validate_architecture()

    def validate_architecture(self):
        """Raise a `ValueError` naming the offending value when fields are out of range or conflict."""
        _check_choice("hypernet_type", self.hypernet_type, HYPERNET_TYPES)
        _check_choice("hypernet_init", self.hypernet_init, HYPERNET_INITS)
        _check_choice("steering_positions", self.steering_positions, STEERING_POSITIONS)
        _check_choice("hypernet_pooling", self.hypernet_pooling, HYPERNET_POOLINGS)
        _check_choice("steering_prior", self.steering_prior, STEERING_PRIORS)
        _check_choice("steering_prior_map", self.steering_prior_map, STEERING_PRIOR_MAPS)
        if self.standardize_pooled_features and not self.center_pooled_features:
            raise ValueError(
                "`standardize_pooled_features=True` scales the centred features: set `center_pooled_features=True` too."
            )
        if not 0 < self.pooled_feature_momentum <= 1:
            raise ValueError(f"`pooled_feature_momentum` must be in (0, 1], got {self.pooled_feature_momentum!r}.")
        _check_number(
            "steering_prior_init_norm",
            self.steering_prior_init_norm,
            lambda v: 0 <= v < math.inf,
            "a finite number >= 0",
        )
        if self.readout_norm is not None:
            _check_number("readout_norm", self.readout_norm, lambda v: 0 < v < math.inf, "a finite number > 0 or None")
        _check_number(
            "steering_prompt_token_dropout",
            self.steering_prompt_token_dropout,
            lambda v: 0 <= v < 1,
            "a probability in [0, 1)",
        )
        for name in ("hypernet_num_layers", "max_steering_prompt_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if (
            isinstance(self.steering_layer, bool)
            or not isinstance(self.steering_layer, int)
            or self.steering_layer < 0
        ):
            raise ValueError(f"`steering_layer` must be a non-negative layer index, got {self.steering_layer!r}.")
        if self.base_num_hidden_layers is not None:
            if self.steering_layer >= self.base_num_hidden_layers:
                raise ValueError(
                    f"`steering_layer={self.steering_layer}` is out of range for a base with "
                    f"{self.base_num_hidden_layers} decoder layers; choose 0..{self.base_num_hidden_layers - 1}."
                )
            if self.hypernet_init == "base" and self.hypernet_num_layers > self.base_num_hidden_layers:
                raise ValueError(
                    f"`hypernet_init='base'` copies the base's first `hypernet_num_layers={self.hypernet_num_layers}` "
                    f"layers, but the base has only {self.base_num_hidden_layers}; lower `hypernet_num_layers` or use "
                    "`hypernet_init='random'`."
                )
        if self.hidden_size is not None and self.hidden_size < 1:
            raise ValueError(f"`hidden_size` must be positive, got {self.hidden_size}.")
        _check_number("default_steering_factor", self.default_steering_factor, math.isfinite, "a finite number")
        if self.prompted_steering_factor is not None:
            _check_number(
                "prompted_steering_factor", self.prompted_steering_factor, math.isfinite, "a finite number or None"
            )
        if self.rms_norm_eps <= 0 or self.initializer_range < 0:
            raise ValueError(
                f"`rms_norm_eps` must be > 0 and `initializer_range` >= 0, got {self.rms_norm_eps} and {self.initializer_range}."
            )


def _check_choice(name: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {list(allowed)}, got {value!r}.")


def _check_number(name: str, value, accepts, requirement: str) -> None:
    """Raise unless `value` is an int or float (not a bool) that `accepts(value)`; `requirement` says what is."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not accepts(value):
        raise ValueError(f"`{name}` must be {requirement}, got {value!r}.")


# Registering on import lets `AutoConfig`/`AutoTokenizer.from_pretrained(saved_dir)` resolve `model_type` without
# asking to run remote code when this package is installed.
try:
    AutoConfig.register(HyperSteerConfig.model_type, HyperSteerConfig)
except ValueError as error:
    if "already used" not in str(error):
        raise


__all__ = ["HyperSteerConfig"]
