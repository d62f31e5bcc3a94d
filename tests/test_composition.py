"""Multi-concept composition: `steering_prompt=[["a", "b"], ...]`, `steering_factor=[[1.0, 0.5], ...]` (tiny models)."""

import pytest
import torch
from test_modeling_hypersteer import VARIANTS, HyperSteerModelTester


CONCEPTS = ["references to legal terminology", "C/C++ syntax", "mathematical equations"]


@pytest.fixture
def tester(tiny_tokenizer):
    return HyperSteerModelTester(tiny_tokenizer)


def _row(inputs, row):
    return {key: value[row : row + 1] for key, value in inputs.items()}


@pytest.mark.parametrize("hypernet_type", VARIANTS)
def test_composition_is_the_factor_weighted_sum_of_single_concept_vectors(tester, hypernet_type):
    model = tester.get_model(hypernet_type=hypernet_type)
    inputs = tester.prompts()
    prompts = [[CONCEPTS[0], CONCEPTS[1]], [CONCEPTS[2]]]
    factors = [[1.0, 0.5], [-0.7]]

    # Manual: each concept on its own row's context, one concept at a time, then the weighted sum.
    manual = []
    for row, (row_prompts, row_factors) in enumerate(zip(prompts, factors)):
        vectors = [model.compute_steering_vectors(**_row(inputs, row), steering_prompt=[p])[0] for p in row_prompts]
        manual.append(sum(factor * vector for factor, vector in zip(row_factors, vectors)))
    manual = torch.stack(manual)
    assert manual.abs().max() > 0.1  # the vectors are not trivially zero

    composed = model.compute_steering_vectors(**inputs, steering_prompt=prompts, steering_factor=factors)
    torch.testing.assert_close(composed, manual, atol=1e-5, rtol=1e-5)
    if hypernet_type == "no_context":
        no_base_pass = model.compute_steering_vectors(steering_prompt=prompts, steering_factor=factors)
        torch.testing.assert_close(no_base_pass, manual, atol=1e-5, rtol=1e-5)

    # The steered forward adds exactly that per-row vector (factors folded in, so the row factor is 1).
    steered = model(**inputs, steering_prompt=prompts, steering_factor=factors)
    torch.testing.assert_close(steered.steering_vectors, manual, atol=1e-5, rtol=1e-5)
    reference = model(**inputs, steering_vectors=manual, steering_factor=1.0)
    torch.testing.assert_close(steered.logits, reference.logits, atol=1e-4, rtol=1e-4)

    generated = model.generate(
        **inputs, steering_prompt=prompts, steering_factor=factors, max_new_tokens=8, do_sample=False
    )
    expected = model.generate(
        **inputs, steering_vectors=manual, steering_factor=1.0, max_new_tokens=8, do_sample=False
    )
    assert generated.tolist() == expected.tolist()
    unsteered = model.language_model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert generated.tolist() != unsteered.tolist()


@pytest.mark.parametrize(
    "hypernet_type,config_kwargs",
    [
        ("cross_attention", {}),
        ("in_context", {"steering_positions": "generated"}),
        ("no_context", {"token_gate": True}),
        ("cross_attention", {"token_gate": True, "steering_positions": "prompt"}),
    ],
)
def test_single_concept_in_list_form_equals_the_plain_form(tester, hypernet_type, config_kwargs):
    model = tester.get_model(hypernet_type=hypernet_type, **config_kwargs)
    if model.hypernetwork.token_gate is not None:
        with torch.no_grad():
            model.hypernetwork.token_gate.proj.weight.normal_(0.0, 1.0)
    inputs = tester.prompts()
    plain = model(**inputs, steering_prompt=CONCEPTS[:2], steering_factor=[1.5, -0.5])
    listed = model(**inputs, steering_prompt=[[CONCEPTS[0]], [CONCEPTS[1]]], steering_factor=[[1.5], [-0.5]])
    torch.testing.assert_close(listed.logits, plain.logits, atol=0, rtol=0)
    if plain.steering_gates is not None:
        torch.testing.assert_close(listed.steering_gates, plain.steering_gates, atol=0, rtol=0)
    kwargs = {"max_new_tokens": 8, "do_sample": False}
    assert (
        model.generate(
            **inputs, steering_prompt=[[CONCEPTS[0]], [CONCEPTS[1]]], steering_factor=[[1.5], [-0.5]], **kwargs
        ).tolist()
        == model.generate(**inputs, steering_prompt=CONCEPTS[:2], steering_factor=[1.5, -0.5], **kwargs).tolist()
    )


def test_an_empty_concept_list_leaves_its_row_unsteered(tester):
    model = tester.get_model()
    inputs = tester.prompts()
    kwargs = {"max_new_tokens": 8, "do_sample": False}
    base = model.language_model.generate(**inputs, **kwargs)
    mixed = model.generate(
        **inputs, steering_prompt=[[CONCEPTS[0], CONCEPTS[1]], []], steering_factor=[[1.0, 1.0], []], **kwargs
    )
    assert mixed[1].tolist() == base[1].tolist()
    assert mixed[0].tolist() != base[0].tolist()
    assert model.generate(**inputs, steering_prompt=[[], []], **kwargs).tolist() == base.tolist()


def test_composition_follows_beam_search_expansion(tester):
    model = tester.get_model()
    inputs = tester.prompts()
    prompts, factors = [[CONCEPTS[0], CONCEPTS[1]], [CONCEPTS[2]]], [[1.0, 0.5], [0.8]]
    manual = model.compute_steering_vectors(**inputs, steering_prompt=prompts, steering_factor=factors)
    kwargs = {"max_new_tokens": 6, "do_sample": False, "num_beams": 3, "num_return_sequences": 2}
    composed = model.generate(**inputs, steering_prompt=prompts, steering_factor=factors, **kwargs)
    expected = model.generate(**inputs, steering_vectors=manual, steering_factor=1.0, **kwargs)
    assert composed.shape[0] == 4
    assert composed.tolist() == expected.tolist()


@pytest.mark.parametrize(
    "prompts,factors,message",
    [
        ([[CONCEPTS[0]]], None, "2 input rows"),
        ([[CONCEPTS[0]], CONCEPTS[1]], None, "row 1"),
        ([[CONCEPTS[0]], [CONCEPTS[1]]], [1.0, 0.5], "one list of factors per row"),
        ([[CONCEPTS[0]], [CONCEPTS[1]]], [[1.0, 0.5], [1.0]], "one factor per concept"),
        ([[CONCEPTS[0]], [CONCEPTS[1]]], [[float("nan")], [1.0]], "finite"),
        ([[CONCEPTS[0]], ["  "]], None, "non-empty"),
    ],
)
def test_composition_rejects_malformed_inputs(tester, prompts, factors, message):
    model = tester.get_model()
    with pytest.raises(ValueError, match=message):
        model.generate(**tester.prompts(), steering_prompt=prompts, steering_factor=factors, max_new_tokens=2)
