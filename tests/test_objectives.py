"""Concept-specificity levers: the contrast and diversity terms, the label-only LM head, mean pooling, the shared
offset, the lexical path, the recipe file and the per-concept baselines."""

import copy
import json
import logging

import pytest
import torch
import yaml
from conftest import REPO_ROOT, build_tiny_base
from datasets import Dataset
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from modeling_hypersteer import HyperSteerConfig, HyperSteerModel, tokenize_steering_prompts
from modeling_hypersteer.baselines import (
    diffmean_vectors,
    load_concept_vectors,
    mean_response_residual,
    save_concept_vectors,
    train_concept_vectors,
)
from modeling_hypersteer.data import HyperSteerDataCollator, tokenize_example
from modeling_hypersteer.modeling_hypersteer import _CACHE_FIELD, HyperSteerRunningCenter, _drop_tokens
from modeling_hypersteer.trainer import (
    ConceptVectorTargets,
    HyperSteerTrainer,
    HyperSteerTrainingArguments,
    cross_concept_cosine,
    fit_readout_to_concept_vectors,
    logits_to_keep_for_labels,
    other_concept_rows,
    steering_prompt_groups,
)


CONCEPT_A = "references to legal terminology and court proceedings"
CONCEPT_B = "C/C++ syntax such as pointers, headers and semicolons"
ROWS = [
    {
        "input": "Explain sorting algorithms in simple words.",
        "output": "The court sorts the docket by date.",
        "output_concept": CONCEPT_A,
    },
    {
        "input": "Write a short poem about the sea.",
        "output": "int *sea; /* tidal currents */",
        "output_concept": CONCEPT_B,
    },
    {
        "input": "Explain sorting in simple words.",
        "output": "A judge hears the legal case.",
        "output_concept": CONCEPT_A,
    },
    {"input": "Write a poem about the fox.", "output": "#include <fox.h> int main;", "output_concept": CONCEPT_B},
]


def _model(tokenizer, architecture="llama", **config):
    base = build_tiny_base(architecture, len(tokenizer))
    config = {"steering_layer": 1, "hypernet_num_layers": 2, **config}
    return HyperSteerModel.from_base_model(base, tokenizer=tokenizer, **config)


def _batch(tokenizer, rows):
    features = [tokenize_example(row, tokenizer, max_length=96) for row in rows]
    return HyperSteerDataCollator(tokenizer=tokenizer)(features)


def _trainer(model, tmp_path, rows=None, callbacks=None, concept_vectors=None, **arguments):
    """A CPU trainer; with `rows`, it trains on them."""
    args = HyperSteerTrainingArguments(
        output_dir=str(tmp_path), report_to="none", eval_strategy="no", use_cpu=True, **arguments
    )
    if rows is None:
        return HyperSteerTrainer(model=model, args=args, callbacks=callbacks, concept_vectors=concept_vectors)
    return HyperSteerTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list([tokenize_example(row, model.tokenizer, max_length=96) for row in rows]),
        data_collator=HyperSteerDataCollator(tokenizer=model.tokenizer),
        callbacks=callbacks,
        concept_vectors=concept_vectors,
    )


