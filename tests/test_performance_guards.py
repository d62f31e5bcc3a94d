"""Correctness guards of HyperSteer's performance design (tiny models, no timing).

Each optimised path must give what the straightforward scheme gives, and must not secretly do the work it saves:
steered generation equals base generation with an additive hook of the same `v` and runs no extra base pass, `v`
is computed once per request, and a training step runs one base pass whose loss and gradients equal the published
three-pass scheme's. The reference schemes are the ones `benchmarks/run.py` times (`benchmarks/schemes.py`).
"""

import sys

import pytest
import torch
from conftest import REPO_ROOT, build_tiny_base

from modeling_hypersteer import HyperSteerModel
from modeling_hypersteer.modeling_hypersteer import tokenize_steering_prompts


sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
from schemes import (  # noqa: E402
    additive_steering,
    call_counter,
    hypersteer_step,
    naive_steering_vectors,
    three_pass_step,
    two_pass_generate,
)


VARIANTS = ("cross_attention", "in_context", "no_context")
STEERING_PROMPTS = ["references to legal terminology", "C/C++ syntax"]
NEW_TOKENS = 6


def _model(tokenizer, architecture="gemma2", hypernet_type="cross_attention", steering_layer=2, **config_kwargs):
    base = build_tiny_base(architecture, len(tokenizer))
    model = HyperSteerModel.from_base_model(
        base,
        tokenizer=tokenizer,
        steering_layer=steering_layer,
        hypernet_type=hypernet_type,
        hypernet_num_layers=2,
        **config_kwargs,
    )
    with torch.no_grad():
        # Untrained models steer by exactly zero; a non-zero head makes every check below non-trivial.
        model.hypernetwork.output_projection.weight.normal_(0.0, 0.5)
    return model.eval()


def _prompts(tokenizer):
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
        for text in ("Explain sorting.", "Hi")
    ]
    return tokenizer(texts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")


def _steering(tokenizer):
    return tokenize_steering_prompts(tokenizer, STEERING_PROMPTS, 64)


def _training_batch(tokenizer):
    """Two right-padded prompt + response rows, labels on the response only."""
    prompts = _prompts(tokenizer)
    input_ids = torch.cat([prompts["input_ids"], torch.randint(10, len(tokenizer), (2, 5))], dim=1)
    attention_mask = torch.cat([prompts["attention_mask"], torch.ones(2, 5, dtype=torch.long)], dim=1)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, : prompts["input_ids"].shape[1]] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, **_steering(tokenizer)}


def _greedy_kwargs(tokenizer):
    return {
        "max_new_tokens": NEW_TOKENS,
        "min_new_tokens": NEW_TOKENS,
        "do_sample": False,
        "pad_token_id": tokenizer.pad_token_id,
    }


@pytest.mark.parametrize("architecture", ("gemma2", "llama"))
@pytest.mark.parametrize("hypernet_type", VARIANTS)
def test_steered_generation_equals_two_pass_and_adds_only_one_hypernet_pass(
    tiny_tokenizer, architecture, hypernet_type
):
    model = _model(tiny_tokenizer, architecture, hypernet_type)
    inputs, steering, kwargs = _prompts(tiny_tokenizer), _steering(tiny_tokenizer), _greedy_kwargs(tiny_tokenizer)
    body, first_layer = model.language_model.model, model.language_model.model.layers[0]
    with call_counter(body, first_layer) as unsteered_calls:
        unsteered = model.language_model.generate(**inputs, **kwargs)

    vectors = []
    handle = model.hypernetwork.register_forward_hook(lambda module, args, output: vectors.append(output))
    try:
        with call_counter(body, first_layer) as steered_calls:
            steered = model.generate(**inputs, **steering, **kwargs)
    finally:
        handle.remove()

    assert len(vectors) == 1, (
        f"the hypernetwork ran {len(vectors)} times in one generate call; v must be computed once"
    )
    assert steered_calls == unsteered_calls == [NEW_TOKENS, NEW_TOKENS], (
        f"steered generate ran the base body/layer 0 {steered_calls} times, unsteered {unsteered_calls}: "
        "steering must not add a base pass"
    )
    assert not torch.equal(steered, unsteered), "steering changed nothing: the guard below would be vacuous"
    reference, _ = two_pass_generate(
        model, inputs["input_ids"], inputs["attention_mask"], vectors=vectors[0], **steering, **kwargs
    )
    assert torch.equal(steered, reference), "steered tokens differ from base generation + additive hook of the same v"
    naive = naive_steering_vectors(model, inputs["input_ids"], inputs["attention_mask"], **steering)
    torch.testing.assert_close(vectors[0], naive, rtol=1e-4, atol=1e-5)


