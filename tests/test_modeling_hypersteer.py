"""Tests of HyperSteerModel on tiny random bases of every supported architecture (offline, CPU, deterministic)."""

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import BLOCK_PACKAGE_PREAMBLE, TINY_ARCHITECTURES, build_tiny_base
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from modeling_hypersteer import HyperSteerModel
from modeling_hypersteer.modeling_hypersteer import _CACHE_FIELD, tokenize_steering_prompts


VARIANTS = ("cross_attention", "in_context", "no_context")
STEERING_PROMPTS = ["references to legal terminology", "C/C++ syntax"]


class HyperSteerModelTester:
    """Builds tiny HyperSteer models and inputs (defaults follow transformers' CausalLMModelTester where they fit)."""

    steering_layer = 2
    hypernet_num_layers = 2

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def get_model(self, architecture="llama", hypernet_type="cross_attention", active=True, **config_kwargs):
        base = build_tiny_base(architecture, len(self.tokenizer))
        config_kwargs.setdefault("steering_layer", self.steering_layer)
        config_kwargs.setdefault("hypernet_num_layers", self.hypernet_num_layers)
        model = HyperSteerModel.from_base_model(
            base, tokenizer=self.tokenizer, hypernet_type=hypernet_type, **config_kwargs
        )
        if active:
            # An untrained model steers by exactly zero; a non-zero head makes steering visible in tests.
            with torch.no_grad():
                model.hypernetwork.output_projection.weight.normal_(0.0, 0.5)
        return model

    def prompts(self, padding_side="left", instructions=("Explain sorting.", "Hi")):
        texts = [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
            )
            for text in instructions
        ]
        return self.tokenizer(
            texts, add_special_tokens=False, padding=True, padding_side=padding_side, return_tensors="pt"
        )

    def training_batch(self, responses=("Sort by comparing pairs.", "Hello there."), padding_side="right"):
        """Prompt + response rows with labels on the response tokens (+EOS) only."""
        rows = []
        for instruction, response in zip(("Explain sorting.", "Hi"), responses):
            prompt = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": instruction}], add_generation_prompt=True, tokenize=False
            )
            prompt_ids = self.tokenizer(prompt, add_special_tokens=False).input_ids
            response_ids = self.tokenizer(response, add_special_tokens=False).input_ids + [self.tokenizer.eos_token_id]
            rows.append((prompt_ids + response_ids, [-100] * len(prompt_ids) + response_ids))
        length = max(len(ids) for ids, _ in rows)
        input_ids, attention_mask, labels = [], [], []
        for ids, row_labels in rows:
            pad = length - len(ids)
            if padding_side == "right":
                input_ids.append(ids + [self.tokenizer.pad_token_id] * pad)
                attention_mask.append([1] * len(ids) + [0] * pad)
                labels.append(row_labels + [-100] * pad)
            else:
                input_ids.append([self.tokenizer.pad_token_id] * pad + ids)
                attention_mask.append([0] * pad + [1] * len(ids))
                labels.append([-100] * pad + row_labels)
        batch = {
            "input_ids": torch.tensor(input_ids),
            "attention_mask": torch.tensor(attention_mask),
            "labels": torch.tensor(labels),
        }
        batch.update(tokenize_steering_prompts(self.tokenizer, STEERING_PROMPTS, 64))
        return batch


@pytest.fixture
def tester(tiny_tokenizer):
    return HyperSteerModelTester(tiny_tokenizer)


def _greedy(model, inputs, **kwargs):
    return model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=0, **kwargs)


@pytest.mark.parametrize("architecture", TINY_ARCHITECTURES)
@pytest.mark.parametrize("hypernet_type", VARIANTS)
def test_every_variant_trains_and_generates_on_every_architecture(tester, architecture, hypernet_type):
    model = tester.get_model(architecture, hypernet_type, token_gate=hypernet_type == "cross_attention")
    model.train()
    batch = tester.training_batch()
    outputs = model(**batch)
    assert outputs.logits.shape == (2, batch["input_ids"].shape[1], len(tester.tokenizer))
    assert outputs.steering_vectors.shape == (2, model.config.hidden_size)
    assert torch.isfinite(outputs.loss)
    outputs.loss.backward()
    assert all(parameter.grad is None for parameter in model.language_model.parameters())
    # The loss reaches every hypernetwork weight (none is dead or detached).
    without_gradient = [
        name
        for name, parameter in model.hypernetwork.named_parameters()
        if parameter.grad is None or not parameter.grad.abs().sum() > 0
    ]
    assert not without_gradient

    model.eval()
    inputs = tester.prompts()
    steered = _greedy(model, inputs, steering_prompt=STEERING_PROMPTS, steering_factor=[4.0, 2.0])
    unsteered = _greedy(model.language_model, inputs)
    assert steered.shape[0] == 2
    assert not torch.equal(steered, unsteered)


