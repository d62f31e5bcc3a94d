"""Tests for the AxBench-schema data pipeline: loading, concept splits, tokenisation, negatives and the collator.

Real AxBench files are read from `../shared/data/axbench` (the `axbench_dir` fixture); small synthetic files go to
`tmp_path`. Nothing touches the network: the Hub test forces offline mode.
"""

import copy
import json
import logging
import math
from collections import Counter, defaultdict

import datasets
import huggingface_hub.constants
import pandas as pd
import pytest
import torch

from modeling_hypersteer.data import (
    EMPTY_CONCEPT,
    MODEL_INPUT_COLUMNS,
    ConceptSplit,
    HyperSteerDataCollator,
    build_splits,
    concept_names,
    format_prompt,
    load_concept_data,
    split_concepts,
    tokenize_dataset,
    tokenize_example,
    turn_end_ids,
)
from modeling_hypersteer.modeling_hypersteer import tokenize_steering_prompts


CONCEPT10_FOLDERS = ("prod_2b_l10_v1", "prod_2b_l20_v1", "prod_9b_l20_v1")
ASCII_ROWS = [
    {
        "input": "Explain sorting algorithms in simple words.",
        "output": "Sorting puts items in order, like a court clerk ranks legal terminology.",
        "output_concept": "references to legal terminology and court proceedings",
        "concept_id": 0,
        "category": "positive",
    },
    {
        "input": "Write a short poem about the sea.",
        "output": "The sea rolls in; int *p = &tide; the waves compile.",
        "output_concept": "C/C++ syntax such as pointers, headers and semicolons",
        "concept_id": 1,
        "category": "positive",
    },
    {
        "input": "The quick brown fox?",
        "output": "The quick brown fox jumps over the lazy dog.",
        "output_concept": EMPTY_CONCEPT,
        "concept_id": -1,
        "category": "negative",
    },
]


@pytest.fixture(scope="module")
def all_train_data(axbench_dir):
    return load_concept_data(str(axbench_dir))


@pytest.fixture(scope="module")
def concept10(axbench_dir):
    return load_concept_data(str(axbench_dir / "concept10"))


def _write_parquet(path, rows):
    pd.DataFrame(rows).to_parquet(path, index=False)
    return path


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _rows_by_concept(dataset, column="input", positives_only=True):
    grouped = defaultdict(set)
    for row in dataset:
        if positives_only and row["is_negative"]:
            continue
        grouped[row["output_concept"]].add(row[column])
    return grouped


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


def test_load_single_parquet_file(axbench_dir):
    path = axbench_dir / "concept10" / "prod_2b_l20_v1" / "train_data.parquet"
    data = load_concept_data(str(path))

    assert len(data) == 936
    expected = (
        "input",
        "output",
        "output_concept",
        "concept_id",
        "category",
        "concept_genre",
        "source",
        "is_negative",
    )
    assert set(expected) <= set(data.column_names)
    assert set(data["source"]) == {str(path.resolve())}
    assert sum(data["is_negative"]) == 216
    assert len(concept_names(data)) == 10
    assert EMPTY_CONCEPT not in concept_names(data)


def test_load_folder_of_folders(concept10, axbench_dir):
    assert len(concept10) == 3 * 936
    assert len(concept_names(concept10)) == 30
    assert sorted(set(concept10["source"])) == sorted(
        str((axbench_dir / "concept10" / folder / "train_data.parquet").resolve()) for folder in CONCEPT10_FOLDERS
    )


def test_load_comma_separated_list_equals_list(axbench_dir):
    first = axbench_dir / "concept10" / "prod_2b_l10_v1"
    second = axbench_dir / "conceptFD" / "prod_2b_l20_v1" / "train_data.parquet"
    from_string = load_concept_data(f"{first},{second}")
    from_list = load_concept_data([str(first), str(second)])

    assert len(from_string) == 936 + 1368
    assert from_string["output_concept"] == from_list["output_concept"]
    assert len(set(from_string["source"])) == 2


