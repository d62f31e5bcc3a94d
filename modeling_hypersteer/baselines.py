"""Per-concept steering baselines: what a single vector per concept at the steering layer does without a hypernetwork.

* DiffMean (AxBench): for each training concept, the mean residual at the steering layer over the response tokens of
  its positive rows minus the same mean over concept-free (negative) rows, as a unit direction scaled to a given norm:

      v_c = norm * (mean_pos(h_L) - mean_neg(h_L)) / ||mean_pos(h_L) - mean_neg(h_L)||

* Per-concept vectors (ReFT-r1-like): one free vector per training concept, trained with the same LM loss,
  rows and Trainer as HyperSteer, added where HyperSteer adds its vector.

Both steer through [`HyperSteerModel`]'s own hook with `steering_vectors=`, so they are scored and generated with
exactly the code path HyperSteer uses, and both exist only for concepts with training rows. Vectors are saved as
safetensors with the concept names in JSON, never pickled.
"""

import json
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import Trainer, TrainingArguments
from transformers.utils import logging

from .data import HyperSteerDataCollator, tokenize_example
from .modeling_hypersteer import HyperSteerModel, steering_layer_output
from .utils import evaluation_mode, restored_training_modes


logger = logging.get_logger(__name__)

VECTORS_FILE = "concept_vectors.safetensors"
CONCEPTS_FILE = "concept_vectors.json"


@torch.no_grad()
def mean_response_residual(
    model: HyperSteerModel, tokenizer, rows: Sequence[dict], batch_size: int = 16, max_length: int = 256
) -> torch.Tensor:
    """Mean residual after the steering layer over the response tokens of `rows` (the base runs up to that layer).

    Returns:
        `torch.FloatTensor` of shape `(hidden_size,)` in float32.
    """
    features = [tokenize_example(dict(row), tokenizer, max_length=max_length) for row in rows]
    features = [feature for feature in features if feature is not None]
    if not features:
        raise ValueError("No row fits `max_length`; raise it to compute a mean residual.")
    collator = HyperSteerDataCollator(tokenizer=tokenizer)
    device = model.get_input_embeddings().weight.device
    total, count = None, 0
    with evaluation_mode(model):
        for start in range(0, len(features), batch_size):
            batch = collator(features[start : start + batch_size])
            batch = {key: value.to(device) for key, value in batch.items()}
            hidden = steering_layer_output(
                model.language_model, model.config.steering_layer, batch["input_ids"], batch["attention_mask"]
            )
            response = batch["labels"].ne(-100)
            hidden = hidden.float()[response]
            total = hidden.sum(0) if total is None else total + hidden.sum(0)
            count += hidden.shape[0]
    return total / count


@torch.no_grad()
def mean_steering_vector_norm(model: HyperSteerModel, tokenizer, rows: Sequence[dict], batch_size: int = 8) -> float:
    """HyperSteer's mean steering-vector norm on `rows` (AxBench rows; each steered by its own concept), the scale a
    baseline is matched to so that the comparison is about direction."""
    features = [
        tokenize_example(
            dict(row), tokenizer, max_length=512, max_steering_prompt_length=model.config.max_steering_prompt_length
        )
        for row in rows
    ]
    features = [feature for feature in features if feature is not None]
    if not features:
        raise ValueError(
            "No row to measure HyperSteer's vector norm on; pass rows with `input`, `output`, `output_concept`."
        )
    collator = HyperSteerDataCollator(tokenizer=tokenizer)
    device = model.get_input_embeddings().weight.device
    norms = []
    with evaluation_mode(model):
        for start in range(0, len(features), batch_size):
            batch = {key: value.to(device) for key, value in collator(features[start : start + batch_size]).items()}
            vectors = model.compute_steering_vectors(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                labels=batch["labels"],
                steering_input_ids=batch["steering_input_ids"],
                steering_attention_mask=batch["steering_attention_mask"],
            )
            norms.append(vectors.float().norm(dim=-1))
    return torch.cat(norms).mean().item()