@pytest.mark.parametrize("architecture", TINY_ARCHITECTURES)
def test_factor_zero_reproduces_the_base_greedy_tokens(tester, architecture):
    model = tester.get_model(architecture, token_gate=True)
    inputs = tester.prompts()
    unsteered = _greedy(model.language_model, inputs)
    steered_zero = _greedy(model, inputs, steering_prompt=STEERING_PROMPTS, steering_factor=0.0)
    assert torch.equal(steered_zero, unsteered)


def test_untrained_model_equals_the_base_and_the_head_is_zero(tester):
    model = tester.get_model("gemma2", active=False)
    assert (model.hypernetwork.output_projection.weight == 0).all()
    batch = tester.training_batch()
    steered = model(**batch)
    reference = model.language_model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=(batch["attention_mask"].cumsum(-1) - 1).clamp(min=0),
    )
    torch.testing.assert_close(steered.logits, reference.logits, rtol=0, atol=0)
    assert torch.count_nonzero(steered.steering_vectors) == 0


def test_initialisation_goes_through_init_weights_and_leaves_the_base_untouched(tester):
    base = build_tiny_base("llama", len(tester.tokenizer))
    before = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    model = HyperSteerModel.from_base_model(
        base,
        tokenizer=tester.tokenizer,
        steering_layer=2,
        hypernet_num_layers=2,
        hypernet_init="random",
        initializer_range=0.0,
    )
    for name, tensor in model.language_model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    cross_attention = model.hypernetwork.cross_attentions[0]
    # With initializer_range=0 every linear layer the hypernetwork owns is drawn as exactly zero.
    assert (cross_attention.q_proj.weight == 0).all() and (cross_attention.o_proj.weight == 0).all()
    assert (cross_attention.query_norm.weight == 1).all()
    # Random decoder blocks are drawn by the base architecture's initialiser, not copied.
    assert not torch.equal(model.hypernetwork.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)
    copied = tester.get_model("llama", hypernet_init="base")
    torch.testing.assert_close(
        copied.hypernetwork.layers[1].mlp.up_proj.weight, copied.language_model.model.layers[1].mlp.up_proj.weight
    )
    assert copied.hypernetwork.layers[1].mlp.up_proj.weight.data_ptr() != (
        copied.language_model.model.layers[1].mlp.up_proj.weight.data_ptr()
    )


def test_only_hypernetwork_parameters_are_trainable_and_embeddings_are_shared(tester):
    model = tester.get_model("gemma2")
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable and all(name.startswith("hypernetwork.") for name in trainable)
    num_trainable, num_total = model.get_nb_trainable_parameters()
    assert num_trainable == sum(p.numel() for p in model.hypernetwork.parameters())
    assert num_total == num_trainable + sum(p.numel() for p in model.language_model.parameters())
    # No second vocabulary matrix: the hypernetwork owns no embedding.
    assert not any(isinstance(module, torch.nn.Embedding) for module in model.hypernetwork.modules())


@pytest.mark.parametrize("hypernet_type", VARIANTS)
def test_changing_the_response_does_not_change_v(tester, hypernet_type):
    """No label leakage: the hypernetwork never attends to the tokens it is trained to produce."""
    model = tester.get_model("llama", hypernet_type)
    first = model(**tester.training_batch(responses=("Sort by comparing pairs.", "Hello there.")))
    second = model(**tester.training_batch(responses=("Completely different words here!", "Bye now, friend")))
    torch.testing.assert_close(first.steering_vectors, second.steering_vectors, rtol=0, atol=0)


