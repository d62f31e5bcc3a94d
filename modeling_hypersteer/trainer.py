"""`HyperSteerTrainer`: the HF `Trainer` with the few differences HyperSteer needs.

Everything else — optimiser over trainable parameters only (the base is frozen), mixed precision, gradient
accumulation, DDP/FSDP/DeepSpeed through `accelerate`, checkpointing and exact resume — is the stock `Trainer`.
Checkpoints are hypernetwork-sized because `HyperSteerModel.save_pretrained` writes the hypernetwork only.
"""

import copy
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import IntervalStrategy, Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging

from .data import DISTILLATION_COLUMNS
from .model_card import DEFAULT_LICENSE, write_model_card
from .modeling_hypersteer import per_row_causal_lm_loss, tokenize_steering_prompts
from .utils import pyplot


logger = logging.get_logger(__name__)

# Evaluations per run when `eval_strategy="steps"` and `eval_steps` is not given.
DEFAULT_EVALUATIONS_PER_RUN = 5
DISTILLATION_REFERENCES = ("prompted", "plain")


@dataclass
class HyperSteerTrainingArguments(TrainingArguments):
    r"""
    [`TrainingArguments`] for HyperSteer. Paper settings for Gemma-2-2B-it (steering layer 20, cross-attention):
    `--learning_rate 8e-5 --num_train_epochs 3 --per_device_train_batch_size 12`.

    > [!NOTE]
    > Parameters whose defaults differ from [`TrainingArguments`]:
    > - `learning_rate`: `8e-5` instead of `5e-5` (the paper's setting).
    > - `logging_steps`: `10` instead of `500`, since useful runs are a few hundred steps on small data.
    > - `activation_checkpointing_kwargs`: `{"use_reentrant": False}`; reentrant checkpointing would cut the gradient
    >   path through the frozen base, whose inputs do not require grad.
    > - `ddp_find_unused_parameters`: `False`; every hypernetwork weight is used at every step, so DDP's extra graph
    >   traversal would only cost time.
    > - `eval_strategy`: by default `"steps"` when the trainer is given an `eval_dataset`, so the loss curve shows
    >   held-in and held-out loss, and `"no"` when it is not (where the parent's `"no"` default applies). The arguments
    >   cannot know which: they resolve the default to `"steps"`, and [`HyperSteerTrainer`] turns it into `"no"` on its
    >   own copy of the arguments when it has no evaluation set. An explicit value is always kept (and
    >   `eval_strategy="steps"` without an evaluation set raises, as in [`Trainer`]).
    > - `contrast_loss_weight`: `0.5` (a HyperSteer field, listed here because it changes the default objective from the
    >   LM loss alone; see below).
    > - `eval_steps`: with `eval_strategy="steps"` and no `eval_steps` given, `1 / DEFAULT_EVALUATIONS_PER_RUN`
    >   (a ratio of the total steps), so a run is evaluated 5 times however long it is, instead of at every
    >   `logging_steps`.

    Training objective. The LM loss on the concept data's responses alone learns a concept-free shift toward the
    teacher's style: the wrong concept then lowers the loss as much as the right one. Two terms make the vector
    depend on the concept (each row of a batch is paired with a row of another concept in the same batch):

        loss = L_lm + contrast_loss_weight * mean_i -log sigmoid(contrast_beta * (L_i(v_wrong) - L_i(v_i)))
                    + diversity_loss_weight * mean_{i,j: c_i != c_j} cos(v_i - b, v_j - b)

    where `L_i(v)` is row `i`'s mean response cross-entropy when steered by `v`, `v_wrong` is the vector the
    hypernetwork makes from the other row's steering prompt *on row `i`'s own context* (only the layers above the
    steering layer run again), and `b` the shared offset when the model has one.

    Per-concept vector targets (`concept_vector_loss_weight > 0`, with `concept_vectors=` given to
    [`HyperSteerTrainer`]): one free vector per training concept trained with the LM loss alone shows its concept in
    generated text far more than the hypernetwork's vectors do at the same fluency. The term pulls each row's vector
    `v_i` (before the steering factor) toward `s * t_{c_i}`, its concept's trained vector `t` times
    `concept_vector_scale`, by the relative squared error `||v_i - s t||^2 / ||s t||^2` averaged over the rows whose
    concept has a target.

    Teacher-free distillation (`distillation_loss_weight > 0`, needs distillation rows from
    [`~modeling_hypersteer.data.tokenize_distillation_dataset`] in the training set). Such a row is a real text steered
    by two concept descriptions `d` and `d'` that need no response of their own; the teacher is the frozen base with
    the description in its prompt (`l_d`, `l_d'`: its logits on the response tokens), and the target for the vector
    of `d` is

        t_d = l_ref + distillation_guidance * (l_d - l_d'),   l_ref = l_d ("prompted") or the unprompted base ("plain")

    (and symmetrically for `d'`, whose student logits come from the contrast pass). The term is
    `KL(softmax(t_d) || student)` averaged over response tokens; the guidance part is what tells `d` from `d'`, the
    reference part what any description in the prompt does. Distillation rows never enter the LM or contrast terms.

    Args:
        plot_loss_curve (`bool`, *optional*, defaults to `True`):
            Write `loss_curve.png` (train, held-in and held-out eval loss) into `output_dir` after training.
        contrast_loss_weight (`float`, *optional*, defaults to 0.5):
            Weight of the wrong-concept contrast (0 turns it off and skips its extra pass). The default is the
            measured winner of `benchmarks/quality_ablation.py`; it costs a second pass over the layers above the
            steering layer.
        contrast_beta (`float`, *optional*, defaults to 5.0):
            Sharpness of the contrast's log-sigmoid on the per-row loss gap (nats).
        diversity_loss_weight (`float`, *optional*, defaults to 0.0):
            Weight of the mean cosine similarity between steering vectors of different concepts in a batch.
        concept_vector_loss_weight (`float`, *optional*, defaults to 0.0):
            Weight of the per-concept vector term (0 turns it off); needs `concept_vectors=` in [`HyperSteerTrainer`].
        concept_vector_scale (`float`, *optional*, defaults to 1.0):
            `s` of the per-concept vector term: the hypernetwork's vector at factor 1 is pulled toward `s` times the
            concept's trained vector, so that a trained vector's best factor `f` becomes the hypernetwork's `f / s`.
        concept_vector_steps (`int`, *optional*, defaults to 250), concept_vector_learning_rate (`float`, *optional*,
            defaults to 0.05): how `train_hypersteer.py` trains the per-concept vectors (batch 4, the LM loss alone)
            on the training rows before the hypernetwork, when `concept_vector_loss_weight > 0` or `fit_readout`.
        fit_readout (`bool`, *optional*, defaults to `False`):
            Before training, fit the hypernetwork's readout to the per-concept vectors in closed form
            ([`fit_readout_to_concept_vectors`]; the vectors are trained as for `concept_vector_loss_weight`). With
            `max_steps=0`, `train_hypersteer.py` saves the fitted model without training it.
        fit_readout_norm (`bool`, *optional*, defaults to `False`):
            With `fit_readout`, also fix the norm of every vector's concept part (`HyperSteerConfig.readout_norm`).
        readout_ridges (`str`, *optional*, defaults to `"0.01,0.03,0.1,0.3,1"`):
            The ridge penalties `fit_readout` chooses from by leave-one-out cosine over the training concepts.
        train_readout_only (`bool`, *optional*, defaults to `False`):
            Train only the hypernetwork's readout (output projection, shared offset, prior map) and keep its decoder
            blocks, cross-attention and token gate as they are ([`freeze_all_but_readout`]). After `fit_readout` the
            features the fit regressed from then stay fixed, so a description never trained on keeps being read
            through the training descriptions it resembles while the LM loss refines their vectors.
        distillation_loss_weight (`float`, *optional*, defaults to 0.0):
            Weight of the teacher-free distillation term on distillation rows (0 turns it off).
        distillation_guidance (`float`, *optional*, defaults to 4.0):
            `γ` of the distillation target: how much the difference between two descriptions' teachers is amplified.
        distillation_reference (`str`, *optional*, defaults to `"prompted"`):
            `l_ref` of the distillation target: `"prompted"` (the teacher with the row's own description) or `"plain"`
            (the unprompted base; one more frozen forward per distillation row).
        token_dropout_start_ratio (`float`, *optional*, defaults to 0.0):
            Fraction of the training steps that run before the model's `steering_prompt_token_dropout` starts (0: from
            the first step). Hiding description tokens slows the contrast's take-off; starting later lets it first
            learn to tell whole descriptions apart.
        train_steering_factor_max (`float`, *optional*):
            When set, each training row's steering factor (the data's `steering_factor` column, 1.0 on concept rows;
            else the model's `default_steering_factor`) is multiplied by its own draw, uniform in
            `[1, train_steering_factor_max]`, in the LM and contrast terms alike. Trained at one factor, a vector is
            free to be fragile at the larger ones `generate` may use (text that repeats itself); over a range it must
            keep real text likely at all of them. Evaluation steers at the rows' own factors.
        logits_on_labels_only (`bool`, *optional*, defaults to `False`):
            Compute the LM head in training only from the position before the first label on (the loss is the
            same); saves the head's cost on prompt tokens. Evaluation keeps full logits for `compute_metrics`.
    """

    learning_rate: float = field(default=8e-5, metadata={"help": "Initial AdamW learning rate (paper: 8e-5)."})
    logging_steps: float = field(default=10, metadata={"help": "Log every X update steps (int) or ratio of steps."})
    eval_strategy: str | None = field(
        default=None,
        metadata={
            "help": "When to evaluate: 'no', 'steps' or 'epoch'. Default: 'steps' when there is an evaluation set, "
            "else 'no'."
        },
    )
    activation_checkpointing_kwargs: dict | str | None = field(
        default_factory=lambda: {"use_reentrant": False},
        metadata={"help": "Keyword arguments for `torch.utils.checkpoint.checkpoint` when checkpointing is on."},
    )
    ddp_find_unused_parameters: bool | None = field(
        default=False, metadata={"help": "Passed to DDP; every hypernetwork weight is used at every step."}
    )
    plot_loss_curve: bool = field(
        default=True, metadata={"help": "Write loss_curve.png (train / held-in / held-out loss) into output_dir."}
    )
    contrast_loss_weight: float = field(
        default=0.5,
        metadata={
            "help": "Weight of the wrong-concept contrast: each row's response must be more likely under its own "
            "concept's vector than under the vector made from another row's concept on this row's context "
            "(-log sigmoid(beta * loss gap)). 0 turns it off."
        },
    )
    contrast_beta: float = field(
        default=5.0, metadata={"help": "Sharpness of the contrast's log-sigmoid on the per-row loss gap (nats)."}
    )
    diversity_loss_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the mean cosine similarity between steering vectors of different concepts."},
    )
    concept_vector_loss_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the term pulling each row's steering vector toward concept_vector_scale times its "
            "concept's LM-trained vector (one free vector per training concept, trained before the hypernetwork). "
            "0 turns it off."
        },
    )
    concept_vector_scale: float = field(
        default=1.0,
        metadata={"help": "Multiple of a concept's trained vector that its steering vector at factor 1 is pulled to."},
    )
    concept_vector_steps: int = field(
        default=250,
        metadata={
            "help": "Training steps (batch 4) of the per-concept vectors, when concept_vector_loss_weight > 0 or "
            "--fit_readout."
        },
    )
    concept_vector_learning_rate: float = field(
        default=0.05, metadata={"help": "AdamW learning rate of the per-concept vectors."}
    )
    fit_readout: bool = field(
        default=False,
        metadata={
            "help": "Before training, set the hypernetwork's readout (output projection, shared offset, feature "
            "statistics) in closed form so each training concept's description maps to its LM-trained vector (kernel "
            "ridge; see fit_readout_to_concept_vectors). With --max_steps 0 the fitted model is saved untrained."
        },
    )
    fit_readout_norm: bool = field(
        default=False,
        metadata={
            "help": "With --fit_readout, rescale every vector's concept part to the training targets' mean norm about "
            "their mean (HyperSteerConfig.readout_norm), so a description unlike the training ones is not shrunk "
            "toward the shared offset."
        },
    )
    readout_ridges: str = field(
        default="0.01,0.03,0.1,0.3,1",
        metadata={"help": "Comma-separated ridge penalties of --fit_readout; leave-one-out picks one."},
    )
    train_readout_only: bool = field(
        default=False,
        metadata={
            "help": "Train only the hypernetwork's readout (output projection, shared offset, prior map); its decoder "
            "blocks keep their weights, so after --fit_readout a never-trained description is still read through the "
            "training descriptions it resembles."
        },
    )
    distillation_loss_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the teacher-free distillation term: on rows built from concept descriptions alone, the "
            "steered model matches the frozen base prompted with the description (guided by a second description). "
            "0 turns it off."
        },
    )
    distillation_guidance: float = field(
        default=4.0,
        metadata={"help": "Guidance scale of the distillation target l_ref + g * (l_d - l_d')."},
    )
    distillation_reference: str = field(
        default="prompted",
        metadata={
            "help": "Reference logits of the distillation target: 'prompted' (the base with the description in its "
            "prompt) or 'plain' (the unprompted base).",
            "choices": ["prompted", "plain"],
        },
    )
    token_dropout_start_ratio: float = field(
        default=0.0,
        metadata={
            "help": "Fraction of the training steps before the model's steering_prompt_token_dropout starts (0: from "
            "the first step), so the contrast first learns to tell whole descriptions apart."
        },
    )
    train_steering_factor_max: float | None = field(
        default=None,
        metadata={
            "help": "Multiply each training row's steering factor (1.0 on concept rows) by a draw uniform in [1, this "
            "value], so the vectors stay good at the larger factors generate may use (default: no draw)."
        },
    )
    logits_on_labels_only: bool = field(
        default=False,
        metadata={
            "help": "In training, compute the LM head only from the position before the first label on (same loss, "
            "less compute)."
        },
    )

    def __post_init__(self):
        # Whether evaluation was left to the default, which only the trainer can resolve (see the [!NOTE]); not a field,
        # so it is neither a flag nor serialised.
        self.eval_strategy_is_default = self.eval_strategy is None
        if self.eval_strategy_is_default:
            self.eval_strategy = IntervalStrategy.STEPS
        # The parent falls back to `logging_steps` (every 10 steps here), which makes evaluation dominate short runs
        # and floods long ones. A ratio is resolved against the run's total steps by the Trainer. With
        # `load_best_model_at_end`, `save_steps` must be a multiple of `eval_steps`, so the parent's rule stays.
        if (
            self.eval_strategy == IntervalStrategy.STEPS
            and self.eval_steps is None
            and not self.load_best_model_at_end
        ):
            self.eval_steps = 1 / DEFAULT_EVALUATIONS_PER_RUN
        super().__post_init__()
        if self.distillation_reference not in DISTILLATION_REFERENCES:
            raise ValueError(
                f"`distillation_reference` must be one of {list(DISTILLATION_REFERENCES)}, got "
                f"{self.distillation_reference!r}."
            )
        if not -float("inf") < self.distillation_guidance < float("inf"):
            raise ValueError(f"`distillation_guidance` must be a finite number, got {self.distillation_guidance!r}.")
        for name in (
            "contrast_loss_weight",
            "diversity_loss_weight",
            "distillation_loss_weight",
            "concept_vector_loss_weight",
        ):
            value = getattr(self, name)
            if not 0.0 <= value < float("inf"):
                raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}.")
        if not 0.0 < self.concept_vector_scale < float("inf"):
            raise ValueError(f"`concept_vector_scale` must be a finite number > 0, got {self.concept_vector_scale!r}.")
        if self.concept_vector_steps < 1 or not 0.0 < self.concept_vector_learning_rate < float("inf"):
            raise ValueError(
                f"`concept_vector_steps` must be >= 1 and `concept_vector_learning_rate` a finite number > 0, got "
                f"{self.concept_vector_steps!r} and {self.concept_vector_learning_rate!r}."
            )
        if self.fit_readout_norm and not self.fit_readout:
            raise ValueError("`fit_readout_norm` sets the norm of the fitted readout: set `fit_readout` too.")
        ridges = self.readout_ridge_values
        if not ridges or not all(0.0 < ridge < float("inf") for ridge in ridges):
            raise ValueError(
                f"`readout_ridges` must be comma-separated finite numbers > 0, got {self.readout_ridges!r}."
            )
        if not 0.0 < self.contrast_beta < float("inf"):
            raise ValueError(f"`contrast_beta` must be a finite number > 0, got {self.contrast_beta!r}.")
        if self.train_steering_factor_max is not None and not 1.0 <= self.train_steering_factor_max < float("inf"):
            raise ValueError(
                f"`train_steering_factor_max` must be a finite number >= 1 (the largest multiple of a row's factor "
                f"to train at) or unset, got {self.train_steering_factor_max!r}."
            )
        if not 0.0 <= self.token_dropout_start_ratio < 1.0:
            raise ValueError(
                f"`token_dropout_start_ratio` must be in [0, 1) (a fraction of the training steps), got "
                f"{self.token_dropout_start_ratio!r}."
            )

    @property
    def readout_ridge_values(self) -> list[float]:
        """`readout_ridges` as numbers."""
        try:
            return [float(value) for value in self.readout_ridges.split(",") if value.strip()]
        except ValueError:
            raise ValueError(
                f"`readout_ridges` must be comma-separated numbers, got {self.readout_ridges!r}."
            ) from None


