"""Evaluation: the offline metric and evaluate_steering.py end to end against a loopback OpenAI-protocol judge."""

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import AXBENCH_DIR, REPO_ROOT, build_tiny_base, cli_arguments, save_tiny_base
from datasets import concatenate_datasets
from openai_stub_server import stub_rating
from safetensors.torch import load_file, save_file

import evaluate_steering
from modeling_hypersteer import HyperSteerConfig, HyperSteerModel, tokenize_steering_prompts
from modeling_hypersteer.data import (
    ConceptSplit,
    HyperSteerDataCollator,
    build_splits,
    format_prompt,
    load_concept_data,
    tokenize_example,
)
from modeling_hypersteer.evaluation import (
    concept_derangement,
    generate_samples,
    generation_tasks,
    model_fingerprint,
    offline_steering_metric,
    prompt_steering_system_prompt,
    prompt_steering_turns,
    steering_ratios,
    summary_markdown,
)
from modeling_hypersteer.judge import build_judge_prompt, harmonic_score
from modeling_hypersteer.model_card import write_model_card
from modeling_hypersteer.text_metric import select_steering_factor


AXBENCH_TRAIN = AXBENCH_DIR / "concept10" / "prod_2b_l20_v1" / "train_data.parquet"


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


def _model(tokenizer, active=True, seed=0, **config):
    base = build_tiny_base("llama", len(tokenizer))
    torch.manual_seed(seed)
    model = HyperSteerModel.from_base_model(
        base, tokenizer=tokenizer, steering_layer=2, hypernet_num_layers=2, **config
    )
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
    result = offline_steering_metric(
        _model(tiny_tokenizer), tiny_tokenizer, concept_rows, max_length=256, prompt_placement="system"
    )
    assert result["num_rows"] == len(concept_rows) and result["num_concepts"] == 4
    for concept_losses in result["per_concept"].values():
        assert set(concept_losses) == {"none", "prompt", "hypersteer", "prompt_wrong", "hypersteer_wrong"}
    losses = result["losses"]
    assert all(math.isfinite(value) for value in losses.values())
    # Each reported loss is the mean over concepts of the per-concept means.
    for condition, value in losses.items():
        per_concept = [concept_losses[condition] for concept_losses in result["per_concept"].values()]
        assert value == pytest.approx(sum(per_concept) / len(per_concept))
    # On these rows the random base's loss falls with a system-turn prompt and rises with a wrong concept, so both ratios
    # are defined.
    assert result["undefined_ratios"] == {}
    assert result["gain_ratio"] == pytest.approx(
        (losses["none"] - losses["hypersteer"]) / (losses["none"] - losses["prompt"])
    )
    assert result["specificity_ratio"] == pytest.approx(
        (losses["hypersteer_wrong"] - losses["hypersteer"]) / (losses["prompt_wrong"] - losses["prompt"])
    )


def test_an_untrained_model_scores_exactly_like_no_steering(tiny_tokenizer, concept_rows):
    """v = 0 at init: the HyperSteer rows must give the unsteered losses, for the right and the wrong concept alike."""
    # The system-turn placement: the one whose prompting lowers this random base's loss, so the gain ratio is defined.
    result = offline_steering_metric(
        _model(tiny_tokenizer, active=False), tiny_tokenizer, concept_rows, max_length=256, prompt_placement="system"
    )
    losses = result["losses"]
    assert losses["hypersteer"] == pytest.approx(losses["none"], abs=1e-6)
    assert losses["hypersteer_wrong"] == pytest.approx(losses["none"], abs=1e-6)
    assert losses["prompt"] != pytest.approx(losses["none"], abs=1e-4)
    assert result["gain_ratio"] == pytest.approx(0.0, abs=1e-4)


def test_prompting_puts_its_instruction_before_the_user_turn_or_in_a_system_turn():
    steering = prompt_steering_system_prompt("pirate speech")
    assert prompt_steering_turns("pirate speech", "Explain sorting.") == (f"{steering}\n\nExplain sorting.", None)
    assert prompt_steering_turns("pirate speech", "Explain sorting.", "system") == ("Explain sorting.", steering)
    with pytest.raises(ValueError, match="'assistant'.*'user', 'system'"):
        prompt_steering_turns("pirate speech", "Explain sorting.", "assistant")


