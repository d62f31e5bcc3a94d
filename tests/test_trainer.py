"""Training: HyperSteerTrainer and train_hypersteer.py on real AxBench rows with a tiny random base."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import warnings

import psutil
import pytest
import torch
from conftest import REPO_ROOT, build_tiny_base, cli_arguments, free_port, save_tiny_base
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import train_hypersteer
from modeling_hypersteer import HyperSteerModel
from modeling_hypersteer.data import HyperSteerDataCollator, load_concept_data, tokenize_dataset
from modeling_hypersteer.evaluation import model_fingerprint
from modeling_hypersteer.trainer import DEFAULT_EVALUATIONS_PER_RUN, HyperSteerTrainer, HyperSteerTrainingArguments


@pytest.fixture(scope="module")
def tiny_base_dir(tmp_path_factory, tiny_tokenizer):
    return save_tiny_base(tmp_path_factory.mktemp("tiny_base"), tiny_tokenizer)


@pytest.fixture(scope="module")
def concept_file(axbench_dir):
    return str(axbench_dir / "concept10" / "prod_2b_l20_v1" / "train_data.parquet")


def _arguments(base_dir, data, output_dir, **overrides):
    arguments = {
        "base_model_name_or_path": str(base_dir),
        "steering_layer": 2,
        "hypernet_num_layers": 2,
        "dataset_name_or_path": data,
        "heldout_concepts": 2,
        "max_examples_per_concept": 4,
        "max_length": 192,
        "per_device_train_batch_size": 4,
        "learning_rate": 3e-3,
        "max_steps": 30,
        "logging_steps": 1,
        "eval_steps": 15,
        "save_steps": 15,
        "output_dir": str(output_dir),
        "report_to": "none",
        "seed": 0,
        "dataloader_num_workers": 0,
    }
    arguments.update(overrides)
    return cli_arguments(**arguments)


def test_end_to_end_run_learns_and_saves_a_loadable_hypernetwork(tiny_base_dir, concept_file, tmp_path):
    output_dir = tmp_path / "run"
    metrics = train_hypersteer.main(_arguments(tiny_base_dir, concept_file, output_dir))
    assert {"eval_heldin_loss", "eval_heldout_loss", "eval_heldin_steering_vector_norm"} <= set(metrics)

    state = json.loads((output_dir / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05, losses
    assert all("steering_vector_norm" in entry for entry in state["log_history"] if "loss" in entry)
    assert (output_dir / "loss_curve.png").stat().st_size > 10_000

    split = json.loads((output_dir / "concept_split.json").read_text())
    assert len(split["heldout_concepts"]) == 2 and not set(split["heldout_concepts"]) & set(split["heldin_concepts"])

    weights = load_file(output_dir / "model.safetensors")
    assert all(key.startswith("hypernetwork.") for key in weights)
    checkpoint = output_dir / "checkpoint-15"
    assert os.path.getsize(checkpoint / "model.safetensors") < os.path.getsize(tiny_base_dir / "model.safetensors")
    assert not any(name.startswith("language_model") for name in load_file(checkpoint / "model.safetensors"))

    loaded = HyperSteerModel.from_pretrained(output_dir)
    auto_loaded = AutoModelForCausalLM.from_pretrained(output_dir, trust_remote_code=True)
    for model in (loaded, auto_loaded):
        for key, value in weights.items():
            assert torch.equal(model.state_dict()[key], value)
    assert loaded.config.base_model_name_or_path == str(tiny_base_dir)


def test_fitted_readout_without_training_steps_is_saved_and_loads(tiny_base_dir, concept_file, tmp_path):
    output_dir = tmp_path / "run"
    arguments = dict(
        hypernet_type="no_context",
        hypernet_pooling="mean",
        shared_steering_offset=True,
        center_pooled_features=True,
        fit_readout=True,
        fit_readout_norm=True,
        readout_ridges="0.1,1",
        concept_vector_steps=5,
        eval_strategy="no",
        save_strategy="no",
        max_steps=0,
    )
    train_hypersteer.main(_arguments(tiny_base_dir, concept_file, output_dir, **arguments))
    summary = json.loads((output_dir / "training_summary.json").read_text())
    split = json.loads((output_dir / "concept_split.json").read_text())
    record = summary["readout_fit"]
    assert record["concepts"] == len(split["heldin_concepts"]) == summary["concept_vector_targets"]["concepts"]
    assert record["ridge"] in (0.1, 1.0) and record["training_cosine"] > 0.5
    # No training step ran: the saved model is the closed-form fit, and its statistics come with it.
    assert json.loads((output_dir / "trainer_state.json").read_text())["global_step"] == 0
    model = HyperSteerModel.from_pretrained(output_dir)
    assert model.hypernetwork.output_projection.weight.abs().sum() > 0
    assert model.hypernetwork.feature_center.num_updates.item() == record["concepts"]
    assert model.config.readout_norm == record["readout_norm"] > 0
    with pytest.raises(ValueError, match="--max_steps 0 trains nothing"):
        train_hypersteer.main(
            _arguments(
                tiny_base_dir,
                concept_file,
                tmp_path / "unfitted",
                **{**arguments, "fit_readout": None, "fit_readout_norm": None},
            )
        )


def test_concept_vector_targets_are_trained_first_and_pull_the_hypernetwork(tiny_base_dir, concept_file, tmp_path):
    output_dir = tmp_path / "run"
    train_hypersteer.main(
        _arguments(
            tiny_base_dir,
            concept_file,
            output_dir,
            hypernet_type="no_context",
            concept_vector_loss_weight=1.0,
            concept_vector_steps=5,
            concept_vector_learning_rate=0.05,
            eval_strategy="no",
            save_strategy="no",
            max_steps=20,
        )
    )
    state = json.loads((output_dir / "trainer_state.json").read_text())
    errors = [entry["concept_vector_loss"] for entry in state["log_history"] if "concept_vector_loss" in entry]
    # Every training row's concept has a target (a missing one would leave the term unlogged), and it is learned.
    assert len(errors) == 20
    assert sum(errors[-5:]) / 5 < sum(errors[:5]) / 5, errors
    # The vectors' own training saves nothing into the model's folder; the summary says how they were made.
    assert not list(output_dir.glob("checkpoint-*"))
    record = json.loads((output_dir / "training_summary.json").read_text())["concept_vector_targets"]
    split = json.loads((output_dir / "concept_split.json").read_text())
    assert record["concepts"] == len(split["heldin_concepts"]) and record["steps"] == 5 and record["norm_mean"] > 0


@pytest.mark.parametrize("train_readout_only", [False, True])
def test_trainer_changes_every_hypernetwork_parameter_and_no_base_parameter(
    tiny_tokenizer, concept_file, tmp_path, train_readout_only
):
    base = build_tiny_base("gemma2", len(tiny_tokenizer))
    model = HyperSteerModel.from_base_model(
        base,
        tokenizer=tiny_tokenizer,
        steering_layer=2,
        hypernet_num_layers=2,
        token_gate=True,
        shared_steering_offset=True,
    )
    data = load_concept_data(concept_file).select(range(16))
    dataset = tokenize_dataset(data, tiny_tokenizer, max_length=192)
    before_hypernet = {name: p.detach().clone() for name, p in model.hypernetwork.named_parameters()}
    before_base = {name: p.detach().clone() for name, p in model.language_model.named_parameters()}
    args = HyperSteerTrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to="none",
        eval_strategy="no",
        save_strategy="no",
        logging_steps=2,
        train_readout_only=train_readout_only,
    )
    trainer = HyperSteerTrainer(
        model=model, args=args, train_dataset=dataset, data_collator=HyperSteerDataCollator(tokenizer=tiny_tokenizer)
    )
    trainer.train()
    # The readout: every parameter the vector is linear in, given the blocks' features.
    readout = {"output_projection.weight", "steering_offset"}
    trained = {name for name in before_hypernet if not train_readout_only or name in readout}
    assert readout < set(before_hypernet) and len(before_hypernet) > len(readout)
    for name, parameter in model.hypernetwork.named_parameters():
        if name in trained:
            assert not torch.equal(parameter, before_hypernet[name]), f"{name} did not change"
        else:
            assert torch.equal(parameter, before_hypernet[name]), f"{name} changed with train_readout_only"
    for name, parameter in model.language_model.named_parameters():
        assert torch.equal(parameter, before_base[name]), f"base parameter {name} changed"
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all("steering_gate_mean" in entry and 0 <= entry["steering_gate_mean"] <= 1 for entry in logged)
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for name, p in model.hypernetwork.named_parameters() if name in trained}


def test_resume_from_checkpoint_is_exact(tiny_base_dir, concept_file, tmp_path):
    common = {"max_steps": 6, "save_steps": 3, "eval_strategy": "no", "learning_rate": 1e-2}
    train_hypersteer.main(_arguments(tiny_base_dir, concept_file, tmp_path / "straight", **common))
    # The straight run's step-3 checkpoint is exactly what a run killed after step 3 leaves behind.
    train_hypersteer.main(
        _arguments(
            tiny_base_dir,
            concept_file,
            tmp_path / "resumed",
            resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-3"),
            **common,
        )
    )
    straight = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    assert set(straight) == set(resumed)
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=1e-5, atol=1e-6)

    def losses(path):
        history = json.loads((path / "trainer_state.json").read_text())["log_history"]
        return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}

    straight_losses, resumed_losses = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    # Same batches in the same order after the resume point.
    for step in (4, 5, 6):
        assert resumed_losses[step] == pytest.approx(straight_losses[step], rel=1e-5)


def _launch_two_processes(
    arguments: list[str], attempts: int = 2, timeout: float = 240
) -> subprocess.CompletedProcess:
    """Runs `accelerate launch` with two CPU processes, killing the whole process group of a launch that hangs.

    A gloo rendezvous on a loaded machine has, rarely, left one rank waiting forever for a peer that never connected
    (seen once in dozens of CI runs; the rerun passed in 12 s). A hang is retried once on a new port; a launch that
    ends, however it ends, is returned for the test to judge, so a real failure is never retried away.
    """
    hangs = []
    for _ in range(attempts):
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(free_port()),
            str(REPO_ROOT / "train_hypersteer.py"),
            "--use_cpu",
            *arguments,
        ]
        # Its own session, so a timeout can kill the ranks too and not only the launcher.
        launch = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO_ROOT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            start_new_session=True,
        )
        try:
            stdout, stderr = launch.communicate(timeout=timeout)
            return subprocess.CompletedProcess(command, launch.returncode, stdout, stderr)
        except subprocess.TimeoutExpired:
            # The ranks run in sessions of their own (torch's elastic agent starts them so): kill the whole tree, or a
            # surviving rank keeps the pipes open and `communicate()` below waits for it forever.
            ranks = psutil.Process(launch.pid).children(recursive=True)
            os.killpg(launch.pid, signal.SIGKILL)
            for rank in ranks:
                with contextlib.suppress(psutil.NoSuchProcess):
                    rank.kill()
            _, stderr = launch.communicate()
            hangs.append(stderr[-2000:])
            warnings.warn(
                f"Two-process launch hung for {timeout} s and was killed; stderr tail:\n{hangs[-1]}", stacklevel=2
            )
    pytest.fail(f"Every two-process launch hung ({attempts} of {attempts}); stderr tails:\n" + "\n---\n".join(hangs))


def test_two_cpu_processes_agree_and_save_a_loadable_model(tiny_base_dir, concept_file, tmp_path):
    output_dir = tmp_path / "ddp"
    result = _launch_two_processes(
        _arguments(
            tiny_base_dir,
            concept_file,
            output_dir,
            max_steps=6,
            eval_strategy="no",
            save_strategy="no",
            per_device_train_batch_size=2,
        )
    )
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((output_dir / "training_summary.json").read_text())
    assert summary["world_size"] == 2
    # The fingerprints cover the running feature statistics (the CLI's default model standardizes its features),
    # which every process must hold identically too.
    fingerprints = summary["rank_fingerprints"]
    assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1]
    model = HyperSteerModel.from_pretrained(output_dir)
    state = model.hypernetwork.state_dict()
    assert state["feature_center.num_updates"] > 0
    total = sum(tensor.double().sum().item() for tensor in state.values())
    assert total == pytest.approx(fingerprints[0][0], rel=1e-9)


def _write_parquet(path, rows):
    import pandas as pd

    pd.DataFrame(rows).to_parquet(path)
    return str(path)


@pytest.mark.parametrize("problem", ["missing_column", "empty", "unknown_path", "offline_hub_id"])
def test_bad_data_fails_with_a_clear_message_and_writes_nothing(tiny_base_dir, tmp_path, problem, monkeypatch):
    row = {
        "input": "Hi",
        "output": "Hello",
        "output_concept": "greetings",
        "concept_id": 0,
        "category": "positive",
        "concept_genre": "text",
    }
    if problem == "missing_column":
        data = _write_parquet(tmp_path / "bad.parquet", [{k: v for k, v in row.items() if k != "output"}])
        expected = "missing the required column\\(s\\) \\['output'\\]"
    elif problem == "empty":
        data, expected = _write_parquet(tmp_path / "empty.parquet", {key: [] for key in row}), "empty.parquet"
    elif problem == "unknown_path":
        data, expected = str(tmp_path / "nowhere" / "train_data.parquet"), "nowhere"
    else:
        data, expected = "someone/not-a-local-dataset", "someone/not-a-local-dataset"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    output_dir = tmp_path / "out"
    with pytest.raises((ValueError, FileNotFoundError), match=expected):
        train_hypersteer.main(_arguments(tiny_base_dir, data, output_dir))
    assert not output_dir.exists()


def test_yaml_config_keeps_types_and_flags_override_it(tiny_base_dir, concept_file, tmp_path):
    config = tmp_path / "args.yaml"
    config.write_text(
        f"base_model_name_or_path: {tiny_base_dir}\nsteering_layer: 1\nhypernet_num_layers: 1\n"
        f"dataset_name_or_path:\n  - {concept_file}\n  - {concept_file}\n"
        f"output_dir: {tmp_path / 'out'}\n"
        "token_gate: true\nuse_negatives: true\nplot_loss_curve: false\nheldout_concepts: 3\n"
        "learning_rate: 1e-3\nactivation_checkpointing_kwargs: {use_reentrant: false, determinism_check: none}\n"
    )
    model_args, data_args, training_args = train_hypersteer.parse_arguments(
        ["--config", str(config), "--steering_layer", "2", "--use_negatives", "false"]
    )
    assert model_args.steering_layer == 2 and model_args.hypernet_num_layers == 1
    assert model_args.token_gate is True and training_args.plot_loss_curve is False
    assert data_args.use_negatives is False  # the flag overrides the file's `true`
    assert data_args.dataset_name_or_path == [concept_file, concept_file]  # a YAML list, not "['...', '...']"
    assert data_args.heldout_concepts == "3" and training_args.learning_rate == 1e-3
    # A mapping stays a mapping (stringified, it would reach torch as the text "{'use_reentrant': False, ...}").
    assert training_args.activation_checkpointing_kwargs == {"use_reentrant": False, "determinism_check": "none"}
    # A lone JSON file is read the same way, typed.
    as_json = tmp_path / "args.json"
    as_json.write_text(
        json.dumps(
            {
                "base_model_name_or_path": str(tiny_base_dir),
                "dataset_name_or_path": concept_file,
                "output_dir": str(tmp_path / "out"),
                "token_gate": True,
                "steering_layer": 3,
            }
        )
    )
    model_args, data_args, _ = train_hypersteer.parse_arguments([str(as_json)])
    assert model_args.token_gate is True and model_args.steering_layer == 3
    assert data_args.dataset_name_or_path == [concept_file]
    with pytest.raises(ValueError, match="hypernet_type"):
        train_hypersteer.parse_arguments(["--config", str(config), "--hypernet_type", "lstm"])
    config.write_text(config.read_text() + "steering_layers: 4\n")
    with pytest.raises(ValueError, match=r"key\(s\) \['steering_layers'\] that are not arguments"):
        train_hypersteer.parse_arguments(["--config", str(config)])
    config.write_text("base_model_name_or_path: x\ndataset_name_or_path: d\noutput_dir: o\nsteering_layer: 2.5\n")
    with pytest.raises(ValueError, match="`steering_layer` must be an integer, got 2.5"):
        train_hypersteer.parse_arguments(["--config", str(config)])


def test_evaluation_runs_a_bounded_number_of_times_by_default(tiny_base_dir, concept_file, tmp_path):
    args = HyperSteerTrainingArguments(output_dir=str(tmp_path), max_steps=1000, logging_steps=10, report_to="none")
    assert args.eval_steps == pytest.approx(1 / DEFAULT_EVALUATIONS_PER_RUN)  # not every logging_steps (10)
    assert HyperSteerTrainingArguments(output_dir=str(tmp_path), eval_steps=7).eval_steps == 7
    overrides = {"max_steps": 10, "save_strategy": "no", "eval_steps": None, "logging_steps": 1}
    train_hypersteer.main(_arguments(tiny_base_dir, concept_file, tmp_path / "run", **overrides))
    history = json.loads((tmp_path / "run" / "trainer_state.json").read_text())["log_history"]
    evaluated_at = [entry["step"] for entry in history if "eval_heldout_loss" in entry]
    assert evaluated_at == [2, 4, 6, 8, 10]


def _small_model(tokenizer, **config):
    base = build_tiny_base("llama", len(tokenizer))
    return HyperSteerModel.from_base_model(
        base, tokenizer=tokenizer, steering_layer=2, hypernet_num_layers=1, **config
    )


def test_default_arguments_train_without_an_evaluation_set(tiny_tokenizer, concept_file, tmp_path, monkeypatch):
    model = _small_model(tiny_tokenizer)
    dataset = tokenize_dataset(load_concept_data(concept_file).select(range(8)), tiny_tokenizer, max_length=192)
    collator = HyperSteerDataCollator(tokenizer=tiny_tokenizer)
    args = HyperSteerTrainingArguments(output_dir=str(tmp_path), max_steps=2, report_to="none")
    trainer = HyperSteerTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    assert trainer.args.eval_strategy == "no"
    trainer.train()
    assert trainer.state.global_step == 2
    # The caller's arguments keep their default, which evaluates when there is an evaluation set.
    assert args.eval_strategy == "steps"
    with_eval = HyperSteerTrainer(
        model=model, args=args, train_dataset=dataset, eval_dataset=dataset, data_collator=collator
    )
    assert with_eval.args.eval_strategy == "steps" and with_eval.args.eval_steps == pytest.approx(0.2)
    # An explicit strategy is the user's: without an evaluation set it fails as in Trainer.
    explicit = HyperSteerTrainingArguments(output_dir=str(tmp_path), eval_strategy="steps", report_to="none")
    with pytest.raises(ValueError, match="eval_dataset"):
        HyperSteerTrainer(model=model, args=explicit, train_dataset=dataset, data_collator=collator)
    # No arguments at all: this trainer's own, whose objective fields compute_loss reads.
    monkeypatch.chdir(tmp_path)
    bare = HyperSteerTrainer(model=model, train_dataset=dataset, data_collator=collator)
    assert isinstance(bare.args, HyperSteerTrainingArguments) and bare.args.eval_strategy == "no"


def test_metrics_of_every_process_are_logged_at_the_end_of_an_epoch(
    tiny_tokenizer, concept_file, tmp_path, monkeypatch
):
    model = _small_model(tiny_tokenizer)
    # 5 rows in batches of 2: the third step ends the epoch on a last batch of 1 row.
    dataset = tokenize_dataset(load_concept_data(concept_file).select(range(5)), tiny_tokenizer, max_length=192)
    args = HyperSteerTrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=2,
        logging_steps=1,
        eval_strategy="no",
        report_to="none",
    )
    trainer = HyperSteerTrainer(
        model=model, args=args, train_dataset=dataset, data_collator=HyperSteerDataCollator(tokenizer=tiny_tokenizer)
    )
    gather = trainer.accelerator.gather

    def gather_with_a_second_process(tensor):
        # A second process whose every scalar metric was 1000.
        gathered = gather(tensor)
        if tensor.is_floating_point() and tensor.shape == (1,):
            gathered = torch.cat([gathered, torch.full_like(gathered, 1000.0)])
        return gathered

    monkeypatch.setattr(trainer.accelerator, "gather", gather_with_a_second_process)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logged] == [1, 2, 3]
    # The mean over both processes at every step (this process's norm is far below 1000), also at the epoch's end.
    assert all(500 <= entry["steering_vector_norm"] < 1000 for entry in logged), logged


def test_fingerprints_cover_the_running_statistics(tiny_tokenizer, tmp_path):
    model = _small_model(tiny_tokenizer, center_pooled_features=True, standardize_pooled_features=True)
    args = HyperSteerTrainingArguments(output_dir=str(tmp_path), eval_strategy="no", report_to="none")
    trainer = HyperSteerTrainer(model=model, args=args)
    rank_fingerprints = train_hypersteer.hypernetwork_fingerprints(trainer)
    checkpoint_fingerprint = model_fingerprint(model.config, model.hypernetwork.state_dict())
    with torch.no_grad():
        model.hypernetwork.feature_center.running_variance.mul_(2)
    assert train_hypersteer.hypernetwork_fingerprints(trainer) != rank_fingerprints
    assert model_fingerprint(model.config, model.hypernetwork.state_dict()) != checkpoint_fingerprint
