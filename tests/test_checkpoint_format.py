"""The checkpoint format is a contract: a hypernetwork saved by an earlier version loads into this one.

The key lists below were written by the code before the layout refactor (issue #19), which moved the priors, the
hypernetwork's input builder, the request builder and the steering hook into their own classes; state-dict keys and
config keys must not move with them.
"""

from pathlib import Path

import pytest
import torch
from conftest import build_tiny_base
from fixtures.make_pre_layout_checkpoint import PROMPTS, USER_PROMPT
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from modeling_hypersteer import HyperSteerModel


CHECKPOINT_KEYS = {
    "lexical_xattn_gate": (
        "llama",
        dict(hypernet_type="cross_attention", token_gate=True, steering_prior="lexical", shared_steering_offset=True),
        [
            "cross_attentions.0.context_norm.weight",
            "cross_attentions.0.k_proj.weight",
            "cross_attentions.0.o_proj.weight",
            "cross_attentions.0.q_proj.weight",
            "cross_attentions.0.query_norm.weight",
            "cross_attentions.0.v_proj.weight",
            "cross_attentions.1.context_norm.weight",
            "cross_attentions.1.k_proj.weight",
            "cross_attentions.1.o_proj.weight",
            "cross_attentions.1.q_proj.weight",
            "cross_attentions.1.query_norm.weight",
            "cross_attentions.1.v_proj.weight",
            "layers.0.input_layernorm.weight",
            "layers.0.mlp.down_proj.weight",
            "layers.0.mlp.gate_proj.weight",
            "layers.0.mlp.up_proj.weight",
            "layers.0.post_attention_layernorm.weight",
            "layers.0.self_attn.k_proj.weight",
            "layers.0.self_attn.o_proj.weight",
            "layers.0.self_attn.q_proj.weight",
            "layers.0.self_attn.v_proj.weight",
            "layers.1.input_layernorm.weight",
            "layers.1.mlp.down_proj.weight",
            "layers.1.mlp.gate_proj.weight",
            "layers.1.mlp.up_proj.weight",
            "layers.1.post_attention_layernorm.weight",
            "layers.1.self_attn.k_proj.weight",
            "layers.1.self_attn.o_proj.weight",
            "layers.1.self_attn.q_proj.weight",
            "layers.1.self_attn.v_proj.weight",
            "norm.weight",
            "output_projection.weight",
            "prior_projection.weight",
            "steering_offset",
            "token_gate.norm.weight",
            "token_gate.proj.bias",
            "token_gate.proj.weight",
        ],
    ),
    "residual_centred": (
        "llama",
        dict(
            hypernet_type="in_context",
            steering_prior="residual",
            center_pooled_features=True,
            standardize_pooled_features=True,
        ),
        [
            "feature_center.num_updates",
            "feature_center.running_mean",
            "feature_center.running_variance",
            "layers.0.input_layernorm.weight",
            "layers.0.mlp.down_proj.weight",
            "layers.0.mlp.gate_proj.weight",
            "layers.0.mlp.up_proj.weight",
            "layers.0.post_attention_layernorm.weight",
            "layers.0.self_attn.k_proj.weight",
            "layers.0.self_attn.o_proj.weight",
            "layers.0.self_attn.q_proj.weight",
            "layers.0.self_attn.v_proj.weight",
            "layers.1.input_layernorm.weight",
            "layers.1.mlp.down_proj.weight",
            "layers.1.mlp.gate_proj.weight",
            "layers.1.mlp.up_proj.weight",
            "layers.1.post_attention_layernorm.weight",
            "layers.1.self_attn.k_proj.weight",
            "layers.1.self_attn.o_proj.weight",
            "layers.1.self_attn.q_proj.weight",
            "layers.1.self_attn.v_proj.weight",
            "norm.weight",
            "output_projection.weight",
            "prior_center.num_updates",
            "prior_center.running_mean",
            "prior_projection.weight",
        ],
    ),
    "plain_gemma2": (
        "gemma2",
        dict(hypernet_type="no_context"),
        [
            "layers.0.input_layernorm.weight",
            "layers.0.mlp.down_proj.weight",
            "layers.0.mlp.gate_proj.weight",
            "layers.0.mlp.up_proj.weight",
            "layers.0.post_attention_layernorm.weight",
            "layers.0.post_feedforward_layernorm.weight",
            "layers.0.pre_feedforward_layernorm.weight",
            "layers.0.self_attn.k_proj.weight",
            "layers.0.self_attn.o_proj.weight",
            "layers.0.self_attn.q_proj.weight",
            "layers.0.self_attn.v_proj.weight",
            "layers.1.input_layernorm.weight",
            "layers.1.mlp.down_proj.weight",
            "layers.1.mlp.gate_proj.weight",
            "layers.1.mlp.up_proj.weight",
            "layers.1.post_attention_layernorm.weight",
            "layers.1.post_feedforward_layernorm.weight",
            "layers.1.pre_feedforward_layernorm.weight",
            "layers.1.self_attn.k_proj.weight",
            "layers.1.self_attn.o_proj.weight",
            "layers.1.self_attn.q_proj.weight",
            "layers.1.self_attn.v_proj.weight",
            "norm.weight",
            "output_projection.weight",
        ],
    ),
}


@pytest.mark.parametrize("name", sorted(CHECKPOINT_KEYS))
def test_hypernetwork_state_dict_keys_are_those_of_earlier_checkpoints(tiny_tokenizer, name, tmp_path):
    architecture, config, expected = CHECKPOINT_KEYS[name]
    base = build_tiny_base(architecture, len(tiny_tokenizer))
    model = HyperSteerModel.from_base_model(
        base, tokenizer=tiny_tokenizer, steering_layer=1, hypernet_num_layers=2, **config
    )
    assert sorted(model.hypernetwork.state_dict()) == expected
    # A state dict of exactly those keys (as an earlier version saved it) loads strictly and round-trips.
    with torch.no_grad():
        for parameter in model.hypernetwork.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    saved = {f"hypernetwork.{key}": value.clone() for key, value in model.hypernetwork.state_dict().items()}
    fresh = HyperSteerModel.from_base_model(
        base, tokenizer=tiny_tokenizer, steering_layer=1, hypernet_num_layers=2, **config
    )
    fresh.load_hypernetwork_state_dict(saved)
    for key, value in fresh.hypernetwork.state_dict().items():
        torch.testing.assert_close(value, saved[f"hypernetwork.{key}"], rtol=0, atol=0)


PRE_LAYOUT_CHECKPOINT = Path(__file__).resolve().parent / "fixtures" / "pre_layout_checkpoint"


def test_a_checkpoint_saved_before_the_layout_refactor_loads_and_steers_as_it_did():
    # Written by the code of commit b76a668 (see fixtures/make_pre_layout_checkpoint.py), with the outputs that code
    # computed: running statistics, priors, gate and offset must load into the same places and give the same numbers.
    base = AutoModelForCausalLM.from_pretrained(PRE_LAYOUT_CHECKPOINT / "base")
    model = HyperSteerModel.from_pretrained(PRE_LAYOUT_CHECKPOINT, base_model=base).eval()
    assert int(model.hypernetwork.feature_center.num_updates) == 3
    expected = load_file(PRE_LAYOUT_CHECKPOINT / "expected_outputs.safetensors")
    inputs = model.tokenizer([USER_PROMPT] * len(PROMPTS), return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs, steering_prompt=PROMPTS, steering_factor=2.0)
    torch.testing.assert_close(outputs.steering_vectors, expected["steering_vectors"])
    torch.testing.assert_close(outputs.logits, expected["logits"])