def test_the_offline_metric_scores_prompting_where_prompt_placement_puts_it(tiny_tokenizer, concept_rows):
    """The `prompt` conditions are the rows' losses with the steering instruction placed as asked; nothing else moves."""
    model = _model(tiny_tokenizer)
    by_placement = {
        placement: offline_steering_metric(
            model, tiny_tokenizer, concept_rows, max_length=1024, prompt_placement=placement
        )
        for placement in ("user", "system")
    }
    user, system = by_placement["user"], by_placement["system"]
    assert user["prompt_placement"] == "user" and system["prompt_placement"] == "system"
    for condition in ("none", "hypersteer", "hypersteer_wrong"):
        assert user["losses"][condition] == pytest.approx(system["losses"][condition])
    assert user["losses"]["prompt"] != pytest.approx(system["losses"]["prompt"], abs=1e-4)
    # The user placement is the plain metric run on rows whose instruction already carries the steering instruction.
    written_in = [
        {**row, "input": prompt_steering_turns(row["output_concept"], row["input"])[0]} for row in concept_rows
    ]
    unsteered = offline_steering_metric(model, tiny_tokenizer, written_in, max_length=1024, prompt_placement="user")
    assert user["losses"]["prompt"] == pytest.approx(unsteered["losses"]["none"])
    with pytest.raises(ValueError, match="Unknown prompt placement 'first'"):
        offline_steering_metric(model, tiny_tokenizer, concept_rows, max_length=1024, prompt_placement="first")


def test_the_offline_metric_scores_prompt_hypersteer_as_hypersteer_on_the_prompted_rows(tiny_tokenizer, concept_rows):
    model = _model(tiny_tokenizer)
    result = offline_steering_metric(model, tiny_tokenizer, concept_rows, max_length=1024, prompt_hypersteer=True)
    plain = offline_steering_metric(model, tiny_tokenizer, concept_rows, max_length=1024)
    for condition in ("none", "prompt", "hypersteer", "prompt_wrong", "hypersteer_wrong"):
        assert result["losses"][condition] == pytest.approx(plain["losses"][condition])
    assert "prompt_hypersteer" not in plain["losses"] and "prompt_hypersteer" not in plain
    # The right concept's rows with the steering instruction written in, steered by the same concept's vector.
    written_in = [
        {**row, "input": prompt_steering_turns(row["output_concept"], row["input"])[0]} for row in concept_rows
    ]
    steered = offline_steering_metric(model, tiny_tokenizer, written_in, max_length=1024)
    losses = result["losses"]
    assert losses["prompt_hypersteer"] == pytest.approx(steered["losses"]["hypersteer"])
    assert losses["prompt_hypersteer"] != pytest.approx(losses["prompt"], abs=1e-4)
    # This random base's prompting raises the loss with the user turn, so both ratios are undefined there; with the
    # system turn it lowers it. Against prompting alone: prompting's denominators, the method's numerators.
    assert set(result["prompt_hypersteer"]["undefined_ratios"]) == {"gain_ratio", "specificity_ratio"}
    system = offline_steering_metric(
        model, tiny_tokenizer, concept_rows, max_length=256, prompt_hypersteer=True, prompt_placement="system"
    )
    ratios, system_losses = system["prompt_hypersteer"], system["losses"]
    assert ratios["gain_ratio"] == pytest.approx(
        (system_losses["none"] - system_losses["prompt_hypersteer"])
        / (system_losses["none"] - system_losses["prompt"])
    )
    assert ratios["specificity_ratio"] == pytest.approx(
        (system_losses["prompt_hypersteer_wrong"] - system_losses["prompt_hypersteer"])
        / (system_losses["prompt_wrong"] - system_losses["prompt"])
    )
    assert ratios["gain_ratio"] != pytest.approx(system["gain_ratio"])
    markdown = summary_markdown({"judge": None, "offline": {"heldout": {**result, "num_rows": len(concept_rows)}}})
    assert (
        "| heldout | " + f"{losses['prompt_hypersteer']:.3f} | {losses['prompt_hypersteer_wrong']:.3f} |" in markdown
    )
    with pytest.raises(ValueError, match="cannot be combined with a baseline"):
        offline_steering_metric(
            model, tiny_tokenizer, concept_rows, prompt_hypersteer=True, concept_vectors={"x": torch.zeros(8)}
        )


def test_generated_prompting_answers_follow_the_prompt_placement(tiny_tokenizer):
    model = _model(tiny_tokenizer)
    tasks = [{"concept": "pirate speech", "instruction": "Explain sorting.", "split": "test"}]

    def alone(user_turn, system_turn):
        inputs = tiny_tokenizer(
            format_prompt(tiny_tokenizer, user_turn, system_turn), add_special_tokens=False, return_tensors="pt"
        )
        ids = model.language_model.generate(**inputs, max_new_tokens=6, do_sample=False)
        return tiny_tokenizer.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()

    for placement in ("user", "system"):
        [sample] = generate_samples(
            model,
            tiny_tokenizer,
            tasks,
            ["prompt"],
            [1.0],
            max_new_tokens=6,
            do_sample=False,
            prompt_placement=placement,
        )
        assert sample["generation"] == alone(*prompt_steering_turns("pirate speech", "Explain sorting.", placement))
    with pytest.raises(ValueError, match="Unknown prompt placement"):
        generate_samples(model, tiny_tokenizer, tasks, ["prompt"], [1.0], prompt_placement="middle")