def diffmean_vectors(
    model: HyperSteerModel,
    tokenizer,
    rows: Sequence[dict],
    negative_rows: Sequence[dict],
    norm: float,
    max_rows_per_concept: int = 32,
    max_negative_rows: int = 256,
    max_length: int = 256,
) -> dict[str, torch.Tensor]:
    """DiffMean vectors of every concept of `rows` (its training rows only), each scaled to `norm`.

    Args:
        rows (`Sequence[dict]`): positive AxBench rows (`input`, `output`, `output_concept`) of training concepts.
        negative_rows (`Sequence[dict]`): concept-free rows (AxBench's negatives).
        norm (`float`): norm of every returned vector, e.g. HyperSteer's mean vector norm, so the comparison is
            about direction.

    Returns:
        `dict` from concept text to a `torch.FloatTensor` of shape `(hidden_size,)`.
    """
    if not negative_rows:
        raise ValueError("DiffMean needs negative (concept-free) rows; load data that has AxBench's negatives.")
    if not norm > 0:
        raise ValueError(f"`norm` must be positive, got {norm!r}.")
    by_concept = defaultdict(list)
    for row in rows:
        by_concept[row["output_concept"]].append(row)
    negative_mean = mean_response_residual(
        model, tokenizer, list(negative_rows)[:max_negative_rows], max_length=max_length
    )
    vectors = {}
    for concept, concept_rows in tqdm(sorted(by_concept.items()), desc="DiffMean", unit="concept"):
        difference = mean_response_residual(
            model, tokenizer, concept_rows[:max_rows_per_concept], max_length=max_length
        )
        difference = difference - negative_mean
        vectors[concept] = norm * difference / difference.norm().clamp(min=1e-6)
    return vectors


class ConceptVectorModel(nn.Module):
    """One trainable vector per concept, added by a [`HyperSteerModel`]'s steering hook (its hypernetwork unused)."""

    def __init__(self, steering_model: HyperSteerModel, concepts: Sequence[str]):
        super().__init__()
        self.steering_model = steering_model
        steering_model.requires_grad_(False)
        self.concepts = list(concepts)
        hidden_size = steering_model.config.hidden_size
        device = steering_model.hypernetwork.output_projection.weight.device
        self.vectors = nn.Parameter(torch.zeros(len(self.concepts), hidden_size, device=device))

    def forward(self, input_ids, attention_mask, labels=None, concept_index=None, **kwargs):
        """
        Args:
            input_ids, attention_mask, labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`).
            concept_index (`torch.LongTensor` of shape `(batch_size,)`): row `i` is steered by `vectors[i]`.
        """
        return self.steering_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=labels,
            steering_vectors=self.vectors[concept_index],
            **kwargs,
        )

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {concept: vector.detach().float().cpu() for concept, vector in zip(self.concepts, self.vectors)}


class _ConceptIndexCollator(HyperSteerDataCollator):
    """[`HyperSteerDataCollator`] that also keeps each row's `concept_index`."""

    def __call__(self, features):
        concept_index = torch.tensor([feature["concept_index"] for feature in features], dtype=torch.long)
        batch = super().__call__([{k: v for k, v in feature.items() if k != "concept_index"} for feature in features])
        batch["concept_index"] = concept_index
        return batch


def concept_vector_training_arguments(
    output_dir: str | os.PathLike, steps: int, learning_rate: float, seed: int, **kwargs
) -> TrainingArguments:
    """The [`TrainingArguments`] of per-concept vectors: `steps` AdamW steps of batch 4, nothing saved or reported, on
    an accelerator when there is one; `kwargs` (e.g. `bf16=True`, `use_cpu=True`) are passed on."""
    kwargs.setdefault("use_cpu", not torch.cuda.is_available())
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=learning_rate,
        save_strategy="no",
        report_to="none",
        seed=seed,
        **kwargs,
    )


def train_concept_vectors(
    model: HyperSteerModel, tokenizer, rows: Sequence[dict], training_args: TrainingArguments, max_length: int = 128
) -> dict[str, torch.Tensor]:
    """Train one vector per concept of `rows` with the LM loss (the same loss and Trainer as HyperSteer).

    Returns:
        `dict` from concept text to a `torch.FloatTensor` of shape `(hidden_size,)`.
    """
    concepts = sorted({row["output_concept"] for row in rows})
    index = {concept: position for position, concept in enumerate(concepts)}
    features = []
    for row in rows:
        feature = tokenize_example(dict(row), tokenizer, max_length=max_length)
        if feature is not None:
            features.append({**feature, "concept_index": index[row["output_concept"]]})
    # The vectors' model freezes all of `model`, whose hypernetwork may be trained next.
    trainable = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    vector_model = ConceptVectorModel(model, concepts)
    trainer = Trainer(
        model=vector_model,
        args=training_args,
        train_dataset=features,
        data_collator=_ConceptIndexCollator(tokenizer=tokenizer),
    )
    # `Trainer.train()` leaves `model` in training mode, in which its later measurements would differ (dropout, and
    # HyperSteer's running statistics would follow every training-mode pass).
    try:
        with restored_training_modes(model):
            trainer.train()
    finally:
        for parameter, requires_grad in trainable:
            parameter.requires_grad_(requires_grad)
    return vector_model.as_dict()


