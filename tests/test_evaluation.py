"""Evaluation: the offline metric and evaluate_steering.py end to end against a loopback OpenAI-protocol judge."""

import json
import math

import pytest
import torch
from conftest import build_tiny_base, cli_arguments, save_tiny_base
from openai_stub_server import stub_rating

import evaluate_steering
from modeling_hypersteer import HyperSteerModel
from modeling_hypersteer.data import ConceptSplit, build_splits, load_concept_data
from modeling_hypersteer.evaluation import (
    concept_derangement,
    generate_samples,
    generation_tasks,
    offline_steering_metric,
)
from modeling_hypersteer.judge import build_judge_prompt, harmonic_score


@pytest.fixture(scope="module")
def concept_rows(axbench_dir):
    data = load_concept_data(str(axbench_dir / "concept10" / "prod_2b_l20_v1" / "train_data.parquet"))
    rows, counts = [], {}
    for row in data:
        concept = row["output_concept"]
        if row["is_negative"] or counts.get(concept, 0) >= 2 or (concept not in counts and len(counts) >= 4):
            continue
        counts[concept] = counts.get(concept, 0) + 1
        rows.append(row)
    return rows


def _model(tokenizer, active=True):
    base = build_tiny_base("llama", len(tokenizer))
    model = HyperSteerModel.from_base_model(base, tokenizer=tokenizer, steering_layer=2, hypernet_num_layers=2)
    if active:
        with torch.no_grad():
            model.hypernetwork.output_projection.weight.normal_(0.0, 0.5)
    return model


def test_derangement_maps_every_concept_to_another():
    concepts = ["b", "a", "c", "a"]
    mapping = concept_derangement(concepts)
    assert set(mapping) == {"a", "b", "c"} and all(mapping[c] != c for c in mapping)
    assert sorted(mapping.values()) == ["a", "b", "c"]
    with pytest.raises(ValueError, match="at least 2"):
        concept_derangement(["only"])


def test_offline_metric_is_finite_and_compares_methods_on_identical_rows(tiny_tokenizer, concept_rows):
    result = offline_steering_metric(_model(tiny_tokenizer), tiny_tokenizer, concept_rows, max_length=256)
    assert result["num_rows"] == len(concept_rows) and result["num_concepts"] == 4
    for concept_losses in result["per_concept"].values():
        assert set(concept_losses) == {"none", "prompt", "hypersteer", "prompt_wrong", "hypersteer_wrong"}
    assert all(math.isfinite(value) for value in result["losses"].values())
    assert result["gain_ratio"] is not None and math.isfinite(result["gain_ratio"])
    assert result["specificity_ratio"] is not None and math.isfinite(result["specificity_ratio"])
    expected_gain = (result["losses"]["none"] - result["losses"]["hypersteer"]) / (
        result["losses"]["none"] - result["losses"]["prompt"]
    )
    assert result["gain_ratio"] == pytest.approx(expected_gain)


def test_an_untrained_model_scores_exactly_like_no_steering(tiny_tokenizer, concept_rows):
    """v = 0 at init: the HyperSteer rows must give the unsteered losses, for the right and the wrong concept alike."""
    result = offline_steering_metric(
        _model(tiny_tokenizer, active=False), tiny_tokenizer, concept_rows, max_length=256
    )
    losses = result["losses"]
    assert losses["hypersteer"] == pytest.approx(losses["none"], abs=1e-6)
    assert losses["hypersteer_wrong"] == pytest.approx(losses["none"], abs=1e-6)
    assert losses["prompt"] != pytest.approx(losses["none"], abs=1e-4)
    assert result["gain_ratio"] == pytest.approx(0.0, abs=1e-4)


def test_generation_resumes_without_regenerating(tiny_tokenizer, tmp_path):
    model = _model(tiny_tokenizer)
    tasks = generation_tasks({"legal terms": ["Hi", "Explain sorting.", "Name a color.", "Count to three."]}, 4)
    assert [task["split"] for task in tasks] == ["select", "select", "test", "test"]
    path = tmp_path / "generations.jsonl"
    first = generate_samples(
        model,
        tiny_tokenizer,
        tasks,
        ["hypersteer", "none"],
        [1.0, 2.0],
        generations_path=path,
        max_new_tokens=4,
        do_sample=False,
    )
    assert len(first) == 4 * 3 and len(path.read_text().splitlines()) == 12
    calls = []
    handle = model.language_model.register_forward_hook(lambda *args: calls.append(1))
    try:
        second = generate_samples(
            model,
            tiny_tokenizer,
            tasks,
            ["hypersteer", "none"],
            [1.0, 2.0],
            generations_path=path,
            max_new_tokens=4,
            do_sample=False,
        )
    finally:
        handle.remove()
    assert not calls and second == first


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory, tiny_tokenizer, axbench_dir):
    import train_hypersteer

    root = tmp_path_factory.mktemp("eval_model")
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
        )
    )
    return root / "run"