def test_concepts_are_keyed_by_text_across_files(concept10):
    texts_by_id = defaultdict(set)
    for row in concept10:
        if not row["is_negative"]:
            texts_by_id[row["concept_id"]].add(row["output_concept"])
    # concept_id 0 names a different concept in each of the three folders; the texts, not the ids, are the keys.
    assert len(texts_by_id[0]) == 3
    assert len(concept_names(concept10)) == 30 > len(texts_by_id)


def test_all_axbench_train_files_hold_63_concepts(all_train_data):
    assert len(set(all_train_data["source"])) == 5
    assert len(concept_names(all_train_data)) == 63


def test_latent_eval_files_count_only_positive_concepts(axbench_dir):
    data = load_concept_data(str(axbench_dir / "concept10"), file_name="latent_eval_data.parquet")
    # Hard negatives carry contrast descriptions ("date//...") in output_concept: they are not concepts.
    assert len(concept_names(data)) == 30
    assert set(data["category"]) == {"positive", "negative", "hard negative"}
    assert data["is_negative"] == [category != "positive" for category in data["category"]]


def test_load_jsonl_defaults_genre_and_keeps_existing_source(tmp_path):
    plain = _write_jsonl(tmp_path / "plain.jsonl", ASCII_ROWS)
    with_source = _write_jsonl(tmp_path / "with_source.jsonl", [dict(row, source="generated") for row in ASCII_ROWS])

    data = load_concept_data(str(plain))
    assert data["concept_genre"] == ["text"] * 3
    assert set(data["source"]) == {str(plain.resolve())}
    assert data["is_negative"] == [False, False, True]

    kept = load_concept_data(str(with_source))
    assert set(kept["source"]) == {"generated"}

    both = load_concept_data([str(plain), str(with_source)])
    assert len(both) == 6


def test_load_glob(axbench_dir):
    data = load_concept_data(str(axbench_dir / "conceptFD" / "prod_*" / "train_data.parquet"))
    assert len(set(data["source"])) == 2
    assert len(concept_names(data)) == 17 + 16


# ---------------------------------------------------------------------------------------------------------------
# Loading errors
# ---------------------------------------------------------------------------------------------------------------


def test_missing_column_names_file_and_column(tmp_path):
    rows = [{key: value for key, value in row.items() if key != "output_concept"} for row in ASCII_ROWS]
    path = _write_parquet(tmp_path / "no_concept.parquet", rows)
    with pytest.raises(ValueError, match=r"no_concept\.parquet.*output_concept"):
        load_concept_data(str(path))


def test_empty_files_are_rejected(tmp_path):
    empty_jsonl = tmp_path / "empty.jsonl"
    empty_jsonl.write_text("")
    with pytest.raises(ValueError, match=r"empty\.jsonl.*empty"):
        load_concept_data(str(empty_jsonl))

    empty_parquet = tmp_path / "empty.parquet"
    pd.DataFrame({column: pd.Series([], dtype=object) for column in ASCII_ROWS[0]}).to_parquet(empty_parquet)
    with pytest.raises(ValueError, match=r"empty\.parquet.*no rows"):
        load_concept_data(str(empty_parquet))


def test_unknown_local_path_and_folder_without_file(tmp_path):
    missing = tmp_path / "does_not_exist.parquet"
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        load_concept_data(str(missing))
    with pytest.raises(FileNotFoundError, match="train_data.parquet"):
        load_concept_data(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="matches no file"):
        load_concept_data(str(tmp_path / "*.parquet"))


def test_unreachable_hub_id_fails_fast_with_local_path_hint(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match=r"pyvene/axbench-concept500.*local path"):
        load_concept_data("pyvene/axbench-concept500")