def test_prompt_hypersteer_adds_the_concepts_vector_to_the_prompting_prompt_at_every_factor(tiny_tokenizer):
    model = _model(tiny_tokenizer)
    concept, instruction = "pirate speech", "Explain sorting."
    tasks = [{"concept": concept, "instruction": instruction, "split": "test"}]
    prompt = format_prompt(tiny_tokenizer, *prompt_steering_turns(concept, instruction))
    inputs = tiny_tokenizer(prompt, add_special_tokens=False, return_tensors="pt")

    def answer(**steering):
        ids = model.generate(**inputs, max_new_tokens=6, do_sample=False, **steering)
        return tiny_tokenizer.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()

    samples = generate_samples(
        model, tiny_tokenizer, tasks, ["prompt", "prompt_hypersteer"], [1.0, 8.0], max_new_tokens=6, do_sample=False
    )
    by_condition = {(sample["method"], sample["factor"]): sample["generation"] for sample in samples}
    assert sorted(by_condition) == [("prompt", 1.0), ("prompt_hypersteer", 1.0), ("prompt_hypersteer", 8.0)]
    for factor in (1.0, 8.0):
        expected = answer(steering_prompt=concept, steering_factor=factor)
        assert by_condition[("prompt_hypersteer", factor)] == expected
    # The vector is really added: at factor 8 the answer leaves the prompt-only one.
    assert by_condition[("prompt_hypersteer", 8.0)] != by_condition[("prompt", 1.0)]
    assert by_condition[("prompt", 1.0)] == answer(steering_factor=0.0, steering_prompt=concept)


def test_a_ratio_with_a_non_positive_denominator_is_undefined_with_its_reason():
    losses = {"none": 2.0, "prompt": 2.25, "hypersteer": 1.5, "prompt_wrong": 2.5, "hypersteer_wrong": 1.75}
    ratios = steering_ratios(losses)
    # Prompting raised the loss (L_none - L_prompt = -0.25): a "gain ratio" of -2.0 would mean nothing.
    assert ratios["gain_ratio"] is None
    assert ratios["undefined_ratios"]["gain_ratio"] == (
        "prompting did not lower the loss (L_none - L_prompt = -0.25, not positive)"
    )
    assert ratios["specificity_ratio"] == pytest.approx((1.75 - 1.5) / (2.5 - 2.25))
    assert "specificity_ratio" not in ratios["undefined_ratios"]
    flat = steering_ratios({**losses, "prompt_wrong": 2.25})
    assert flat["specificity_ratio"] is None
    assert "L_prompt,wrong - L_prompt = 0, not positive" in flat["undefined_ratios"]["specificity_ratio"]

    summary = {
        "judge": {"model": "stub"},
        "methods": {"hypersteer": {"score": 1.0, "num_concepts": 1}, "prompt": {"score": 1.5, "num_concepts": 1}},
        "excluded_concepts": {"tides": ["prompt: no samples"]},
        "offline": {"heldout": {"losses": losses, "num_rows": 4, **ratios}},
    }
    markdown = summary_markdown(summary)
    assert "undefined: prompting did not lower the loss (L_none - L_prompt = -0.25, not positive)" in markdown
    assert "- tides: prompt: no samples" in markdown


def test_offline_metric_cuts_steering_prompts_to_the_model_length_like_generate(tiny_tokenizer, concept_rows):
    """With `max_steering_prompt_length=3` the HyperSteer loss is that of the vector of the first 3 tokens."""
    model = _model(tiny_tokenizer, hypernet_type="no_context", max_steering_prompt_length=3)
    first_rows = {}
    for row in concept_rows:
        first_rows.setdefault(row["output_concept"], row)
    rows = list(first_rows.values())[:2]
    result = offline_steering_metric(model, tiny_tokenizer, rows, max_length=256)
    collator = HyperSteerDataCollator(tokenizer=tiny_tokenizer)
    for row in rows:
        batch = collator([tokenize_example(row, tiny_tokenizer, max_length=256)])
        losses = {}
        for length in (3, 64):
            steering = tokenize_steering_prompts(tiny_tokenizer, [row["output_concept"]], length)
            vectors = model.compute_steering_vectors(**steering)
            with torch.no_grad():
                losses[length] = model(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    labels=batch["labels"],
                    steering_vectors=vectors,
                ).loss.item()
        assert losses[3] != pytest.approx(losses[64], abs=1e-4)  # the cut matters for these concepts
        assert result["per_concept"][row["output_concept"]]["hypersteer"] == pytest.approx(losses[3], abs=1e-5)


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


def _count_generations(model, run):
    calls = []
    handle = model.language_model.register_forward_hook(lambda *args: calls.append(1))
    try:
        samples = run()
    finally:
        handle.remove()
    return samples, len(calls)


