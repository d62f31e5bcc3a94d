# Copyright 2025 The HyperSteer Authors. Licensed under the Apache License, Version 2.0.
"""The AxBench judge protocol (https://huggingface.co/papers/2501.17148), as used by HyperSteer's evaluation.

A judge LLM rates every steered generation on three 0–2 scales, each in its own call:

- **concept**: is the steering concept present in the generation?
- **instruction**: does the generation address the user's instruction?
- **fluency**: is the generation fluent, coherent text?

Each answer must end with `Rating: [[x]]`. The per-sample score is the harmonic mean of the three ratings,

    score = 3 / (1/c + 1/i + 1/f),   and score = 0 if any rating is 0.

A judgement whose call failed or whose rating cannot be parsed is recorded as failed (`judge_status`) and has no
score: it is never counted as 0. For each method and concept, the steering factor with the best mean score on the
`"select"` half of the instructions is chosen, and the mean scores at that factor on the `"test"` half are reported
([`select_and_report`]).

Example:

```python
>>> from modeling_hypersteer.openai_client import CachedChatClient
>>> from modeling_hypersteer.judge import judge_generations, select_and_report
>>> client = CachedChatClient(model="gpt-4o-mini", cache_path="judge_cache.sqlite")
>>> rows = [{"concept": "legal terminology", "instruction": "Explain sorting.", "generation": "...",
...          "method": "hypersteer", "factor": 1.0, "split": "select"}]
>>> judged = judge_generations(client, rows)
>>> summary = select_and_report(judged)
```
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from transformers.utils import logging

from .openai_client import CachedChatClient, ChatRequest, ChatResult, run_sync


logger = logging.get_logger(__name__)

JUDGE_ASPECTS = ("concept", "instruction", "fluency")
SELECT_SPLIT = "select"
TEST_SPLIT = "test"

CONCEPT_JUDGE_TEMPLATE = """You are an impartial grader of concept presence in text.

A steering concept is described below, followed by a passage. Decide how strongly the passage expresses the \
concept, whether through its topic, its vocabulary, or explicit references. Ignore the quality of the writing and \
whether it answers any question; judge only the concept.

Concept description: {concept}

Passage:
<<<
{generation}
>>>

Use this scale:
0 = the concept does not appear at all.
1 = the concept appears only weakly, indirectly or in passing.
2 = the concept is clearly and substantially present.

Give a short justification, then end your answer with the rating in the form Rating: [[x]], where x is 0, 1 or 2."""

INSTRUCTION_JUDGE_TEMPLATE = """You are an impartial grader of how well a response addresses an instruction.

An instruction is given below, followed by a response to it. Decide whether the response engages with what the \
instruction asks. The response may include unrelated topics or an unusual theme; judge only whether the request \
itself is addressed, not style or correctness details.

Instruction:
<<<
{instruction}
>>>

Response:
<<<
{generation}
>>>

Use this scale:
0 = the response ignores the instruction or is unrelated to it.
1 = the response is partly related to the instruction or addresses it only loosely.
2 = the response clearly addresses the instruction.

Give a short justification, then end your answer with the rating in the form Rating: [[x]], where x is 0, 1 or 2."""

FLUENCY_JUDGE_TEMPLATE = """You are an impartial grader of the fluency of text.

Read the passage below and decide whether it is well-formed, coherent language. Do not judge its topic, its \
accuracy or its relevance to anything; judge only whether it reads naturally, without broken grammar, repetition \
loops or nonsense.

Passage:
<<<
{generation}
>>>

Use this scale:
0 = not fluent: largely incoherent, repetitive or ungrammatical.
1 = somewhat fluent: readable, but with noticeable errors, repetition or awkwardness.
2 = fluent: natural and coherent throughout.