class TokenDropoutStartCallback(TrainerCallback):
    """Keeps the hypernetwork's steering-prompt token dropout off for the first `start_ratio` of the training steps.

    The model's configured rate is restored when training ends, so a saved or evaluated model is unchanged.
    """

    def __init__(self, start_ratio: float):
        self.start_ratio = start_ratio

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        # From the step count, not a flag flipped once, so a run resumed from a checkpoint gets the same schedule.
        started = state.global_step >= self.start_ratio * state.max_steps
        model.hypernetwork.token_dropout = model.config.steering_prompt_token_dropout if started else 0.0

    def on_train_end(self, args, state, control, model=None, **kwargs):
        model.hypernetwork.token_dropout = model.config.steering_prompt_token_dropout


class HyperSteerTrainer(Trainer):
    """Trainer for [`HyperSteerModel`].

    It differs from [`Trainer`] in the training objective (the wrong-concept contrast and diversity terms of
    [`HyperSteerTrainingArguments`], the optional label-only LM head, and the start of the steering-prompt token
    dropout) and in logging steering diagnostics per step — the mean L2 norm of the steering vectors and, with
    `token_gate=True`, the mean gate value over real tokens — for training and for every evaluation
    set (pass `eval_dataset={"heldin": ..., "heldout": ...}` to get `eval_heldin_loss` and `eval_heldout_loss`).
    The model returns its own loss and saves its own (hypernetwork-only) weights; the only other override writes the
    HyperSteer model card instead of Trainer's generic one when pushing to the Hub. Without `eval_dataset`, the default
    `eval_strategy` of [`HyperSteerTrainingArguments`] resolves to `"no"`, and without `args` the trainer uses
    [`HyperSteerTrainingArguments`] (not the parent's), so `HyperSteerTrainer(model=..., train_dataset=...)` trains.
    """

    def __init__(
        self,
        model=None,
        args=None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        *more,
        concept_vectors: Mapping[str, torch.Tensor] | None = None,
        **kwargs,
    ):
        if args is None:
            # The parent would build plain `TrainingArguments`, without this trainer's objective fields.
            args = HyperSteerTrainingArguments(output_dir="tmp_trainer")
        if (
            getattr(args, "eval_strategy_is_default", False)
            and args.eval_strategy != IntervalStrategy.NO
            and eval_dataset is None
        ):
            # The default evaluates only what exists; a copy, so arguments shared with another trainer keep theirs.
            args = copy.copy(args)
            args.eval_strategy = IntervalStrategy.NO
            args.do_eval = False
        super().__init__(model, args, data_collator, train_dataset, eval_dataset, *more, **kwargs)
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self.concept_vector_targets = None
        if args.concept_vector_loss_weight > 0:
            if not concept_vectors:
                raise ValueError(
                    f"`concept_vector_loss_weight={args.concept_vector_loss_weight}` needs `concept_vectors=` (a dict "
                    "from each training concept to its trained vector, e.g. from "
                    "`modeling_hypersteer.baselines.train_concept_vectors`); pass them or set the weight to 0."
                )
            unwrapped = self.accelerator.unwrap_model(self.model)
            self.concept_vector_targets = ConceptVectorTargets(
                concept_vectors,
                self.processing_class or unwrapped.tokenizer,
                unwrapped.config.max_steering_prompt_length,
                unwrapped.config.hidden_size,
            )
        elif concept_vectors:
            logger.warning("`concept_vectors` are unused: `concept_vector_loss_weight` is 0.")
        if args.train_readout_only:
            freeze_all_but_readout(self.accelerator.unwrap_model(self.model))
        if args.token_dropout_start_ratio > 0:
            if not getattr(self.model.config, "steering_prompt_token_dropout", 0.0):
                logger.warning(
                    f"`token_dropout_start_ratio={args.token_dropout_start_ratio}` has no effect: the model's "
                    "`steering_prompt_token_dropout` is 0. Set it in the model config "
                    "(`--steering_prompt_token_dropout`)."
                )
            self.add_callback(TokenDropoutStartCallback(args.token_dropout_start_ratio))

    def _set_signature_columns_if_needed(self) -> None:
        # Overwritten: distillation rows carry their own contrast prompt and teacher inputs, which `forward` does not
        # take by those names; `compute_loss` consumes them.
        super()._set_signature_columns_if_needed()
        self._signature_columns += [name for name in DISTILLATION_COLUMNS if name not in self._signature_columns]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        args = self.args
        inputs = dict(inputs)
        distillation = {name: inputs.pop(name) for name in DISTILLATION_COLUMNS if name in inputs}
        # Rows built from descriptions alone (their teacher inputs are non-empty); real rows carry the columns empty.
        distilled = (
            distillation["teacher_attention_mask"].bool().any(dim=-1)
            if distillation and distillation["teacher_attention_mask"].shape[1] > 0
            else None
        )
        if distilled is not None and not distilled.any():
            distilled = None
        if distilled is not None and args.distillation_loss_weight <= 0:
            raise ValueError(
                "The batch holds distillation rows but `distillation_loss_weight` is 0: set it > 0, or train without "
                "distillation rows."
            )
        other_row = None
        if args.contrast_loss_weight > 0 or args.diversity_loss_weight > 0 or distilled is not None:
            concept_ids = steering_prompt_groups(inputs["steering_input_ids"], inputs.get("steering_attention_mask"))
            other_row = other_concept_rows(concept_ids)
        # Evaluation reports the LM loss; the contrast and diversity terms are logged there as diagnostics only.
        use_contrast = args.contrast_loss_weight > 0 and other_row is not None and bool((other_row >= 0).any())
        if use_contrast or distilled is not None:
            partner = other_row.clamp(min=0)
            contrast_ids = inputs["steering_input_ids"][partner]
            contrast_mask = inputs.get("steering_attention_mask", torch.ones_like(contrast_ids))[partner]
            if distilled is not None:
                # A distillation row's contrast pass is steered by its own second description.
                contrast_ids, contrast_mask = _rows_from(
                    distilled,
                    (distillation["contrast_steering_input_ids"], distillation["contrast_steering_attention_mask"]),
                    (contrast_ids, contrast_mask),
                    pad_values=(self.processing_class.pad_token_id, 0),
                )
            inputs["contrast_steering_input_ids"] = contrast_ids
            inputs["contrast_steering_attention_mask"] = contrast_mask
        if model.training and args.train_steering_factor_max is not None:
            inputs["steering_factor"] = self._training_steering_factors(model, inputs)
        if model.training and args.logits_on_labels_only and "labels" in inputs:
            inputs["logits_to_keep"] = logits_to_keep_for_labels(inputs["labels"])
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        # The LM loss may already be normalised over gradient-accumulation steps (by `num_items_in_batch`); the
        # per-batch auxiliary terms must then be too, or they would weigh more with more accumulation.
        aux_scale = 1.0
        if model.training and self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            aux_scale = 1.0 / self.current_gradient_accumulation_steps
        if distilled is not None:
            # The model's loss covered every labelled row; distillation rows' texts are not their concepts' responses.
            real = ~distilled
            token_losses = _token_losses(outputs.logits, inputs["labels"])
            real_labels = inputs["labels"][:, 1:].ne(-100) & real[:, None]
            real_labels = real_labels[:, real_labels.shape[1] - token_losses.shape[1] :]
            loss = (token_losses * real_labels).sum() / real_labels.sum().clamp(min=1)
            distill = self._distillation_term(model, outputs, inputs, distillation, distilled)
            if model.training:
                loss = loss + aux_scale * args.distillation_loss_weight * distill
            self._metrics[mode]["distillation_loss"].append(distill.detach())
            if other_row is not None:
                other_row = torch.where(real, other_row, -1)
            use_contrast = args.contrast_loss_weight > 0 and bool((other_row >= 0).any())
        if use_contrast:
            valid = other_row >= 0
            right = per_row_causal_lm_loss(outputs.logits, inputs["labels"])
            wrong = per_row_causal_lm_loss(outputs.contrast_logits, inputs["labels"])
            gap = (wrong - right)[valid]
            contrast = -F.logsigmoid(args.contrast_beta * gap).mean()
            if model.training:
                loss = loss + aux_scale * args.contrast_loss_weight * contrast
            self._metrics[mode]["contrast_loss"].append(contrast.detach())
            self._metrics[mode]["contrast_gap"].append(gap.detach().mean())
        if args.diversity_loss_weight > 0 and other_row is not None:
            unwrapped = self.accelerator.unwrap_model(model)
            vectors = outputs.steering_vectors.float()
            offset = unwrapped.hypernetwork.steering_offset
            if offset is not None:
                vectors = vectors - offset.float()
            similarity = cross_concept_cosine(vectors, concept_ids)
            if similarity is not None and model.training:
                loss = loss + aux_scale * args.diversity_loss_weight * similarity
                self._metrics[mode]["cross_concept_cosine"].append(similarity.detach())
        if self.concept_vector_targets is not None:
            rows, targets = self.concept_vector_targets(
                inputs["steering_input_ids"], inputs.get("steering_attention_mask")
            )
            if len(rows) > 0:
                vectors = outputs.steering_vectors[rows].float()
                targets = args.concept_vector_scale * targets.to(vectors.device)
                error = (vectors - targets).pow(2).sum(-1) / targets.pow(2).sum(-1).clamp(min=1e-6)
                if model.training:
                    loss = loss + aux_scale * args.concept_vector_loss_weight * error.mean()
                self._metrics[mode]["concept_vector_loss"].append(error.detach().mean())
        # Kept as tensors: converting to floats here would add a host sync to every step.
        vectors = outputs.steering_vectors.detach()
        self._metrics[mode]["steering_vector_norm"].append(vectors.float().norm(dim=-1).mean())
        if outputs.steering_gates is not None:
            real_tokens = inputs["attention_mask"].bool()
            self._metrics[mode]["steering_gate_mean"].append(
                outputs.steering_gates.detach()[real_tokens].float().mean()
            )
        return (loss, outputs) if return_outputs else loss

    def _training_steering_factors(self, model, inputs: dict) -> torch.Tensor:
        """Each row's factor times its own draw, uniform in `[1, train_steering_factor_max]`.

        Returns:
            `torch.FloatTensor` of shape `(batch_size,)`.
        """
        batch_size, device = inputs["input_ids"].shape[0], inputs["input_ids"].device
        # The model's own reading of a missing or scalar factor (its default), so training draws around what it steers.
        requests = self.accelerator.unwrap_model(model)._requests()
        factors = requests.steering_factors(batch_size, inputs.get("steering_factor"), device)
        draws = torch.rand(batch_size, device=device, dtype=torch.float32)
        return factors * (1.0 + (self.args.train_steering_factor_max - 1.0) * draws)

    def _distillation_term(self, model, outputs, inputs, distillation, distilled) -> torch.Tensor:
        """Mean KL between the guided teacher distribution and the steered model over distillation rows' responses.

        The student's logits under the first description are `outputs.logits`, under the second
        `outputs.contrast_logits`; the teachers are the frozen base without steering, run in one batched forward.

        Returns:
            `torch.FloatTensor` scalar.
        """
        args = self.args
        rows = distilled.nonzero().squeeze(-1)
        teachers = [
            tuple(distillation[f"{prefix}{name}"][rows] for name in ("input_ids", "attention_mask", "labels"))
            for prefix in ("teacher_", "teacher_contrast_")
        ]
        if args.distillation_reference == "plain":
            teachers.append(tuple(inputs[name][rows] for name in ("input_ids", "attention_mask", "labels")))
        width = max(ids.shape[1] for ids, _, _ in teachers)
        pad_token_id = self.processing_class.pad_token_id
        stacked = [
            torch.cat([_pad_right(tensors[index], width, value) for tensors in teachers])
            for index, value in enumerate((pad_token_id, 0, -100))
        ]
        language_model = self.accelerator.unwrap_model(model).language_model
        with torch.no_grad():
            teacher_logits = language_model(
                input_ids=stacked[0],
                attention_mask=stacked[1],
                logits_to_keep=logits_to_keep_for_labels(stacked[2]),
                use_cache=False,
            ).logits
        per_teacher = [
            response_logits(chunk, labels).float()
            for chunk, labels in zip(teacher_logits.split(len(rows)), stacked[2].split(len(rows)))
        ]
        first, second = per_teacher[:2]
        students = [
            response_logits(outputs.logits[rows], inputs["labels"][rows]).float(),
            response_logits(outputs.contrast_logits[rows], inputs["labels"][rows]).float(),
        ]
        if any(student.shape != first.shape for student in students):
            raise ValueError(
                f"Distillation rows' student and teacher responses differ in length ({students[0].shape[0]} vs "
                f"{first.shape[0]} tokens); tokenize them with `tokenize_distillation_dataset`."
            )
        guidance = args.distillation_guidance
        if args.distillation_reference == "plain":
            references = (per_teacher[2], per_teacher[2])
        else:
            references = (first, second)
        targets = (references[0] + guidance * (first - second), references[1] + guidance * (second - first))
        terms = [
            F.kl_div(
                F.log_softmax(student, dim=-1), F.log_softmax(target, dim=-1), log_target=True, reduction="batchmean"
            )
            for student, target in zip(students, targets)
        ]
        return (terms[0] + terms[1]) / 2

    def _metric_names(self) -> list[str]:
        """The diagnostics this run logs, decided by its arguments and model alone (identical on every process)."""
        names = ["steering_vector_norm"]
        if self.accelerator.unwrap_model(self.model).config.token_gate:
            names.append("steering_gate_mean")
        if self.args.contrast_loss_weight > 0:
            names += ["contrast_gap", "contrast_loss"]
        if self.args.diversity_loss_weight > 0:
            names.append("cross_concept_cosine")
        if self.args.distillation_loss_weight > 0:
            names.append("distillation_loss")
        if self.concept_vector_targets is not None:
            names.append("concept_vector_loss")
        return names

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        eval_loss_key = next((key for key in logs if key.startswith("eval") and key.endswith("_loss")), None)
        mode, prefix = ("eval", eval_loss_key[: -len("loss")]) if eval_loss_key else ("train", "")
        # Every process gathers the same metrics in the same order (a gather per name is a collective call); a
        # metric a process could not measure in its batches (e.g. no two concepts met) is NaN there and left out
        # of the mean. One value per process: `gather`, not `gather_for_metrics`, which at the end of a dataloader
        # cuts what it gathers to the last batch's number of samples and would drop other processes' values.
        for name in self._metric_names():
            values = self._metrics[mode].get(name)
            mean = torch.stack(values).nanmean() if values else torch.tensor(float("nan"), device=self.args.device)
            gathered = self.accelerator.gather(mean.to(self.args.device)[None]).nanmean()
            if not torch.isnan(gathered):
                logs[f"{prefix}{name}"] = gathered.item()
        self._metrics[mode].clear()
        super().log(logs, start_time)

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
    ) -> None:
        """Write the HyperSteer model card to `output_dir/README.md` instead of Trainer's generic card.

        [`Trainer.push_to_hub`] calls this before uploading `output_dir`. The card reads `training_summary.json` and
        `concept_split.json` from `output_dir` (see [`~modeling_hypersteer.model_card.write_model_card`]).
        `finetuned_from` overrides the base model's Hub id. `dataset` (or `dataset_tags`) names the training data.
        """
        if not self.is_world_process_zero():
            return
        if tasks or dataset_args:
            logger.warning(f"The HyperSteer model card ignores tasks={tasks!r} and dataset_args={dataset_args!r}.")
        datasets = dataset if dataset is not None else dataset_tags
        write_model_card(
            self.args.output_dir,
            self.accelerator.unwrap_model(self.model),
            repo_id=self.hub_model_id or self.args.hub_model_id,
            model_name=model_name,
            base_model=finetuned_from,
            license=license or DEFAULT_LICENSE,
            language=language,
            tags=tags,
            dataset_names=[datasets] if isinstance(datasets, str) else datasets,
        )