@pytest.mark.parametrize("hypernet_type", VARIANTS)
@pytest.mark.parametrize("architecture", ("gemma2", "llama"))
def test_left_and_right_padding_give_the_same_vectors_and_losses(tester, hypernet_type, architecture):
    # Imported here so this module stays importable in CI's lowest-transformers virtualenv, which has no `datasets`.
    from modeling_hypersteer.modeling_hypersteer import per_row_causal_lm_loss

    model = tester.get_model(architecture, hypernet_type)
    right_batch = tester.training_batch(padding_side="right")
    left_batch = tester.training_batch(padding_side="left")
    right = model(**right_batch)
    left = model(**left_batch)
    torch.testing.assert_close(left.steering_vectors, right.steering_vectors, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        per_row_causal_lm_loss(left.logits, left_batch["labels"]),
        per_row_causal_lm_loss(right.logits, right_batch["labels"]),
        rtol=1e-4,
        atol=1e-4,
    )
    # A row alone gives the same vector and loss as inside the padded batch.
    alone = {key: value[1:2] for key, value in right_batch.items()}
    length = int(alone["attention_mask"].sum())
    alone = {
        key: value[:, :length] if key in ("input_ids", "attention_mask", "labels") else value
        for key, value in alone.items()
    }
    single = model(**alone)
    torch.testing.assert_close(single.steering_vectors[0], right.steering_vectors[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        per_row_causal_lm_loss(single.logits, alone["labels"])[0],
        per_row_causal_lm_loss(right.logits, right_batch["labels"])[1],
        rtol=1e-4,
        atol=1e-4,
    )


def test_padding_side_does_not_change_greedy_generation(tester):
    model = tester.get_model("gemma2")
    left = _greedy(model, tester.prompts("left"), steering_prompt=STEERING_PROMPTS, steering_factor=2.0)
    single = _greedy(
        model, tester.prompts("left", instructions=("Hi",)), steering_prompt=STEERING_PROMPTS[1:], steering_factor=2.0
    )
    new_tokens = left.shape[1] - tester.prompts("left")["input_ids"].shape[1]
    assert torch.equal(left[1, -new_tokens:], single[0, -new_tokens:])


def test_layers_below_the_steering_layer_build_no_autograd_graph(tester):
    model = tester.get_model("llama", steering_layer=2)
    model.train()
    recorded = {}

    def record(name):
        def hook(module, args, kwargs):
            hidden_states = args[0] if args else kwargs["hidden_states"]
            recorded[name] = (hidden_states.requires_grad, hidden_states.grad_fn)

        return hook

    layers = model.language_model.model.layers
    handles = [layers[index].register_forward_pre_hook(record(index), with_kwargs=True) for index in range(4)]
    try:
        model(**tester.training_batch()).loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    for index in (0, 1, 2):
        assert recorded[index] == (False, None), f"layer {index} input carries a graph"
    assert recorded[3][0] and recorded[3][1] is not None


def test_steering_is_visible_in_recorded_hidden_states(tester):
    model = tester.get_model("llama", steering_layer=1)
    batch = tester.training_batch()
    outputs = model(**batch, output_hidden_states=True)
    base_outputs = model(**batch, output_hidden_states=True, steering_factor=0.0)
    # hidden_states[i + 1] is the output of layer i: the steering layer's recorded output is already steered.
    assert torch.equal(outputs.hidden_states[1], base_outputs.hidden_states[1])
    assert not torch.equal(outputs.hidden_states[2], base_outputs.hidden_states[2])


@pytest.mark.parametrize("steering_positions", ("all", "prompt", "generated"))
def test_generation_with_cache_matches_the_training_forward(tester, steering_positions):
    """Training (labels mark the response) and cached generation steer the same positions with the same `v`."""
    model = tester.get_model("gemma2", steering_positions=steering_positions, token_gate=True)
    inputs = tester.prompts("left")
    generated = _greedy(model, inputs, steering_prompt=STEERING_PROMPTS, steering_factor=3.0)
    prompt_length = inputs["input_ids"].shape[1]
    attention_mask = torch.cat([inputs["attention_mask"], torch.ones_like(generated[:, prompt_length:])], dim=1)
    labels = generated.clone()
    labels[:, :prompt_length] = -100
    steering = tokenize_steering_prompts(tester.tokenizer, STEERING_PROMPTS, 64)
    outputs = model(input_ids=generated, attention_mask=attention_mask, labels=labels, steering_factor=3.0, **steering)
    predicted = outputs.logits[:, prompt_length - 1 : -1].argmax(-1)
    assert torch.equal(predicted, generated[:, prompt_length:])

    unsteered = _greedy(model.language_model, inputs)
    first_token_steered = not torch.equal(generated[:, prompt_length], unsteered[:, prompt_length])
    if steering_positions == "generated":
        # The prefill is not steered, so the first new token is the base's.
        assert torch.equal(generated[:, prompt_length], unsteered[:, prompt_length])
    else:
        assert first_token_steered


def test_prompt_only_steering_stops_at_decode_steps(tester):
    model = tester.get_model("llama", steering_positions="prompt")
    inputs = tester.prompts("left")
    prompt_length = inputs["input_ids"].shape[1]
    generated = _greedy(model, inputs, steering_prompt=STEERING_PROMPTS, steering_factor=3.0)
    # Re-run with "all": the same prefill, but decode steps now also steered.
    model.config.steering_positions = "all"
    everywhere = _greedy(model, inputs, steering_prompt=STEERING_PROMPTS, steering_factor=3.0)
    assert torch.equal(generated[:, prompt_length], everywhere[:, prompt_length])
    assert not torch.equal(generated, everywhere)


def test_beam_search_and_multiple_return_sequences_repeat_the_steering_rows(tester):
    model = tester.get_model("llama")
    inputs = tester.prompts("left")
    outputs = model.generate(
        **inputs,
        steering_prompt=STEERING_PROMPTS,
        steering_factor=[2.0, 0.0],
        max_new_tokens=4,
        num_beams=2,
        num_return_sequences=2,
        do_sample=False,
        pad_token_id=0,
    )
    assert outputs.shape[0] == 4
    # Row 1 has factor 0, so its sequences are the base's beam-search sequences.
    base_outputs = model.language_model.generate(
        **inputs, max_new_tokens=4, num_beams=2, num_return_sequences=2, do_sample=False, pad_token_id=0
    )
    assert torch.equal(outputs[2:], base_outputs[2:])


def test_precomputed_no_context_vectors_can_be_reused(tester):
    model = tester.get_model("llama", "no_context")
    vectors = model.compute_steering_vectors(steering_prompt=STEERING_PROMPTS)
    assert vectors.shape == (2, model.config.hidden_size)
    inputs = tester.prompts("left")
    from_prompt = _greedy(model, inputs, steering_prompt=STEERING_PROMPTS)
    from_vectors = _greedy(model, inputs, steering_vectors=vectors)
    assert torch.equal(from_prompt, from_vectors)


def test_compute_steering_vectors_matches_forward(tester):
    model = tester.get_model("gemma2", "cross_attention")
    inputs = tester.prompts("left")
    vectors = model.compute_steering_vectors(**inputs, steering_prompt=STEERING_PROMPTS)
    forward_vectors = model(**inputs, steering_prompt=STEERING_PROMPTS).steering_vectors
    torch.testing.assert_close(vectors, forward_vectors, rtol=0, atol=0)


def test_save_and_load_round_trip(tester, tmp_path):
    base = build_tiny_base("gemma2", len(tester.tokenizer))
    base.save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    model = HyperSteerModel.from_base_model(
        base, tokenizer=tester.tokenizer, steering_layer=2, hypernet_num_layers=2, token_gate=True
    )
    with torch.no_grad():
        model.hypernetwork.output_projection.weight.normal_(0.0, 0.5)
    inputs = tester.prompts("left")
    vectors = model.compute_steering_vectors(**inputs, steering_prompt=STEERING_PROMPTS)
    tokens = _greedy(model, inputs, steering_prompt=STEERING_PROMPTS)
    model.save_pretrained(tmp_path / "hypersteer")

    files = set(os.listdir(tmp_path / "hypersteer"))
    assert {
        "config.json",
        "model.safetensors",
        "configuration_hypersteer.py",
        "modeling_hypersteer.py",
        "tokenizer.json",
        "generation_config.json",
    } <= files
    saved = load_file(tmp_path / "hypersteer" / "model.safetensors")
    assert set(saved) == {f"hypernetwork.{key}" for key in model.hypernetwork.state_dict()}
    config = json.loads((tmp_path / "hypersteer" / "config.json").read_text())
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}
    assert config["base_model_name_or_path"] == str(tmp_path / "base")

    for reloaded in (
        HyperSteerModel.from_pretrained(tmp_path / "hypersteer"),
        HyperSteerModel.from_pretrained(tmp_path / "hypersteer", base_model=base),
        AutoModelForCausalLM.from_pretrained(tmp_path / "hypersteer"),
    ):
        assert isinstance(reloaded, HyperSteerModel)
        for key, value in model.hypernetwork.state_dict().items():
            assert torch.equal(reloaded.hypernetwork.state_dict()[key], value)
        torch.testing.assert_close(
            reloaded.compute_steering_vectors(**inputs, steering_prompt=STEERING_PROMPTS), vectors, rtol=0, atol=0
        )
        assert torch.equal(_greedy(reloaded, inputs, steering_prompt=STEERING_PROMPTS), tokens)