def test_evaluate_steering_with_a_loopback_judge(trained_dir, tmp_path, openai_stub):
    output_dir = tmp_path / "eval"
    argv = [
        "--model",
        str(trained_dir),
        "--concepts",
        "heldout",
        "--num_instructions_per_concept",
        "4",
        "--steering_factors",
        "0.5,2.0",
        "--max_new_tokens",
        "6",
        "--offline_examples_per_concept",
        "2",
        "--judge_base_url",
        openai_stub.base_url,
        "--judge_model",
        "stub-judge",
        "--judge_initial_backoff",
        "0.01",
        "--output_dir",
        str(output_dir),
        "--max_length",
        "192",
    ]
    openai_stub.fail_next(3, "server_error")
    summary = evaluate_steering.main(argv)
    samples = [json.loads(line) for line in (output_dir / "samples.jsonl").read_text().splitlines()]
    # 3 held-out concepts x 4 instructions x (2 hypersteer factors + prompt + none)
    assert len(samples) == 3 * 4 * 4
    expected_keys = {
        "method",
        "concept",
        "factor",
        "instruction",
        "generation",
        "split",
        "concept_score",
        "instruction_score",
        "fluency_score",
        "score",
        "judge_status",
    }
    assert all(expected_keys <= set(sample) for sample in samples)
    for sample in samples:
        ratings = [
            stub_rating(build_judge_prompt(aspect, sample["concept"], sample["instruction"], sample["generation"]))
            for aspect in ("concept", "instruction", "fluency")
        ]
        assert sample["judge_status"] == "ok"
        assert sample["score"] == pytest.approx(harmonic_score(*ratings))

    def mean_at(method, concept, factor, split):
        values = [
            s["score"]
            for s in samples
            if s["method"] == method and s["concept"] == concept and s["factor"] == factor and s["split"] == split
        ]
        return sum(values) / len(values)

    hypersteer = summary["methods"]["hypersteer"]
    for concept, factor in hypersteer["best_factors"].items():
        best = max(mean_at("hypersteer", concept, f, "select") for f in (0.5, 2.0))
        assert mean_at("hypersteer", concept, factor, "select") == pytest.approx(best)
    expected_score = sum(mean_at("hypersteer", c, f, "test") for c, f in hypersteer["best_factors"].items()) / 3
    assert hypersteer["score"] == pytest.approx(expected_score)
    assert set(summary["methods"]) == {"hypersteer", "prompt", "none"}
    assert {"heldout"} <= set(summary["offline"])
    for name in ("summary.md", "score_vs_factor.png", "ratings.png", "offline_losses.png"):
        assert (output_dir / name).is_file()
    # Identical judge prompts are paid once; the three scripted 500s were retried.
    distinct_prompts = {
        build_judge_prompt(aspect, s["concept"], s["instruction"], s["generation"])
        for s in samples
        for aspect in ("concept", "instruction", "fluency")
    }
    assert summary["judge"]["requests_sent"] == len(distinct_prompts) + 3

    requests_before = openai_stub.request_count
    again = evaluate_steering.main(argv)
    assert openai_stub.request_count == requests_before
    assert again["judge"]["requests_sent"] == 0 and again["methods"] == summary["methods"]


def test_offline_only_without_a_judge(trained_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    summary = evaluate_steering.main(
        [
            "--model",
            str(trained_dir),
            "--concepts",
            "all",
            "--offline_examples_per_concept",
            "2",
            "--output_dir",
            str(tmp_path / "eval"),
            "--max_length",
            "192",
        ]
    )
    assert summary["judge"] is None and summary["methods"] == {}
    assert set(summary["offline"]) == {"heldin", "heldout"}
    # Held-in rows are rows the model was never trained on: rebuild the training split exactly as training did.
    training = json.loads((trained_dir / "training_summary.json").read_text())
    data = load_concept_data(training["sources"])
    split = ConceptSplit.from_json(trained_dir / "concept_split.json")
    trained_pairs = {
        (row["output_concept"], row["input"])
        for row in build_splits(data, split, **training["split_settings"])["train"]
    }
    assert summary["offline_rows"]["heldin"]
    assert not {tuple(pair) for pair in summary["offline_rows"]["heldin"]} & trained_pairs
    assert not (tmp_path / "eval" / "samples.jsonl").exists()
    assert "only the offline metric" in (tmp_path / "eval" / "summary.md").read_text()


def test_bad_method_is_rejected():
    with pytest.raises(ValueError, match="diffmean"):
        evaluate_steering.make_parser().parse_args_into_dataclasses(
            args=["--model", "x", "--output_dir", "y", "--methods", "hypersteer,diffmean"]
        )