def test_bad_values_are_rejected(tmp_path):
    unknown_category = [dict(ASCII_ROWS[0], category="positve")]
    with pytest.raises(ValueError, match=r"category.*positve"):
        load_concept_data(str(_write_jsonl(tmp_path / "category.jsonl", unknown_category)))

    placeholder_positive = [dict(ASCII_ROWS[0], output_concept=EMPTY_CONCEPT)]
    with pytest.raises(ValueError, match=r"placeholder\.jsonl.*positive row"):
        load_concept_data(str(_write_jsonl(tmp_path / "placeholder.jsonl", placeholder_positive)))

    only_negatives = [ASCII_ROWS[2]]
    with pytest.raises(ValueError, match="no positive rows"):
        load_concept_data(str(_write_jsonl(tmp_path / "negatives.jsonl", only_negatives)))

    null_output = [dict(ASCII_ROWS[0], output=None), ASCII_ROWS[1]]
    with pytest.raises(ValueError, match=r"nulls\.parquet.*'output'"):
        load_concept_data(str(_write_parquet(tmp_path / "nulls.parquet", null_output)))


# ---------------------------------------------------------------------------------------------------------------
# Concept split
# ---------------------------------------------------------------------------------------------------------------


def test_split_sizes_and_types(all_train_data):
    by_count = split_concepts(all_train_data, heldout=13, seed=0)
    assert len(by_count.heldout_concepts) == 13 and len(by_count.heldin_concepts) == 50
    by_ratio = split_concepts(all_train_data, heldout=0.2, seed=0)
    assert len(by_ratio.heldout_concepts) == round(0.2 * 63)
    assert split_concepts(all_train_data, heldout=None).heldout_concepts == []
    assert by_count.sources == sorted(set(all_train_data["source"]))

    chosen = by_count.heldout_concepts[:2]
    explicit = split_concepts(all_train_data, heldout=chosen, seed=0)
    assert explicit.heldout_concepts == sorted(chosen)
    assert set(explicit.heldin_concepts) == set(concept_names(all_train_data)) - set(chosen)

    for bad in (63, -1, 1.0, True):
        with pytest.raises((ValueError, TypeError)):
            split_concepts(all_train_data, heldout=bad)


def test_split_is_stable_under_row_shuffling_and_changes_with_seed(concept10):
    split = split_concepts(concept10, heldout=6, seed=7)
    shuffled = concept10.shuffle(seed=123).flatten_indices()
    assert split_concepts(shuffled, heldout=6, seed=7) == split
    assert split_concepts(concept10, heldout=6, seed=8).heldout_concepts != split.heldout_concepts

    # The whole train/eval construction is row-order free too (as a multiset of rows).
    def content(dataset_dict):
        return {
            name: Counter((row["output_concept"], row["input"], row["output"], row["steering_factor"]) for row in rows)
            for name, rows in dataset_dict.items()
        }

    kwargs = dict(eval_fraction=0.1, max_examples_per_concept=30, use_negatives=True, seed=7)
    assert content(build_splits(concept10, split, **kwargs)) == content(build_splits(shuffled, split, **kwargs))


def test_explicit_unknown_concept_lists_close_matches(all_train_data):
    real = concept_names(all_train_data)[0]
    typo = real[:-3] + "xyz"
    with pytest.raises(ValueError, match="close matches") as error:
        split_concepts(all_train_data, heldout=[typo])
    assert repr(real) in str(error.value)
    with pytest.raises(ValueError, match="not concepts"):
        split_concepts(all_train_data, heldout=[EMPTY_CONCEPT])


def test_concept_split_json_round_trip(tmp_path, concept10):
    split = split_concepts(concept10, heldout=3, seed=1)
    split.to_json(tmp_path / "split" / "concept_split.json")
    assert ConceptSplit.from_json(tmp_path / "split" / "concept_split.json") == split

    (tmp_path / "bad.json").write_text(json.dumps({"heldin": []}))
    with pytest.raises(ValueError, match="not a concept split"):
        ConceptSplit.from_json(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="both"):
        ConceptSplit(["a", "b"], ["b"])


def test_split_for_other_data_is_rejected(concept10, all_train_data):
    split = split_concepts(concept10, heldout=3, seed=1)
    with pytest.raises(ValueError, match="neither list"):
        build_splits(all_train_data, split)
    foreign = ConceptSplit(split.heldin_concepts + ["a concept with no rows"], split.heldout_concepts)
    with pytest.raises(ValueError, match="no positive rows"):
        build_splits(concept10, foreign)