def test_remote_code_loads_where_the_package_is_not_importable(tester, tmp_path):
    _, expected = _saved_model(tester, tmp_path)
    torch.save({"inputs": dict(tester.prompts("left")), "expected": expected}, tmp_path / "reference.pt")
    script = textwrap.dedent(
        f"""
        import warnings

        import torch
        from transformers import AutoModelForCausalLM

        # The frozen remote code must not trigger deprecations, which announce its breakage in a later transformers.
        warnings.filterwarnings("error", category=FutureWarning, module="transformers_modules")
        warnings.filterwarnings("error", category=DeprecationWarning, module="transformers_modules")
        warnings.filterwarnings("error", message="`past_key_values` is deprecated", category=FutureWarning)
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "hypersteer")!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        reference = torch.load({str(tmp_path / "reference.pt")!r})
        tokens = model.generate(**reference["inputs"], steering_prompt={STEERING_PROMPTS!r}, max_new_tokens=8,
                                do_sample=False, pad_token_id=0)
        assert torch.equal(tokens, reference["expected"]), (tokens, reference["expected"])
        print("REMOTE-OK")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_PACKAGE_PREAMBLE + script],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert "REMOTE-OK" in result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m, i: m(**i, steering_prompt=["only one"]), "1 steering prompts for 2 input rows"),
        (lambda m, i: m(**i, steering_prompt=["a", "  "]), "Steering prompt 1"),
        (lambda m, i: m(**i), "No steering prompt given"),
        (lambda m, i: m(**i, steering_prompt=STEERING_PROMPTS, steering_factor=[1.0, 2.0, 3.0]), "3 steering factors"),
        (lambda m, i: m(**i, steering_prompt=STEERING_PROMPTS, steering_factor=[1.0, float("inf")]), "finite"),
        (lambda m, i: m(**i, steering_prompt=STEERING_PROMPTS, steering_factor=[float("nan"), 1.0]), "finite"),
        (
            lambda m, i: m(**i, steering_prompt=STEERING_PROMPTS, steering_factor=torch.tensor([1.0, float("nan")])),
            "finite",
        ),
        (lambda m, i: m(**i, steering_prompt=STEERING_PROMPTS, steering_factor=torch.tensor(float("-inf"))), "finite"),
        (
            lambda m, i: m.generate(
                **i, steering_prompt=STEERING_PROMPTS, steering_factor=torch.tensor([float("inf")])
            ),
            "finite",
        ),
        (lambda m, i: m(**i, steering_vectors=torch.zeros(2, 5)), "steering_vectors"),
        (lambda m, i: m.generate(**i, steering_prompt=STEERING_PROMPTS * 2, max_new_tokens=2), "4 steering prompts"),
    ],
)
def test_bad_inputs_raise_clear_errors(tester, call, message):
    model = tester.get_model("llama")
    with pytest.raises(ValueError, match=message):
        call(model, tester.prompts("left"))


def test_nan_vectors_are_refused(tester):
    model = tester.get_model("llama")
    with torch.no_grad():
        model.hypernetwork.output_projection.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf"):
        _greedy(model, tester.prompts("left"), steering_prompt=STEERING_PROMPTS)
    with pytest.raises(ValueError, match="NaN/inf"):
        model.compute_steering_vectors(**tester.prompts("left"), steering_prompt=STEERING_PROMPTS)


def test_construction_errors(tester, tmp_path):
    base = build_tiny_base("llama", len(tester.tokenizer))
    with pytest.raises(ValueError, match="out of range"):
        HyperSteerModel.from_base_model(base, tokenizer=tester.tokenizer, steering_layer=4, hypernet_num_layers=2)
    with pytest.raises(ValueError, match="hypernet_type"):
        HyperSteerModel.from_base_model(base, tokenizer=tester.tokenizer, steering_layer=1, hypernet_type="lstm")
    with pytest.raises(ValueError, match="hypernet_init='random'"):
        HyperSteerModel.from_base_model(base, tokenizer=tester.tokenizer, steering_layer=1, hypernet_num_layers=8)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tester.tokenizer)))
    with pytest.raises(ValueError, match="model.model.layers"):
        HyperSteerModel.from_base_model(gpt2, tokenizer=tester.tokenizer, steering_layer=1)

    model = HyperSteerModel.from_base_model(base, tokenizer=tester.tokenizer, steering_layer=2, hypernet_num_layers=2)
    model.save_pretrained(tmp_path / "hypersteer")
    wider = build_tiny_base("llama", len(tester.tokenizer))
    wider.config.hidden_size = 64
    with pytest.raises(ValueError, match="Hidden-size mismatch"):
        HyperSteerModel.from_pretrained(tmp_path / "hypersteer", base_model=wider)


def test_activation_checkpointing_keeps_gradients_and_the_single_graph(tester):
    model = tester.get_model("gemma2", steering_layer=1, token_gate=True)
    batch = tester.training_batch()
    model.train()
    model(**batch).loss.backward()
    expected = {name: p.grad.clone() for name, p in model.hypernetwork.named_parameters()}
    model.zero_grad()
    model.activation_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in model.language_model.model.layers)
    assert all(layer.gradient_checkpointing for layer in model.hypernetwork.layers)
    embeddings_require_grad = []
    handle = model.get_input_embeddings().register_forward_hook(
        lambda module, args, output: embeddings_require_grad.append(output.requires_grad)
    )
    try:
        model(**batch).loss.backward()
    finally:
        handle.remove()
    assert embeddings_require_grad and not any(embeddings_require_grad)
    for name, parameter in model.hypernetwork.named_parameters():
        torch.testing.assert_close(parameter.grad, expected[name], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="non-reentrant"):
        model.activation_checkpointing_enable({"use_reentrant": True})


def test_config_default_factor_is_checked_when_used(tester):
    model = tester.get_model("llama")
    # Set after construction, so only the call-time check can catch it.
    model.config.default_steering_factor = float("nan")
    with pytest.raises(ValueError, match="finite"):
        model(**tester.prompts("left"), steering_prompt=STEERING_PROMPTS)


@pytest.mark.parametrize("steering_positions", ("all", "generated"))
def test_forward_with_a_cache_reuses_the_prefill_vectors_and_positions_from_the_mask(tester, steering_positions):
    """A decode step through `forward` needs the prefill's `v` and must place left-padded rows by their real tokens:
    it then gives the logits of a full forward over the same tokens."""
    model = tester.get_model("gemma2", steering_positions=steering_positions, token_gate=True)
    inputs = tester.prompts("left")
    assert (inputs["attention_mask"] == 0).any(), "rows of equal length would not exercise the padded positions"
    steering = tokenize_steering_prompts(tester.tokenizer, STEERING_PROMPTS, 64)
    prefill = model(**inputs, **steering, steering_factor=3.0, use_cache=True)
    cache = prefill[_CACHE_FIELD]
    next_tokens = prefill.logits[:, -1].argmax(-1, keepdim=True)
    attention_mask = torch.cat([inputs["attention_mask"], torch.ones_like(next_tokens)], dim=1)

    with pytest.raises(ValueError, match="cannot compute the prompt's steering vectors"):
        model(input_ids=next_tokens, attention_mask=attention_mask, cache=cache, **steering)
    with pytest.raises(ValueError, match="pass the mask of all"):
        model(
            input_ids=next_tokens,
            attention_mask=torch.ones_like(next_tokens),
            cache=cache,
            steering_vectors=prefill.steering_vectors,
        )
    step = model(
        input_ids=next_tokens,
        attention_mask=attention_mask,
        cache=cache,
        steering_vectors=prefill.steering_vectors,
        steering_factor=3.0,
    )

    input_ids = torch.cat([inputs["input_ids"], next_tokens], dim=1)
    labels = torch.full_like(input_ids, -100)
    labels[:, -1] = next_tokens[:, 0]  # the new token is the "generated" one, as in the decode step
    full = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, steering_factor=3.0, **steering)
    torch.testing.assert_close(full.steering_vectors, prefill.steering_vectors, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], rtol=1e-4, atol=1e-4)
    unsteered_step = model.language_model(input_ids=input_ids, attention_mask=attention_mask)
    assert not torch.allclose(step.logits[:, -1], unsteered_step.logits[:, -1], atol=1e-3)


def test_in_context_hypernetwork_reads_a_single_bos(tester):
    """The chat-templated user prompt opens with BOS; when the steering prompt does too, the hypernetwork reads the
    steering prompt's BOS only, exactly as if the user prompt had none."""
    model = tester.get_model("llama", "in_context")
    bos = tester.tokenizer.bos_token_id
    inputs = tester.prompts("left")
    lengths = inputs["attention_mask"].sum(dim=1)
    first_real = inputs["input_ids"].gather(1, (inputs["attention_mask"].argmax(dim=1))[:, None])
    assert (first_real == bos).all()
    steering = tokenize_steering_prompts(tester.tokenizer, STEERING_PROMPTS, 64)
    with_bos = {
        "steering_input_ids": torch.cat([torch.full((2, 1), bos), steering["steering_input_ids"]], dim=1),
        "steering_attention_mask": torch.cat(
            [torch.ones(2, 1, dtype=torch.long), steering["steering_attention_mask"]], 1
        ),
    }

    read = []

    def record(module, args, kwargs):
        token_mask = args[1] if len(args) > 1 else kwargs["attention_mask"]
        read.append(token_mask.sum(dim=1))

    handle = model.hypernetwork.register_forward_pre_hook(record, with_kwargs=True)
    try:
        vectors = model.compute_steering_vectors(**inputs, **with_bos)
        texts = [
            tester.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
            ).removeprefix(tester.tokenizer.bos_token)
            for text in ("Explain sorting.", "Hi")
        ]
        without_user_bos = tester.tokenizer(
            texts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt"
        )
        assert torch.equal(without_user_bos["attention_mask"].sum(dim=1), lengths - 1)
        assert bos not in without_user_bos["input_ids"]
        reference = model.compute_steering_vectors(**without_user_bos, **with_bos)
        plain = model.compute_steering_vectors(**inputs, **steering)
    finally:
        handle.remove()
    steering_lengths = with_bos["steering_attention_mask"].sum(dim=1)
    assert torch.equal(read[0], steering_lengths + lengths - 1)
    torch.testing.assert_close(vectors, reference, rtol=1e-5, atol=1e-6)
    # A steering prompt without BOS leaves the user prompt's BOS in place (it is then the only one).
    assert torch.equal(read[2], steering_lengths - 1 + lengths)
    assert not torch.allclose(plain, reference)


