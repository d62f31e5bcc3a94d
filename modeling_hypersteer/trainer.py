"""`HyperSteerTrainer`: the HF `Trainer` with the few differences HyperSteer needs.

Everything else — optimiser over trainable parameters only (the base is frozen), mixed precision, gradient
accumulation, DDP/FSDP/DeepSpeed through `accelerate`, checkpointing and exact resume — is the stock `Trainer`.
Checkpoints are hypernetwork-sized because `HyperSteerModel.save_pretrained` writes the hypernetwork only.
"""

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import IntervalStrategy, Trainer, TrainingArguments
from transformers.utils import logging

from .model_card import DEFAULT_LICENSE, write_model_card
from .utils import pyplot


logger = logging.get_logger(__name__)

# Evaluations per run when `eval_strategy="steps"` and `eval_steps` is not given.
DEFAULT_EVALUATIONS_PER_RUN = 5


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
    > - `eval_strategy`: `"steps"` when an evaluation set exists, so the loss curve shows held-in and held-out loss.
    > - `eval_steps`: with `eval_strategy="steps"` and no `eval_steps` given, `1 / DEFAULT_EVALUATIONS_PER_RUN`
    >   (a ratio of the total steps), so a run is evaluated 5 times however long it is, instead of at every
    >   `logging_steps`.

    Args:
        plot_loss_curve (`bool`, *optional*, defaults to `True`):
            Write `loss_curve.png` (train, held-in and held-out eval loss) into `output_dir` after training.
    """

    learning_rate: float = field(default=8e-5, metadata={"help": "Initial AdamW learning rate (paper: 8e-5)."})
    logging_steps: float = field(default=10, metadata={"help": "Log every X update steps (int) or ratio of steps."})
    eval_strategy: str = field(default="steps", metadata={"help": "When to evaluate: 'no', 'steps' or 'epoch'."})
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

    def __post_init__(self):
        # The parent falls back to `logging_steps` (every 10 steps here), which makes evaluation dominate short runs
        # and floods long ones. A ratio is resolved against the run's total steps by the Trainer. With
        # `load_best_model_at_end`, `save_steps` must be a multiple of `eval_steps`, so the parent's rule stays.
        if (
            self.eval_strategy in ("steps", IntervalStrategy.STEPS)
            and self.eval_steps is None
            and not self.load_best_model_at_end
        ):
            self.eval_steps = 1 / DEFAULT_EVALUATIONS_PER_RUN
        super().__post_init__()


class HyperSteerTrainer(Trainer):
    """Trainer for [`HyperSteerModel`].

    It differs from [`Trainer`] only in logging two steering diagnostics per step — the mean L2 norm of the steering
    vectors and, with `token_gate=True`, the mean gate value over real tokens — for training and for every evaluation
    set (pass `eval_dataset={"heldin": ..., "heldout": ...}` to get `eval_heldin_loss` and `eval_heldout_loss`).
    The model returns its own loss and saves its own (hypernetwork-only) weights; the only other override writes the
    HyperSteer model card instead of Trainer's generic one when pushing to the Hub.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        mode = "train" if model.training else "eval"
        # Kept as tensors: converting to floats here would add a host sync to every step.
        vectors = outputs.steering_vectors.detach()
        self._metrics[mode]["steering_vector_norm"].append(vectors.float().norm(dim=-1).mean())
        if outputs.steering_gates is not None:
            real_tokens = inputs["attention_mask"].bool()
            self._metrics[mode]["steering_gate_mean"].append(
                outputs.steering_gates.detach()[real_tokens].float().mean()
            )
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        eval_loss_key = next((key for key in logs if key.startswith("eval") and key.endswith("_loss")), None)
        mode, prefix = ("eval", eval_loss_key[: -len("loss")]) if eval_loss_key else ("train", "")
        for name, values in self._metrics[mode].items():
            if values:
                mean = torch.stack(values).mean()
                logs[f"{prefix}{name}"] = self.accelerator.gather_for_metrics(mean[None]).mean().item()
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


__all__ = ["HyperSteerTrainer", "HyperSteerTrainingArguments", "plot_loss_curves"]