# ---------------------------------------------------------------------------------------------------------------
# Train / eval splits
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def split_with_negatives(all_train_data):
    split = split_concepts(all_train_data, heldout=0.2, seed=3)
    splits = build_splits(
        all_train_data,
        split,
        eval_fraction=0.1,
        max_examples_per_concept=24,
        use_negatives=True,
        negative_steering_factor=0.0,
        seed=3,
    )
    return split, splits


def test_heldout_concepts_never_reach_training(split_with_negatives):
    split, splits = split_with_negatives
    train = splits["train"]
    heldout = set(split.heldout_concepts)
    string_columns = [name for name, feature in train.features.items() if feature == datasets.Value("string")]
    for row in train:
        for column in string_columns:
            assert not any(concept in row[column] for concept in heldout), (column, row[column][:80])
    assert set(train["output_concept"]) <= set(split.heldin_concepts)
    assert set(splits["eval_heldin"]["output_concept"]) <= set(split.heldin_concepts)
    assert set(splits["eval_heldout"]["output_concept"]) == heldout


def test_heldin_eval_prompts_are_never_trained_for_that_concept(split_with_negatives):
    split, splits = split_with_negatives
    train_prompts = _rows_by_concept(splits["train"], positives_only=False)  # negatives included
    eval_prompts = _rows_by_concept(splits["eval_heldin"])
    assert set(eval_prompts) == set(split.heldin_concepts)
    for concept, prompts in eval_prompts.items():
        assert prompts and not prompts & train_prompts[concept], concept
        assert len(prompts) == round(0.1 * 72)


def test_negatives_are_spread_over_heldin_concepts(split_with_negatives, all_train_data):
    split, splits = split_with_negatives
    train = splits["train"]
    negatives = train.filter(lambda row: row["is_negative"])
    positives = train.filter(lambda row: not row["is_negative"])

    assert len(negatives) > 0
    assert EMPTY_CONCEPT not in set(negatives["output_concept"])
    assert set(negatives["steering_factor"]) == {0.0}
    assert set(positives["steering_factor"]) == {1.0}
    per_concept = Counter(negatives["output_concept"])
    # Dealt round robin: nearly every held-in concept gets some, none gets far more than its share.
    assert len(per_concept) >= 0.9 * len(split.heldin_concepts)
    assert max(per_concept.values()) <= math.ceil(len(negatives) / len(split.heldin_concepts)) + 2
    # Each distinct negative is used once.
    pairs = list(zip(negatives["input"], negatives["output"]))
    assert len(pairs) == len(set(pairs))
    source_negatives = {(row["input"], row["output"]) for row in all_train_data if row["is_negative"]}
    assert set(pairs) <= source_negatives
    # No concept gets more negatives than positive training rows (AxBench's negative_example_ratio=1).
    positive_counts = Counter(positives["output_concept"])
    assert all(count <= positive_counts[concept] for concept, count in per_concept.items())


def test_max_examples_per_concept_and_steering_factor_column(split_with_negatives):
    _, splits = split_with_negatives
    positive_counts = Counter(row["output_concept"] for row in splits["train"] if not row["is_negative"])
    assert set(positive_counts.values()) == {24}
    for name in ("train", "eval_heldin", "eval_heldout"):
        assert splits[name].features["steering_factor"] == datasets.Value("float32")
    assert set(splits["eval_heldin"]["steering_factor"]) == {1.0}
    assert set(splits["eval_heldout"]["steering_factor"]) == {1.0}
    assert not any(splits["eval_heldin"]["is_negative"]) and not any(splits["eval_heldout"]["is_negative"])