def save_concept_vectors(vectors: dict[str, torch.Tensor], directory: str | os.PathLike, method: str, **meta) -> None:
    """Write `concept_vectors.safetensors` (a `(num_concepts, hidden_size)` tensor) and `concept_vectors.json` (the
    method, the concept names in row order, and any `meta` such as the model fingerprint they were made for)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    concepts = sorted(vectors)
    save_file(
        {"vectors": torch.stack([vectors[concept] for concept in concepts]).contiguous()}, directory / VECTORS_FILE
    )
    (directory / CONCEPTS_FILE).write_text(
        json.dumps({"method": method, "concepts": concepts, **meta}, indent=2) + "\n"
    )


def load_concept_vectors(directory: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read what `save_concept_vectors` wrote: `(meta, {concept: vector})`, `meta` holding at least `method`."""
    directory = Path(directory)
    for name in (VECTORS_FILE, CONCEPTS_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(
                f"{directory / name} is missing; write baseline vectors with `save_concept_vectors`."
            )
    meta = json.loads((directory / CONCEPTS_FILE).read_text())
    tensor = load_file(directory / VECTORS_FILE)["vectors"]
    if tensor.shape[0] != len(meta["concepts"]):
        raise ValueError(
            f"{directory / VECTORS_FILE} holds {tensor.shape[0]} vectors but {CONCEPTS_FILE} names "
            f"{len(meta['concepts'])} concepts; the files do not belong together."
        )
    return meta, dict(zip(meta["concepts"], tensor))


def baseline_concept_vectors(
    method: str,
    model: HyperSteerModel,
    tokenizer,
    train_rows: Sequence[dict],
    negative_rows: Sequence[dict],
    reference_rows: Sequence[dict],
    folder: str | os.PathLike,
    vector_norm: float | None = None,
    steps: int = 200,
    learning_rate: float = 1e-2,
    seed: int = 42,
    max_length: int = 256,
) -> dict[str, torch.Tensor]:
    """The per-concept vectors of a baseline (`"diffmean"` or a trained vector per concept) for every concept of
    `train_rows`, reused from `folder` when made there for the same model and settings.

    Args:
        method (`str`): `"diffmean"`, or any other baseline name for vectors trained with [`train_concept_vectors`].
        train_rows (`list[dict]`): positive AxBench rows to build the vectors from (a training split, never
            evaluation rows).
        negative_rows (`list[dict]`): the negative rows DiffMean subtracts.
        reference_rows (`list[dict]`): rows HyperSteer's mean vector norm is measured on when `vector_norm` is
            `None` (DiffMean vectors are scaled to it).
        folder (`str` or `os.PathLike`): where the vectors are saved (see [`save_concept_vectors`]).
        vector_norm (`float`, *optional*), steps (`int`), learning_rate (`float`), seed (`int`), max_length (`int`):
            the DiffMean norm and the training settings of trained vectors.
    """
    from .evaluation import model_fingerprint

    folder = Path(folder)
    settings = {
        "model_fingerprint": model_fingerprint(model.config, model.hypernetwork.state_dict()),
        "baseline_vector_norm": vector_norm,
        "vector_baseline_steps": steps,
        "vector_baseline_learning_rate": learning_rate,
    }
    if (folder / CONCEPTS_FILE).is_file():
        meta, vectors = load_concept_vectors(folder)
        if meta.get("method") == method and all(meta.get(key) == value for key, value in settings.items()):
            logger.info(f"Reusing the {method} vectors in {folder}.")
            return vectors
    if method == "diffmean":
        norm = vector_norm or mean_steering_vector_norm(model, tokenizer, reference_rows)
        vectors = diffmean_vectors(model, tokenizer, list(train_rows), list(negative_rows), norm=norm)
    else:
        training_args = concept_vector_training_arguments(folder / "run", steps, learning_rate, seed)
        vectors = train_concept_vectors(model, tokenizer, list(train_rows), training_args, max_length=max_length)
    save_concept_vectors(vectors, folder, method=method, **settings)
    return vectors


__all__ = [
    "ConceptVectorModel",
    "baseline_concept_vectors",
    "concept_vector_training_arguments",
    "diffmean_vectors",
    "load_concept_vectors",
    "mean_response_residual",
    "mean_steering_vector_norm",
    "save_concept_vectors",
    "train_concept_vectors",
]