def _saved_model(tester, tmp_path, **save_kwargs):
    """A steering model on a tiny Llama base saved in `tmp_path`, with its greedy steered tokens."""
    build_tiny_base("llama", len(tester.tokenizer)).save_pretrained(tmp_path / "base")
    tester.tokenizer.save_pretrained(tmp_path / "base")
    model = HyperSteerModel.from_base_model(
        AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
        tokenizer=tester.tokenizer,
        steering_layer=2,
        hypernet_num_layers=2,
    )
    with torch.no_grad():
        model.hypernetwork.output_projection.weight.normal_(0.0, 0.5)
    model.save_pretrained(tmp_path / "hypersteer", **save_kwargs)
    return model, _greedy(model, tester.prompts("left"), steering_prompt=STEERING_PROMPTS)


def test_sharded_hypernetwork_weights_load(tester, tmp_path):
    model, tokens = _saved_model(tester, tmp_path, max_shard_size="20KB")
    files = set(os.listdir(tmp_path / "hypersteer"))
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files
    shards = sorted(name for name in files if name.startswith("model-") and name.endswith(".safetensors"))
    assert len(shards) > 1
    for reloaded in (
        HyperSteerModel.from_pretrained(tmp_path / "hypersteer"),
        AutoModelForCausalLM.from_pretrained(tmp_path / "hypersteer"),
    ):
        for key, value in model.hypernetwork.state_dict().items():
            assert torch.equal(reloaded.hypernetwork.state_dict()[key], value), key
        assert torch.equal(_greedy(reloaded, tester.prompts("left"), steering_prompt=STEERING_PROMPTS), tokens)
    os.remove(tmp_path / "hypersteer" / "model.safetensors.index.json")
    with pytest.raises(OSError, match="neither model.safetensors nor model.safetensors.index.json"):
        HyperSteerModel.from_pretrained(tmp_path / "hypersteer")