def check_concept_vector_shapes(vectors: Mapping[str, torch.Tensor], hidden_size: int) -> None:
    """Raise a `ValueError` naming the concepts whose vector is not of shape `(hidden_size,)`."""
    wrong = {concept: tuple(vector.shape) for concept, vector in vectors.items() if vector.shape != (hidden_size,)}
    if wrong:
        raise ValueError(
            f"Concept vectors must have shape ({hidden_size},) (the model's hidden size); got {len(wrong)} others, "
            f"e.g. {dict(list(wrong.items())[:3])}."
        )


class ConceptVectorTargets:
    """Each training concept's target steering vector, found for a row from its steering-prompt tokens.

    Args:
        vectors (`Mapping[str, torch.Tensor]`): concept description -> vector of shape `(hidden_size,)`.
        tokenizer: the tokenizer the training rows' steering prompts were made with.
        max_steering_prompt_length (`int`): their truncation length (the model config's).
        hidden_size (`int`): the model's; every vector must have it.
    """

    def __init__(
        self, vectors: Mapping[str, torch.Tensor], tokenizer, max_steering_prompt_length: int, hidden_size: int
    ):
        concepts = list(vectors)
        check_concept_vector_shapes(vectors, hidden_size)
        tokens = tokenize_steering_prompts(tokenizer, concepts, max_steering_prompt_length)
        self.position = {
            tuple(ids[mask.bool()].tolist()): position
            for position, (ids, mask) in enumerate(
                zip(tokens["steering_input_ids"], tokens["steering_attention_mask"])
            )
        }
        self.vectors = torch.stack([vectors[concept].detach().float().cpu() for concept in concepts])

    def __call__(
        self, steering_input_ids: torch.Tensor, steering_attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows whose steering prompt is a concept with a target, and their targets.

        Args:
            steering_input_ids (`torch.LongTensor` of shape `(batch_size, steering_sequence_length)`).
            steering_attention_mask (`torch.Tensor` of the same shape, *optional*).

        Returns:
            `torch.LongTensor` of shape `(num_rows,)` (on the inputs' device) and `torch.FloatTensor` of shape
            `(num_rows, hidden_size)` (on CPU).
        """
        if steering_attention_mask is None:
            steering_attention_mask = torch.ones_like(steering_input_ids)
        rows, positions = [], []
        for row, (ids, mask) in enumerate(zip(steering_input_ids.tolist(), steering_attention_mask.tolist())):
            position = self.position.get(tuple(token for token, keep in zip(ids, mask) if keep))
            if position is not None:
                rows.append(row)
                positions.append(position)
        return torch.tensor(rows, dtype=torch.long, device=steering_input_ids.device), self.vectors[positions]


def freeze_all_but_readout(model) -> list[str]:
    """Leave only the readout of `model`'s hypernetwork trainable: the output projection `W_o`, the shared offset `b`
    and the prior map `A` (see [`HyperSteerHypernetwork`]), every parameter linear in the vector given the blocks'
    features. The blocks, cross-attention and token gate stop taking gradients (the frozen base already does).

    Args:
        model ([`HyperSteerModel`]): changed in place.

    Returns:
        `list[str]`: the names of the parameters left trainable.
    """
    hypernetwork = model.hypernetwork
    hypernetwork.requires_grad_(False)
    readout = [hypernetwork.output_projection, hypernetwork.prior_projection]
    for module in readout:
        if module is not None:
            module.requires_grad_(True)
    if hypernetwork.steering_offset is not None:
        hypernetwork.steering_offset.requires_grad_(True)
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    logger.info(f"Training the readout only: {trainable}")
    return trainable


@torch.no_grad()
def fit_readout_to_concept_vectors(
    model,
    concept_vectors: Mapping[str, torch.Tensor],
    ridges: Sequence[float],
    normalize: bool = False,
    batch_size: int = 16,
) -> dict:
    """Set the hypernetwork's readout in closed form so each concept's description maps to its trained vector.

    With the decoder blocks as they are (at the start of training: the base's first layers), the feature statistics
    of `center_pooled_features` are set to those of the concepts' pooled features `p_c`, and the output projection
    `W` and shared offset `b` to the kernel ridge regression from the normalised features `f_c = norm(center(p_c))`
    to the targets `t_c` minus the prior term (`v = W f + b + A u(s)`, see [`HyperSteerHypernetwork`]):

        W = R^T (K + ridge I)^-1 F / d,  K = F F^T / d,  b = mean_c r_c - W mean_c f_c,  r_c = t_c - A u(s_c)

    where `F` and `R` are the features and `r` centred on their means (without a shared offset: not centred, and no
    `b`). So a description never trained on gets the vectors of the concepts whose descriptions the blocks read alike,
    instead of the part every training concept shares, which is what end-to-end training on a few dozen concepts
    learns. The ridge (on the scale of a cosine kernel) is the one of `ridges` with the best leave-one-out cosine
    between a concept's prediction and its target, both centred (closed form: the hat matrix's diagonal).

    Args:
        model ([`HyperSteerModel`]): with `hypernet_type="no_context"` (the vector depends on the description only).
        concept_vectors (`Mapping[str, torch.Tensor]`): description -> target vector of shape `(hidden_size,)`, e.g.
            from [`~modeling_hypersteer.baselines.train_concept_vectors`]; at least 3 concepts.
        ridges (`Sequence[float]`): candidate penalties, each a finite number > 0.
        normalize (`bool`, *optional*, defaults to `False`): also set `config.readout_norm` to the targets' mean norm
            about their mean, so every description's concept part `W f` has that norm (the regression then has no
            intercept on the features: `b` is the targets' mean).
        batch_size (`int`, *optional*, defaults to 16): descriptions per hypernetwork call.

    Returns:
        `dict`: `concepts`, `readout_norm` (`None` unless `normalize`), `ridge`, `leave_one_out_cosine` (per
        candidate), `leave_one_out_norm_ratio` (how long a held-out prediction's concept part is against its target's,
        at the chosen ridge, before any normalisation) and `training_cosine`.
    """
    if model.config.hypernet_type != "no_context":
        raise ValueError(
            "Fitting the readout needs `hypernet_type='no_context'` (one vector per description); this model has "
            f"{model.config.hypernet_type!r}."
        )
    ridges = [float(ridge) for ridge in ridges]
    if not ridges or not all(0.0 < ridge < float("inf") for ridge in ridges):
        raise ValueError(f"Readout ridges must be finite numbers > 0, got {ridges!r}.")
    concepts = list(concept_vectors)
    if len(concepts) < 3:
        raise ValueError(f"Fitting the readout needs target vectors for at least 3 concepts, got {len(concepts)}.")
    check_concept_vector_shapes(concept_vectors, model.config.hidden_size)
    hypernetwork = model.hypernetwork
    targets = torch.stack([concept_vectors[concept].detach().double().cpu() for concept in concepts])
    projection = hypernetwork.output_projection.weight
    projection.zero_()
    if hypernetwork.steering_offset is not None:
        hypernetwork.steering_offset.zero_()
    # With the readout at zero the model's vectors are the prior term alone; the blocks' pooled features are read
    # where they enter the readout.
    pooled, prior_terms = [], []
    reader = hypernetwork.feature_center if hypernetwork.feature_center is not None else hypernetwork.norm
    handle = reader.register_forward_pre_hook(lambda module, args: pooled.append(args[0].detach().double().cpu()))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(concepts), batch_size):
            vectors = model.compute_steering_vectors(steering_prompt=concepts[start : start + batch_size])
            prior_terms.append(vectors.detach().double().cpu())
    finally:
        handle.remove()
        model.train(was_training)
    pooled, residuals = torch.cat(pooled), targets - torch.cat(prior_terms)
    center = hypernetwork.feature_center
    if center is not None:
        center.running_mean.copy_(pooled.mean(0))
        if center.running_variance is not None:
            center.running_variance.copy_(pooled.var(0, unbiased=False))
        center.num_updates.fill_(len(concepts))
    # `no_grad`: the centre reads its new statistics without moving them.
    pooled = pooled.to(projection)
    features = hypernetwork.norm(center(pooled) if center is not None else pooled).double().cpu()
    # With a shared offset the regression has an unpenalised intercept: features and targets are centred first. A
    # normalised readout rescales `W f` itself, so there `b` is the targets' mean and the features stay as they are.
    feature_mean, target_mean = torch.zeros_like(features[0]), torch.zeros_like(residuals[0])
    if hypernetwork.steering_offset is not None:
        target_mean = residuals.mean(0)
        if not normalize:
            feature_mean = features.mean(0)
    features, centred = features - feature_mean, residuals - target_mean
    size = features.shape[-1]
    kernel = features @ features.T / size
    identity = torch.eye(len(concepts), dtype=kernel.dtype)
    # Leave-one-out in closed form (exact for penalised least squares): the fit is `hat @ residuals`, and concept i's
    # prediction from the others is `r_i - (r_i - fitted_i) / (1 - hat_ii)`. Both it and the target are compared
    # centred on the *other* concepts' mean, so the left-out target does not leak into the comparison.
    count = len(concepts)
    others_mean = (residuals.sum(0) - residuals) / (count - 1)
    loo_cosine, loo_norm = {}, {}
    for ridge in ridges:
        hat = kernel @ torch.linalg.inv(kernel + ridge * identity)
        if hypernetwork.steering_offset is not None:
            hat = hat + 1.0 / count
        leverage = hat.diagonal()[:, None]
        held_out = residuals - (residuals - hat @ residuals) / (1 - leverage).clamp(min=1e-6)
        predicted, actual = held_out - others_mean, residuals - others_mean
        loo_cosine[ridge] = F.cosine_similarity(predicted, actual, dim=-1).mean().item()
        loo_norm[ridge] = (predicted.norm(dim=-1) / actual.norm(dim=-1).clamp(min=1e-12)).mean().item()
    ridge = max(ridges, key=lambda value: loo_cosine[value])
    weight = centred.T @ torch.linalg.solve(kernel + ridge * identity, features) / size
    projection.copy_(weight.to(projection))
    if hypernetwork.steering_offset is not None:
        hypernetwork.steering_offset.copy_((target_mean - weight @ feature_mean).to(hypernetwork.steering_offset))
    readout_norm = None
    if normalize:
        readout_norm = round(centred.norm(dim=-1).mean().item(), 6)
        model.config.readout_norm = hypernetwork.readout_norm = readout_norm
    fitted = features @ weight.T
    return {
        "concepts": len(concepts),
        "readout_norm": readout_norm,
        "ridge": ridge,
        "leave_one_out_cosine": {str(value): round(loo_cosine[value], 4) for value in ridges},
        "leave_one_out_norm_ratio": round(loo_norm[ridge], 4),
        "training_cosine": round(F.cosine_similarity(fitted, centred, dim=-1).mean().item(), 4),
    }


def steering_prompt_groups(
    steering_input_ids: torch.Tensor, steering_attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """One integer per row, equal for rows whose steering prompts are the same tokens (the same concept).

    Args:
        steering_input_ids (`torch.LongTensor` of shape `(batch_size, steering_sequence_length)`).
        steering_attention_mask (`torch.Tensor` of the same shape, *optional*).

    Returns:
        `torch.LongTensor` of shape `(batch_size,)`.
    """
    if steering_attention_mask is not None:
        steering_input_ids = steering_input_ids.masked_fill(~steering_attention_mask.bool(), -1)
    _, groups = torch.unique(steering_input_ids, dim=0, return_inverse=True)
    return groups


def other_concept_rows(groups: torch.Tensor) -> torch.Tensor:
    """For each row, the nearest following row (cyclically) of another concept, or -1 when the batch holds no other
    concept. Deterministic, so a resumed run pairs rows as the original did.

    Returns:
        `torch.LongTensor` of shape `(batch_size,)`.
    """
    batch_size = groups.shape[0]
    partner = torch.full_like(groups, -1)
    for shift in range(batch_size - 1, 0, -1):
        candidate = torch.roll(torch.arange(batch_size, device=groups.device), -shift)
        partner = torch.where(groups[candidate] != groups, candidate, partner)
    return partner


def cross_concept_cosine(vectors: torch.Tensor, groups: torch.Tensor) -> torch.Tensor | None:
    """Mean cosine similarity over pairs of rows with different concepts, or `None` when there is no such pair.

    Args:
        vectors (`torch.FloatTensor` of shape `(batch_size, hidden_size)`).
        groups (`torch.LongTensor` of shape `(batch_size,)`): concept of each row.
    """
    different = groups[:, None] != groups[None, :]
    if not different.any():
        return None
    unit = F.normalize(vectors, dim=-1)
    return (unit @ unit.T)[different].mean()


def logits_to_keep_for_labels(labels: torch.Tensor) -> int:
    """The number of last positions whose logits cover every label of the batch: from the position before the
    earliest label on (that position predicts it)."""
    has_label = labels.ne(-100)
    if not has_label.any():
        return 0
    first_label = int(has_label.float().argmax(dim=-1)[has_label.any(dim=-1)].min())
    return labels.shape[1] - max(first_label - 1, 0)


def response_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The logits that predict label tokens, row by row in order.

    Args:
        logits (`torch.FloatTensor` of shape `(batch_size, kept_length, vocab_size)`): all positions or a
            `logits_to_keep` window.
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`): -100 where there is no label.

    Returns:
        `torch.FloatTensor` of shape `(num_label_tokens, vocab_size)`.
    """
    labels = labels[:, labels.shape[1] - logits.shape[1] :].to(logits.device)
    return logits[:, :-1][labels[:, 1:].ne(-100)]


def _token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy per position, `(batch_size, kept_length - 1)`, 0 where there is no label."""
    labels = labels[:, labels.shape[1] - logits.shape[1] :].to(logits.device)
    return F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none")


def _pad_right(tensor: torch.Tensor, width: int, value: int) -> torch.Tensor:
    return F.pad(tensor, (0, width - tensor.shape[1]), value=value)


def _rows_from(chosen: torch.Tensor, first: tuple, second: tuple, pad_values: tuple) -> list[torch.Tensor]:
    """Row `i` of each tensor from `first` where `chosen[i]`, else from `second`, padded on the right to one width."""
    merged = []
    for a, b, value in zip(first, second, pad_values):
        width = max(a.shape[1], b.shape[1])
        merged.append(torch.where(chosen[:, None], _pad_right(a, width, value), _pad_right(b, width, value)))
    return merged


def plot_loss_curves(log_history: list[dict], path: str | Path) -> Path:
    """Plot training loss and every `eval*_loss` series of a `Trainer.state.log_history` into a PNG.

    Returns:
        The written path.
    """
    plt = pyplot()
    series = defaultdict(list)
    for entry in log_history:
        step = entry.get("step")
        for key, value in entry.items():
            if key == "loss" or (key.startswith("eval") and key.endswith("_loss")):
                series["train loss" if key == "loss" else key.replace("_loss", " loss").replace("_", " ")].append(
                    (step, value)
                )
    if not series:
        raise ValueError("The log history holds no loss values to plot; train with `logging_steps` > 0 first.")
    figure, axis = plt.subplots(figsize=(7, 4.2))
    for label, points in sorted(series.items()):
        steps, values = zip(*points)
        axis.plot(steps, values, marker="o" if len(points) < 30 else None, label=label)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("cross-entropy on response tokens")
    axis.set_title("HyperSteer training")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


__all__ = [
    "ConceptVectorTargets",
    "HyperSteerTrainer",
    "HyperSteerTrainingArguments",
    "fit_readout_to_concept_vectors",
    "freeze_all_but_readout",
    "plot_loss_curves",
]
