"""Teacher-free distillation: description-only data, the aligned teacher/student features, and the trainer's term."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny_base, cli_arguments, save_tiny_base

from modeling_hypersteer import HyperSteerModel
from modeling_hypersteer.data import (
    DISTILLATION_COLUMNS,
    MODEL_INPUT_COLUMNS,
    HyperSteerDataCollator,
    build_distillation_rows,
    load_concept_descriptions,
    tokenize_distillation_dataset,
    tokenize_example,
    with_empty_distillation_columns,
)
from modeling_hypersteer.evaluation import prompt_steering_system_prompt
from modeling_hypersteer.trainer import HyperSteerTrainer, HyperSteerTrainingArguments, response_logits


DESCRIPTIONS = [
    "references to legal terminology and court proceedings",
    "C/C++ syntax such as pointers, headers and semicolons",
    "mathematical equations with integrals, sums and limits",
    "the quick brown fox",
]
TEXTS = [
    {"input": "Explain sorting algorithms in simple words.", "output": "Sort the list by comparing pairs."},
    {"input": "Write a short poem about the sea.", "output": "The sea and tidal currents sing."},
]
REAL_ROWS = [
    {
        "input": "Explain sorting in simple words.",
        "output": "The court sorts the docket.",
        "output_concept": DESCRIPTIONS[0],
    },
    {"input": "Write a poem about the fox.", "output": "int *fox; /* jumps */", "output_concept": DESCRIPTIONS[1]},
]


def test_descriptions_load_from_jsonl_txt_and_axbench_keys(tmp_path):
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"feature_index": 0, "description": " time intervals. "})
        + "\n\n"
        + json.dumps({"concept_id": 3, "concept": "rental services"})
        + "\n"
    )
    (tmp_path / "b.txt").write_text("rental services\nmedical examinations\n\n")
    descriptions = load_concept_descriptions(f"{tmp_path / 'a.jsonl'},{tmp_path / 'b.txt'}")
    assert descriptions == ["time intervals.", "rental services", "medical examinations"]


def test_real_concept16k_descriptions_load(axbench_dir):
    path = axbench_dir.parent / "axbench_more" / "concept16k" / "descriptions.jsonl"
    descriptions = load_concept_descriptions(str(path))
    assert len(descriptions) > 15000 and all(isinstance(text, str) and text for text in descriptions[:100])


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"name": "x"}\n', "needs one of the keys"),
        ("not json\n", "not JSON"),
        ('{"description": "   "}\n', "No concept description"),
    ],
)
def test_bad_description_files_are_refused(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_concept_descriptions(str(path))


def test_distillation_rows_pair_two_different_descriptions_and_skip_heldout():
    rows = build_distillation_rows(DESCRIPTIONS, TEXTS, num_rows=7, seed=3, exclude=[DESCRIPTIONS[2].upper()])
    assert len(rows) == 7
    used = set(rows["output_concept"]) | set(rows["contrast_concept"])
    assert DESCRIPTIONS[2] not in used and used == set(DESCRIPTIONS) - {DESCRIPTIONS[2]}
    assert all(first != second for first, second in zip(rows["output_concept"], rows["contrast_concept"]))
    assert {row["output"] for row in rows} == {text["output"] for text in TEXTS}
    again = build_distillation_rows(DESCRIPTIONS, TEXTS, num_rows=7, seed=3, exclude=[DESCRIPTIONS[2]])
    assert again.to_list() == rows.to_list()
    with pytest.raises(ValueError, match="at least 2 concept descriptions"):
        build_distillation_rows(DESCRIPTIONS[:2], TEXTS, num_rows=2, exclude=[DESCRIPTIONS[0]])
    with pytest.raises(ValueError, match="num_rows"):
        build_distillation_rows(DESCRIPTIONS, TEXTS, num_rows=0)


def test_student_and_teachers_share_the_response_tokens(tiny_tokenizer):
    rows = build_distillation_rows(DESCRIPTIONS, TEXTS, num_rows=3, seed=0)
    features = tokenize_distillation_dataset(rows, tiny_tokenizer, prompt_steering_system_prompt, max_length=400)
    for row, feature in zip(rows, features):
        responses = [
            [token for token in feature[f"{prefix}labels"] if token != -100]
            for prefix in ("", "teacher_", "teacher_contrast_")
        ]
        assert responses[0] and responses[0] == responses[1] == responses[2]
        teacher_text = tiny_tokenizer.decode(feature["teacher_input_ids"])
        # The teacher's prompt names the row's own description; the student's names none.
        assert tiny_tokenizer.decode(tiny_tokenizer(row["output_concept"])["input_ids"]) in teacher_text
        assert len(feature["teacher_input_ids"]) > len(feature["input_ids"])
        assert feature["contrast_steering_input_ids"] != feature["steering_input_ids"]


def _mixed_batch(tokenizer):
    rows = build_distillation_rows(DESCRIPTIONS, TEXTS, num_rows=2, seed=0)
    distilled = tokenize_distillation_dataset(rows, tokenizer, prompt_steering_system_prompt, max_length=400)
    real = [tokenize_example(row, tokenizer, max_length=400) for row in REAL_ROWS]
    real = [{**row, **{name: [] for name in DISTILLATION_COLUMNS}} for row in real]
    return HyperSteerDataCollator(tokenizer=tokenizer)(real + list(distilled))


def _model(tokenizer):
    model = HyperSteerModel.from_base_model(
        build_tiny_base("llama", len(tokenizer)),
        tokenizer=tokenizer,
        steering_layer=1,
        hypernet_num_layers=1,
        hypernet_type="no_context",
    )
    with torch.no_grad():
        model.hypernetwork.output_projection.weight.normal_(0.0, 0.3)
    return model


def _trainer(model, tmp_path, **arguments):
    args = HyperSteerTrainingArguments(
        output_dir=str(tmp_path),
        report_to="none",
        eval_strategy="no",
        use_cpu=True,
        contrast_loss_weight=0.0,
        **arguments,
    )
    return HyperSteerTrainer(model=model, args=args, processing_class=model.tokenizer)


@pytest.mark.parametrize("reference", ["prompted", "plain"])
def test_distillation_term_is_the_kl_to_the_guided_teacher(tiny_tokenizer, tmp_path, reference):
    model = _model(tiny_tokenizer).train()
    batch = _mixed_batch(tiny_tokenizer)
    guidance = 2.5
    trainer = _trainer(
        model, tmp_path, distillation_loss_weight=1.0, distillation_guidance=guidance, distillation_reference=reference
    )
    trainer.compute_loss(model, dict(batch))
    logged = trainer._metrics["train"]["distillation_loss"][-1]

    # By hand, one distillation row at a time: the steered student against the unsteered base given the prompts.
    base = model.language_model

    def logits_of(row, prefix, steer_with=None):
        ids = batch[f"{prefix}input_ids"][row : row + 1]
        mask = batch[f"{prefix}attention_mask"][row : row + 1]
        labels = batch[f"{prefix}labels"][row : row + 1]
        real = mask.bool()[0]
        ids, labels = ids[:, real], labels[:, real]
        if steer_with is None:
            logits = base(input_ids=ids).logits
        else:
            steering = batch[f"{steer_with}steering_input_ids"][row : row + 1]
            steering_mask = batch[f"{steer_with}steering_attention_mask"][row : row + 1]
            logits = model(
                input_ids=ids, labels=labels, steering_input_ids=steering, steering_attention_mask=steering_mask
            ).logits
        return response_logits(logits, labels).float()

    expected = []
    for row in (2, 3):
        with torch.no_grad():
            first, second = logits_of(row, "teacher_"), logits_of(row, "teacher_contrast_")
            plain = logits_of(row, "")
            students = (logits_of(row, "", steer_with=""), logits_of(row, "", steer_with="contrast_"))
        references = (plain, plain) if reference == "plain" else (first, second)
        targets = (references[0] + guidance * (first - second), references[1] + guidance * (second - first))
        for student, target in zip(students, targets):
            expected.append((F.softmax(target, -1) * (F.log_softmax(target, -1) - F.log_softmax(student, -1))).sum(-1))
    # Both students' KLs are averaged over all distillation tokens of the batch.
    first_tokens = torch.cat(expected[0::2]).mean()
    second_tokens = torch.cat(expected[1::2]).mean()
    torch.testing.assert_close(logged, (first_tokens + second_tokens) / 2, atol=1e-4, rtol=1e-4)


def test_lm_loss_covers_real_rows_only(tiny_tokenizer, tmp_path):
    model = _model(tiny_tokenizer).train()
    batch = _mixed_batch(tiny_tokenizer)
    trainer = _trainer(model, tmp_path, distillation_loss_weight=1e-12)
    loss = trainer.compute_loss(model, dict(batch))
    real = {name: batch[name][:2] for name in MODEL_INPUT_COLUMNS}
    torch.testing.assert_close(loss, model(**real).loss, atol=1e-5, rtol=1e-5)


def test_distillation_rows_without_a_weight_are_refused(tiny_tokenizer, tmp_path):
    model = _model(tiny_tokenizer).train()
    trainer = _trainer(model, tmp_path)
    with pytest.raises(ValueError, match="distillation_loss_weight"):
        trainer.compute_loss(model, dict(_mixed_batch(tiny_tokenizer)))


def test_empty_distillation_columns_collate_to_no_distillation(tiny_tokenizer, tmp_path):
    from datasets import Dataset

    real = Dataset.from_list([tokenize_example(row, tiny_tokenizer, max_length=400) for row in REAL_ROWS])
    padded = with_empty_distillation_columns(real)
    batch = HyperSteerDataCollator(tokenizer=tiny_tokenizer)(list(padded))
    assert batch["teacher_input_ids"].shape == (2, 0)
    model = _model(tiny_tokenizer).train()
    trainer = _trainer(model, tmp_path, distillation_loss_weight=1.0)
    loss = trainer.compute_loss(model, dict(batch))
    real_batch = {name: batch[name] for name in batch if name not in DISTILLATION_COLUMNS}
    torch.testing.assert_close(loss, model(**real_batch).loss)
    assert "distillation_loss" not in trainer._metrics["train"]


def test_train_cli_with_descriptions_trains_and_records_them(tiny_tokenizer, tmp_path, axbench_dir):
    import train_hypersteer

    base = save_tiny_base(tmp_path / "base", tiny_tokenizer)
    descriptions = tmp_path / "descriptions.txt"
    descriptions.write_text("\n".join(DESCRIPTIONS))
    output = tmp_path / "out"
    argv = cli_arguments(
        base_model_name_or_path=base,
        dataset_name_or_path=axbench_dir / "concept10" / "prod_2b_l20_v1",
        heldout_concepts=2,
        steering_layer=1,
        hypernet_num_layers=1,
        max_length=1000,
        max_steps=3,
        per_device_train_batch_size=4,
        distillation_loss_weight=1.0,
        distillation_descriptions=descriptions,
        distillation_rows=40,
        output_dir=output,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        eval_examples_per_concept=0,
        logging_steps=1,
        use_cpu=True,
    )
    train_hypersteer.main(argv)
    summary = json.loads((output / "training_summary.json").read_text())
    assert summary["distillation"]["rows"] == 40 and summary["distillation"]["concepts"] == len(DESCRIPTIONS)
    weight = argv.index("--distillation_loss_weight")
    with pytest.raises(ValueError, match="go together"):
        train_hypersteer.main(argv[:weight] + argv[weight + 2 :])