def test_generations_of_another_checkpoint_or_other_settings_are_never_reused(tiny_tokenizer, tmp_path):
    tasks = generation_tasks({"legal terms": ["Hi", "Explain sorting."]}, 2, {"legal terms": 7})
    path = tmp_path / "generations.jsonl"
    first_model, other_model = _model(tiny_tokenizer, seed=0), _model(tiny_tokenizer, seed=1)
    assert model_fingerprint(first_model.config, first_model.hypernetwork.state_dict()) != model_fingerprint(
        other_model.config, other_model.hypernetwork.state_dict()
    )

    def run(model, **settings):
        kwargs = {"max_new_tokens": 4, "do_sample": False, **settings}
        return _count_generations(
            model,
            lambda: generate_samples(
                model, tiny_tokenizer, tasks, ["hypersteer"], [1.0], generations_path=path, **kwargs
            ),
        )

    first, calls = run(first_model)
    assert calls > 0 and all(sample["concept_id"] == 7 for sample in first)
    # Another checkpoint into the same file: everything is generated again, from the other model.
    other, calls = run(other_model)
    assert calls > 0 and {s["run_key"] for s in other}.isdisjoint({s["run_key"] for s in first})
    fresh = generate_samples(
        other_model, tiny_tokenizer, tasks, ["hypersteer"], [1.0], max_new_tokens=4, do_sample=False
    )
    assert [s["generation"] for s in other] == [s["generation"] for s in fresh]
    # The same checkpoint with other decoding settings: generated again too.
    _, calls = run(first_model, max_new_tokens=3)
    assert calls > 0
    # The same checkpoint and settings: reused, nothing generated.
    again, calls = run(first_model)
    assert calls == 0 and again == first
    assert len(path.read_text().splitlines()) == 3 * len(tasks)


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


def test_prompt_hypersteer_offline_benchmark_scores_both_methods_per_factor_and_pools(
    trained_dir, tmp_path, monkeypatch
):
    sys.path.insert(0, str(REPO_ROOT / "benchmarks" / "quality"))
    import prompt_hypersteer_offline as benchmark

    monkeypatch.setattr(benchmark, "RESULTS_PATH", tmp_path / "results.json")
    common = ["--heldback_data", "", "--heldout_rows_per_concept", "2", "--eval_max_length", "192"]
    result = benchmark.main(["--run_dirs", str(trained_dir), "--name", "tiny", "--factors", "0.5,2", *common])
    run = result[str(trained_dir)]
    assert set(run) == {"heldin", "heldout"} and set(run["heldout"]) == {"0.5", "2"}
    split = ConceptSplit.from_json(trained_dir / "concept_split.json")
    model = HyperSteerModel.from_pretrained(trained_dir)
    rows = benchmark.run_rows(
        trained_dir, benchmark.argparse.Namespace(heldout_rows_per_concept=2, heldback_data="", sets="heldout")
    )
    assert list(rows) == ["heldout"] and {row["output_concept"] for row in rows["heldout"]} == set(
        split.heldout_concepts
    )
    # The unsteered and prompted losses of the first factor, reused at the second, are those of a call of its own.
    fresh = offline_steering_metric(
        model, model.tokenizer, rows["heldout"], steering_factor=2.0, max_length=192, prompt_hypersteer=True
    )
    for condition, value in fresh["losses"].items():
        assert run["heldout"]["2"]["losses"][condition] == pytest.approx(value, abs=1e-6), condition
    assert run["heldout"]["0.5"]["losses"]["prompt"] == pytest.approx(run["heldout"]["2"]["losses"]["prompt"])
    assert run["heldout"]["0.5"]["losses"]["prompt_hypersteer"] != pytest.approx(
        run["heldout"]["2"]["losses"]["prompt_hypersteer"], abs=1e-5
    )
    # One run pooled is that run, for each method.
    pooled = result["pooled"]["heldout"]["2"]
    for method, ratios in (("hypersteer", fresh), ("prompt_hypersteer", fresh["prompt_hypersteer"])):
        for name in ("specificity_ratio", "gain_ratio"):
            if ratios[name] is None:
                assert pooled[method][name] is None
            else:
                assert pooled[method][name] == pytest.approx(ratios[name], abs=1e-6)
    assert "tiny" in json.loads((tmp_path / "results.json").read_text())["runs"]
    # A run whose saved split is not the one its summary rebuilds is refused, naming the file.
    moved = Path(shutil.copytree(trained_dir, tmp_path / "moved"))
    saved = json.loads((moved / "concept_split.json").read_text())
    saved["heldout_concepts"][0], saved["heldin_concepts"][0] = (
        saved["heldin_concepts"][0],
        saved["heldout_concepts"][0],
    )
    (moved / "concept_split.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="not the run's concept_split.json"):
        benchmark.main(["--run_dirs", str(moved), "--name", "moved", *common])
    with pytest.raises(SystemExit):
        benchmark.main(["--run_dirs", str(tmp_path), "--name", "empty", *common])
    with pytest.raises(SystemExit):
        benchmark.main(["--run_dirs", str(trained_dir), "--name", "sets", "--sets", "heldin,elsewhere", *common])
    with pytest.raises(SystemExit):
        benchmark.main(["--run_dirs", str(trained_dir), "--name", "zero", "--factors", "0,1", *common])


def test_concept_part_scale_probe_changes_only_the_vectors(trained_dir, tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO_ROOT / "benchmarks" / "quality"))
    import probe_concept_part_scale as probe

    vectors, mean = torch.tensor([[3.0, 4.0], [1.0, 0.0]]), torch.tensor([1.0, 1.0])
    assert torch.equal(probe.transform(vectors, mean, "k1"), vectors)
    assert torch.equal(probe.transform(vectors, mean, "k2"), 2 * vectors - mean)
    assert torch.equal(probe.transform(vectors, mean, "c1"), vectors - mean)
    rescaled = probe.transform(vectors, mean, "r1")
    assert torch.allclose(rescaled.norm(dim=-1), vectors.norm(dim=-1))
    assert torch.allclose(F.normalize(rescaled, dim=-1), F.normalize(vectors - mean, dim=-1))
    for bad in ("x2", "k", "knan", "kinf"):
        with pytest.raises(ValueError, match=f"got '{bad}'"):
            probe.parse_variant(bad)
    monkeypatch.setattr(probe, "RESULTS_PATH", tmp_path / "results.json")
    common = ["--run_dirs", str(trained_dir), "--name", "tiny", "--sets", "heldout", "--heldback_data", ""]
    result = probe.main([*common, "--variants", "k1,k2", "--heldout_rows_per_concept", "2"])
    # k1 is the model's own vector: its losses are the hypernetwork's.
    model = HyperSteerModel.from_pretrained(trained_dir)
    arguments = argparse.Namespace(heldout_rows_per_concept=2, heldback_data="", sets="heldout")
    rows = probe.prompt_hypersteer_offline.run_rows(trained_dir, arguments)["heldout"]
    own = offline_steering_metric(model, model.tokenizer, rows, max_length=320)
    run = result[str(trained_dir)]["heldout"]
    for condition in ("hypersteer", "hypersteer_wrong", "prompt", "none"):
        assert run["k1"]["losses"][condition] == pytest.approx(own["losses"][condition], abs=1e-5), condition
    assert run["k2"]["losses"]["hypersteer"] != pytest.approx(own["losses"]["hypersteer"], abs=1e-5)
    assert run["k2"]["losses"]["prompt"] == run["k1"]["losses"]["prompt"]
    assert set(result["pooled"]["heldout"]) == {"k1", "k2"}
    with pytest.raises(SystemExit):
        probe.main([*common, "--variants", "k1,q2"])


