"""Teacher-free distillation rows: concept descriptions without responses, tokenised for the distillation term."""

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from datasets import Dataset
from transformers import PreTrainedTokenizerBase
from transformers.utils import logging

from ..modeling_hypersteer import tokenize_steering_prompts
from ..utils import split_sources as _split_sources
from .loading import _check_not_empty, concept_names, load_concept_data
from .splits import _rng
from .tokenization import DISTILLATION_COLUMNS, MODEL_INPUT_COLUMNS, _model_input_features, format_prompt, turn_end_ids


logger = logging.get_logger(__name__)


# Keys a description file may use for its text, tried in this order (Concept16K, concept500 metadata, AxBench rows).
DESCRIPTION_KEYS = ("description", "concept", "output_concept")


def load_concept_descriptions(sources: str | Sequence[str]) -> list[str]:
    """Concept descriptions, without responses, from local files: the distillation objective's concepts.

    Args:
        sources (`str` or `list[str]`): `.jsonl` files whose lines are JSON objects with one of `DESCRIPTION_KEYS`
            (`../shared/data/axbench_more/concept16k/descriptions.jsonl`, a concept500 `metadata.jsonl`), `.txt` files
            with one description per line, or AxBench-schema data (a `.parquet` file or a folder, read with
            [`load_concept_data`]; its concepts are used). Comma-separated strings are split.

    Returns:
        `list[str]`: distinct descriptions, in first-seen order, stripped of surrounding whitespace.
    """
    descriptions = []
    for source in _split_sources(sources):
        path = Path(source)
        if path.suffix == ".txt":
            _check_not_empty(path)
            descriptions += path.read_text(encoding="utf-8").splitlines()
        elif path.suffix == ".jsonl" and path.is_file():
            _check_not_empty(path)
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}, line {number}: not JSON ({err}).") from err
                key = next((key for key in DESCRIPTION_KEYS if isinstance(record, dict) and key in record), None)
                if key is None:
                    raise ValueError(
                        f"{path}, line {number}: a description line needs one of the keys {list(DESCRIPTION_KEYS)}; "
                        f"got {sorted(record) if isinstance(record, dict) else type(record).__name__}."
                    )
                descriptions.append(str(record[key]))
        else:
            descriptions += concept_names(load_concept_data(source))
    unique = list(dict.fromkeys(text.strip() for text in descriptions if text.strip()))
    if not unique:
        raise ValueError(f"No concept description found in {sources!r}.")
    return unique


def build_distillation_rows(
    descriptions: Sequence[str],
    texts: Dataset | Sequence[dict[str, Any]],
    num_rows: int,
    seed: int = 42,
    exclude: Sequence[str] = (),
) -> Dataset:
    """Pairs real instruction/response texts with two concept descriptions each, for the distillation objective.

    Every row reads one text (`input`, `output` of a row of `texts`) and names two different descriptions: the row is
    steered by the first (`output_concept`) and, on the same text, by the second (`contrast_concept`). Descriptions
    are drawn without replacement until all are used (then again), so `num_rows` rows cover
    `min(2 * num_rows, len(descriptions))` distinct concepts; texts are drawn the same way.

    Args:
        descriptions (`Sequence[str]`): concept descriptions (e.g. from [`load_concept_descriptions`]).
        texts (`Dataset` or rows): AxBench-schema rows with `input` and `output`; use training rows only, so no
            held-out concept's responses reach training.
        num_rows (`int`): rows to build.
        seed (`int`): seed of the draws.
        exclude (`Sequence[str]`): descriptions never to use, compared case-insensitively (the held-out concepts).

    Returns:
        `Dataset` with `input`, `output`, `output_concept` and `contrast_concept`.
    """
    excluded = {text.strip().lower() for text in exclude}
    pool = [text for text in dict.fromkeys(descriptions) if text.strip().lower() not in excluded]
    if len(pool) < 2:
        raise ValueError(
            f"Distillation needs at least 2 concept descriptions after excluding {len(excluded)} held-out concept(s); "
            f"got {len(pool)}."
        )
    if not isinstance(num_rows, int) or num_rows < 1:
        raise ValueError(f"`num_rows` must be a positive int, got {num_rows!r}.")
    texts = [{"input": row["input"], "output": row["output"]} for row in texts]
    if not texts:
        raise ValueError("Distillation needs at least one instruction/response text; `texts` is empty.")
    rng = _rng(seed, "distillation")

    def draws(items: list, count: int) -> list:
        drawn = []
        while len(drawn) < count:
            order = list(range(len(items)))
            rng.shuffle(order)
            drawn += [items[index] for index in order]
        return drawn[:count]

    firsts_and_seconds = draws(pool, 2 * num_rows)
    chosen_texts = draws(texts, num_rows)
    rows = {"input": [], "output": [], "output_concept": [], "contrast_concept": []}
    for index, text in enumerate(chosen_texts):
        first, second = firsts_and_seconds[2 * index], firsts_and_seconds[2 * index + 1]
        if first == second:  # only at the seam between two passes over the pool
            second = pool[(pool.index(first) + 1) % len(pool)]
        rows["input"].append(text["input"])
        rows["output"].append(text["output"])
        rows["output_concept"].append(first)
        rows["contrast_concept"].append(second)
    return Dataset.from_dict(rows)