@pytest.fixture
def load_calls(monkeypatch):
    """Records the path and keyword arguments of every `AutoModelForCausalLM`/`AutoTokenizer.from_pretrained` call."""
    calls = []
    for auto_class in (AutoModelForCausalLM, AutoTokenizer):
        original = auto_class.from_pretrained

        def spy(path, *args, _original=original, _name=auto_class.__name__, **kwargs):
            calls.append((_name, str(path), kwargs))
            return _original(path, *args, **kwargs)

        monkeypatch.setattr(auto_class, "from_pretrained", spy)
    return calls


HUB_SETTINGS = {"token": "hf_test_token", "force_download": True, "local_files_only": True}


def test_from_pretrained_passes_hub_settings_to_the_base_and_tokenizer(tester, tmp_path, load_calls):
    _, tokens = _saved_model(tester, tmp_path)
    load_calls.clear()
    cache_dir = str(tmp_path / "cache")
    model = HyperSteerModel.from_pretrained(tmp_path / "hypersteer", cache_dir=cache_dir, **HUB_SETTINGS)
    expected = {"cache_dir": cache_dir, **HUB_SETTINGS}
    by_path = {(name, path): kwargs for name, path, kwargs in load_calls}
    base_kwargs = by_path[("AutoModelForCausalLM", str(tmp_path / "base"))]
    assert {key: base_kwargs.get(key) for key in expected} == expected
    # The HyperSteer folder's revision never names a base revision.
    assert base_kwargs["revision"] is None and "subfolder" not in base_kwargs
    tokenizer_kwargs = by_path[("AutoTokenizer", str(tmp_path / "hypersteer"))]
    assert {key: tokenizer_kwargs.get(key) for key in expected} == expected
    assert ("AutoTokenizer", str(tmp_path / "base")) not in by_path
    assert torch.equal(_greedy(model, tester.prompts("left"), steering_prompt=STEERING_PROMPTS), tokens)