def test_prompted_calibration_benchmark_records_the_rule_without_changing_the_run(trained_dir, tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO_ROOT / "benchmarks" / "quality"))
    import prompted_calibration as benchmark

    monkeypatch.setattr(benchmark, "RESULTS_PATH", tmp_path / "results.json")
    config_before = (trained_dir / "config.json").read_text()
    settings = ["--calibration_concepts", "2", "--calibration_instructions", "2", "--calibration_max_new_tokens", "4"]
    result = benchmark.main(["--run_dirs", str(trained_dir), "--name", "tiny", "--factors", "1,0.5", *settings])
    record = result[str(trained_dir)]
    assert (trained_dir / "config.json").read_text() == config_before
    assert record["method"] == "prompt_hypersteer" and record["grid"] == [0.5, 1.0]
    expected, _ = select_steering_factor(record["table"], record["reference"]["prompt"])
    assert record["factor"] == expected
    split = ConceptSplit.from_json(trained_dir / "concept_split.json")
    assert len(record["concepts"]) == 2 and set(record["concepts"]) <= set(split.heldin_concepts)
    assert "tiny" in json.loads((tmp_path / "results.json").read_text())["runs"]
    # Both factors in one pass, as the recipe does: the same prompted record, and the default factor's.
    both = benchmark.main(
        ["--run_dirs", str(trained_dir), "--name", "both", "--factors", "1,0.5", "--default_factors", "1,2", *settings]
    )
    assert both[str(trained_dir)]["table"] == record["table"] and both[str(trained_dir)]["factor"] == record["factor"]
    default = both["default_factor"][str(trained_dir)]
    assert default["method"] == "hypersteer" and default["grid"] == [1.0, 2.0]
    assert default["reference"] == both[str(trained_dir)]["reference"]
    assert (trained_dir / "config.json").read_text() == config_before
    with pytest.raises(SystemExit):
        benchmark.main(["--run_dirs", str(trained_dir), "--name", "bad", "--default_factors", "0"])
    with pytest.raises(SystemExit):
        benchmark.main(["--run_dirs", str(trained_dir), "--name", "bad", "--factors", "0.5,inf"])
    with pytest.raises(SystemExit):
        benchmark.main(["--run_dirs", str(tmp_path), "--name", "empty"])


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
        "concept_id",
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
    data = load_concept_data(str(AXBENCH_TRAIN))
    ids = {row["output_concept"]: row["concept_id"] for row in data if not row["is_negative"]}
    assert all(sample["concept_id"] == ids[sample["concept"]] for sample in samples)
    assert summary["excluded_concepts"] == {}
    assert all(method["num_concepts"] == 3 for method in summary["methods"].values())
    for name in ("evaluation_summary.json", "evaluation_summary.md", "score_vs_factor.png", "ratings.png"):
        assert (output_dir / name).is_file()
    assert (output_dir / "offline_losses.png").is_file()
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

    # Another checkpoint evaluated into the same folder: not one generation of the first model is reused.
    other = _perturbed_copy(trained_dir, tmp_path / "other")
    other_argv = [item if item != str(trained_dir) else str(other) for item in argv]
    lines_before = len((output_dir / "generations.jsonl").read_text().splitlines())
    evaluate_steering.main(other_argv)
    other_samples = [json.loads(line) for line in (output_dir / "samples.jsonl").read_text().splitlines()]
    assert len((output_dir / "generations.jsonl").read_text().splitlines()) == lines_before + len(samples)
    assert {s["run_key"] for s in other_samples}.isdisjoint({s["run_key"] for s in samples})
    hypersteer_texts = {
        (s["concept"], s["factor"], s["instruction"]): s["generation"] for s in samples if s["method"] == "hypersteer"
    }
    assert any(
        hypersteer_texts[(s["concept"], s["factor"], s["instruction"])] != s["generation"]
        for s in other_samples
        if s["method"] == "hypersteer"
    )