def test_no_context_vectors_need_no_base_pass(tiny_tokenizer):
    model = _model(tiny_tokenizer, hypernet_type="no_context")
    with call_counter(model.language_model.model.layers[0], model.hypernetwork) as calls:
        vectors = model.compute_steering_vectors(**_steering(tiny_tokenizer))
    assert calls == [0, 1]
    inputs = _prompts(tiny_tokenizer)
    naive = naive_steering_vectors(model, inputs["input_ids"], inputs["attention_mask"], **_steering(tiny_tokenizer))
    torch.testing.assert_close(vectors, naive, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("hypernet_type", ("cross_attention", "in_context"))
def test_compute_steering_vectors_stops_at_the_steering_layer(tiny_tokenizer, hypernet_type):
    model = _model(tiny_tokenizer, hypernet_type=hypernet_type, steering_layer=1)
    layers = model.language_model.model.layers
    inputs, steering = _prompts(tiny_tokenizer), _steering(tiny_tokenizer)
    with call_counter(layers[1], layers[2], model.language_model.lm_head) as calls:
        vectors = model.compute_steering_vectors(**inputs, **steering)
    assert calls == [1, 0, 0], f"layer L, layer L+1 and the LM head ran {calls} times; the pass must stop at L"
    naive = naive_steering_vectors(model, inputs["input_ids"], inputs["attention_mask"], **steering)
    torch.testing.assert_close(vectors, naive, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("architecture", ("gemma2", "llama"))
@pytest.mark.parametrize("hypernet_type", VARIANTS)
def test_training_step_is_one_base_pass_equal_to_the_three_pass_scheme(tiny_tokenizer, architecture, hypernet_type):
    model = _model(tiny_tokenizer, architecture, hypernet_type).train()
    batch = _training_batch(tiny_tokenizer)
    body, first_layer = model.language_model.model, model.language_model.model.layers[0]
    with call_counter(body, first_layer, model.hypernetwork) as calls:
        loss = hypersteer_step(model, batch)
    assert calls == [1, 1, 1], f"one training step ran the base body, layer 0 and the hypernetwork {calls} times"
    grads = {name: parameter.grad.clone() for name, parameter in model.hypernetwork.named_parameters()}
    model.zero_grad(set_to_none=True)

    three_pass_loss, reference_loss = three_pass_step(model, batch)
    torch.testing.assert_close(loss, three_pass_loss, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(loss, reference_loss), "steering did not change the loss: the guard would be vacuous"
    for name, parameter in model.hypernetwork.named_parameters():
        torch.testing.assert_close(
            parameter.grad, grads[name], rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}"
        )


def test_additive_reference_hook_equals_the_model_for_the_same_vectors(tiny_tokenizer):
    """The benchmark's reference hook and the model's own hook add `v` the same way (bit-identical logits)."""
    model = _model(tiny_tokenizer)
    batch = _training_batch(tiny_tokenizer)
    with torch.no_grad():
        outputs = model(**batch)
        with additive_steering(model.language_model.model.layers[2], outputs.steering_vectors):
            reference = model.language_model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                position_ids=(batch["attention_mask"].cumsum(-1) - 1).clamp(min=0),
            )
    assert torch.equal(outputs.logits, reference.logits)


def test_activation_checkpointing_recomputes_the_base_layers_above_the_steering_layer(tiny_tokenizer):
    """Checkpointing must reach the frozen base's layers above the steering layer (transformers checkpoints a layer
    only while it is in training mode), and layers below it, which hold no graph, must never be recomputed."""
    model = _model(tiny_tokenizer, steering_layer=1).train()
    model.activation_checkpointing_enable()
    layers = model.language_model.model.layers
    # Counted on the first sublayer: checkpointing re-runs the layer's `forward`, not its `__call__`.
    with call_counter(layers[0].input_layernorm, layers[2].input_layernorm) as calls:
        hypersteer_step(model, _training_batch(tiny_tokenizer))
    assert calls[0] == 1, "a layer below the steering layer was recomputed: it should hold no graph at all"
    assert calls[1] == 2, f"base layer 2 (above the steering layer) ran {calls[1]} time(s): it was not checkpointed"