def test_without_negatives_and_eval_examples_per_concept(concept10):
    split = split_concepts(concept10, heldout=4, seed=0)
    splits = build_splits(concept10, split, eval_examples_per_concept=5, use_negatives=False, seed=0)
    assert not any(splits["train"]["is_negative"])
    assert set(splits["train"]["steering_factor"]) == {1.0}
    assert set(Counter(splits["eval_heldin"]["output_concept"]).values()) == {5}
    assert set(Counter(splits["eval_heldout"]["output_concept"]).values()) == {5}
    assert len(splits["train"]) == 26 * (72 - 5)

    default_factor = build_splits(concept10, split, use_negatives=True, seed=0)["train"]
    assert {row["steering_factor"] for row in default_factor if row["is_negative"]} == {1.0}

    with pytest.raises(ValueError, match="eval_fraction"):
        build_splits(concept10, split, eval_fraction=1.5)
    with pytest.raises(ValueError, match="max_examples_per_concept"):
        build_splits(concept10, split, max_examples_per_concept=0)


# ---------------------------------------------------------------------------------------------------------------
# Tokenisation
# ---------------------------------------------------------------------------------------------------------------


def test_format_prompt_applies_chat_template_and_folds_system(tiny_tokenizer):
    text = format_prompt(tiny_tokenizer, "Explain sorting.")
    assert text == "<bos><|user|>Explain sorting.<|end|><|assistant|>"
    with_system = format_prompt(tiny_tokenizer, "Explain sorting.", system_prompt="Be brief.")
    assert with_system == "<bos><|system|>Be brief.<|end|><|user|>Explain sorting.<|end|><|assistant|>"

    no_system = copy.deepcopy(tiny_tokenizer)
    no_system.chat_template = (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}<|{{ message['role'] }}|>{{ message['content'] }}"
        "<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    folded = format_prompt(no_system, "Explain sorting.", system_prompt="Be brief.")
    assert folded == "<bos><|user|>Be brief.\n\nExplain sorting.<|end|><|assistant|>"

    no_template = copy.deepcopy(tiny_tokenizer)
    no_template.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        format_prompt(no_template, "Explain sorting.")


def test_tokenize_example_labels_are_exactly_response_and_turn_end(tiny_tokenizer):
    row = dict(ASCII_ROWS[0], steering_factor=0.5)
    features = tokenize_example(row, tiny_tokenizer, max_length=512, max_steering_prompt_length=64)

    labels = torch.tensor(features["labels"])
    input_ids = torch.tensor(features["input_ids"])
    response = labels != -100
    # The labelled suffix is the response followed by the template's turn end; every earlier position is -100.
    first = int(response.nonzero()[0])
    assert response[first:].all() and not response[:first].any()
    assert torch.equal(labels[response], input_ids[response])
    assert int(labels[-1]) == tiny_tokenizer.convert_tokens_to_ids("<|end|>")
    assert tiny_tokenizer.decode(labels[response][:-1].tolist()) == row["output"]
    # The unlabelled prefix is the chat-formatted prompt, with the template's BOS once.
    prompt_text = format_prompt(tiny_tokenizer, row["input"])
    assert input_ids[:first].tolist() == tiny_tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    prompt_tokens = tiny_tokenizer.convert_ids_to_tokens(input_ids[:first].tolist())
    assert prompt_tokens[:2] == ["<bos>", "<|user|>"] and prompt_tokens[-2:] == ["<|end|>", "<|assistant|>"]
    assert input_ids[:first].tolist().count(tiny_tokenizer.bos_token_id) == 1
    assert features["attention_mask"] == [1] * len(input_ids)
    assert features["steering_factor"] == 0.5

    expected = tokenize_steering_prompts(tiny_tokenizer, [row["output_concept"]], 64)
    assert features["steering_input_ids"] == expected["steering_input_ids"][0].tolist()
    assert features["steering_attention_mask"] == expected["steering_attention_mask"][0].tolist()