def _train_steps(model, trainer, batch, steps, learning_rate, metric=None) -> list[float]:
    """`steps` AdamW steps of `trainer`'s objective on one batch; the mean of `metric` logged at each step, if given."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate)
    model.train()
    values = []
    for _ in range(steps):
        optimizer.zero_grad()
        trainer.compute_loss(model, batch).backward()
        optimizer.step()
        if metric is not None:
            values.append(torch.stack(trainer._metrics["train"][metric]).mean().item())
        trainer._metrics["train"].clear()
    return values


def _perturb(model, std=0.3):
    with torch.no_grad():
        model.hypernetwork.output_projection.weight.normal_(0.0, std)


def test_rows_pair_with_a_row_of_another_concept():
    groups = torch.tensor([0, 0, 1, 2])
    partner = other_concept_rows(groups)
    assert partner.tolist() == [2, 2, 3, 0]
    assert (groups[partner] != groups).all()
    assert other_concept_rows(torch.tensor([5, 5, 5])).tolist() == [-1, -1, -1]


def test_steering_prompt_groups_ignore_padding():
    ids = torch.tensor([[7, 8, 0], [7, 8, 9], [7, 8, 5]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 0]])
    # Rows 0 and 2 differ only on a padded position: the same prompt.
    groups = steering_prompt_groups(ids, mask)
    assert groups[0] == groups[2] and groups[0] != groups[1]


@pytest.mark.parametrize("architecture", ["llama", "gemma2"])
@pytest.mark.parametrize(
    "hypernet_type, prior", [("cross_attention", "residual"), ("in_context", "lexical"), ("no_context", "none")]
)
def test_contrast_logits_equal_a_separate_pass_with_the_other_prompts(
    tiny_tokenizer, architecture, hypernet_type, prior
):
    model = _model(tiny_tokenizer, architecture, hypernet_type=hypernet_type, token_gate=True, steering_prior=prior)
    _perturb(model)
    batch = _batch(tiny_tokenizer, ROWS)
    swapped = {"input_ids": batch["steering_input_ids"].flip(0), "mask": batch["steering_attention_mask"].flip(0)}
    outputs = model(
        **batch,
        contrast_steering_input_ids=swapped["input_ids"],
        contrast_steering_attention_mask=swapped["mask"],
    )
    separate = {**batch, "steering_input_ids": swapped["input_ids"], "steering_attention_mask": swapped["mask"]}
    torch.testing.assert_close(outputs.contrast_logits, model(**separate).logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(outputs.contrast_logits, outputs.logits, atol=1e-3)


def test_label_only_logits_give_the_same_loss(tiny_tokenizer):
    model = _model(tiny_tokenizer, architecture="gemma2")
    _perturb(model)
    batch = _batch(tiny_tokenizer, ROWS)
    keep = logits_to_keep_for_labels(batch["labels"])
    assert 0 < keep < batch["input_ids"].shape[1]
    full = model(**batch)
    kept = model(**batch, logits_to_keep=keep)
    assert kept.logits.shape[1] == keep
    torch.testing.assert_close(kept.loss, full.loss, atol=1e-5, rtol=1e-5)


def _contrast_gradient(model, tokenizer, rows, tmp_path, weight):
    trainer = _trainer(model, tmp_path, contrast_loss_weight=weight, contrast_beta=5.0)
    model.train()
    model.zero_grad()
    loss = trainer.compute_loss(model, _batch(tokenizer, rows))
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.hypernetwork.parameters() if p.grad is not None]).clone()


def test_contrast_gradient_vanishes_when_every_row_has_the_same_concept(tiny_tokenizer, tmp_path):
    model = _model(tiny_tokenizer)
    _perturb(model)
    same = [dict(row, output_concept=CONCEPT_A) for row in ROWS]
    torch.testing.assert_close(
        _contrast_gradient(model, tiny_tokenizer, same, tmp_path, 1.0),
        _contrast_gradient(model, tiny_tokenizer, same, tmp_path, 0.0),
    )
    mixed_with = _contrast_gradient(model, tiny_tokenizer, ROWS, tmp_path, 1.0)
    mixed_without = _contrast_gradient(model, tiny_tokenizer, ROWS, tmp_path, 0.0)
    assert (mixed_with - mixed_without).abs().max() > 1e-6


def test_contrast_training_separates_right_from_wrong_concept(tiny_tokenizer, tmp_path):
    model = _model(tiny_tokenizer, hypernet_type="no_context")
    trainer = _trainer(model, tmp_path, contrast_loss_weight=1.0, learning_rate=1e-2)
    gaps = _train_steps(model, trainer, _batch(tiny_tokenizer, ROWS), 15, 1e-2, metric="contrast_gap")
    assert gaps[-1] > gaps[0] + 0.05


def test_diversity_term_lowers_the_cosine_between_concepts(tiny_tokenizer, tmp_path):
    batch = _batch(tiny_tokenizer, ROWS)
    groups = steering_prompt_groups(batch["steering_input_ids"], batch["steering_attention_mask"])

    def cosine_after_training(weight):
        torch.manual_seed(0)
        model = _model(tiny_tokenizer, hypernet_type="no_context")
        _perturb(model, std=0.05)
        trainer = _trainer(model, tmp_path, diversity_loss_weight=weight)
        _train_steps(model, trainer, batch, 10, 3e-3)
        with torch.no_grad():
            return cross_concept_cosine(model(**batch).steering_vectors, groups).item()

    assert cosine_after_training(5.0) < cosine_after_training(0.0) - 0.1


def test_concept_vector_targets_are_found_by_a_rows_steering_prompt(tiny_tokenizer):
    target = torch.arange(32, dtype=torch.float32)
    batch = _batch(tiny_tokenizer, ROWS)
    targets = ConceptVectorTargets({CONCEPT_A: target}, tiny_tokenizer, 64, hidden_size=32)
    rows, vectors = targets(batch["steering_input_ids"], batch["steering_attention_mask"])
    # Rows 1 and 3 are another concept, which has no target: they are left out, not given a zero target.
    assert rows.tolist() == [0, 2]
    torch.testing.assert_close(vectors, torch.stack([target, target]))
    with pytest.raises(ValueError, match=r"shape \(32,\)"):
        ConceptVectorTargets({CONCEPT_A: torch.zeros(16)}, tiny_tokenizer, 64, hidden_size=32)


def test_concept_vector_term_pulls_each_concepts_vector_toward_its_target(tiny_tokenizer, tmp_path):
    torch.manual_seed(0)
    model = _model(tiny_tokenizer, hypernet_type="no_context")
    targets = {CONCEPT_A: torch.randn(32), CONCEPT_B: torch.randn(32)}
    trainer = _trainer(
        model, tmp_path, concept_vectors=targets, concept_vector_loss_weight=5.0, concept_vector_scale=2.0
    )
    errors = _train_steps(model, trainer, _batch(tiny_tokenizer, ROWS), 30, 1e-2, metric="concept_vector_loss")
    assert errors[-1] < 0.5 * errors[0], errors
    model.eval()
    with torch.no_grad():
        vectors = model.compute_steering_vectors(steering_prompt=[CONCEPT_A, CONCEPT_B])
    own = torch.nn.functional.cosine_similarity(vectors, torch.stack([targets[CONCEPT_A], targets[CONCEPT_B]]))
    swapped = torch.nn.functional.cosine_similarity(vectors, torch.stack([targets[CONCEPT_B], targets[CONCEPT_A]]))
    assert (own > swapped).all(), (own, swapped)


def test_concept_vector_weight_and_vectors_go_together(tiny_tokenizer, tmp_path, caplog):
    model = _model(tiny_tokenizer, hypernet_type="no_context")
    with pytest.raises(ValueError, match="concept_vectors="):
        _trainer(model, tmp_path, concept_vector_loss_weight=1.0)
    with caplog.at_level(logging.WARNING):
        _trainer(model, tmp_path, concept_vectors={CONCEPT_A: torch.zeros(32)})
    assert "`concept_vectors` are unused" in caplog.text


READOUT_CONCEPTS = [
    CONCEPT_A,
    CONCEPT_B,
    "mentions of the ocean, tides and marine animals",
    "expressions of gratitude and thanks",
    "dates and calendar references",
]


@pytest.mark.parametrize("steering_prior", ["none", "lexical"])
def test_fitted_readout_maps_each_training_description_to_its_vector(tiny_tokenizer, tmp_path, steering_prior):
    torch.manual_seed(0)
    model = _model(
        tiny_tokenizer,
        hypernet_type="no_context",
        hypernet_pooling="mean",
        shared_steering_offset=True,
        center_pooled_features=True,
        standardize_pooled_features=True,
        steering_prior=steering_prior,
        steering_prior_map="scalar",
        steering_prior_init_norm=3.0,
    ).eval()
    targets = {concept: torch.randn(32) + 2.0 for concept in READOUT_CONCEPTS}
    summary = fit_readout_to_concept_vectors(model, targets, [1e-8])
    with torch.no_grad():
        vectors = model.compute_steering_vectors(steering_prompt=READOUT_CONCEPTS)
    # Five descriptions, 32 features: at a vanishing ridge the fit interpolates, prior term included.
    torch.testing.assert_close(vectors, torch.stack(list(targets.values())), atol=1e-3, rtol=1e-3)
    assert summary["concepts"] == 5 and summary["ridge"] == 1e-8 and summary["training_cosine"] > 0.999
    # The feature statistics are the checkpoint's: a reloaded model gives the same vectors.
    model.save_pretrained(tmp_path)
    reloaded = HyperSteerModel.from_pretrained(tmp_path, base_model=model.language_model).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded.compute_steering_vectors(steering_prompt=READOUT_CONCEPTS), vectors)


def test_normalised_readout_gives_every_description_the_same_concept_norm(tiny_tokenizer, tmp_path):
    torch.manual_seed(0)
    model = _model(
        tiny_tokenizer, hypernet_type="no_context", hypernet_pooling="mean", shared_steering_offset=True
    ).eval()
    targets = {concept: torch.randn(32) * (1 + index) for index, concept in enumerate(READOUT_CONCEPTS)}
    summary = fit_readout_to_concept_vectors(model, targets, [0.1], normalize=True)
    stacked = torch.stack(list(targets.values()))
    expected_norm = (stacked - stacked.mean(0)).norm(dim=-1).mean().item()
    assert model.config.readout_norm == summary["readout_norm"] == pytest.approx(expected_norm, rel=1e-5)
    torch.testing.assert_close(model.hypernetwork.steering_offset.detach(), stacked.mean(0))
    unseen = ["stock markets and interest rates", "the smell of rain"]
    with torch.no_grad():
        vectors = model.compute_steering_vectors(steering_prompt=READOUT_CONCEPTS + unseen)
    concept_parts = (vectors - model.hypernetwork.steering_offset).norm(dim=-1)
    torch.testing.assert_close(concept_parts, torch.full_like(concept_parts, expected_norm), rtol=1e-4, atol=1e-4)
    model.save_pretrained(tmp_path)
    reloaded = HyperSteerModel.from_pretrained(tmp_path, base_model=model.language_model).eval()
    assert reloaded.config.readout_norm == model.config.readout_norm
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded.compute_steering_vectors(steering_prompt=READOUT_CONCEPTS + unseen), vectors
        )


def test_fitted_readout_generalises_through_what_the_blocks_read(tiny_tokenizer):
    # Targets that are a fixed linear function of the features: a larger ridge, chosen by leave-one-out, predicts a
    # description left out of the fit better than chance.
    torch.manual_seed(0)
    model = _model(tiny_tokenizer, hypernet_type="no_context", hypernet_pooling="mean", shared_steering_offset=True)
    model.eval()
    words = ["court", "judge", "ocean", "tide", "thanks", "grateful", "date", "calendar", "pointer", "header"]
    concepts = [f"{first} and {second}" for first in words for second in words if first < second]
    captured = []
    handle = model.hypernetwork.norm.register_forward_hook(lambda module, args, output: captured.append(output))
    with torch.no_grad():
        model.compute_steering_vectors(steering_prompt=concepts)
    handle.remove()
    features = captured[0].double()
    truth = features @ torch.randn(32, 32, dtype=torch.float64)
    held_out = concepts[::5]
    train = {c: t.float() for c, t in zip(concepts, truth) if c not in held_out}
    summary = fit_readout_to_concept_vectors(model, train, [0.01, 0.1, 1.0])
    with torch.no_grad():
        predicted = model.compute_steering_vectors(steering_prompt=held_out).double()
    expected = truth[[concepts.index(c) for c in held_out]]
    centre = torch.stack(list(train.values())).double().mean(0)
    cosines = torch.nn.functional.cosine_similarity(predicted - centre, expected - centre)
    assert cosines.mean() > 0.5, (cosines, summary)
    assert summary["leave_one_out_cosine"][str(summary["ridge"])] == max(summary["leave_one_out_cosine"].values())


def test_fitting_the_readout_rejects_what_it_cannot_fit(tiny_tokenizer):
    model = _model(tiny_tokenizer, hypernet_type="no_context")
    three = {concept: torch.zeros(32) for concept in READOUT_CONCEPTS[:3]}
    with pytest.raises(ValueError, match="at least 3 concepts"):
        fit_readout_to_concept_vectors(model, {CONCEPT_A: torch.zeros(32), CONCEPT_B: torch.zeros(32)}, [1.0])
    with pytest.raises(ValueError, match=r"shape \(32,\)"):
        fit_readout_to_concept_vectors(model, {c: torch.zeros(16) for c in READOUT_CONCEPTS[:3]}, [1.0])
    for ridges in ([], [0.0], [float("nan")]):
        with pytest.raises(ValueError, match="ridges"):
            fit_readout_to_concept_vectors(model, three, ridges)
    with pytest.raises(ValueError, match="no_context"):
        fit_readout_to_concept_vectors(_model(tiny_tokenizer, hypernet_type="cross_attention"), three, [1.0])


@pytest.mark.parametrize("ridges", ["", "0", "0.1,-1", "a,b"])
def test_readout_ridges_are_validated(tmp_path, ridges):
    with pytest.raises(ValueError, match="readout_ridges"):
        HyperSteerTrainingArguments(output_dir=str(tmp_path), report_to="none", readout_ridges=ridges)


def test_readout_norm_is_validated(tmp_path):
    for value in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="readout_norm"):
            HyperSteerConfig(readout_norm=value)
    with pytest.raises(ValueError, match="fit_readout"):
        HyperSteerTrainingArguments(output_dir=str(tmp_path), report_to="none", fit_readout_norm=True)


def test_mean_pooling_and_offset_are_padding_invariant(tiny_tokenizer):
    model = _model(tiny_tokenizer, hypernet_pooling="mean", shared_steering_offset=True)
    _perturb(model)
    with torch.no_grad():
        model.hypernetwork.steering_offset.normal_()
    features = [tokenize_example(row, tiny_tokenizer, max_length=96) for row in ROWS]
    right = HyperSteerDataCollator(tokenizer=tiny_tokenizer, padding_side="right")(features)
    left = HyperSteerDataCollator(tokenizer=tiny_tokenizer, padding_side="left")(features)
    alone = HyperSteerDataCollator(tokenizer=tiny_tokenizer)(features[:1])
    vectors = model(**right).steering_vectors
    torch.testing.assert_close(vectors, model(**left).steering_vectors, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vectors[:1], model(**alone).steering_vectors, atol=1e-5, rtol=1e-5)


def test_shared_offset_starts_at_zero_and_is_part_of_every_vector(tiny_tokenizer):
    model = _model(tiny_tokenizer, shared_steering_offset=True)
    assert (model.hypernetwork.steering_offset == 0).all()
    batch = _batch(tiny_tokenizer, ROWS)
    torch.testing.assert_close(model(**batch).steering_vectors, torch.zeros(4, 32))
    with torch.no_grad():
        model.hypernetwork.steering_offset.fill_(0.5)
    torch.testing.assert_close(model(**batch).steering_vectors, torch.full((4, 32), 0.5))


def test_lexical_path_starts_as_the_centred_prompt_embedding(tiny_tokenizer):
    model = _model(tiny_tokenizer, hypernet_type="no_context", steering_prior="lexical", steering_prior_init_norm=8.0)
    vectors = model.compute_steering_vectors(steering_prompt=[CONCEPT_A, CONCEPT_B])
    torch.testing.assert_close(vectors.norm(dim=-1), torch.full((2,), 8.0))
    embeddings = model.get_output_embeddings().weight.float()
    ids = tiny_tokenizer(CONCEPT_A, add_special_tokens=False)["input_ids"]
    expected = embeddings[ids].mean(0) - embeddings.mean(0)
    torch.testing.assert_close(vectors[0], 8.0 * expected / expected.norm(), atol=1e-4, rtol=1e-4)
    # Special tokens carry no concept: a BOS in front of the prompt does not move the direction.
    with_bos = torch.tensor([[tiny_tokenizer.bos_token_id] + ids])
    torch.testing.assert_close(
        model.compute_steering_vectors(steering_input_ids=with_bos)[0], vectors[0], atol=1e-4, rtol=1e-4
    )
    assert model.hypernetwork.prior_projection.weight.requires_grad


def test_a_scalar_prior_map_learns_one_scale_and_keeps_the_direction_of_any_description(tiny_tokenizer, tmp_path):
    matrix = _model(tiny_tokenizer, hypernet_type="no_context", steering_prior="lexical", steering_prior_init_norm=8.0)
    scalar = _model(
        tiny_tokenizer,
        hypernet_type="no_context",
        steering_prior="lexical",
        steering_prior_init_norm=8.0,
        steering_prior_map="scalar",
    )
    prompts = [CONCEPT_A, CONCEPT_B]
    # The same vectors at initialisation, from one parameter instead of hidden_size ** 2.
    torch.testing.assert_close(
        scalar.compute_steering_vectors(steering_prompt=prompts),
        matrix.compute_steering_vectors(steering_prompt=prompts),
    )
    assert scalar.hypernetwork.prior_projection.weight.numel() == 1
    # One training step moves the scale, never the direction: a description no step saw keeps its lexical direction.
    scalar.train()
    optimizer = torch.optim.SGD([scalar.hypernetwork.prior_projection.weight], lr=1.0)
    scalar(**_batch(tiny_tokenizer, ROWS)).loss.backward()
    optimizer.step()
    scalar.eval()
    scale = scalar.hypernetwork.prior_projection.weight.item()
    assert scale != 8.0
    unseen = "mentions of lighthouses and the sea"
    expected = matrix.compute_steering_vectors(steering_prompt=[unseen]) / 8.0 * scale
    torch.testing.assert_close(scalar.compute_steering_vectors(steering_prompt=[unseen]), expected)
    scalar.save_pretrained(tmp_path)
    reloaded = HyperSteerModel.from_pretrained(tmp_path, base_model=scalar.language_model)
    assert reloaded.config.steering_prior_map == "scalar"
    torch.testing.assert_close(reloaded.hypernetwork.prior_projection.weight, torch.tensor([scale]))
    with pytest.raises(ValueError, match="steering_prior_map"):
        HyperSteerConfig(steering_prior="lexical", steering_prior_map="vector")


def test_token_dropout_hides_steering_prompt_tokens_in_training_steps_only(tiny_tokenizer):
    model = _model(tiny_tokenizer, hypernet_type="no_context", steering_prompt_token_dropout=0.5)
    torch.nn.init.normal_(model.hypernetwork.output_projection.weight)
    inputs = tokenize_steering_prompts(tiny_tokenizer, [CONCEPT_A, CONCEPT_B], max_length=64)
    ids, mask = inputs["steering_input_ids"], inputs["steering_attention_mask"]
    model.eval()
    whole = model.compute_steering_vectors(steering_input_ids=ids, steering_attention_mask=mask)
    model.train()
    with torch.no_grad():
        # Outside a training step (no gradient) the whole prompt is read, as at inference.
        torch.testing.assert_close(model._run_hypernetwork(ids, mask, None, None, None), whole)
    torch.manual_seed(0)
    kept = _drop_tokens(mask.bool(), 0.5)
    torch.manual_seed(0)
    dropped = model._run_hypernetwork(ids, mask, None, None, None)
    assert (kept.sum(-1) < mask.sum(-1)).all()
    # A training step reads the kept tokens and nothing else: the vector of the shortened description.
    model.eval()
    shortened = model.compute_steering_vectors(steering_input_ids=ids, steering_attention_mask=kept.long())
    torch.testing.assert_close(dropped, shortened)
    assert not torch.allclose(dropped, whole)


def test_token_dropout_starts_after_the_given_fraction_of_steps_and_is_restored(tiny_tokenizer, tmp_path):
    model = _model(tiny_tokenizer, hypernet_type="no_context", steering_prompt_token_dropout=0.3)
    seen = []

    class RecordDropout(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            seen.append(model.hypernetwork.token_dropout)

    trainer = _trainer(
        model,
        tmp_path,
        rows=ROWS,
        callbacks=[RecordDropout()],
        max_steps=8,
        per_device_train_batch_size=2,
        token_dropout_start_ratio=0.5,
        save_strategy="no",
        plot_loss_curve=False,
    )
    trainer.train()
    assert seen == [0.0] * 4 + [0.3] * 4
    assert model.hypernetwork.token_dropout == 0.3


@pytest.mark.parametrize("value", [1.0, -0.1])
def test_token_dropout_start_ratio_is_a_fraction_below_one(tmp_path, value):
    with pytest.raises(ValueError, match="token_dropout_start_ratio"):
        HyperSteerTrainingArguments(output_dir=str(tmp_path), report_to="none", token_dropout_start_ratio=value)


def test_training_rows_are_steered_at_their_factor_times_a_draw_up_to_the_maximum(tiny_tokenizer, tmp_path):
    model = _model(tiny_tokenizer, hypernet_type="no_context")
    _perturb(model)
    seen = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["steering_factor"]), with_kwargs=True
    )
    trainer = _trainer(model, tmp_path, train_steering_factor_max=2.5)
    batch = _batch(tiny_tokenizer, ROWS * 4)
    # Concept rows at 1.0, a negative row at 0 (unsteered) and one at -1, as the data's column may hold.
    row_factors = torch.tensor([1.0] * 14 + [0.0, -1.0])
    batch["steering_factor"] = row_factors.clone()
    model.train()
    augmented = trainer.compute_loss(model, batch)
    draws = seen[-1][:14]
    assert (draws >= 1.0).all() and (draws <= 2.5).all() and draws.std() > 0.1
    assert seen[-1][14] == 0.0 and -2.5 <= seen[-1][15] <= -1.0
    # The drawn factors reach the steering: the same rows at their own factors give another loss.
    assert not torch.isclose(augmented, _trainer(model, tmp_path).compute_loss(model, batch))
    torch.testing.assert_close(seen[-1], row_factors)
    model.eval()
    with torch.no_grad():
        trainer.compute_loss(model, batch)
    torch.testing.assert_close(seen[-1], row_factors)


@pytest.mark.parametrize("value", [0.5, -1.0, float("inf"), float("nan")])
def test_train_steering_factor_max_must_be_a_number_of_at_least_one(tmp_path, value):
    with pytest.raises(ValueError, match="train_steering_factor_max"):
        HyperSteerTrainingArguments(output_dir=str(tmp_path), report_to="none", train_steering_factor_max=value)


def test_token_dropout_start_without_token_dropout_warns(tiny_tokenizer, tmp_path, caplog):
    model = _model(tiny_tokenizer, hypernet_type="no_context")
    with caplog.at_level(logging.WARNING):
        _trainer(model, tmp_path, token_dropout_start_ratio=0.5)
    assert "`steering_prompt_token_dropout` is 0" in caplog.text


def test_drop_tokens_keeps_a_subset_and_never_empties_a_row():
    torch.manual_seed(0)
    mask = torch.zeros(4000, 12, dtype=torch.bool)
    mask[:, :9] = True
    kept = _drop_tokens(mask, 0.3)
    assert not (kept & ~mask).any() and kept.any(dim=-1).all()
    assert 0.27 < 1 - kept.sum() / mask.sum() < 0.33
    single = torch.tensor([[True, False, False]])
    torch.manual_seed(0)
    assert all(_drop_tokens(single, 0.9).equal(single) for _ in range(20))


@pytest.mark.parametrize("value", [1.0, -0.1, True, "0.3"])
def test_token_dropout_must_be_a_probability_below_one(value):
    with pytest.raises(ValueError, match="steering_prompt_token_dropout"):
        HyperSteerConfig(steering_prompt_token_dropout=value)


def test_every_model_argument_the_config_has_reaches_the_config():
    import train_hypersteer

    model_args, _, _ = train_hypersteer.parse_arguments(
        [
            "--base_model_name_or_path",
            "base",
            "--dataset_name_or_path",
            "data",
            "--output_dir",
            "/tmp/unused",
            "--steering_prompt_token_dropout",
            "0.3",
        ]
    )
    kwargs = train_hypersteer.hypersteer_config_kwargs(model_args)
    assert kwargs["steering_prompt_token_dropout"] == 0.3
    config_fields = set(HyperSteerConfig().to_dict())
    assert set(kwargs) == {name for name in vars(model_args) if name in config_fields}
    assert {"steering_prior_map", "standardize_pooled_features", "hypernet_type"} <= set(kwargs)
    assert HyperSteerConfig(**kwargs).steering_prompt_token_dropout == 0.3


@pytest.mark.parametrize("prior", ["lexical", "residual"])
def test_prior_model_round_trips(tiny_tokenizer, tmp_path, prior):
    model = _model(
        tiny_tokenizer,
        steering_prior=prior,
        shared_steering_offset=True,
        hypernet_pooling="mean",
        center_pooled_features=True,
    )
    _perturb(model)
    model.train()
    model(**_batch(tiny_tokenizer, ROWS))  # moves the running means away from zero
    model.eval()
    model.save_pretrained(tmp_path)
    reloaded = HyperSteerModel.from_pretrained(tmp_path, base_model=model.language_model)
    batch = _batch(tiny_tokenizer, ROWS)
    torch.testing.assert_close(reloaded(**batch).steering_vectors, model(**batch).steering_vectors)
    assert reloaded.config.steering_prior == prior and reloaded.config.hypernet_pooling == "mean"


@pytest.mark.parametrize(
    "field, value",
    [
        ("contrast_loss_weight", -1.0),
        ("diversity_loss_weight", float("nan")),
        ("contrast_beta", 0.0),
        ("concept_vector_loss_weight", -1.0),
        ("concept_vector_scale", 0.0),
        ("concept_vector_steps", 0),
        ("concept_vector_learning_rate", float("inf")),
    ],
)
def test_objective_weights_are_validated(tmp_path, field, value):
    with pytest.raises(ValueError, match=field):
        HyperSteerTrainingArguments(output_dir=str(tmp_path), report_to="none", **{field: value})


@pytest.mark.parametrize(
    "recipe_file",
    ["smollm2_axbench.yaml", "smollm2_axbench_fitted_readout.yaml", "smollm2_axbench_fitted_readout_trained.yaml"],
)
def test_recipe_file_parses_into_the_arguments_it_names(recipe_file):
    import train_hypersteer

    recipe_path = REPO_ROOT / "examples" / "recipes" / recipe_file
    recipe = yaml.safe_load(recipe_path.read_text())
    model_args, data_args, training_args = train_hypersteer.parse_arguments(
        ["--config", str(recipe_path), "--output_dir", "/tmp/unused-recipe-output"]
    )
    parsed = {**vars(model_args), **vars(data_args), **vars(training_args)}
    for key, value in recipe.items():
        if key == "dataset_name_or_path":
            expected = [part for item in (value if isinstance(value, list) else [value]) for part in item.split(",")]
            assert parsed[key] == expected
        else:
            assert parsed[key] == value, key
    assert training_args.contrast_loss_weight > 0


def test_quickstart_trains_the_recipe_variant_and_objective(tmp_path):
    import quickstart

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("hypernet_type: in_context\ncontrast_loss_weight: 0.25\nmax_steps: 9\n")
    # The variant and objective come from the recipe; data and budget are the quickstart's own.
    assert quickstart.recipe_objective_arguments(quickstart.recipe_settings(recipe)) == [
        "--hypernet_type",
        "in_context",
        "--contrast_loss_weight",
        "0.25",
    ]
    shipped = yaml.safe_load(quickstart.RECIPE_PATH.read_text())
    assert quickstart.recipe_settings()["hypernet_type"] == shipped["hypernet_type"]
    with pytest.raises(FileNotFoundError, match="recipe"):
        quickstart.recipe_settings(tmp_path / "missing.yaml")


def test_ablation_reuses_reference_losses_only_for_the_same_rows(tmp_path):
    import sys

    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    import quality_ablation

    class Args:
        work_dir = str(tmp_path)
        eval_max_length = 320

    rows = [{"input": "Say hi.", "output": "Hello.", "output_concept": CONCEPT_A}]
    other_split = [{**rows[0], "output_concept": CONCEPT_B}]
    path = quality_ablation.reference_losses_path(Args, "heldout", rows, "user")
    assert path == quality_ablation.reference_losses_path(Args, "heldout", [dict(rows[0])], "user")
    assert path != quality_ablation.reference_losses_path(Args, "heldout", other_split, "user")
    assert path != quality_ablation.reference_losses_path(Args, "heldin", rows, "user")
    # Prompting's losses depend on where its instruction goes.
    assert path != quality_ablation.reference_losses_path(Args, "heldout", rows, "system")


def test_ablation_pools_runs_that_differ_only_in_split_description_or_factor_calibration():
    import sys

    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    import quality_ablation

    trained = {"max_steps": 400, "contrast_loss_weight": 0.5, "calibrate_steering_factor": False}
    # The recipe command's own run: both calibrations on, with their grids; another split and description.
    recipe = {
        **trained,
        "calibrate_steering_factor": True,
        "calibration_factors": "1,1.5,2,4,8",
        "calibrate_prompted_steering_factor": True,
        "prompted_calibration_factors": "0.25,0.5,0.75,1",
    }
    runs = {
        "a": {"config": {**trained, "concept_split_seed": 42, "description": "x"}},
        "b": {"config": {**recipe, "concept_split_seed": 5, "description": "y"}},
        "c": {"config": {**trained, "contrast_loss_weight": 1.0, "concept_split_seed": 7}},
        "d": {"config": {**recipe, "concept_split_seed": 42}},  # a rerun of split 42 is not another split
    }
    variants = quality_ablation._variants(runs)
    assert sorted(sorted(name for name, _ in per_split.values()) for per_split in variants) == [["a", "b"], ["c"]]


def test_an_ablation_rescoring_experiment_scores_another_run_with_its_own_evaluation_settings(tmp_path, monkeypatch):
    import shutil
    import sys

    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    import quality_ablation

    rescoring = quality_ablation.load_experiment("recipe_split2026_user_prompt")
    trained = quality_ablation.load_experiment("recipe_split2026")
    assert trained["prompt_placement"] == "system" and rescoring["prompt_placement"] == "user"
    assert rescoring["rescores"] == "recipe_split2026"
    # The same training run: no evaluation key or the link is a training flag.
    assert quality_ablation.training_argv(rescoring, tmp_path) == quality_ablation.training_argv(trained, tmp_path)
    assert "--prompt_placement" not in quality_ablation.training_argv(rescoring, tmp_path)

    quality_dir = tmp_path / "quality"
    (quality_dir / "experiments").mkdir(parents=True)
    shutil.copy(quality_ablation.QUALITY_DIR / "default_training_params.json", quality_dir)
    (quality_dir / "experiments" / "base.json").write_text('{"max_steps": 10}')
    (quality_dir / "experiments" / "retrains.json").write_text('{"rescores": "base", "max_steps": 20}')
    (quality_dir / "experiments" / "new.json").write_text('{"max_steps": 10}')
    monkeypatch.setattr(quality_ablation, "QUALITY_DIR", quality_dir)
    with pytest.raises(ValueError, match=r"rescores 'base'.*also sets \['max_steps'\]"):
        quality_ablation.load_experiment("retrains")
    # An experiment that does not say is scored against the package's default placement.
    assert quality_ablation.load_experiment("new")["prompt_placement"] == "user"


def test_an_ablation_scores_offline_at_the_factor_the_run_ships_with_when_asked(tmp_path):
    import sys
    from types import SimpleNamespace

    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    import quality_ablation

    rescoring = quality_ablation.load_experiment("readout_fit_norm_at_default")
    trained = quality_ablation.load_experiment("readout_fit_norm")
    # Scoring at another factor is no training flag: the rescoring reuses the trained run.
    assert quality_ablation.training_argv(rescoring, tmp_path) == quality_ablation.training_argv(trained, tmp_path)
    model = SimpleNamespace(config=SimpleNamespace(default_steering_factor=3.0))
    args = SimpleNamespace(steering_factor=1.0)
    assert quality_ablation.offline_steering_factor(rescoring, model, args) == 3.0
    assert quality_ablation.offline_steering_factor({"offline_steering_factor": "2.5"}, model, args) == 2.5
    assert quality_ablation.offline_steering_factor(trained, model, args) == 1.0
    with pytest.raises(ValueError, match=r"offline_steering_factor must be a number or 'default'.*'shipped'"):
        quality_ablation.offline_steering_factor({"offline_steering_factor": "shipped"}, model, args)


def test_ablation_extra_training_data_never_holds_a_scored_concept(tmp_path):
    import sys

    import pandas as pd

    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    import quality_ablation

    def frame(concepts):
        return pd.DataFrame(
            [
                {
                    "input": f"Prompt {i}.",
                    "output": f"About {concept}.",
                    "output_concept": concept,
                    "concept_id": index,
                    "category": "positive",
                }
                for index, concept in enumerate(concepts)
                for i in range(2)
            ]
        )

    split_data = tmp_path / "split.parquet"
    frame(["trained", "held out"]).to_parquet(split_data)
    extra = tmp_path / "extra.parquet"
    frame(["trained", "held out", "held back", "new one", "new two"]).to_parquet(extra)
    rows = {
        "train": [{"output_concept": "trained"}],
        "heldout": [{"output_concept": "held out"}],
        "heldback": [{"output_concept": "held back"}],
    }
    config = {"dataset_name_or_path": str(split_data), "heldout_concepts": "1", "extra_training_data": [str(extra)]}

    training = quality_ablation.add_extra_training_data("run", config, rows, str(tmp_path))
    sources = training["dataset_name_or_path"].split(",")
    assert sources[0] == str(split_data)
    added = pd.read_parquet(sources[1])
    assert sorted(set(added["output_concept"])) == ["new one", "new two"]
    assert len(added) == 4
    # The held-out concepts are named, so the added concepts cannot change which ones are held out.
    assert training["heldout_concepts"] == "held out"
    assert quality_ablation.add_extra_training_data("run", {**config, "extra_training_data": []}, rows, "") == {
        **config,
        "extra_training_data": [],
    }
    frame(["trained", "held back"]).to_parquet(extra)
    with pytest.raises(ValueError, match="adds no concept"):
        quality_ablation.add_extra_training_data("run", config, rows, str(tmp_path))


def test_ablation_summarises_a_variant_over_its_concept_splits():
    import sys

    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    import quality_ablation

    def run(seed, heldin, heldout, gain, **settings):
        config = {"contrast_loss_weight": 0.5, "concept_split_seed": seed, "description": f"seed {seed}", **settings}
        return {
            "config": config,
            "heldin": {"specificity_ratio": heldin, "gain_ratio": gain},
            "heldout": {"specificity_ratio": heldout, "gain_ratio": gain},
        }

    runs = {
        "a42": run(42, 2.0, 0.1, 1.4),
        "a7": run(7, 1.0, 0.9, 1.2),
        "a42_again": run(42, 9.0, 9.0, 9.0),  # a rerun on a split already counted
        "b42": run(42, 3.0, 0.0, 0.6, contrast_loss_weight=1.0),  # other settings, one split only
    }
    table = quality_ablation.split_summary(runs)
    assert len(table) == 3
    assert table[2] == "| a7, a42 | 7 / 42 | 1.000 / 2.000 | 1.500 | 1.000 | 0.900 / 0.100 | 0.500 | 0.100 | 1.200 |"
    assert quality_ablation.split_summary({"b42": runs["b42"]}) == []


def test_ablation_pools_splits_over_rows_not_over_ratios():
    import sys

    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    import quality_ablation

    def result(num_rows, hypersteer, hypersteer_wrong, prompt, prompt_wrong, none):
        losses = dict(
            hypersteer=hypersteer,
            hypersteer_wrong=hypersteer_wrong,
            prompt=prompt,
            prompt_wrong=prompt_wrong,
            none=none,
        )
        return {"num_rows": num_rows, "losses": losses, "specificity_ratio": None, "gain_ratio": None}

    # Split a: prompting separates by 0.1 and HyperSteer by 0.3 (ratio 3); split b: 1.0 and 0.5 (ratio 0.5), 3x the rows.
    a = result(10, 2.0, 2.3, 2.0, 2.1, 3.0)
    b = result(30, 2.5, 3.0, 2.0, 3.0, 3.0)
    pooled = quality_ablation.pooled_ratios([a, b])
    assert pooled["specificity_ratio"] == pytest.approx((10 * 0.3 + 30 * 0.5) / (10 * 0.1 + 30 * 1.0))
    assert pooled["gain_ratio"] == pytest.approx((10 * 1.0 + 30 * 0.5) / (10 * 1.0 + 30 * 1.0))
    # Prompting that separates nothing leaves the pooled specificity undefined rather than infinite.
    flat = result(10, 2.0, 2.3, 2.0, 2.0, 3.0)
    assert quality_ablation.pooled_ratios([flat])["specificity_ratio"] is None

    def run(seed, split_result):
        return {
            "config": {"contrast_loss_weight": 0.5, "concept_split_seed": seed},
            **{split: {**split_result, "specificity_ratio": seed / 10} for split in quality_ablation.EVALUATION_SETS},
        }

    table = quality_ablation.pooled_summary({"x7": run(7, a), "x13": run(13, b), "y42": {**run(42, a), "config": {}}})
    assert len(table) == 3
    assert table[2].startswith("| x7, x13 | 7 / 13 | 0.581 / 0.625 (0.700) |")

    # Runs that differ in their description or the run they rescore are one variant; more training data is another.
    def variant(seed, **keys):
        base = run(seed, a)
        return {**base, "config": {**base["config"], **keys}}

    extra = {"extra_training_data": ["concept_llama"]}
    table = quality_ablation.pooled_summary(
        {
            "x7": variant(7, description="one"),
            "x13": variant(13, description="two", rescores="x13_trained"),
            "more7": variant(7, **extra),
            "more13": variant(13, **extra),
        }
    )
    assert [row.split(" | ")[0] for row in table[2:]] == ["| x7, x13", "| more7, more13"]


def test_diffmean_vectors_come_from_the_given_training_rows_only(tiny_tokenizer):
    model = _model(tiny_tokenizer, hypernet_type="no_context")
    negatives = [{"input": "Say hi.", "output": "Hello there, friend.", "output_concept": "EEEEE"}] * 2
    vectors = diffmean_vectors(model, tiny_tokenizer, ROWS, negatives, norm=3.0)
    assert sorted(vectors) == sorted({CONCEPT_A, CONCEPT_B})
    for vector in vectors.values():
        assert vector.shape == (32,)
        torch.testing.assert_close(vector.norm(), torch.tensor(3.0))
    assert not torch.allclose(vectors[CONCEPT_A], vectors[CONCEPT_B])
    # Changing a row of concept B moves B's vector and leaves A's unchanged.
    changed = [
        dict(row, output="Totally different words here.") if row["output_concept"] == CONCEPT_B else row
        for row in ROWS
    ]
    again = diffmean_vectors(model, tiny_tokenizer, changed, negatives, norm=3.0)
    torch.testing.assert_close(again[CONCEPT_A], vectors[CONCEPT_A])
    assert not torch.allclose(again[CONCEPT_B], vectors[CONCEPT_B])


def test_concept_vectors_train_and_round_trip(tiny_tokenizer, tmp_path):
    from transformers import TrainingArguments

    model = _model(tiny_tokenizer, hypernet_type="no_context")
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=5,
        per_device_train_batch_size=2,
        learning_rate=0.1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
    )
    vectors = train_concept_vectors(model, tiny_tokenizer, ROWS, args, max_length=96)
    assert sorted(vectors) == sorted({CONCEPT_A, CONCEPT_B})
    assert all(vector.shape == (32,) and vector.norm() > 0 for vector in vectors.values())
    save_concept_vectors(vectors, tmp_path / "vectors", method="vector")
    meta, loaded = load_concept_vectors(tmp_path / "vectors")
    assert meta["method"] == "vector"
    for concept in vectors:
        torch.testing.assert_close(loaded[concept], vectors[concept])
    assert not any(p.requires_grad for p in model.language_model.parameters())
    # The hypernetwork, frozen while the vectors trained, can be trained next.
    assert all(p.requires_grad for p in model.hypernetwork.parameters())


def test_running_center_tracks_training_batches_and_is_frozen_in_eval(tiny_tokenizer, tmp_path):
    model = _model(
        tiny_tokenizer, hypernet_type="no_context", center_pooled_features=True, pooled_feature_momentum=0.5
    )
    _perturb(model)
    center = model.hypernetwork.feature_center
    batch = _batch(tiny_tokenizer, ROWS)
    model.eval()
    before = model(**batch).steering_vectors
    assert center.num_updates.item() == 0 and (center.running_mean == 0).all()
    model.train()
    model(**batch)
    assert center.num_updates.item() == 1 and center.running_mean.abs().sum() > 0
    # The first update is the exact batch mean: the centred features of the batch now average to zero.
    model.eval()
    after = model(**batch).steering_vectors
    assert not torch.allclose(before, after)
    torch.testing.assert_close(model(**batch).steering_vectors, after)  # eval does not move the mean
    model.save_pretrained(tmp_path)
    reloaded = HyperSteerModel.from_pretrained(tmp_path, base_model=model.language_model)
    torch.testing.assert_close(reloaded(**batch).steering_vectors, after)


def test_standardized_features_have_unit_spread_per_coordinate_after_the_first_batch(tiny_tokenizer, tmp_path):
    model = _model(
        tiny_tokenizer,
        hypernet_type="no_context",
        center_pooled_features=True,
        standardize_pooled_features=True,
        pooled_feature_momentum=0.5,
    )
    _perturb(model)
    batch = _batch(tiny_tokenizer, ROWS)
    model.train()
    model(**batch)
    captured = {}
    model.hypernetwork.norm.register_forward_hook(lambda module, inputs, output: captured.update(features=inputs[0]))
    model.eval()
    vectors = model(**batch).steering_vectors
    # The first update is the exact batch mean and variance: every coordinate of this batch is now standardized.
    features = captured["features"]
    torch.testing.assert_close(features.mean(dim=0), torch.zeros(features.shape[-1]), atol=1e-4, rtol=0)
    variance = model.hypernetwork.feature_center.running_variance
    spread = variance / (variance + model.hypernetwork.feature_center.eps)  # 1 up to the epsilon
    assert spread.min() > 0.9
    torch.testing.assert_close(features.pow(2).mean(dim=0), spread, atol=1e-4, rtol=1e-4)
    model.save_pretrained(tmp_path)
    reloaded = HyperSteerModel.from_pretrained(tmp_path, base_model=model.language_model)
    torch.testing.assert_close(reloaded(**batch).steering_vectors, vectors)
    # Centring alone keeps its checkpoint's exact tensors (no variance buffer).
    centring_only = _model(tiny_tokenizer, hypernet_type="no_context", center_pooled_features=True)
    assert not any("running_variance" in name for name in centring_only.state_dict())


def test_standardizing_needs_centring():
    import train_hypersteer

    with pytest.raises(ValueError, match="center_pooled_features=True"):
        HyperSteerConfig(standardize_pooled_features=True)
    # The CLI standardizes by default, so turning centring off there names the second flag to turn off.
    required = [
        "--base_model_name_or_path",
        "smollm2",
        "--dataset_name_or_path",
        "data",
        "--output_dir",
        "/tmp/unused",
    ]
    with pytest.raises(ValueError, match="also pass --standardize_pooled_features False"):
        train_hypersteer.parse_arguments([*required, "--center_pooled_features", "False"])
    model_args, _, _ = train_hypersteer.parse_arguments(
        [*required, "--center_pooled_features", "False", "--standardize_pooled_features", "False"]
    )
    assert not model_args.standardize_pooled_features


def test_residual_prior_reads_the_unsteered_base_at_the_steering_layer(tiny_tokenizer):
    model = _model(tiny_tokenizer, steering_prior="residual", steering_prior_init_norm=4.0)
    model.eval()
    ids = tiny_tokenizer([CONCEPT_A, CONCEPT_B], add_special_tokens=False, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model.language_model(**ids, output_hidden_states=True).hidden_states[model.config.steering_layer + 1]
    mask = ids["attention_mask"][..., None].float()
    expected = (hidden * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(
        model._residual_directions(ids["input_ids"], ids["attention_mask"]), expected, atol=1e-4, rtol=1e-4
    )
    # Read inside a steered forward, the prior pass is not steered and leaves the request's own pass intact.
    batch = _batch(tiny_tokenizer, ROWS)
    vectors = model(**batch).steering_vectors
    torch.testing.assert_close(vectors.norm(dim=-1), torch.full((4,), 4.0), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        model.compute_steering_vectors(
            **{
                k: batch[k]
                for k in ("input_ids", "attention_mask", "labels", "steering_input_ids", "steering_attention_mask")
            }
        ),
        vectors,
    )


def _running_centers(model):
    return [center for center in (model.hypernetwork.feature_center, model.hypernetwork.prior_center) if center]


@pytest.mark.parametrize("hypernet_type, prior", [("no_context", "none"), ("cross_attention", "residual")])
def test_contrast_shares_the_hypernetwork_call_and_updates_the_statistics_once(tiny_tokenizer, hypernet_type, prior):
    model = _model(
        tiny_tokenizer,
        hypernet_type=hypernet_type,
        steering_prior=prior,
        center_pooled_features=True,
        standardize_pooled_features=True,
    )
    _perturb(model)
    batch = _batch(tiny_tokenizer, ROWS)
    # Contrast prompts that are not a permutation of the batch's own (other concepts, other lengths): normalised
    # with statistics of their own, they would not match a separate pass.
    contrast = tokenize_steering_prompts(
        tiny_tokenizer, ["pirate speech", "weather reports and forecasts in the north", "pirate speech", "jazz"], 16
    )
    without_contrast = copy.deepcopy(model)
    model.train()
    outputs = model(
        **batch,
        contrast_steering_input_ids=contrast["steering_input_ids"],
        contrast_steering_attention_mask=contrast["steering_attention_mask"],
    )
    without_contrast.train()
    without_contrast(**batch)
    # One update per training step, from the right prompts only: the statistics of the same step without contrast.
    for center, reference in zip(_running_centers(model), _running_centers(without_contrast), strict=True):
        assert center.num_updates.item() == 1
        for name, buffer in center.named_buffers():
            torch.testing.assert_close(buffer, reference.get_buffer(name), rtol=1e-6, atol=1e-6)
    # Right and wrong vectors were normalised with the same statistics: each equals its own pass on them.
    model.eval()
    separate = model(**{**batch, **contrast})
    torch.testing.assert_close(outputs.contrast_logits, separate.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outputs.logits, model(**batch).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("architecture", ["llama", "gemma2"])
def test_contrast_pass_leaves_the_returned_cache_as_without_it(tiny_tokenizer, architecture):
    model = _model(tiny_tokenizer, architecture, hypernet_type="cross_attention")
    _perturb(model)
    model.eval()
    batch = _batch(tiny_tokenizer, ROWS)
    contrast = {
        "contrast_steering_input_ids": batch["steering_input_ids"].flip(0),
        "contrast_steering_attention_mask": batch["steering_attention_mask"].flip(0),
    }
    with torch.no_grad():
        plain = model(**batch, use_cache=True)
        with_contrast = model(**batch, use_cache=True, **contrast)
    plain_cache, contrast_cache = (getattr(output, _CACHE_FIELD) for output in (plain, with_contrast))
    assert len(contrast_cache.layers) == len(plain_cache.layers) == 4
    for plain_layer, contrast_layer in zip(plain_cache.layers, contrast_cache.layers):
        torch.testing.assert_close(contrast_layer.keys, plain_layer.keys)
        torch.testing.assert_close(contrast_layer.values, plain_layer.values)
    torch.testing.assert_close(with_contrast.logits, plain.logits)


def _gradient_norm(model, batch):
    model.zero_grad()
    model(**batch).loss.backward()
    return torch.cat([p.grad.flatten() for p in model.hypernetwork.parameters() if p.grad is not None]).norm()


@pytest.mark.parametrize("hypernet_type", ["no_context", "cross_attention"])
def test_a_first_batch_of_one_concept_does_not_divide_by_its_zero_variance(tiny_tokenizer, hypernet_type):
    model = _model(
        tiny_tokenizer, hypernet_type=hypernet_type, center_pooled_features=True, standardize_pooled_features=True
    )
    _perturb(model)
    model.train()
    one_concept = _batch(tiny_tokenizer, [{**row, "output_concept": CONCEPT_A} for row in ROWS])
    center = model.hypernetwork.feature_center
    gradient_norm = _gradient_norm(model, one_concept)
    # The batch shows no spread between concepts: the statistics stay as they were (the identity transform here).
    assert center.num_updates.item() == 0
    assert (center.running_variance == 1).all() and (center.running_mean == 0).all()
    model.hypernetwork.feature_center = None
    plain_gradient_norm = _gradient_norm(model, one_concept)
    model.hypernetwork.feature_center = center
    # With the batch's own (zero) variance the gradient was ~1e6 times larger (1 / sqrt(eps), then the norm).
    assert torch.isfinite(gradient_norm) and gradient_norm <= 2 * plain_gradient_norm
    _gradient_norm(model, _batch(tiny_tokenizer, ROWS))
    assert center.num_updates.item() == 1


def test_statistics_are_kept_and_applied_in_float32_in_a_bfloat16_hypernetwork(tiny_tokenizer, tmp_path):
    center = HyperSteerRunningCenter(8, momentum=0.5, scale=True).to(torch.bfloat16)
    assert center.running_mean.dtype == center.running_variance.dtype == torch.float32
    # Features far from zero with a small spread, as residual coordinates often are.
    features = (100 + torch.randn(4, 8)).to(torch.bfloat16)
    center.train()
    output = center(features)
    torch.testing.assert_close(center.running_mean, features.double().mean(0).float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(
        center.running_variance, features.double().var(0, unbiased=False).float(), rtol=1e-5, atol=1e-6
    )
    expected = (features.float() - center.running_mean) * torch.rsqrt(center.running_variance + center.eps)
    assert output.dtype == torch.bfloat16
    assert torch.equal(output, expected.to(torch.bfloat16))

    model = _model(
        tiny_tokenizer,
        hypernet_type="no_context",
        center_pooled_features=True,
        standardize_pooled_features=True,
        hypernet_dtype=torch.bfloat16,
    )
    assert model.hypernetwork.output_projection.weight.dtype == torch.bfloat16
    model.train()
    model(**_batch(tiny_tokenizer, ROWS))
    model.to(torch.bfloat16)
    center = model.hypernetwork.feature_center
    assert center.num_updates.item() == 1
    assert center.running_mean.dtype == center.running_variance.dtype == torch.float32
    # Saved and reloaded into a bfloat16 hypernetwork, the statistics stay float32 and exact.
    model.save_pretrained(tmp_path)
    reloaded = HyperSteerModel.from_pretrained(
        tmp_path, base_model=model.language_model, hypernet_dtype=torch.bfloat16
    )
    assert torch.equal(reloaded.hypernetwork.feature_center.running_variance, center.running_variance)
    # A checkpoint saved before the statistics were kept in float32 holds them in bfloat16: it loads, as float32.
    weights = load_file(tmp_path / "model.safetensors")
    assert weights["hypernetwork.feature_center.running_mean"].dtype == torch.float32
    save_file(
        {key: value.to(torch.bfloat16) if value.is_floating_point() else value for key, value in weights.items()},
        tmp_path / "model.safetensors",
    )
    old = HyperSteerModel.from_pretrained(tmp_path, base_model=model.language_model, hypernet_dtype=torch.bfloat16)
    assert old.hypernetwork.feature_center.running_mean.dtype == torch.float32
    torch.testing.assert_close(old.hypernetwork.feature_center.running_mean, center.running_mean, rtol=1e-2, atol=0)


def _synchronised_statistics_worker(rank, init_file, features, masks, result_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        center = HyperSteerRunningCenter(features.shape[-1], momentum=0.5, scale=True).train()
        for step in range(features.shape[0]):
            center(features[step, rank], masks[step, rank])
        save_file(dict(center.state_dict()), f"{result_dir}/rank{rank}.safetensors")
    finally:
        torch.distributed.destroy_process_group()


def test_statistics_are_reduced_over_processes(tmp_path):
    # Three steps on two processes, 3 rows each; at the second step rank 1's rows do not count (one concept).
    features = torch.randn(3, 2, 3, 6) * 4 + 10
    masks = torch.ones(3, 2, 3, dtype=torch.bool)
    masks[1, 1] = False
    torch.multiprocessing.spawn(
        _synchronised_statistics_worker,
        args=(str(tmp_path / "init"), features, masks, str(tmp_path)),
        nprocs=2,
        join=True,
    )
    ranks = [load_file(tmp_path / f"rank{rank}.safetensors") for rank in range(2)]
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
    # Equal to one process seeing the global batch.
    reference = HyperSteerRunningCenter(6, momentum=0.5, scale=True).train()
    for step in range(3):
        reference(features[step].reshape(6, 6), masks[step].reshape(6))
    for name, buffer in reference.state_dict().items():
        torch.testing.assert_close(ranks[0][name], buffer, rtol=1e-6, atol=1e-6)
    assert ranks[0]["num_updates"].item() == 3


def test_vector_regression_probe_fits_the_map_and_scores_retrieval():
    import sys

    sys.path.insert(0, str(REPO_ROOT / "benchmarks" / "quality"))
    import probe_vector_regression as probe

    torch.manual_seed(0)
    features = torch.nn.functional.normalize(torch.randn(20, 8), dim=-1)
    mapping = torch.randn(8, 5)
    targets = features @ mapping
    queries = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    # With more training concepts than feature dimensions and almost no penalty, a linear map is recovered exactly.
    torch.testing.assert_close(
        probe.kernel_ridge(features, targets, queries, 1e-6), queries @ mapping, atol=1e-3, rtol=0
    )
    # A heavy penalty shrinks the predictions toward zero.
    assert probe.kernel_ridge(features, targets, queries, 1e4).abs().max() < 0.01
    cosines = probe.centred_cosines(queries @ mapping, queries @ mapping, torch.zeros(5))
    scores = probe.summary(cosines)
    assert scores["own_cosine"] == pytest.approx(1.0) and scores["retrieval_accuracy"] == 1.0
    shuffled = probe.summary(cosines[torch.tensor([1, 0, 3, 2, 5, 4])])
    assert shuffled["retrieval_accuracy"] == 0.0 and shuffled["own_cosine"] < 1.0


def test_cosine_to_text_probe_sets_the_cosine_and_reads_the_curves():
    import sys

    sys.path.insert(0, str(REPO_ROOT / "benchmarks" / "quality"))
    import probe_cosine_to_text as probe

    torch.manual_seed(0)
    own = torch.nn.functional.normalize(torch.randn(4, 16), dim=-1)
    others = [torch.nn.functional.normalize(torch.randn(5, 16), dim=-1) for _ in range(4)]
    error = probe.error_directions(own, others)
    torch.testing.assert_close((error * own).sum(-1), torch.zeros(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(error.norm(dim=-1), torch.ones(4))
    # The error lies in the span of the other concepts' vectors (and the own one, removed from it).
    for index in range(4):
        basis = torch.cat([others[index], own[index : index + 1]])
        coefficients = torch.linalg.lstsq(basis.T, error[index][:, None]).solution
        torch.testing.assert_close((basis.T @ coefficients)[:, 0], error[index], atol=1e-5, rtol=0)
    for cosine in (0.0, 0.3, 1.0):
        directions = probe.vectors_at_cosine(own, error, cosine)
        torch.testing.assert_close(directions.norm(dim=-1), torch.ones(4))
        torch.testing.assert_close((directions * own).sum(-1), torch.full((4,), cosine), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="1.5"):
        probe.vectors_at_cosine(own, error, 1.5)

    levels = [{"cosine": 0.0, "gain": 0.0}, {"cosine": 0.5, "gain": 0.1}, {"cosine": 1.0, "gain": 0.5}]
    assert probe.cosine_for_share(levels, prompt_gain=0.2, share=0.5) == pytest.approx(0.5)
    assert probe.cosine_for_share(levels, prompt_gain=0.2, share=1.0) == pytest.approx(0.625)
    assert probe.cosine_for_share(levels, prompt_gain=0.2, share=3.0) is None
    # Per factor, for both target shares (0.5x and 1x prompting's gain).
    at_two_factors = [{**level, "factor": 3.0} for level in levels] + [
        {"cosine": 0.0, "gain": 0.0, "factor": 4.0},
        {"cosine": 1.0, "gain": 0.2, "factor": 4.0},
    ]
    assert probe.cosines_for_target_shares(at_two_factors, prompt_gain=0.2) == {
        3.0: {0.5: pytest.approx(0.5), 1.0: pytest.approx(0.625)},
        4.0: {0.5: pytest.approx(0.5), 1.0: 1.0},
    }
    # 0.1 per doubling from 0.1 at 16 concepts: 0.4 is three doublings on. Pooled sizes ("56+43") are not fitted.
    fit = probe.concepts_for_cosine({"16": [0.1, 0.0], "32": [0.2, 0.0], "64": [0.3, 0.0], "56+43": [0.9, 0.0]}, 0.4)
    assert fit["cosine_per_doubling"] == pytest.approx(0.1) and fit["concepts_needed"] == 128
    assert probe.concepts_for_cosine({"16": [0.2, 0.0], "32": [0.1, 0.0]}, 0.4)["concepts_needed"] is None
    with pytest.raises(ValueError, match="two or more"):
        probe.concepts_for_cosine({"16": [0.2, 0.0]}, 0.4)

    def row(accuracy, samples, **extra):
        scores = {"detector_accuracy": accuracy, "wrong_concept_accuracy": 0.0, "nll": 1.0, "distinct_bigrams": 0.9}
        return {**scores, "num_samples": samples, **extra}

    def run(prompt, level, samples):
        return {
            "none": row(0.0, samples, method="none"),
            "prompt": row(prompt, samples, method="prompt"),
            "levels": [row(level, samples, method="vector", factor=4.0, cosine=0.5)],
            "answers_per_condition": samples,
        }

    # Pooled by answer count: 0.3 of 100 and 0.0 of 300 answers is 0.075 of 400.
    pooled = probe.pooled_rows([run(0.2, 0.3, 100), run(0.1, 0.0, 300)])
    assert pooled["answers_per_condition"] == 400 and pooled["prompt"]["detector_accuracy"] == pytest.approx(0.125)
    assert pooled["levels"][0]["detector_accuracy"] == pytest.approx(0.075)
    assert pooled["levels"][0]["gain"] == pytest.approx(0.075) and pooled["levels"][0]["num_samples"] == 400
    unmatched = run(0.1, 0.0, 300)
    unmatched["levels"][0]["cosine"] = 0.75
    with pytest.raises(ValueError, match="every run"):
        probe.pooled_rows([run(0.2, 0.3, 100), unmatched])


def test_training_free_direction_probe_reads_the_prior_and_weights_rare_words(tiny_tokenizer):
    import sys

    sys.path.insert(0, str(REPO_ROOT / "benchmarks" / "quality"))
    import probe_training_free_directions as probe

    model = _model(tiny_tokenizer, hypernet_type="no_context", steering_prior="lexical", steering_prior_init_norm=8.0)
    vocab_size = model.get_output_embeddings().weight.shape[0]
    # Uniform weights give exactly the lexical prior's u(s) (the model's vectors at the start, divided by the norm).
    uniform = probe.weighted_lexical_directions(model, [CONCEPT_A, CONCEPT_B], torch.ones(vocab_size))
    vectors = model.compute_steering_vectors(steering_prompt=[CONCEPT_A, CONCEPT_B]).float()
    torch.testing.assert_close(uniform, vectors / 8.0, atol=1e-4, rtol=1e-4)

    descriptions = ["terms related to cats", "terms related to ships", "terms related to law"]
    idf = probe.idf_token_weights(tiny_tokenizer, descriptions, vocab_size)
    shared = tiny_tokenizer(" related", add_special_tokens=False)["input_ids"][0]
    rare = tiny_tokenizer(" cats", add_special_tokens=False)["input_ids"][0]
    assert idf[shared] == pytest.approx(0.0) and idf[rare] > idf[shared]
    # Tokens every description shares drop out: "terms related to cats" points where " cats" alone does.
    with_prefix, alone = probe.weighted_lexical_directions(model, ["terms related to cats", " cats"], idf)
    torch.testing.assert_close(with_prefix, alone, atol=1e-5, rtol=1e-5)
    uniform = probe.weighted_lexical_directions(model, ["terms related to cats", " cats"], torch.ones(vocab_size))
    assert (uniform[0] @ uniform[1]).item() < 0.99

    # Own-centred cosines: a direction set that is the targets up to a shared offset and scale scores 1 with itself.
    targets = torch.randn(5, 32)
    cosines = probe.own_centred_cosines(3 * targets + 7, targets, heldin=[0, 1, 2, 3, 4], rows=[0, 1, 2, 3, 4])
    torch.testing.assert_close(cosines.diagonal(), torch.ones(5), atol=1e-5, rtol=0)

    # Self-written DiffMean: each concept's mean residual over its own text, centred on the held-in concepts' mean.
    rows = [
        {"input": "Describe a cat.", "output": text, "output_concept": concept}
        for concept, texts in ((CONCEPT_A, ["cats purr", "a cat naps"]), (CONCEPT_B, ["ships sail", "a ship docks"]))
        for text in texts
    ]
    directions = probe.self_written_directions(model, [CONCEPT_A, CONCEPT_B], [0, 1], rows)
    torch.testing.assert_close(directions.sum(0), torch.zeros(directions.shape[-1]), atol=1e-4, rtol=0)
    own_mean = mean_response_residual(model, tiny_tokenizer, rows[:2])
    torch.testing.assert_close(
        directions[0], own_mean - (own_mean + mean_response_residual(model, tiny_tokenizer, rows[2:])) / 2
    )

    # The self-written texts of the vector probe: `rows_per_concept` per concept, cycling over the requested kinds.
    import argparse

    import probe_self_written_vectors

    settings = argparse.Namespace(templates=2, rows_per_concept=3, max_new_tokens=4, temperature=1.0, seed=0)
    side, model.tokenizer.padding_side = model.tokenizer.padding_side, "right"
    try:
        samples = probe_self_written_vectors.self_written_samples(model, [CONCEPT_A, CONCEPT_B], settings)
        assert model.tokenizer.padding_side == "right"  # generation pads on the left, then the caller's side is back
    finally:
        model.tokenizer.padding_side = side
    assert sorted(samples) == sorted([CONCEPT_A, CONCEPT_B]) and all(len(texts) == 3 for texts in samples.values())


def test_description_map_probe_standardizes_features_and_reads_the_about_prompt(tiny_tokenizer):
    import argparse
    import sys

    sys.path.insert(0, str(REPO_ROOT / "benchmarks" / "quality"))
    import probe_description_map as probe

    from modeling_hypersteer.concept_data import ABOUT_PROMPT_TEMPLATES
    from modeling_hypersteer.data import format_prompt

    # One coordinate 1000 times larger than the rest: as they are, the normalised features are that coordinate;
    # standardised over the held-in rows, the other coordinates count again.
    torch.manual_seed(0)
    values = torch.randn(6, 4)
    values[:, 0] *= 1000.0
    plain = probe.unit_features(values, 4, argparse.Namespace(standardize_features=False))
    scaled = probe.unit_features(values, 4, argparse.Namespace(standardize_features=True))
    torch.testing.assert_close(plain.norm(dim=-1), torch.ones(6))
    assert plain[:, 0].abs().min() > 0.99 and scaled[:, 0].abs().max() < 0.99
    standardized = (values - values[:4].mean(0)) / values[:4].std(0)
    torch.testing.assert_close(scaled, torch.nn.functional.normalize(standardized, dim=-1), atol=1e-5, rtol=1e-4)

    model = _model(tiny_tokenizer, hypernet_type="no_context")
    side, model.tokenizer.padding_side = model.tokenizer.padding_side, "right"
    try:
        states = probe.about_prompt_states(model, [CONCEPT_A, "cats"], layers=[1, 2])
        assert model.tokenizer.padding_side == "right"
    finally:
        model.tokenizer.padding_side = side
    assert sorted(states) == [1, 2] and states[1].shape == (2, model.config.hidden_size)
    # Batched with left padding, each description's state is its own prompt's last tokens, read alone.
    alone = tiny_tokenizer(
        format_prompt(tiny_tokenizer, ABOUT_PROMPT_TEMPLATES[0].format(concept="cats")),
        return_tensors="pt",
        add_special_tokens=False,
    )
    with torch.no_grad():
        hidden = model.language_model(**alone, output_hidden_states=True).hidden_states[2]
    torch.testing.assert_close(
        states[2][1], hidden[0, -probe.ABOUT_TAIL_TOKENS :].mean(0).float(), atol=1e-4, rtol=1e-4
    )


def test_prompt_plus_steering_adds_each_concepts_vector_to_its_prompt_and_pools_runs(tiny_tokenizer, tmp_path):
    import sys

    sys.path.insert(0, str(REPO_ROOT / "benchmarks" / "quality"))
    import prompt_plus_steering as probe

    concepts, instructions = [CONCEPT_A, CONCEPT_B, "cats"], ["Say hi.", "Name a colour."]
    jobs = probe.steering_jobs(concepts, instructions, [0.5, 1.0])
    by_method = {method: [job for job in jobs if job["method"] == method] for method in probe.CONDITIONS}
    assert [len(by_method[method]) for method in probe.CONDITIONS] == [6, 6, 12, 12]
    assert not any(job["prompted"] or job["steering_prompt"] for job in by_method["none"])
    assert all(job["prompted"] and job["steering_prompt"] is None for job in by_method["prompt"])
    assert all(job["steering_prompt"] == job["concept"] for job in by_method["prompt_hypersteer"])
    # The control keeps the prompt's concept and takes another concept's vector, a different one for each concept.
    wrong = {job["concept"]: job["steering_prompt"] for job in by_method["prompt_wrong_vector"]}
    assert all(vector != concept for concept, vector in wrong.items()) and sorted(wrong.values()) == sorted(concepts)

    model = _model(tiny_tokenizer, hypernet_type="no_context")
    cache = tmp_path / "answers.jsonl"
    answers = probe.generate_jobs(model, jobs, max_new_tokens=2, batch_size=4, cache_path=cache)
    assert [answer["method"] for answer in answers] == [job["method"] for job in jobs]
    assert all(isinstance(answer["generation"], str) for answer in answers)
    assert CONCEPT_A in probe.job_prompt(tiny_tokenizer, by_method["prompt"][0])
    assert CONCEPT_A not in probe.job_prompt(tiny_tokenizer, by_method["none"][0])
    # The unsteered answers do not depend on the concept: one per instruction; every other job is its own answer.
    assert len(cache.read_text().splitlines()) == 2 + 6 + 12 + 12
    again = probe.generate_jobs(model, jobs, max_new_tokens=2, batch_size=4, cache_path=cache)
    assert again == answers and len(cache.read_text().splitlines()) == 32

    def row(method, factor, accuracy, count):
        fields = ("detector_probability", "wrong_concept_accuracy", "nll", "distinct_bigrams")
        return {
            "method": method,
            "factor": factor,
            "detector_accuracy": accuracy,
            "num_samples": count,
        } | dict.fromkeys(fields, 0.5)

    pooled = probe.pooled_rows(
        [
            [row("none", 0.0, 0.0, 10), row("prompt", 0.0, 0.2, 10), row("prompt_hypersteer", 0.5, 0.4, 10)],
            [row("none", 0.0, 0.1, 30), row("prompt", 0.0, 0.1, 30), row("prompt_hypersteer", 0.5, 0.3, 30)],
        ]
    )
    by_condition = {entry["method"]: entry for entry in pooled}
    assert by_condition["prompt_hypersteer"]["detected"] == 13 and by_condition["prompt"]["detected"] == 5
    # Gain over the unsteered 3 of 40: prompting 2, the vector on the prompt 10.
    assert by_condition["prompt_hypersteer"]["gain_ratio"] == pytest.approx(5.0)
    assert by_condition["none"]["gain_ratio"] == pytest.approx(0.0)

    # Runs of an earlier row are pooled as recorded, each with every condition of the new call.
    first = [row("none", 0.0, 0.0, 10), row("prompt", 0.0, 0.2, 10), row("prompt_hypersteer", 0.5, 0.4, 10)]
    results = {"runs": {"earlier": {"command": "...", "/runs/a": {"heldout": first}, "pooled": {"heldout": first}}}}
    conditions = {("none", 0.0), ("prompt", 0.0), ("prompt_hypersteer", 0.5)}
    assert probe.recorded_run_rows(results, ["earlier"], ["heldout"], conditions) == {"/runs/a": {"heldout": first}}
    with pytest.raises(ValueError, match="'later' is not a recorded row"):
        probe.recorded_run_rows(results, ["later"], ["heldout"], conditions)
    with pytest.raises(ValueError, match=r"no heldout rows for \[\('prompt_hypersteer', 1.0\)\]"):
        probe.recorded_run_rows(results, ["earlier"], ["heldout"], conditions | {("prompt_hypersteer", 1.0)})
    with pytest.raises(ValueError, match="no heldback rows"):
        probe.recorded_run_rows(results, ["earlier"], ["heldout", "heldback"], conditions)

    # Pooling recorded rows alone (no new run) keeps their runs' rows in the new row, so it can be pooled in turn.
    recorded = [*first, row("prompt_wrong_vector", 0.5, 0.1, 10)]
    results["runs"]["earlier"]["/runs/a"]["heldout"] = recorded
    results["runs"]["other"] = {"command": "...", "/runs/b": {"heldout": recorded}, "pooled": {}}
    results_path = tmp_path / "prompt_plus_steering.json"
    results_path.write_text(json.dumps(results))
    original_path, probe.RESULTS_PATH = probe.RESULTS_PATH, results_path
    try:
        flags = ["--factors", "0.5", "--concept_sets", "heldout", "--run_dirs", ""]
        both = probe.main([*flags, "--name", "both", "--pool_with", "earlier,other"])
        assert both["pooled_runs"] == ["/runs/a", "/runs/b"] and both["/runs/b"] == {"heldout": recorded}
        again = probe.main([*flags, "--name", "again", "--pool_with", "both"])
        assert again["pooled"] == both["pooled"]
        by_condition = {entry["method"]: entry for entry in again["pooled"]["heldout"]}
        assert by_condition["prompt_hypersteer"]["detected"] == 8 and by_condition["prompt"]["detected"] == 4
        with pytest.raises(SystemExit):
            probe.main([*flags, "--name", "nothing"])
    finally:
        probe.RESULTS_PATH = original_path
    assert set(json.loads(results_path.read_text())["runs"]) == {"earlier", "other", "both", "again"}


def test_ablation_results_file_keeps_other_runs_when_one_is_recorded(tmp_path):
    import sys

    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    import quality_ablation

    path = tmp_path / "results" / "runs.json"
    quality_ablation.record_run(path, "first", {"value": 1})
    quality_ablation.record_run(path, "second", {"value": 2}, machine={"cores": 2})
    quality_ablation.record_run(path, "first", {"value": 3})
    results = json.loads(path.read_text())
    assert results == {"runs": {"first": {"value": 3}, "second": {"value": 2}}, "machine": {"cores": 2}}
