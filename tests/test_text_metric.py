"""The judge-free text metric (concept detector, fluency NLL, repetition), its factor selection, the calibration of
`default_steering_factor` in train_hypersteer.py, and `evaluate_steering.py --text_metric`."""

import json
import math

import pytest
import torch
from conftest import REPO_ROOT, build_tiny_base, cli_arguments, save_tiny_base

import evaluate_steering
import train_hypersteer
from modeling_hypersteer import HyperSteerConfig, HyperSteerModel
from modeling_hypersteer import text_metric as text_metric_module
from modeling_hypersteer.data import format_prompt
from modeling_hypersteer.evaluation import FACTOR_METHODS, METHODS, summary_markdown
from modeling_hypersteer.model_card import write_model_card
from modeling_hypersteer.text_metric import (
    CALIBRATION_INSTRUCTIONS,
    GENERIC_INSTRUCTIONS,
    METHOD_COLORS,
    ConceptDetector,
    calibrate_steering_factor,
    calibrate_steering_factors,
    check_factor_grid,
    distinct_bigram_share,
    generation_nll,
    select_steering_factor,
    text_metric,
)


LAW = [
    "The court ruled that the defendant was liable under the statute.",
    "Her attorney filed a motion to dismiss the lawsuit in federal court.",
    "The judge instructed the jury on the burden of proof in the trial.",
    "The plaintiff sued for breach of contract and sought damages.",
    "Under the statute of limitations, the claim was filed too late for the court.",
    "The appeals court reversed the verdict and remanded the case to the judge.",
    "A lawyer must disclose any conflict of interest to the court.",
    "The contract was void because the defendant lacked legal capacity.",
]
SEA = [
    "Waves crashed on the shore as the tide came in over the beach.",
    "Whales and dolphins swim through the deep blue ocean.",
    "Coral reefs shelter fish, turtles and other marine life under the sea.",
    "The fishing boat sailed out to sea before the storm and the waves.",
    "At low tide the rock pools on the shore fill with crabs and starfish.",
    "Sharks patrol the ocean currents along the reef.",
    "The lighthouse guided ships safely across the stormy sea.",
    "Seaweed drifted with the tide towards the sandy shore and the waves.",
]
NEUTRAL = [
    "I like to spend my weekend reading a book and cooking dinner.",
    "A good friend listens and is there for you when you need help.",
    "Try to study in short sessions and take regular breaks.",
    "People enjoy travelling because they see new places and meet people.",
    "Start your morning with a glass of water and a short stretch.",
    "Learning something new every day keeps the mind active.",
]


@pytest.fixture(scope="module")
def detector():
    return ConceptDetector.fit({"law": LAW[:6], "sea": SEA[:6]}, NEUTRAL[:4], concepts=["law", "sea"])


def test_detector_separates_a_concept_from_other_concepts_and_plain_text(detector):
    law_probability = detector.predict_proba("law", [LAW[6], LAW[7], SEA[6], SEA[7], NEUTRAL[4], NEUTRAL[5]])
    assert detector.detect("law", [LAW[6], LAW[7]]) == [True, True]
    assert detector.detect("law", [SEA[6], SEA[7], NEUTRAL[4], NEUTRAL[5]]) == [False] * 4
    assert min(law_probability[:2]) > max(law_probability[2:])
    assert detector.detect("sea", [SEA[6], SEA[7], LAW[6], NEUTRAL[4]]) == [True, True, False, False]
    # Nothing said, nothing shown (a classifier with balanced weights would otherwise score "" near 0.5).
    assert detector.predict_proba("sea", ["", "   "]) == [0.0, 0.0]


def test_detector_rejects_a_concept_without_reference_responses(detector):
    with pytest.raises(ValueError, match=r"No reference responses for the concept\(s\) \['space'\]"):
        ConceptDetector.fit({"law": LAW, "space": ["  "]}, NEUTRAL, concepts=["law", "space"])
    with pytest.raises(ValueError, match="'law' has no negative texts"):
        ConceptDetector.fit({"law": LAW})
    with pytest.raises(ValueError, match="no word of two or more characters"):
        ConceptDetector.fit({"a": ["x y"], "b": ["p q"]})
    with pytest.raises(ValueError, match="no classifier for concept 'space'"):
        detector.predict_proba("space", ["stars"])