# The chat templates of google/gemma-2-2b-it and HuggingFaceTB/SmolLM2-135M-Instruct, verbatim.
GEMMA2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _chat_tokenizer(tiny_tokenizer, chat_template, turn_tokens):
    """The tiny tokenizer with another base's chat template and its turn tokens (its EOS stays `<eos>`)."""
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.add_tokens(list(turn_tokens), special_tokens=True)
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.mark.parametrize(
    "chat_template, turn_tokens, turn_end",
    [
        (GEMMA2_CHAT_TEMPLATE, ("<start_of_turn>", "<end_of_turn>"), "<end_of_turn>"),
        (SMOLLM2_CHAT_TEMPLATE, ("<|im_start|>", "<|im_end|>"), "<|im_end|>"),
    ],
    ids=("gemma2", "smollm2"),
)
def test_labels_end_with_the_turn_end_of_the_chat_template(tiny_tokenizer, chat_template, turn_tokens, turn_end):
    """Gemma-2-it ends a reply with `<end_of_turn>`, not with its EOS: labels must end the way the base ends a turn."""
    tokenizer = _chat_tokenizer(tiny_tokenizer, chat_template, turn_tokens)
    turn_end_id = tokenizer.convert_tokens_to_ids(turn_end)
    assert turn_end_ids(tokenizer) == [turn_end_id]

    row = ASCII_ROWS[0]
    features = tokenize_example(row, tokenizer, max_length=512)
    labels = [label for label in features["labels"] if label != -100]
    assert labels[-1] == turn_end_id and tokenizer.eos_token_id not in labels
    assert tokenizer.decode(labels[:-1]) == row["output"]
    prompt_tokens = tokenizer.convert_ids_to_tokens(features["input_ids"][: len(features["input_ids"]) - len(labels)])
    # The prompt opens the reply's turn (Gemma-2: user + model turns; SmolLM2: default system, user, assistant).
    assert prompt_tokens.count(turn_tokens[0]) == (3 if chat_template == SMOLLM2_CHAT_TEMPLATE else 2)
    assert prompt_tokens.count(turn_end) == prompt_tokens.count(turn_tokens[0]) - 1


def test_a_template_without_a_turn_end_falls_back_to_eos_with_a_warning(tiny_tokenizer, caplog):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
    with caplog.at_level(logging.WARNING):
        assert turn_end_ids(tokenizer) == [tokenizer.eos_token_id]
    assert "labels end with the EOS token '<eos>'" in caplog.text


def test_tokenize_dataset_on_real_rows(tiny_tokenizer, concept10):
    sample = concept10.select(range(0, len(concept10), 97))  # positives and negatives from three files
    tokenized = tokenize_dataset(sample, tiny_tokenizer, max_length=4096, max_steering_prompt_length=16)

    assert tokenized.column_names == list(MODEL_INPUT_COLUMNS)
    assert tokenized.features["steering_factor"] == datasets.Value("float32")
    assert len(tokenized) == len(sample)
    for row, features in zip(sample, tokenized):
        response = tiny_tokenizer(row["output"], add_special_tokens=False)["input_ids"] + turn_end_ids(tiny_tokenizer)
        prompt = tiny_tokenizer(format_prompt(tiny_tokenizer, row["input"]), add_special_tokens=False)["input_ids"]
        assert features["input_ids"] == prompt + response
        assert features["labels"] == [-100] * len(prompt) + response
        # Batched steering tokenisation (padded, then unpadded per row) equals the single-prompt call.
        expected = tokenize_steering_prompts(tiny_tokenizer, [row["output_concept"]], 16)
        assert features["steering_input_ids"] == expected["steering_input_ids"][0].tolist()
        assert features["steering_attention_mask"] == expected["steering_attention_mask"][0].tolist()
        assert features["steering_factor"] == 1.0