def _perturbed_copy(model_dir, target):
    """A copy of a checkpoint folder with other hypernetwork weights, as another training run would leave."""
    shutil.copytree(model_dir, target)
    weights = load_file(target / "model.safetensors")
    # Weights move; integer buffers (e.g. the running centre's update count) stay as saved.
    perturbed = {
        key: value + 0.05 * torch.randn_like(value) if value.is_floating_point() else value
        for key, value in weights.items()
    }
    save_file(perturbed, target / "model.safetensors")
    return target


def _offline_argv(model_dir, output_dir, *extra):
    return [
        "--model",
        str(model_dir),
        "--offline_examples_per_concept",
        "2",
        "--output_dir",
        str(output_dir),
        "--max_length",
        "192",
        *extra,
    ]


def test_offline_only_without_a_judge_and_the_card_shows_it(trained_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    model_dir = shutil.copytree(trained_dir, tmp_path / "model")
    summary = evaluate_steering.main(
        _offline_argv(model_dir, tmp_path / "eval", "--concepts", "all", "--dtype", "float32", "--device_map", "cpu")
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
    assert "only the offline metric" in (tmp_path / "eval" / "evaluation_summary.md").read_text()

    # The summary reaches the model card: evaluation writes it where the card reads it.
    written = json.loads((model_dir / "evaluation_summary.json").read_text())
    assert written["model_fingerprint"] == summary["model_fingerprint"]
    card = write_model_card(model_dir, HyperSteerConfig.from_pretrained(model_dir)).read_text()
    heldout = summary["offline"]["heldout"]
    gain = heldout["gain_ratio"]
    gain_cell = f"undefined: {heldout['undefined_ratios']['gain_ratio']}" if gain is None else f"{gain:.4f}"
    assert f"| `heldout` | {heldout['num_concepts']} | {gain_cell} |" in card
    assert "**Offline evaluation only.**" in card
    # Weights changed after the evaluation (e.g. retrained into the same folder): the card drops the stale numbers.
    _perturbed_copy(model_dir, tmp_path / "retrained")
    shutil.copy(tmp_path / "retrained" / "model.safetensors", model_dir / "model.safetensors")
    stale = write_model_card(model_dir, HyperSteerConfig.from_pretrained(model_dir)).read_text()
    assert "| `heldout` |" not in stale and "**Not evaluated.**" in stale


def test_prompt_hypersteer_gets_offline_ratios_against_prompting_and_the_card_shows_them(
    trained_dir, tmp_path, monkeypatch
):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    model_dir = shutil.copytree(trained_dir, tmp_path / "model")
    common = ("--concepts", "heldout", "--offline_steering_factor", "0.5")
    plain = evaluate_steering.main(
        _offline_argv(model_dir, tmp_path / "plain", *common, "--save_summary_to_model", "false")
    )
    summary = evaluate_steering.main(
        _offline_argv(model_dir, tmp_path / "eval", *common, "--methods", "prompt_hypersteer,prompt,none")
    )
    heldout = summary["offline"]["heldout"]
    losses = heldout["losses"]
    # The methods without the vector on the prompt are scored as before.
    assert {key: value for key, value in losses.items() if not key.startswith("prompt_hypersteer")} == plain[
        "offline"
    ]["heldout"]["losses"]
    assert "prompt_hypersteer" not in plain["offline"]["heldout"]
    assert {"prompt_hypersteer", "prompt_hypersteer_wrong"} <= set(losses)
    ratios = heldout["prompt_hypersteer"]
    expected_gain = (losses["none"] - losses["prompt_hypersteer"]) / (losses["none"] - losses["prompt"])
    if ratios["gain_ratio"] is not None:
        assert ratios["gain_ratio"] == pytest.approx(expected_gain)
    else:
        assert "gain_ratio" in ratios["undefined_ratios"]
    assert "On top of the prompt" in (tmp_path / "eval" / "evaluation_summary.md").read_text()
    card = write_model_card(model_dir, HyperSteerConfig.from_pretrained(model_dir)).read_text()
    assert "On top of the prompt (`prompt_hypersteer`" in card
    assert f"| `heldout` | {_card_ratio(ratios, 'gain_ratio')} | {_card_ratio(ratios, 'specificity_ratio')} |" in card


def _card_ratio(result, name):
    reason = result["undefined_ratios"].get(name)
    return f"undefined: {reason}" if reason else f"{result[name]:.4f}"


def test_the_card_shows_judge_scores_of_evaluate_steering(trained_dir, tmp_path, openai_stub):
    model_dir = shutil.copytree(trained_dir, tmp_path / "model")
    instructions = tmp_path / "instructions.txt"
    instructions.write_text("Name a color.\n\nCount to three.\nName a color.\n")
    summary = evaluate_steering.main(
        [
            "--model",
            str(model_dir),
            "--instructions",
            str(instructions),
            "--num_instructions_per_concept",
            "2",
            "--steering_factors",
            "1.0",
            "--max_new_tokens",
            "4",
            "--offline_examples_per_concept",
            "0",
            "--judge_base_url",
            openai_stub.base_url,
            "--judge_model",
            "stub-judge",
            "--output_dir",
            str(tmp_path / "eval"),
        ]
    )
    samples = [json.loads(line) for line in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    assert {(s["instruction"], s["split"]) for s in samples} == {
        ("Name a color.", "select"),
        ("Count to three.", "test"),
    }
    model = HyperSteerModel.from_pretrained(model_dir)
    card = write_model_card(model_dir, model).read_text()
    assert "judged by `stub-judge`" in card
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in card.splitlines() if line.startswith("| `")}
    for name, report in summary["methods"].items():
        cells = [cell.strip() for cell in rows[f"`{name}`"]]
        keys = ("score", "concept_score", "instruction_score", "fluency_score", "num_concepts")
        assert [float(cell) for cell in cells[:5]] == pytest.approx([report[key] for key in keys], abs=5e-5)


def test_held_in_evaluation_without_the_training_split_settings_fails(trained_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    model_dir = shutil.copytree(trained_dir, tmp_path / "model")
    training = json.loads((model_dir / "training_summary.json").read_text())
    del training["split_settings"]
    (model_dir / "training_summary.json").write_text(json.dumps(training))
    for concepts in ("heldin", "all"):
        with pytest.raises(ValueError, match="Held-in evaluation needs the training run's split settings"):
            evaluate_steering.main(_offline_argv(model_dir, tmp_path / "eval", "--concepts", concepts))
    # Held-out concepts never reached training: they need no split settings.
    summary = evaluate_steering.main(_offline_argv(model_dir, tmp_path / "eval", "--concepts", "heldout"))
    assert set(summary["offline"]) == {"heldout"}


def test_concept_data_of_another_source_is_evaluated_as_never_trained(trained_dir, tmp_path, axbench_dir, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    trained = ConceptSplit.from_json(trained_dir / "concept_split.json")
    other = load_concept_data(str(axbench_dir / "conceptFD" / "prod_2b_l20_v1" / "train_data.parquet"))
    other = other.filter(
        lambda row: row["output_concept"] not in {*trained.heldin_concepts, *trained.heldout_concepts}
    )
    new_concepts = sorted({row["output_concept"] for row in other if not row["is_negative"]})[:2]
    new_data = tmp_path / "new.parquet"
    other.filter(lambda row: row["output_concept"] in new_concepts).to_parquet(new_data)

    def evaluate(data, output_name, concepts="all"):
        # conceptFD's long descriptions need room in the prompted condition.
        argv = ["--dataset_name_or_path", str(data), "--concepts", concepts, "--max_length", "640"]
        return evaluate_steering.main(_offline_argv(trained_dir, tmp_path / output_name, *argv))

    summary = evaluate(new_data, "eval")
    # Every concept of that data is never-trained: it is scored as held-out, with no held-in part.
    assert set(summary["offline"]) == {"heldout"}
    assert summary["offline"]["heldout"]["num_concepts"] == 2
    # Data that shares some concepts with the training split (e.g. a data set the run trained on part of): its other
    # concepts are never-trained and scored as held-out; the trained concept is left out, since which of its rows were
    # trained on is unknown, and refused when named.
    mixed = tmp_path / "mixed.parquet"
    trained_rows = load_concept_data(str(axbench_dir / "concept10" / "prod_2b_l20_v1" / "train_data.parquet"))
    trained_rows = trained_rows.filter(lambda row: row["output_concept"] == trained.heldin_concepts[0])
    concatenate_datasets([trained_rows, load_concept_data(str(new_data))]).to_parquet(mixed)
    summary = evaluate(mixed, "eval2")
    assert set(summary["offline"]) == {"heldout"}
    assert summary["offline"]["heldout"]["num_concepts"] == 2
    with pytest.raises(
        ValueError, match=r"names concept\(s\) the run trained on.*Evaluate them with the run's own data"
    ):
        # Named as --concepts is parsed: spaces around a name do not hide it.
        evaluate(mixed, "eval3", concepts=f" {trained.heldin_concepts[0]} |{new_concepts[0]}")
    with pytest.raises(ValueError, match="No concepts selected by --concepts 'heldin'"):
        evaluate(mixed, "eval4", concepts="heldin")


def test_a_missing_model_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="'/no/such/path': the model is missing"):
        evaluate_steering.main(["--model", "/no/such/path", "--output_dir", str(tmp_path / "eval")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="folder without config.json"):
        evaluate_steering.main(["--model", str(tmp_path / "empty"), "--output_dir", str(tmp_path / "eval")])
    assert not (tmp_path / "eval").exists()


def test_bad_method_is_rejected():
    with pytest.raises(ValueError, match="reft"):
        evaluate_steering.main(["--model", "x", "--output_dir", "y", "--methods", "hypersteer,reft"])


def test_baselines_are_built_from_training_rows_and_scored_offline(trained_dir, tmp_path, monkeypatch):
    from modeling_hypersteer.baselines import load_concept_vectors
    from modeling_hypersteer.data import ConceptSplit

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    output_dir = tmp_path / "eval"
    argv = _offline_argv(
        trained_dir,
        output_dir,
        "--concepts",
        "all",
        "--methods",
        "hypersteer,prompt,none,diffmean,vector",
        "--vector_baseline_steps",
        "3",
    )
    summary = evaluate_steering.main(argv)
    split = ConceptSplit.from_json(trained_dir / "concept_split.json")
    for method in ("diffmean", "vector"):
        meta, vectors = load_concept_vectors(output_dir / "baselines" / method)
        assert meta["method"] == method
        # One vector per held-in concept, none for held-out concepts (they have no training rows).
        assert sorted(vectors) == sorted(split.heldin_concepts)
        assert all(vector.shape == (32,) for vector in vectors.values())
        heldin = summary["offline_baselines"][method]["heldin"]
        assert heldin["num_rows"] == summary["offline"]["heldin"]["num_rows"]
        # The shared conditions are the very numbers of HyperSteer's metric on the same rows.
        for condition in ("none", "prompt", "prompt_wrong"):
            assert heldin["losses"][condition] == summary["offline"]["heldin"]["losses"][condition]
        assert "no training rows" in summary["offline_baselines"][method]["heldout"]["note"]
    diffmean = load_concept_vectors(output_dir / "baselines" / "diffmean")[1]
    norms = torch.stack(list(diffmean.values())).norm(dim=-1)
    torch.testing.assert_close(norms, norms[:1].expand_as(norms))
    assert "row_losses" not in summary["offline"]["heldin"]
    # A second run reuses the saved vectors instead of rebuilding them.
    stamp = (output_dir / "baselines" / "vector" / "concept_vectors.safetensors").stat().st_mtime_ns
    evaluate_steering.main(argv)
    assert (output_dir / "baselines" / "vector" / "concept_vectors.safetensors").stat().st_mtime_ns == stamp


def test_offline_numbers_depend_neither_on_the_methods_nor_on_resuming(trained_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    saved = load_file(trained_dir / "model.safetensors")
    # The CLI's default model standardizes its pooled features: it carries running statistics.
    assert any("running_variance" in key for key in saved)
    loaded = []
    load = HyperSteerModel.from_pretrained

    def recording_load(*args, **kwargs):
        loaded.append(load(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(evaluate_steering.HyperSteerModel, "from_pretrained", recording_load)
    common = ("--concepts", "heldin", "--vector_baseline_steps", "3", "--save_summary_to_model", "false")
    alone = evaluate_steering.main(_offline_argv(trained_dir, tmp_path / "alone", "--methods", "hypersteer", *common))
    # The per-concept vectors are trained first (a Trainer, which leaves the model in training mode) ...
    after_vectors = evaluate_steering.main(
        _offline_argv(trained_dir, tmp_path / "vector", "--methods", "vector,hypersteer", *common)
    )
    # ... and reused from disk when the run is resumed.
    resumed = evaluate_steering.main(
        _offline_argv(trained_dir, tmp_path / "vector", "--methods", "vector,hypersteer", *common)
    )
    assert alone["offline"]["heldin"]["losses"]["hypersteer"] != alone["offline"]["heldin"]["losses"]["none"]
    assert after_vectors["offline"] == alone["offline"] and resumed["offline"] == alone["offline"]
    assert after_vectors["offline_baselines"] == resumed["offline_baselines"]
    assert len(loaded) == 3
    for model in loaded:
        assert not model.training
        state = {f"hypernetwork.{key}": value for key, value in model.hypernetwork.state_dict().items()}
        assert set(state) == set(saved)
        for key, value in saved.items():
            assert state[key].dtype == value.dtype and torch.equal(state[key], value), key