def test_repetition_ranks_degenerate_text_below_normal_text():
    assert distinct_bigram_share("akin akin akin akin") == pytest.approx(1 / 3)
    # Tokens: the cat , the cat , the cat sat -> 8 bigrams, 4 distinct.
    assert distinct_bigram_share("the cat, the cat, the cat sat") == pytest.approx(4 / 8)
    # Punctuation repeats count: what a SmolLM2 steered too hard wrote.
    collapsed = "A SQL query like `WHERE ` WHERE ` and ` ` ` ` ` ` ` ` ` ` ` ` ` ` ` ` ` `"
    assert distinct_bigram_share(collapsed) < text_metric_module.DEGENERATE_DISTINCT_BIGRAMS
    assert distinct_bigram_share(SEA[0]) == 1.0
    assert distinct_bigram_share("akin akin akin akin") < text_metric_module.DEGENERATE_DISTINCT_BIGRAMS
    assert distinct_bigram_share("word") == 1.0 and distinct_bigram_share("") == 1.0


def test_generation_nll_equals_a_manual_cross_entropy(tiny_tokenizer):
    base = build_tiny_base("llama", len(tiny_tokenizer))
    instructions = ["Explain sorting.", "Write a short poem about the sea, please.", "Say nothing."]
    generations = ["sorting puts items in order", "waves", ""]
    nlls = generation_nll(base, tiny_tokenizer, instructions, generations, batch_size=2)
    assert math.isnan(nlls[2])
    for instruction, generation, nll in zip(instructions[:2], generations[:2], nlls[:2]):
        prompt = tiny_tokenizer(format_prompt(tiny_tokenizer, instruction), add_special_tokens=False)["input_ids"]
        target = tiny_tokenizer(generation, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = base(input_ids=torch.tensor([prompt + target])).logits[0]
        # The logits at positions len(prompt) - 1 ... end - 1 predict the generated tokens.
        expected = torch.nn.functional.cross_entropy(logits[len(prompt) - 1 : -1], torch.tensor(target))
        assert nll == pytest.approx(expected.item(), abs=1e-4)
    # Batched with padding gives each row's own value.
    alone = generation_nll(base, tiny_tokenizer, instructions[1:2], generations[1:2])
    assert alone[0] == pytest.approx(nlls[1], abs=1e-4)


def _row(factor, accuracy, nll, distinct):
    return {
        "method": "hypersteer",
        "factor": factor,
        "detector_accuracy": accuracy,
        "nll": nll,
        "distinct_bigrams": distinct,
    }


def test_factor_selection_rejects_degenerate_and_broken_factors_and_breaks_ties_by_detector_probability():
    reference = {"nll": 2.0, "distinct_bigrams": 0.9}
    table = [
        _row(8.0, 1.0, 0.8, 0.2),  # the concept word repeated: highest accuracy, low NLL, degenerate
        _row(1.0, 0.25, 2.1, 0.95),
        _row(4.0, 0.75, 2.9, 0.8),  # NLL 2.9 > 2.0 + 0.5: broken text
        _row(2.0, 0.5, 2.4, 0.7),  # 0.7 >= 0.75 * 0.9 = 0.675: passes
    ]
    factor, checked = select_steering_factor(table, reference)
    assert factor == 2.0
    assert [row["factor"] for row in checked] == [1.0, 2.0, 4.0, 8.0]
    assert [row["passes"] for row in checked] == [True, True, False, False]
    assert "distinct-bigram share 0.200 < 0.675" in checked[3]["rejected_because"]
    assert "NLL 2.900 > 2.500" in checked[2]["rejected_because"]
    # Equal accuracy: the higher mean detector probability wins, whichever factor it belongs to; then the smaller.
    tie = [_row(3.0, 0.5, 2.0, 0.9), _row(1.5, 0.5, 2.0, 0.9)]
    assert select_steering_factor(tie, reference)[0] == 1.5
    tie[0]["detector_probability"], tie[1]["detector_probability"] = 0.41, 0.40
    assert select_steering_factor(tie, reference)[0] == 3.0
    tie[0]["detector_probability"], tie[1]["detector_probability"] = 0.39, 0.40
    assert select_steering_factor(tie, reference)[0] == 1.5
    # The probability only breaks ties: higher accuracy wins over a higher probability.
    tie[0]["detector_accuracy"] = 0.25
    tie[0]["detector_probability"] = 0.9
    assert select_steering_factor(tie, reference)[0] == 1.5
    nothing, _ = select_steering_factor([_row(8.0, 1.0, 0.8, 0.2)], reference)
    assert nothing is None


@pytest.mark.parametrize(
    "factors, message",
    [([], "grid is empty"), ([1.0, 0.0], "got 0.0"), ([-2.0], "got -2.0"), ([float("nan")], "got nan")],
)
def test_bad_factor_grids_are_rejected_naming_the_value(factors, message):
    with pytest.raises(ValueError, match=message):
        check_factor_grid(factors, "--calibration_factors")


def _scripted_generation(texts_by_method_factor, calls=None):
    """A stand-in for `generate_samples` that writes the given text for each (method, factor) and concept; each call's
    methods are appended to `calls`."""

    def fake(model, tokenizer, tasks, methods, factors, **kwargs):
        if calls is not None:
            calls.append(list(methods))
        samples = []
        for method in methods:
            grid = factors[method] if isinstance(factors, dict) and method in FACTOR_METHODS else factors
            for factor in grid if method in FACTOR_METHODS else [1.0 if method == "prompt" else 0.0]:
                for task in tasks:
                    text = texts_by_method_factor[(method, float(factor))]
                    samples.append({**task, "method": method, "factor": float(factor), "generation": text(task)})
        return samples

    return fake


def _scripted_model(monkeypatch, tokenizer, scripted, calls=None):
    """A tiny model whose generations the calibration and text metric take from `scripted` (its NLL stays real)."""
    monkeypatch.setattr(text_metric_module, "generate_samples", _scripted_generation(scripted, calls))
    return HyperSteerModel.from_base_model(
        build_tiny_base("llama", len(tokenizer)), tokenizer=tokenizer, steering_layer=2, hypernet_num_layers=1
    )


def _concept_text(task):
    return (LAW if task["concept"] == "law" else SEA)[6 + len(task["instruction"]) % 2]


def test_text_metric_on_scripted_generations_picks_the_fluent_factor(tiny_tokenizer, detector, monkeypatch):
    scripted = {
        ("none", 0.0): lambda task: NEUTRAL[4],
        ("prompt", 1.0): _concept_text,
        ("hypersteer", 1.0): lambda task: NEUTRAL[5],
        ("hypersteer", 2.0): _concept_text,
        # One topic whatever the concept: right for "law", and for "sea" it is the wrong concept's text.
        ("hypersteer", 4.0): lambda task: LAW[6],
        ("hypersteer", 8.0): lambda task: " ".join(["court" if task["concept"] == "law" else "ocean"] * 12),
    }
    model = _scripted_model(monkeypatch, tiny_tokenizer, scripted)
    result = text_metric(
        model, tiny_tokenizer, detector, ["law", "sea"], ["hypersteer", "prompt", "none"], [1, 2, 4, 8]
    )
    rows = {(row["method"], row["factor"]): row for row in result["rows"]}
    assert rows[("none", 0.0)]["detector_accuracy"] == 0.0 and rows[("prompt", 1.0)]["detector_accuracy"] == 1.0
    # Each concept's own text is not the other concept's; one topic for both is right half the time, wrong half.
    assert rows[("prompt", 1.0)]["wrong_concept_accuracy"] == 0.0
    assert rows[("hypersteer", 4.0)]["detector_accuracy"] == rows[("hypersteer", 4.0)]["wrong_concept_accuracy"] == 0.5
    wrong_of = {sample["concept"]: sample["wrong_concept"] for sample in result["samples"]}
    assert wrong_of == {"law": "sea", "sea": "law"}
    assert rows[("hypersteer", 2.0)]["detector_accuracy"] == 1.0 and rows[("hypersteer", 1.0)]["gain_over_none"] == 0
    assert rows[("hypersteer", 8.0)]["degenerate_share"] == 1.0
    # Same texts as prompting, so the same NLL under the base.
    assert rows[("hypersteer", 2.0)]["nll"] == pytest.approx(rows[("prompt", 1.0)]["nll"])
    assert all(row["num_samples"] == 2 * 4 for row in result["rows"])
    headline = result["headline"]
    assert headline["factor"] == 2.0 and headline["gain_ratio"] == pytest.approx(1.0)
    rejected = {row["factor"]: row for row in result["selection"]}
    assert not rejected[8.0]["passes"] and "distinct-bigram share" in rejected[8.0]["rejected_because"]
    markdown = summary_markdown({"judge": None, "text_metric": result})
    assert "| hypersteer | 8 | " in markdown and "1.000 at factor 2.0" in markdown
    assert "| hypersteer | 4 | 0.500 | 0.500 | " in markdown


def _calibration_rows():
    return [
        *(
            {"output": text, "output_concept": concept, "is_negative": False}
            for concept, texts in (("law", LAW[:6]), ("sea", SEA[:6]))
            for text in texts
        ),
        *({"output": text, "output_concept": "", "is_negative": True} for text in NEUTRAL[:4]),
    ]


def test_both_factors_calibrated_together_equal_each_calibrated_alone_with_one_reference(tiny_tokenizer, monkeypatch):
    scripted = {
        ("none", 0.0): lambda task: NEUTRAL[4],
        ("prompt", 1.0): lambda task: NEUTRAL[5],
        ("hypersteer", 1.0): lambda task: NEUTRAL[5],
        ("hypersteer", 2.0): _concept_text,
        ("prompt_hypersteer", 0.25): lambda task: NEUTRAL[5],
        ("prompt_hypersteer", 0.5): _concept_text,
    }
    calls = []
    model = _scripted_model(monkeypatch, tiny_tokenizer, scripted, calls)
    settings = dict(num_concepts=None, num_instructions=2, max_new_tokens=8)
    grids = {"hypersteer": [1, 2], "prompt_hypersteer": [0.25, 0.5]}
    together = calibrate_steering_factors(model, tiny_tokenizer, _calibration_rows(), grids, **settings)
    # Prompting and the unsteered base were generated once for both methods.
    assert sum(call.count("prompt") for call in calls) == 1 and sum(call.count("none") for call in calls) == 1
    assert {method: factor for method, (factor, _) in together.items()} == {
        "hypersteer": 2.0,
        "prompt_hypersteer": 0.5,
    }
    for method, grid in grids.items():
        alone = calibrate_steering_factor(model, tiny_tokenizer, _calibration_rows(), grid, method=method, **settings)
        assert alone == together[method]
    with pytest.raises(ValueError, match="at least one method"):
        calibrate_steering_factors(model, tiny_tokenizer, _calibration_rows(), {}, **settings)


def test_the_prompted_calibration_chooses_among_the_vectors_on_top_of_the_prompt(
    tiny_tokenizer, monkeypatch, tmp_path
):
    degenerate = lambda task: " ".join(["court" if task["concept"] == "law" else "ocean"] * 12)  # noqa: E731
    scripted = {
        ("none", 0.0): lambda task: NEUTRAL[4],
        # The prompt alone does not show the concept; with the vector at 0.5 it does, at 1 the text degenerates.
        ("prompt", 1.0): lambda task: NEUTRAL[5],
        ("prompt_hypersteer", 0.25): lambda task: NEUTRAL[5],
        ("prompt_hypersteer", 0.5): _concept_text,
        ("prompt_hypersteer", 1.0): degenerate,
    }
    model = _scripted_model(monkeypatch, tiny_tokenizer, scripted)
    rows = _calibration_rows()
    calibrate = dict(num_concepts=None, num_instructions=2, max_new_tokens=8, method="prompt_hypersteer")
    assert model.config.prompted_steering_factor is None
    # Only the method being calibrated is generated at the grid's factors: a ("hypersteer", f) key would be missing.
    factor, record = calibrate_steering_factor(model, tiny_tokenizer, rows, [1, 0.5, 0.25], **calibrate)
    assert factor == 0.5 and record["chosen_by"] == "rule"
    assert record["method"] == "prompt_hypersteer" and record["field"] == "prompted_steering_factor"
    assert {row["method"] for row in record["table"]} == {"prompt_hypersteer"} and record["grid"] == [0.25, 0.5, 1.0]
    assert set(record["reference"]) == {"prompt", "none"}
    by_factor = {row["factor"]: row for row in record["table"]}
    assert by_factor[0.5]["detector_accuracy"] == 1.0 and by_factor[0.25]["detector_accuracy"] == 0.0
    assert "distinct-bigram share" in by_factor[1.0]["rejected_because"]
    # Nothing within the bound: the field keeps its value, None for a model never calibrated.
    scripted[("prompt_hypersteer", 0.5)] = degenerate
    factor, record = calibrate_steering_factor(model, tiny_tokenizer, rows, [1, 0.5], **calibrate)
    assert factor is None and record["chosen_by"] == "kept_default" and record["factor"] is None
    card = write_model_card(
        tmp_path, model.config, training_summary={"prompted_steering_factor_calibration": record}
    ).read_text()
    assert "found no factor within the bound and left it unset" in card and "prompt_steering_turns" not in card
    assert "| Factor on top of a prompt (`prompted_steering_factor`) | not calibrated |" in card
    model.config.prompted_steering_factor = 0.75
    card = write_model_card(tmp_path, model.config).read_text()
    assert "`steering_factor=0.75`" in card and "prompt_steering_turns(concept, request)" in card
    assert '`hypersteer-serve` does both for a steering concept marked `"in_prompt": true`' in card
    assert calibrate_steering_factor(model, tiny_tokenizer, rows, [1, 0.5], **calibrate)[0] == 0.75
    with pytest.raises(ValueError, match="`method` must be one of .* got 'prompt'"):
        calibrate_steering_factor(model, tiny_tokenizer, rows, [1], **{**calibrate, "method": "prompt"})


@pytest.fixture(scope="module")
def calibrated_dir(tmp_path_factory, tiny_tokenizer, axbench_dir):
    root = tmp_path_factory.mktemp("calibrated")
    train_hypersteer.main(
        cli_arguments(
            base_model_name_or_path=save_tiny_base(root / "base", tiny_tokenizer),
            steering_layer=2,
            hypernet_num_layers=2,
            dataset_name_or_path=axbench_dir / "concept10" / "prod_2b_l20_v1" / "train_data.parquet",
            heldout_concepts=3,
            max_examples_per_concept=4,
            max_length=192,
            max_steps=3,
            eval_strategy="no",
            save_strategy="no",
            learning_rate="1e-2",
            output_dir=root / "run",
            report_to="none",
            calibrate_steering_factor=True,
            calibration_factors="0.5,4,2",
            calibrate_prompted_steering_factor=True,
            prompted_calibration_factors="1,0.25",
            calibration_concepts=3,
            calibration_max_new_tokens=8,
        )
    )
    return root / "run"


def test_training_with_calibration_saves_the_chosen_factor(calibrated_dir):
    record = json.loads((calibrated_dir / "training_summary.json").read_text())["steering_factor_calibration"]
    config = json.loads((calibrated_dir / "config.json").read_text())
    assert record["grid"] == [0.5, 2.0, 4.0] and len(record["concepts"]) == 3 and len(record["table"]) == 3
    assert (
        config["default_steering_factor"]
        == record["factor"]
        == HyperSteerConfig.from_pretrained(calibrated_dir).default_steering_factor
    )
    split = json.loads((calibrated_dir / "concept_split.json").read_text())
    assert set(record["concepts"]) <= set(split["heldin_concepts"])
    # Calibrated on its own instructions, so the text metric reports the factor on prompts it was not chosen on.
    assert record["instructions"] == list(CALIBRATION_INSTRUCTIONS)
    assert not set(record["instructions"]) & set(GENERIC_INSTRUCTIONS)
    # The saved choice is the rule's choice on the recorded numbers.
    expected, _ = select_steering_factor(record["table"], record["reference"]["prompt"])
    assert record["factor"] == (expected if expected is not None else 1.0)
    assert record["chosen_by"] == ("rule" if expected is not None else "kept_default")
    card = write_model_card(calibrated_dir, HyperSteerConfig.from_pretrained(calibrated_dir)).read_text()
    assert "chosen by calibration" in card and f"over {record['grid']}" in card


def test_training_calibrates_the_factor_on_top_of_a_prompt_on_the_same_concepts(calibrated_dir):
    summary = json.loads((calibrated_dir / "training_summary.json").read_text())
    record, plain = summary["prompted_steering_factor_calibration"], summary["steering_factor_calibration"]
    assert record["grid"] == [0.25, 1.0] and record["method"] == "prompt_hypersteer"
    assert {row["method"] for row in record["table"]} == {"prompt_hypersteer"}
    assert record["concepts"] == plain["concepts"] and record["instructions"] == plain["instructions"]
    expected, _ = select_steering_factor(record["table"], record["reference"]["prompt"])
    assert record["factor"] == expected
    config = HyperSteerConfig.from_pretrained(calibrated_dir)
    # Each calibration writes its own field; the prompted one leaves the default factor as the first chose it.
    assert config.prompted_steering_factor == record["factor"] and config.default_steering_factor == plain["factor"]
    card = write_model_card(calibrated_dir, config).read_text()
    assert "Prompted steering factor (the vector added on top of a prompt" in card
    if expected is not None:
        assert f"`steering_factor={expected:g}`" in card and "prompt_steering_turns(concept, request)" in card
    else:
        assert "found no factor within the bound and left it unset" in card and "prompt_steering_turns" not in card


def test_calibration_flags_are_checked_before_training(tiny_tokenizer, tmp_path):
    required = ["--base_model_name_or_path", "x", "--dataset_name_or_path", "y", "--output_dir", str(tmp_path)]
    with pytest.raises(ValueError, match="got 0.0"):
        train_hypersteer.parse_arguments([*required, "--calibrate_steering_factor", "--calibration_factors", "1,0"])
    with pytest.raises(ValueError, match="grid is empty"):
        train_hypersteer.parse_arguments([*required, "--calibrate_steering_factor", "--calibration_factors", ","])
    with pytest.raises(ValueError, match="--calibration_instructions must be >= 2, got 1"):
        train_hypersteer.parse_arguments([*required, "--calibrate_steering_factor", "--calibration_instructions", "1"])
    with pytest.raises(ValueError, match="--calibration_instructions must be <= 6 .* got 7"):
        train_hypersteer.parse_arguments([*required, "--calibrate_steering_factor", "--calibration_instructions", "7"])
    with pytest.raises(ValueError, match="'1,two'"):
        train_hypersteer.parse_arguments([*required, "--calibrate_steering_factor", "--calibration_factors", "1,two"])
    prompted = [*required, "--calibrate_prompted_steering_factor"]
    with pytest.raises(ValueError, match="--prompted_calibration_factors .*got -0.5"):
        train_hypersteer.parse_arguments([*prompted, "--prompted_calibration_factors", "0.5,-0.5"])
    with pytest.raises(ValueError, match="--calibration_concepts must be >= 1, got 0"):
        train_hypersteer.parse_arguments([*prompted, "--calibration_concepts", "0"])
    model_args = train_hypersteer.parse_arguments([*prompted, "--prompted_calibration_factors", "1,0.5"])[0]
    assert model_args.prompted_calibration_factor_grid == [0.5, 1.0] and model_args.calibration_factor_grid == []


def test_evaluate_steering_text_metric_end_to_end(calibrated_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    output_dir = tmp_path / "eval"
    summary = evaluate_steering.main(
        [
            "--model",
            str(calibrated_dir),
            "--concepts",
            "heldout",
            "--text_metric",
            "--steering_factors",
            "1,4",
            "--methods",
            "hypersteer,prompt_hypersteer,prompt,none",
            "--text_metric_instructions_per_concept",
            "2",
            "--text_metric_max_new_tokens",
            "6",
            "--offline_examples_per_concept",
            "2",
            "--max_length",
            "192",
            "--output_dir",
            str(output_dir),
            "--save_summary_to_model",
            "false",
        ]
    )
    result = summary["text_metric"]
    assert {(row["method"], row["factor"]) for row in result["rows"]} == {
        ("hypersteer", 1.0),
        ("hypersteer", 4.0),
        ("prompt_hypersteer", 1.0),
        ("prompt_hypersteer", 4.0),
        ("prompt", 1.0),
        ("none", 0.0),
    }
    samples = [json.loads(line) for line in (output_dir / "text_metric_samples.jsonl").read_text().splitlines()]
    # 3 held-out concepts x 2 instructions x 6 (method, factor) cells
    assert len(samples) == 3 * 2 * 6 and "samples" not in result
    for row in result["rows"]:
        cell = [s for s in samples if (s["method"], s["factor"]) == (row["method"], row["factor"])]
        assert row["detector_accuracy"] == pytest.approx(sum(s["concept_detected"] for s in cell) / len(cell))
    assert set(json.loads((output_dir / "evaluation_summary.json").read_text())) >= {"text_metric", "offline"}
    markdown = (output_dir / "evaluation_summary.md").read_text()
    assert "Judge-free text metric" in markdown and "| prompt_hypersteer | 4 | " in markdown
    assert (output_dir / "text_metric_vs_factor.png").stat().st_size > 10_000
    # The card of an evaluated checkpoint reports the text metric next to the offline ratios.
    (calibrated_dir / "evaluation_summary.json").write_text((output_dir / "evaluation_summary.json").read_text())
    card = write_model_card(calibrated_dir, HyperSteerConfig.from_pretrained(calibrated_dir)).read_text()
    (calibrated_dir / "evaluation_summary.json").unlink()
    assert "Judge-free text metric" in card and "| `heldout` |" in card


def test_text_metric_flags_are_checked():
    with pytest.raises(ValueError, match="got 0.0"):
        evaluate_steering.main(["--model", "x", "--output_dir", "y", "--text_metric", "--steering_factors", "0,1"])
    with pytest.raises(ValueError, match="between 2 and 10.*got 1"):
        evaluate_steering.main(
            ["--model", "x", "--output_dir", "y", "--text_metric", "--text_metric_instructions_per_concept", "1"]
        )


def test_every_method_has_its_own_plot_colour():
    assert set(METHODS) <= set(METHOD_COLORS)
    colours = [METHOD_COLORS[method] for method in METHODS]
    assert len(set(colours)) == len(colours)


def test_calibration_transfer_pairs_runs_and_checks_the_bound_on_the_evaluation():
    import sys

    sys.path.insert(0, str(REPO_ROOT / "benchmarks" / "quality"))
    import calibration_transfer

    def run(factor, nll, distinct, accuracy):
        rows = [
            {"method": "hypersteer", "nll": nll, "distinct_bigrams": distinct, "detector_accuracy": accuracy},
            {"method": "prompt", "nll": 1.3, "distinct_bigrams": 0.9, "detector_accuracy": 8 / 48},
            {"method": "none", "nll": 0.8, "distinct_bigrams": 0.8, "detector_accuracy": 1 / 48},
        ]
        for row in rows:
            row["num_samples"] = 48
        return {"factor": factor, "calibration": {"reference": {"prompt": {"nll": 1.9}}}, "heldin": {"rows": rows}}

    runs = {
        "fluent": run(1.0, 1.5, 0.9, 2 / 48),
        "fluent_cal8x6": run(1.0, 1.5, 0.9, 2 / 48),
        "broken": run(4.0, 2.0, 0.9, 15 / 48),  # NLL above 1.3 + 0.5
        "broken_cal8x6": run(2.0, 1.7, 0.9, 6 / 48),
        "repetitive": run(8.0, 1.0, 0.6, 9 / 48),  # distinct bigrams below 0.75 x 0.9
        "recipe_prior48": run(2.0, 2.2, 0.9, 7 / 48),
        "recipe_split42_cal8x6": run(1.0, 1.26, 0.95, 1 / 48),
    }
    table = {row["run"]: row for row in calibration_transfer.transfer_table(runs)}
    assert set(table) == {"fluent", "broken", "recipe_prior48"}  # "repetitive" has no recalibrated row
    assert table["fluent"]["old"]["within_bound"] and table["fluent"]["new"]["within_bound"]
    assert not table["broken"]["old"]["within_bound"] and table["broken"]["new"]["within_bound"]
    assert table["broken"]["old"]["detected"] == 15 and table["broken"]["new"]["factor"] == 2.0
    assert table["recipe_prior48"]["new"]["detected"] == 1
    assert not calibration_transfer.evaluation_outcome(runs["repetitive"])["within_bound"]
    text = calibration_transfer.markdown(list(table.values()))
    assert "old 1 of 3, new 3 of 3" in text and "**outside**" in text