def test_truncation_cuts_response_and_drops_rows_without_one(tiny_tokenizer, caplog):
    data = datasets.Dataset.from_list(
        [dict(ASCII_ROWS[0]), dict(ASCII_ROWS[1], input="Write a short poem about the sea. " * 8)]
    )
    prompt_text = format_prompt(tiny_tokenizer, ASCII_ROWS[0]["input"])
    short_prompt = len(tiny_tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
    max_length = short_prompt + 5
    with caplog.at_level(logging.WARNING):
        tokenized = tokenize_dataset(data, tiny_tokenizer, max_length=max_length)
    assert len(tokenized) == 1
    assert "Dropped 1 of 2 rows" in caplog.text
    row = tokenized[0]
    assert len(row["input_ids"]) == max_length
    labels = [label for label in row["labels"] if label != -100]
    assert len(labels) == 5 and tiny_tokenizer.convert_tokens_to_ids("<|end|>") not in labels

    with pytest.raises(ValueError, match="All 2 rows were dropped"):
        tokenize_dataset(data, tiny_tokenizer, max_length=4)
    assert tokenize_example(data[1], tiny_tokenizer, max_length=short_prompt) is None


def test_tokenize_dataset_dict_keeps_splits(tiny_tokenizer, tmp_path):
    data = load_concept_data(str(_write_jsonl(tmp_path / "rows.jsonl", ASCII_ROWS)))
    split = split_concepts(data, heldout=["C/C++ syntax such as pointers, headers and semicolons"])
    splits = build_splits(data, split, eval_fraction=0.0)
    tokenized = tokenize_dataset(splits, tiny_tokenizer, max_length=256)
    assert set(tokenized) == {"train", "eval_heldin", "eval_heldout"}
    assert (len(tokenized["train"]), len(tokenized["eval_heldin"]), len(tokenized["eval_heldout"])) == (1, 0, 1)
    assert tokenized["eval_heldin"].column_names == list(MODEL_INPUT_COLUMNS)


# ---------------------------------------------------------------------------------------------------------------
# Collator
# ---------------------------------------------------------------------------------------------------------------


def test_collator_left_and_right_padding_keep_rows_aligned(tiny_tokenizer):
    rows = [dict(ASCII_ROWS[0], steering_factor=1.0), dict(ASCII_ROWS[1], steering_factor=0.25)]
    features = [tokenize_example(row, tiny_tokenizer, 512, 64) for row in rows]
    right = HyperSteerDataCollator(tiny_tokenizer)(features)
    left = HyperSteerDataCollator(tiny_tokenizer, padding_side="left", pad_to_multiple_of=8)(features)

    assert set(right) == set(MODEL_INPUT_COLUMNS)
    batch_size, length = right["input_ids"].shape
    assert length == max(len(feature["input_ids"]) for feature in features)
    assert left["input_ids"].shape[1] % 8 == 0
    for row, feature in enumerate(features):
        for batch in (left, right):
            mask = batch["attention_mask"][row].bool()
            assert batch["input_ids"][row][mask].tolist() == feature["input_ids"]
            assert batch["labels"][row][mask].tolist() == feature["labels"]
            assert (batch["input_ids"][row][~mask] == tiny_tokenizer.pad_token_id).all()
            assert (batch["labels"][row][~mask] == -100).all()
        assert not left["attention_mask"][row][-1] == 0  # left padding: real tokens end the row
        assert right["attention_mask"][row][0] == 1
        # Steering prompts are right-padded whatever the base padding side.
        for batch in (left, right):
            steering_mask = batch["steering_attention_mask"][row]
            assert steering_mask.tolist() == sorted(steering_mask.tolist(), reverse=True)
            assert batch["steering_input_ids"][row][steering_mask.bool()].tolist() == feature["steering_input_ids"]
    for batch in (left, right):
        assert batch["steering_factor"].dtype == torch.float32
        assert batch["steering_factor"].tolist() == [1.0, 0.25]
        assert all(tensor.dtype == torch.long for key, tensor in batch.items() if key != "steering_factor")


def test_collator_errors(tiny_tokenizer):
    no_pad = copy.deepcopy(tiny_tokenizer)
    no_pad.pad_token = None
    with pytest.raises(ValueError, match="no pad token"):
        HyperSteerDataCollator(no_pad)
    with pytest.raises(ValueError, match="padding_side"):
        HyperSteerDataCollator(tiny_tokenizer, padding_side="middle")
    collator = HyperSteerDataCollator(tiny_tokenizer)
    with pytest.raises(ValueError, match="steering_factor"):
        collator([{"input_ids": [1, 2], "steering_factor": 1.0}, {"input_ids": [1]}])
    batch = collator([{"input_ids": [1, 2]}, {"input_ids": torch.tensor([3])}])
    assert batch["attention_mask"].tolist() == [[1, 1], [1, 0]]
    assert set(batch) == {"input_ids", "attention_mask"}