def test_base_tokenizer_is_used_only_when_none_was_saved(tester, tmp_path, load_calls, caplog):
    _, tokens = _saved_model(tester, tmp_path)
    saved = tmp_path / "hypersteer"
    (saved / "tokenizer.json").write_text("{not json")
    load_calls.clear()
    with pytest.raises(OSError, match="The tokenizer saved in .* does not load"):
        HyperSteerModel.from_pretrained(saved)
    assert not any(name == "AutoTokenizer" and path == str(tmp_path / "base") for name, path, _ in load_calls)

    for name in os.listdir(saved):
        if name.startswith("tokenizer") or name in ("special_tokens_map.json", "chat_template.jinja"):
            os.remove(saved / name)
    load_calls.clear()
    with caplog.at_level(logging.WARNING):
        model = HyperSteerModel.from_pretrained(saved, local_files_only=True)
    assert "No tokenizer was saved" in caplog.text
    tokenizer_calls = [(path, kwargs) for name, path, kwargs in load_calls if name == "AutoTokenizer"]
    assert [path for path, _ in tokenizer_calls] == [str(tmp_path / "base")]
    assert tokenizer_calls[0][1]["local_files_only"] is True
    assert torch.equal(_greedy(model, tester.prompts("left"), steering_prompt=STEERING_PROMPTS), tokens)


