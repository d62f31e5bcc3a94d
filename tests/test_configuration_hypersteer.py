import json

import pytest
from transformers import AutoConfig

from modeling_hypersteer import HyperSteerConfig


def test_round_trip_is_lossless(tmp_path):
    config = HyperSteerConfig(
        base_model_name_or_path="some/base",
        base_model_revision="abc123",
        steering_layer=3,
        hypernet_type="in_context",
        hypernet_num_layers=2,
        hypernet_init="random",
        steering_positions="generated",
        token_gate=True,
        default_steering_factor=0.5,
        prompted_steering_factor=0.25,
        max_steering_prompt_length=16,
        hidden_size=32,
        num_attention_heads=2,
        head_dim=16,
        base_num_hidden_layers=4,
    )
    config.save_pretrained(tmp_path)
    reloaded = HyperSteerConfig.from_pretrained(tmp_path)
    assert reloaded.to_dict() == config.to_dict()
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "hypersteer"
    assert isinstance(AutoConfig.from_pretrained(tmp_path), HyperSteerConfig)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"hypernet_type": "lstm"}, "hypernet_type"),
        ({"hypernet_init": "xavier"}, "hypernet_init"),
        ({"steering_positions": "response"}, "steering_positions"),
        ({"steering_layer": -1}, "steering_layer"),
        ({"hypernet_num_layers": 0}, "hypernet_num_layers"),
        ({"max_steering_prompt_length": 0}, "max_steering_prompt_length"),
        ({"steering_layer": 4, "base_num_hidden_layers": 4}, "out of range"),
        ({"hypernet_num_layers": 6, "base_num_hidden_layers": 4, "steering_layer": 1}, "hypernet_init='random'"),
        ({"default_steering_factor": float("nan")}, "default_steering_factor"),
        ({"default_steering_factor": float("inf")}, "default_steering_factor"),
        ({"default_steering_factor": float("-inf")}, "default_steering_factor"),
        ({"default_steering_factor": True}, "default_steering_factor"),
        ({"prompted_steering_factor": float("inf")}, "`prompted_steering_factor` must be a finite number or None"),
        ({"prompted_steering_factor": "0.5"}, "prompted_steering_factor"),
    ],
)
def test_invalid_values_raise_with_the_field_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HyperSteerConfig(**kwargs)


def test_prompted_steering_factor_is_unset_until_calibrated():
    assert HyperSteerConfig().prompted_steering_factor is None
    # A checkpoint saved before the field existed loads without it.
    legacy = HyperSteerConfig(default_steering_factor=2.0).to_dict()
    legacy.pop("prompted_steering_factor")
    assert HyperSteerConfig.from_dict(legacy).prompted_steering_factor is None


def test_random_init_allows_more_layers_than_the_base():
    config = HyperSteerConfig(
        hypernet_num_layers=6, base_num_hidden_layers=4, steering_layer=1, hypernet_init="random"
    )
    assert config.hypernet_num_layers == 6
