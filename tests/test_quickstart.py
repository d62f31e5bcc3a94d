"""The offline quickstart on the real SmolLM2-135M-Instruct, in a reduced mode (a few training steps)."""

import json
import math
import subprocess
import sys

import pytest
from conftest import REPO_ROOT


@pytest.mark.slow
def test_quickstart_runs_end_to_end_in_reduced_mode(smollm2_dir, tmp_path):
    output_dir = tmp_path / "quickstart"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "quickstart.py"),
            "--max_steps",
            "3",
            "--max_new_tokens",
            "8",
            "--offline_examples_per_concept",
            "1",
            "--output_dir",
            str(output_dir),
        ],
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    # What a newcomer sees: no deprecation warnings and no warnings they cannot act on. The `past_key_values`
    # deprecations come from the remote code's mask and layer calls; the model tests turn warnings from our modules
    # into errors in-process, so they are not counted twice here.
    lines = [line for line in (result.stdout + result.stderr).splitlines() if "past_key_values" not in line]
    for alarming in ("FutureWarning", "DeprecationWarning", "UserWarning", "pin_memory"):
        assert not [line for line in lines if alarming in line], [line for line in lines if alarming in line][:5]
    stdout = result.stdout
    blocks = stdout.split("=== Concept: ")[1:]
    assert len(blocks) == 4 and sum("HELD-OUT" in block for block in blocks) == 1
    for block in blocks:
        for label in ("Unsteered:", "Prompt-steered:", "HyperSteer:", "Prompt + HyperSteer:"):
            assert label in block, block
    for name in ("heldin", "heldout"):
        assert f"{name} gain ratio" in stdout and f"{name} specificity ratio" in stdout
    assert "identical greedy tokens to the trained model: True" in stdout

    results = json.loads((output_dir / "quickstart_results.json").read_text())
    assert all({"none", "prompt", "hypersteer", "prompt_hypersteer"} <= set(row) for row in results["side_by_side"])
    # The recipe calibrates both factors; the side-by-side uses what training saved.
    config = json.loads((output_dir / "config.json").read_text())
    summary = json.loads((output_dir / "training_summary.json").read_text())
    prompted = summary["prompted_steering_factor_calibration"]
    assert config["prompted_steering_factor"] == prompted["factor"]
    assert prompted["concepts"] == summary["steering_factor_calibration"]["concepts"]
    if prompted["factor"] is not None:
        assert results["arguments"]["prompted_steering_factor"] == prompted["factor"]
        assert f"on top of the prompt {prompted['factor']}, calibrated" in stdout
    else:
        assert results["arguments"]["prompted_steering_factor"] == config["default_steering_factor"] / 2
        assert "half the factor" in stdout
    for name in ("heldin", "heldout"):
        offline = results["offline"][name]
        assert offline["num_concepts"] == (15 if name == "heldin" else 3)
        losses = offline["losses"]
        assert all(math.isfinite(value) for value in losses.values())
        denominators = {
            "gain_ratio": (losses["none"] - losses["hypersteer"], losses["none"] - losses["prompt"]),
            "specificity_ratio": (
                losses["hypersteer_wrong"] - losses["hypersteer"],
                losses["prompt_wrong"] - losses["prompt"],
            ),
        }
        for ratio, (numerator, denominator) in denominators.items():
            if denominator > 1e-6:
                assert offline[ratio] == pytest.approx(numerator / denominator)
                assert ratio not in offline["undefined_ratios"]
            else:
                # Not a number: reported as undefined, with the reason, in the results and on screen.
                assert offline[ratio] is None and "not positive" in offline["undefined_ratios"][ratio]
                assert f"undefined: {offline['undefined_ratios'][ratio]}" in stdout
    assert (output_dir / "loss_curve.png").is_file() and (output_dir / "model.safetensors").is_file()
    # The card of the quickstart model reports the ratios the quickstart measured.
    from modeling_hypersteer import HyperSteerConfig
    from modeling_hypersteer.model_card import write_model_card

    card = write_model_card(output_dir, HyperSteerConfig.from_pretrained(output_dir)).read_text()
    assert "not measured." not in card and "| `heldout` | 3 |" in card and "| `heldin` | 15 |" in card


@pytest.mark.parametrize("flag", ["--steering_factor", "--prompted_steering_factor", "--offline_steering_factor"])
@pytest.mark.parametrize("value", ["-0.5", "inf"])
def test_quickstart_refuses_a_negative_or_infinite_factor_before_training(flag, value):
    sys.path.insert(0, str(REPO_ROOT))
    import quickstart

    with pytest.raises(ValueError, match=f"{flag} must be a finite number >= 0 .*got {float(value)}"):
        quickstart.main([flag, value])