@pytest.mark.parametrize("device_map", ("cpu", "auto"))
def test_blocks_copied_from_a_dispatched_base_carry_no_accelerate_hooks(tester, tmp_path, device_map):
    from accelerate import dispatch_model

    build_tiny_base("llama", len(tester.tokenizer)).save_pretrained(tmp_path / "base")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    dispatched = AutoModelForCausalLM.from_pretrained(tmp_path / "base", device_map=device_map)
    # On a CPU-only machine transformers keeps a one-device map undispatched; a multi-GPU map installs an accelerate
    # hook on every decoder layer, which `force_hooks` reproduces here.
    layer_map = {f"model.layers.{index}": "cpu" for index in range(len(dispatched.model.layers))}
    dispatch_model(
        dispatched,
        {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu", **layer_map},
        force_hooks=True,
    )
    assert all(hasattr(layer, "_hf_hook") for layer in dispatched.model.layers)

    models = []
    for base in (plain, dispatched):
        torch.manual_seed(0)
        models.append(
            HyperSteerModel.from_base_model(base, tokenizer=tester.tokenizer, steering_layer=2, hypernet_num_layers=2)
        )
        with torch.no_grad():
            models[-1].hypernetwork.output_projection.weight.copy_(torch.linspace(-1, 1, 32 * 32).view(32, 32))
    for module in models[1].hypernetwork.modules():
        assert not {"_hf_hook", "_old_forward", "forward"} & set(vars(module)), module
    inputs = tester.prompts("left")
    torch.testing.assert_close(
        models[1].compute_steering_vectors(**inputs, steering_prompt=STEERING_PROMPTS),
        models[0].compute_steering_vectors(**inputs, steering_prompt=STEERING_PROMPTS),
        rtol=0,
        atol=0,
    )
    assert torch.equal(
        _greedy(models[1], inputs, steering_prompt=STEERING_PROMPTS),
        _greedy(models[0], inputs, steering_prompt=STEERING_PROMPTS),
    )


def test_config_records_the_base_special_tokens_so_trainer_aligns_nothing(tester):
    from transformers.trainer_utils import align_special_tokens

    model = tester.get_model("llama")
    base_config = model.language_model.config
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (
        base_config.bos_token_id,
        base_config.eos_token_id,
        base_config.pad_token_id,
    )
    config, generation_config = model.config.to_dict(), model.generation_config.to_dict()
    # Trainer runs this before training and warns about every token it has to update.
    align_special_tokens(model, tester.tokenizer)
    assert model.config.to_dict() == config and model.generation_config.to_dict() == generation_config
