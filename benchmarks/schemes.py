"""The straightforward schemes HyperSteer's one-pass paths are timed against and checked against.

Imported by `benchmarks/run.py` (timing, plus correctness guards before any timing) and by
`tests/test_performance_guards.py` (the same guards on tiny models), so the reference the benchmark beats is
also the reference the tests hold the model to.

- floor: the frozen base's forward + backward to a single trainable vector added after layer `L`; no training
  step for a steering method can be cheaper.
- two-pass generation: a full extra no-grad base forward that records layer `L`'s output, the hypernetwork on
  it, then plain base generation with an additive hook.
- three-pass training (as published code does): (a) a no-grad base pass for the hypernetwork's input at `L`,
  (b) an unsteered no-grad reference pass, (c) the steered pass with backward.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def steering_layer(model) -> torch.nn.Module:
    """The base decoder layer whose output HyperSteer reads and steers."""
    return model.language_model.model.layers[model.config.steering_layer]


def positions_from_mask(attention_mask: torch.Tensor) -> torch.LongTensor:
    """Position ids counting real tokens only (what `generate` and HyperSteer's forward use)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@contextmanager
def additive_steering(layer: torch.nn.Module, vectors: torch.Tensor) -> Iterator[None]:
    """`h <- h + v` at every position after `layer`; `vectors` is `(batch_size, hidden_size)` or `(hidden_size,)`."""

    def hook(module, args, kwargs, output):
        hidden_states = output[0] if isinstance(output, tuple) else output
        rows = vectors if vectors.dim() == 2 else vectors.expand(hidden_states.shape[0], -1)
        steered = hidden_states + rows[:, None, :].to(hidden_states.dtype)
        return (steered,) + tuple(output[1:]) if isinstance(output, tuple) else steered

    handle = layer.register_forward_hook(hook, with_kwargs=True, prepend=True)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def recorded_output(layer: torch.nn.Module) -> Iterator[dict]:
    """Record the output hidden states of `layer` into the yielded dict under `"hidden_states"`."""
    store = {}

    def hook(module, args, output):
        store["hidden_states"] = output[0] if isinstance(output, tuple) else output

    handle = layer.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


@contextmanager
def call_counter(*modules: torch.nn.Module) -> Iterator[list[int]]:
    """Count calls of each module (yielded list, same order) with forward *pre*-hooks, which fire even when a call
    is cut short by an exception (HyperSteer stops at the steering layer in `compute_steering_vectors`; activation
    checkpointing stops its recomputation early). Transformers checkpoints a decoder layer's `forward`, not its
    `__call__`, so a recomputation is seen by the layer's submodules, not by the layer itself."""
    counts = [0] * len(modules)
    handles = []
    for index, module in enumerate(modules):

        def hook(module, args, index=index):
            counts[index] += 1

        handles.append(module.register_forward_pre_hook(hook))
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def naive_steering_vectors(
    model, input_ids, attention_mask, steering_input_ids, steering_attention_mask, context_mask=None
) -> torch.Tensor:
    """Pass 1 of the naive schemes: a *full* extra no-grad forward of the base body (every layer, no LM head) that
    records layer `L`'s output, then the hypernetwork on it (with grad if grad mode is on).

    The full body is what published code runs (it asks for `output_hidden_states`); stopping at `L` would be
    cheaper, which is what HyperSteer's one-pass design makes unnecessary altogether.
    """
    if context_mask is None:
        context_mask = attention_mask.bool()
    with torch.no_grad(), recorded_output(steering_layer(model)) as store:
        model.language_model.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions_from_mask(attention_mask),
            use_cache=False,
        )
    kind = model.config.hypernet_type
    return model._run_hypernetwork(
        steering_input_ids,
        steering_attention_mask,
        store["hidden_states"] if kind == "cross_attention" else None,
        context_mask,
        input_ids if kind == "in_context" else None,
    )


@torch.no_grad()
def two_pass_generate(
    model,
    input_ids,
    attention_mask,
    steering_input_ids,
    steering_attention_mask,
    vectors: torch.Tensor | None = None,
    **generate_kwargs,
):
    """Naive steered generation: extra base pass + hypernetwork, then the base's `generate` with an additive hook.

    With `vectors` given, skip pass 1 and steer with them (to compare tokens for the very same `v`).

    Returns:
        `(sequences, vectors)`.
    """
    if vectors is None:
        vectors = naive_steering_vectors(model, input_ids, attention_mask, steering_input_ids, steering_attention_mask)
    with additive_steering(steering_layer(model), vectors):
        sequences = model.language_model.generate(
            input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs
        )
    return sequences, vectors


def _optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer | None) -> None:
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def hypersteer_step(model, batch: dict, optimizer=None) -> torch.Tensor:
    """One HyperSteer training step: one steered base forward (the hypernetwork runs inside it), backward, AdamW."""
    loss = model(**batch).loss
    _optimizer_step(loss, optimizer)
    return loss.detach()


def floor_step(model, vector: torch.nn.Parameter, batch: dict, optimizer=None) -> torch.Tensor:
    """The floor: frozen base forward + backward to one trainable vector added after layer `L`, and its AdamW step."""
    with additive_steering(steering_layer(model), vector):
        loss = model.language_model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=positions_from_mask(batch["attention_mask"]),
            labels=batch["labels"],
        ).loss
    _optimizer_step(loss, optimizer)
    return loss.detach()


def three_pass_step(model, batch: dict, optimizer=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The published three-pass training step.

    Returns:
        `(steered_loss, unsteered_reference_loss)`, both detached.
    """
    input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    real = attention_mask.bool()
    context_mask = real & ~(labels.ne(-100) & real)
    position_ids = positions_from_mask(attention_mask)
    # (a) extra no-grad base pass, then the hypernetwork (with grad) on its layer-L output
    vectors = naive_steering_vectors(
        model, input_ids, attention_mask, batch["steering_input_ids"], batch["steering_attention_mask"], context_mask
    )
    # (b) unsteered no-grad reference pass
    with torch.no_grad():
        reference = model.language_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, labels=labels
        ).loss
    # (c) steered pass with backward
    with additive_steering(steering_layer(model), vectors):
        loss = model.language_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, labels=labels
        ).loss
    _optimizer_step(loss, optimizer)
    return loss.detach(), reference.detach()


__all__ = [
    "additive_steering",
    "call_counter",
    "floor_step",
    "hypersteer_step",
    "naive_steering_vectors",
    "positions_from_mask",
    "recorded_output",
    "steering_layer",
    "three_pass_step",
    "two_pass_generate",
]