Give a short justification, then end your answer with the rating in the form Rating: [[x]], where x is 0, 1 or 2."""

JUDGE_TEMPLATES: dict[str, str] = {
    "concept": CONCEPT_JUDGE_TEMPLATE,
    "instruction": INSTRUCTION_JUDGE_TEMPLATE,
    "fluency": FLUENCY_JUDGE_TEMPLATE,
}

# `[[x]]`, optionally preceded by "Rating:" (any case, any spacing); x is an unsigned decimal number.
_RATING_PATTERN = re.compile(r"\[\[\s*([+-]?\d+(?:\.\d+)?)\s*\]\]")


def build_judge_prompt(aspect: str, concept: str, instruction: str, generation: str) -> str:
    """The user message asking the judge to rate one `aspect` (`"concept"`, `"instruction"` or `"fluency"`)."""
    if aspect not in JUDGE_TEMPLATES:
        raise ValueError(f"Unknown judge aspect {aspect!r}; choose one of {JUDGE_ASPECTS}.")
    return JUDGE_TEMPLATES[aspect].format(concept=concept, instruction=instruction, generation=generation)


def parse_rating(text: str | None) -> float | None:
    """Parses a judge answer's final `Rating: [[x]]` (or bare `[[x]]`) into a float in [0, 2].

    The last bracketed number wins. Spacing and case are free (`rating:[[ 2.0 ]]`). Returns `None`, never 0, when
    the text has no rating or the rating is outside [0, 2].

    Example:

    ```python
    >>> parse_rating("Clear and natural. Rating: [[2]]")
    2.0
    >>> parse_rating("I would say 2.") is None
    True
    ```
    """
    if not text:
        return None
    matches = _RATING_PATTERN.findall(text)
    if not matches:
        return None
    value = float(matches[-1])
    if not 0.0 <= value <= 2.0:
        return None
    return value


def _is_parsable(text: str) -> bool:
    return parse_rating(text) is not None


def harmonic_score(concept: float | None, instruction: float | None, fluency: float | None) -> float | None:
    """Harmonic mean of the three ratings: `3 / (1/c + 1/i + 1/f)`; 0 if any is 0; `None` if any is `None`."""
    ratings = (concept, instruction, fluency)
    if any(rating is None for rating in ratings):
        return None
    if any(rating == 0 for rating in ratings):
        return 0.0
    return 3.0 / sum(1.0 / rating for rating in ratings)  # type: ignore[operator]


_REQUIRED_ROW_KEYS = ("concept", "instruction", "generation")


async def ajudge_generations(
    client: CachedChatClient,
    rows: Sequence[Mapping[str, Any]],
    judge_model: str | None = None,
    temperature: float = 0.0,
    max_tokens: int | None = None,
    desc: str = "Judging",
) -> list[dict[str, Any]]:
    """Async [`judge_generations`]."""
    for position, row in enumerate(rows):
        missing = [key for key in _REQUIRED_ROW_KEYS if key not in row]
        if missing:
            raise ValueError(
                f"Row {position} lacks the key(s) {missing}; every row needs {list(_REQUIRED_ROW_KEYS)}, "
                f"got keys {sorted(row)}."
            )
    model = judge_model or client.model
    requests = [
        ChatRequest(
            messages=[
                {
                    "role": "user",
                    "content": build_judge_prompt(
                        aspect, str(row["concept"]), str(row["instruction"]), str(row["generation"] or "")
                    ),
                }
            ],
            model=model,
            temperature=temperature,
            max_tokens=max_tokens,
        )
        for row in rows
        for aspect in JUDGE_ASPECTS
    ]
    # Unparsable answers are not cached, so that a rerun asks again rather than replaying a useless answer.
    results = await client.complete_many(requests, desc=desc, cache_filter=_is_parsable)
    judged = []
    for position, row in enumerate(rows):
        row_results = results[position * len(JUDGE_ASPECTS) : (position + 1) * len(JUDGE_ASPECTS)]
        judged.append({**row, **_judgement_fields(row_results)})
    failed = sum(1 for row in judged if row["judge_status"] != "ok")
    if failed:
        logger.warning(f"{failed} of {len(judged)} judgements failed; they are excluded from every mean.")
    return judged


def _judgement_fields(results: Sequence[ChatResult]) -> dict[str, Any]:
    ratings: dict[str, float | None] = {}
    problems = []
    for aspect, result in zip(JUDGE_ASPECTS, results):
        if not result.ok:
            ratings[aspect] = None
            reason = result.status.removeprefix("failed: ")
            problems.append(f"api_failed: {aspect}: {reason}")
            continue
        ratings[aspect] = parse_rating(result.text)
        if ratings[aspect] is None:
            problems.append(f"parse_failed: {aspect}")
    return {
        "concept_score": ratings["concept"],
        "instruction_score": ratings["instruction"],
        "fluency_score": ratings["fluency"],
        "score": harmonic_score(ratings["concept"], ratings["instruction"], ratings["fluency"]),
        "judge_status": "; ".join(problems) if problems else "ok",
    }


def judge_generations(
    client: CachedChatClient,
    rows: Sequence[Mapping[str, Any]],
    judge_model: str | None = None,
    temperature: float = 0.0,
    max_tokens: int | None = None,
    desc: str = "Judging",
) -> list[dict[str, Any]]:
    """Rates every row's generation on concept, instruction and fluency (3 concurrent judge calls per row).

    Args:
        client ([`~openai_client.CachedChatClient`]):
            The judge endpoint; its cache makes repeated or resumed runs free.
        rows (`Sequence[Mapping]`):
            Each with `concept` (the steering concept description), `instruction` (the user prompt) and
            `generation` (the model's answer). Other keys (`method`, `factor`, `split`...) are copied through.
        judge_model (`str`, *optional*):
            Judge model; defaults to `client.model`.
        temperature (`float`, *optional*, defaults to 0.0):
            Judge sampling temperature.
        max_tokens (`int`, *optional*):
            Cap on the judge's answer length (an answer cut before its rating becomes a parse failure).
        desc (`str`, *optional*):
            Progress-bar label.

    Returns:
        `list[dict]`: each input row plus `concept_score`, `instruction_score`, `fluency_score` (floats in [0, 2]
        or `None`), `score` (harmonic mean or `None`) and `judge_status`: `"ok"`, or the reasons joined by `"; "`,
        e.g. `"parse_failed: concept"` or `"api_failed: fluency: RateLimitError 429: ..."`.
    """
    return run_sync(ajudge_generations(client, rows, judge_model, temperature, max_tokens, desc))


def _mean(values: Sequence[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


_REQUIRED_SAMPLE_KEYS = ("method", "concept", "factor", "split", "score", "judge_status")
_RATING_KEYS = ("concept_score", "instruction_score", "fluency_score")


def _is_valid(sample: Mapping[str, Any]) -> bool:
    return sample["judge_status"] == "ok" and sample["score"] is not None


def select_and_report(
    samples: Sequence[Mapping[str, Any]], select_split: str = SELECT_SPLIT, test_split: str = TEST_SPLIT
) -> dict[str, Any]:
    """Chooses each concept's best steering factor on the select split and reports the test split at that factor.

    For every method and concept: the factor with the highest mean `score` over the concept's valid `select_split`
    samples is chosen (ties go to the smallest factor); the concept's test result is the mean over its valid
    `test_split` samples at that factor. A method's numbers are means over concepts (each concept weighs the same),
    and every method is averaged over the same concepts: a concept without a test result for any one method (no
    valid judgement left) is excluded from all of them and listed with the reason in `excluded_concepts`. Failed
    judgements (`judge_status != "ok"`) are excluded everywhere and counted in `failed_judgements`. Methods with a
    single factor (no steering, prompting) go through the same path.

    Args:
        samples (`Sequence[Mapping]`):
            Judged samples with `method`, `concept`, `factor`, `split`, `score`, `judge_status` and, optionally, the
            three ratings (`concept_score`, `instruction_score`, `fluency_score`).
        select_split (`str`, *optional*, defaults to `"select"`), test_split (`str`, *optional*, defaults to `"test"`):
            Names of the two halves.

    Returns:
        `dict`: `{"methods": {method: {"score", "concept_score", "instruction_score", "fluency_score",
        "best_factors": {concept: factor}, "failed_judgements": int, "num_concepts": int,
        "per_concept": {concept: {"factor", "score", ..., "num_test_samples"}}}}, "concepts": [the common concepts],
        "excluded_concepts": {concept: ["<method>: <reason>", ...]}}`. A mean with no valid sample is `None`.
    """
    if select_split == test_split:
        raise ValueError(f"select_split and test_split must differ, both are {select_split!r}.")
    by_method: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for position, sample in enumerate(samples):
        missing = [key for key in _REQUIRED_SAMPLE_KEYS if key not in sample]
        if missing:
            raise ValueError(
                f"Sample {position} lacks the key(s) {missing}; every sample needs {list(_REQUIRED_SAMPLE_KEYS)}."
            )
        if sample["split"] not in (select_split, test_split):
            raise ValueError(
                f"Sample {position} has split {sample['split']!r}; allowed splits are {select_split!r} and "
                f"{test_split!r}."
            )
        by_method[str(sample["method"])].append(sample)

    entries: dict[str, dict[Any, dict[str, Any]]] = {}
    reasons: dict[str, dict[Any, str]] = {}
    best_factors: dict[str, dict[Any, Any]] = {}
    all_concepts = {sample["concept"] for method_samples in by_method.values() for sample in method_samples}
    for method, method_samples in by_method.items():
        entries[method], reasons[method], best_factors[method] = _per_concept_results(
            method_samples, all_concepts, select_split, test_split
        )

    # Methods are compared over one set of concepts: a concept that lost every valid judgement for one method would
    # otherwise leave that method's mean alone (and could favour it), so it leaves every method's mean.
    common = [concept for concept in sorted(all_concepts, key=str) if all(concept in e for e in entries.values())]
    excluded = {
        concept: [f"{method}: {reasons[method][concept]}" for method in by_method if concept in reasons[method]]
        for concept in sorted(all_concepts - set(common), key=str)
    }
    for concept, why in excluded.items():
        logger.warning(f"Concept {concept!r} is left out of every method's means: {'; '.join(why)}.")

    report: dict[str, Any] = {}
    for method, method_samples in by_method.items():
        per_concept = {concept: entries[method][concept] for concept in common}
        method_report: dict[str, Any] = {"score": _mean([entry["score"] for entry in per_concept.values()])}
        for key in _RATING_KEYS:
            method_report[key] = _mean([entry[key] for entry in per_concept.values() if entry[key] is not None])
        method_report.update(
            best_factors=best_factors[method],
            failed_judgements=sum(1 for sample in method_samples if not _is_valid(sample)),
            num_concepts=len(per_concept),
            per_concept=per_concept,
        )
        report[method] = method_report
    return {"methods": report, "concepts": common, "excluded_concepts": excluded}


def _per_concept_results(
    method_samples: Sequence[Mapping[str, Any]], all_concepts: set, select_split: str, test_split: str
) -> tuple[dict[Any, dict[str, Any]], dict[Any, str], dict[Any, Any]]:
    """One method's test result per concept, the reason for each concept without one, and the chosen factors."""
    by_concept: dict[Any, list[Mapping[str, Any]]] = defaultdict(list)
    for sample in method_samples:
        by_concept[sample["concept"]].append(sample)
    entries: dict[Any, dict[str, Any]] = {}
    reasons: dict[Any, str] = {}
    best_factors: dict[Any, Any] = {}
    for concept in all_concepts:
        concept_samples = by_concept.get(concept, [])
        if not concept_samples:
            reasons[concept] = "no samples"
            continue
        select_scores: dict[Any, list[float]] = defaultdict(list)
        for sample in concept_samples:
            if sample["split"] == select_split and _is_valid(sample):
                select_scores[sample["factor"]].append(float(sample["score"]))
        if not select_scores:
            reasons[concept] = f"no valid judgement on the {select_split!r} split, so no factor can be chosen"
            continue
        best_factor = min(sorted(select_scores), key=lambda factor: -_mean(select_scores[factor]))
        best_factors[concept] = best_factor
        test_samples = [
            sample
            for sample in concept_samples
            if sample["split"] == test_split and sample["factor"] == best_factor and _is_valid(sample)
        ]
        if not test_samples:
            reasons[concept] = f"no valid judgement on the {test_split!r} split at the chosen factor {best_factor}"
            continue
        entry: dict[str, Any] = {
            "factor": best_factor,
            "score": _mean([float(sample["score"]) for sample in test_samples]),
            "num_test_samples": len(test_samples),
        }
        for key in _RATING_KEYS:
            values = [float(sample[key]) for sample in test_samples if sample.get(key) is not None]
            entry[key] = _mean(values)
        entries[concept] = entry
    return entries, reasons, best_factors


__all__ = [
    "JUDGE_ASPECTS",
    "JUDGE_TEMPLATES",
    "ajudge_generations",
    "build_judge_prompt",
    "harmonic_score",
    "judge_generations",
    "parse_rating",
    "select_and_report",
]