def _tokenize_distillation_batch(
    batch: dict[str, list],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    max_steering_prompt_length: int,
    teacher_system_prompt: Callable[[str], str],
) -> dict[str, list]:
    """Student and teacher features of distillation rows (see [`tokenize_distillation_dataset`])."""
    turn_end = turn_end_ids(tokenizer)
    response_ids = tokenizer(list(batch["output"]), add_special_tokens=False)["input_ids"]

    def prompts(system_for):
        texts = [
            format_prompt(tokenizer, instruction, None if concept is None else teacher_system_prompt(concept))
            for instruction, concept in zip(batch["input"], system_for)
        ]
        return tokenizer(texts, add_special_tokens=False)["input_ids"]

    student = prompts([None] * len(response_ids))
    teacher = prompts(batch["output_concept"])
    teacher_contrast = prompts(batch["contrast_concept"])
    steering = {
        name: tokenize_steering_prompts(tokenizer, list(batch[column]), max_steering_prompt_length)
        for name, column in (("", "output_concept"), ("contrast_", "contrast_concept"))
    }
    features = {name: [] for name in (*MODEL_INPUT_COLUMNS, *DISTILLATION_COLUMNS)}
    for row, response in enumerate(response_ids):
        # The same response tokens under the student and both teachers, so their positions pair up one to one.
        budget = max_length - max(len(student[row]), len(teacher[row]), len(teacher_contrast[row]))
        if budget <= 0:
            continue
        response = (response + turn_end)[:budget]
        for prefix, prompt in (
            ("", student[row]),
            ("teacher_", teacher[row]),
            ("teacher_contrast_", teacher_contrast[row]),
        ):
            features[f"{prefix}input_ids"].append(prompt + response)
            features[f"{prefix}attention_mask"].append([1] * (len(prompt) + len(response)))
            features[f"{prefix}labels"].append([-100] * len(prompt) + response)
        for prefix, encoded in steering.items():
            length = int(encoded["steering_attention_mask"][row].sum())
            features[f"{prefix}steering_input_ids"].append(encoded["steering_input_ids"][row][:length].tolist())
            features[f"{prefix}steering_attention_mask"].append([1] * length)
        features["steering_factor"].append(1.0)
    return features


def tokenize_distillation_dataset(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    teacher_system_prompt: Callable[[str], str],
    max_length: int = 1024,
    max_steering_prompt_length: int = 64,
) -> Dataset:
    """Tokenises distillation rows (from [`build_distillation_rows`]).

    The student sees the plain prompt and the response, steered by `output_concept` (and, as its contrast pass, by
    `contrast_concept`); `labels` mark the response tokens, which the trainer uses for the distillation term only,
    never for the LM loss. Each teacher sees the prompt with `teacher_system_prompt(concept)` as a system turn
    (folded into the user turn when the template has no system role) and the same response tokens. A response is cut
    to fit the longest of the three prompts into `max_length`.

    Returns:
        `Dataset` with `MODEL_INPUT_COLUMNS` and `DISTILLATION_COLUMNS`.
    """
    missing = [
        column
        for column in ("input", "output", "output_concept", "contrast_concept")
        if column not in dataset.column_names
    ]
    if missing:
        raise ValueError(
            f"Cannot tokenize distillation rows: column(s) {missing} are missing (got {dataset.column_names}); build "
            "them with `build_distillation_rows`."
        )
    tokenized = dataset.map(
        _tokenize_distillation_batch,
        batched=True,
        remove_columns=dataset.column_names,
        fn_kwargs={
            "tokenizer": tokenizer,
            "max_length": max_length,
            "max_steering_prompt_length": max_steering_prompt_length,
            "teacher_system_prompt": teacher_system_prompt,
        },
        features=_model_input_features(with_distillation=True),
        desc="Tokenizing distillation rows",
    )
    if len(tokenized) == 0:
        raise ValueError(f"Every distillation row's prompt fills max_length={max_length} tokens; raise `max_length`.")
    if len(tokenized) < len(dataset):
        logger.warning(
            f"Dropped {len(dataset) - len(tokenized)} of {len(dataset)} distillation rows whose longest (teacher) prompt "
            f"fills max_length={max_length} tokens. Raise `max_length` to keep them."
        )
    return tokenized


def with_empty_distillation_columns(dataset: Dataset) -> Dataset:
    """Adds empty `DISTILLATION_COLUMNS` to tokenised real rows, so they concatenate with distillation rows."""
    features = _model_input_features(with_distillation=True)
    return dataset.map(
        lambda batch: {name: [[] for _ in batch["input_ids"]] for name in DISTILLATION_COLUMNS},
        batched=True,
        features=features,
        desc="Adding distillation columns",
    )


__all__ = [
    "DESCRIPTION_KEYS",
    "build_distillation_rows",
    "load_concept_descriptions",
    "tokenize_distillation_dataset",
    "with_empty_distillation_columns",
]
