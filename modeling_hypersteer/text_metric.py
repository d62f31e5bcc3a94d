"""A judge-free text metric of steering, and the calibration of `default_steering_factor` built on it.

For each evaluated concept, greedy generations answer instructions that have nothing to do with the concept, under
every method (`hypersteer`, `prompt_hypersteer` and the per-concept baselines at each factor of a grid, `prompt`,
`none`). Each generation gets three numbers:

* **concept detected** — a scikit-learn concept detector ([`ConceptDetector`]) trained on the concept data's own
  reference responses says whether the concept shows: `1[P(concept | text) >= 0.5]`, and the probability itself;
* **fluency NLL** — the mean per-token negative log-likelihood of the generated tokens under the *unsteered* base
  model, teacher-forced after the plain instruction prompt (no steering instruction) ([`generation_nll`]);
* **distinct-bigram share** — distinct word bigrams / word bigrams ([`distinct_bigram_share`]; 1.0 = no repetition).
  Degenerate repetition ("akin akin akin ...") has a *low* NLL, so NLL alone would reward it; the bigram share catches
  it, and a generation with a share below `DEGENERATE_DISTINCT_BIGRAMS` is counted as degenerate.

Per method and factor, detector accuracy is the mean over (concept, instruction) of `1[concept detected]`, and

    gain(method, factor) = accuracy(method, factor) - accuracy(none)
    gain ratio           = gain(hypersteer, f*) / gain(prompt)

where `f*` is chosen on the `select` half of the instructions by [`select_steering_factor`] (highest accuracy within
the fluency bound) and both gains are measured on the `test` half: like AxBench, the factor is not chosen on the
rows it is reported on (unlike AxBench, one factor serves every concept, as `default_steering_factor` does). This
metric needs no LLM judge, so it runs on any machine; it is *not* comparable with published numbers, which use the
judged AxBench protocol of `evaluate_steering.py`.

Instructions: a fixed list of generic instructions ([`GENERIC_INSTRUCTIONS`]), the same for every concept and
method; the factor calibration draws from a pool of its own ([`CALIBRATION_INSTRUCTIONS`]). Both were written for
this metric, not taken from the concept data, and name no concept, so the concept shows only when the method puts it
there, and the unsteered accuracy is the detector's false-positive rate on identical prompts.

This module is library code (it needs scikit-learn); the remote code never imports it.
"""

import math
import random
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from .data import format_prompt
from .evaluation import SELECT_SPLIT, TEST_SPLIT, _ratio, concept_derangement, generate_samples, generation_tasks
from .modeling_hypersteer import positions_from_mask
from .utils import pyplot


logger = logging.get_logger(__name__)

# Written for this metric: everyday requests that invite a few sentences of free text and name no AxBench concept.
GENERIC_INSTRUCTIONS = (
    "Describe your ideal weekend in two sentences.",
    "What makes someone a good friend?",
    "Give me a tip for staying focused while studying.",
    "Why do people enjoy travelling?",
    "Write a short note thanking a neighbour for their help.",
    "What should I consider before adopting a pet?",
    "Explain why sleep is important.",
    "Suggest a simple way to start a morning routine.",
    "What are the benefits of learning a new language?",
    "Describe a pleasant walk in a park.",
)
# The factor calibration's own instructions, written like the ones above but none of them. The fluency bound is
# prompting's NLL on the calibration's answers + a margin, and prompting's NLL per instruction spans 0.7-2.1 nats on
# SmolLM2-135M: calibrated on the first two instructions above (prompting 1.77-1.95 there, 1.31-1.44 on the first
# four), 6 of 11 runs shipped a factor whose text broke the bound on the evaluation's instructions; on these six, 0 of
# 11 (docs/concept_steering.md, "The calibration's own instructions"). The factor is then also reported on prompts
# it was not chosen on.
CALIBRATION_INSTRUCTIONS = (
    "How would you cheer up a friend who had a bad day?",
    "Describe your favourite meal and why you like it.",
    "What is a good habit to build this year?",
    "Write a short message inviting a colleague to lunch.",
    "Explain how to plan a small birthday party.",
    "What do you enjoy about the first snow of winter?",
)
# Reference responses run to hundreds of words, generations to tens: the detector learns from windows of this many
# words (see `ConceptDetector.fit`).
DETECTOR_WINDOW_WORDS = 40
DETECTOR_WINDOWS_PER_TEXT = 6
# A detector probability at or above this counts as "concept present".
DETECTION_THRESHOLD = 0.5
# Below this distinct-bigram share a generation repeats itself so much that it is counted as degenerate.
DEGENERATE_DISTINCT_BIGRAMS = 0.5
# The fluency bound of factor selection (see `select_steering_factor`).
DEFAULT_NLL_MARGIN = 0.5
DEFAULT_DISTINCT_FRACTION = 0.75
# Words and single punctuation marks: a collapsed model also repeats punctuation ("` ` ` `"), which words alone miss.
_TOKEN = re.compile(r"\w+|[^\w\s]", re.UNICODE)


# ---------------------------------------------------------------------------------------------------------------
# Concept detector
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ConceptDetector:
    """One binary classifier per concept over a shared TF-IDF representation of texts.

    Each concept's classifier is a `LogisticRegression` (balanced class weights, since a concept has far fewer
    positives than negatives) on word 1-2-gram TF-IDF features with sublinear term frequency. Positives are the
    concept's reference responses; negatives are every other concept's reference responses plus the concept-free
    (`is_negative`) responses. The vectorizer is fitted once on all reference texts and shared, which is the same as
    one `Pipeline(TfidfVectorizer, LogisticRegression)` per concept with a common vocabulary, at a fraction of the
    cost.

    Every reference text is cut into windows of `window_words` words (at most `DETECTOR_WINDOWS_PER_TEXT` per text),
    each a training text with the label of its response: the detector then sees texts as short as the generations it
    scores. Trained on whole responses it is calibrated for long texts and misses the concept in short ones: on the
    AxBench concept10 + conceptFD data (12 concepts, 36-word excerpts of responses it was not trained on) the
    true-positive rate was 0.37 with whole responses and 0.62 with 40-word windows (default caps), at false-positive
    rates of 0.4% and 0.8%.

    Build it with [`ConceptDetector.fit`] or [`ConceptDetector.from_rows`].
    """

    vectorizer: Any
    classifiers: dict[str, Any]
    threshold: float = DETECTION_THRESHOLD

    @classmethod
    def fit(
        cls,
        reference_responses: Mapping[str, Sequence[str]],
        negative_responses: Sequence[str] = (),
        concepts: Sequence[str] | None = None,
        seed: int = 0,
        window_words: int | None = DETECTOR_WINDOW_WORDS,
    ) -> "ConceptDetector":
        """Fits one classifier per concept of `concepts` (default: every concept of `reference_responses`).

        Args:
            reference_responses (`Mapping[str, Sequence[str]]`): texts in which each concept shows, per concept.
                Concepts not in `concepts` still serve as negatives of the others.
            negative_responses (`Sequence[str]`, *optional*): concept-free texts, negatives of every concept.
            concepts (`Sequence[str]`, *optional*): the concepts to detect.
            seed (`int`, *optional*, defaults to 0): seed of the classifiers' solver.
            window_words (`int`, *optional*, defaults to `DETECTOR_WINDOW_WORDS`): words per training window; `None`
                trains on whole texts.

        Raises:
            `ValueError` naming a concept without reference responses, or when a concept has no negatives.
        """
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression

        references = {
            concept: [text for text in texts if text and text.strip()]
            for concept, texts in reference_responses.items()
        }
        concepts = list(references) if concepts is None else list(dict.fromkeys(concepts))
        if not concepts:
            raise ValueError("The concept detector needs at least one concept; got none.")
        empty = [concept for concept in concepts if not references.get(concept)]
        if empty:
            raise ValueError(
                f"No reference responses for the concept(s) {empty[:5]}: the detector learns a concept from its "
                "responses in the concept data; pass data with positive rows for them, or leave them out."
            )
        references = {concept: _windows(texts, window_words) for concept, texts in references.items()}
        negatives = _windows([text for text in negative_responses if text and text.strip()], window_words)
        texts = [text for values in references.values() for text in values] + negatives
        vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, strip_accents="unicode")
        try:
            features = vectorizer.fit_transform(texts)
        except ValueError as error:
            if "empty vocabulary" not in str(error):
                raise
            raise ValueError(
                f"The reference texts hold no word of two or more characters ({len(texts)} texts, e.g. "
                f"{texts[:2]!r}); the detector needs real responses."
            ) from error
        owners = [concept for concept, values in references.items() for _ in values] + [None] * len(negatives)
        classifiers = {}
        for concept in tqdm(concepts, desc="Fitting concept detectors", unit="concept", disable=len(concepts) < 8):
            labels = [int(owner == concept) for owner in owners]
            if all(labels):
                raise ValueError(
                    f"Concept {concept!r} has no negative texts (no other concept and no concept-free responses); "
                    "the detector needs responses without the concept to learn from."
                )
            classifier = LogisticRegression(class_weight="balanced", solver="liblinear", random_state=seed)
            classifiers[concept] = classifier.fit(features, labels)
        return cls(vectorizer=vectorizer, classifiers=classifiers)

    @classmethod
    def from_rows(
        cls,
        rows: Iterable[Mapping[str, Any]],
        concepts: Sequence[str] | None = None,
        max_responses_per_concept: int | None = 64,
        max_negative_responses: int | None = 512,
        seed: int = 0,
    ) -> "ConceptDetector":
        """Fits the detector on concept-data rows (AxBench schema: `output`, `output_concept`, `is_negative`).

        `max_responses_per_concept` and `max_negative_responses` bound the fitting cost; the kept rows are a seeded
        random sample. See [`reference_responses`].
        """
        positives, negatives = reference_responses(rows, max_responses_per_concept, max_negative_responses, seed=seed)
        return cls.fit(positives, negatives, concepts=concepts, seed=seed)

    @property
    def concepts(self) -> list[str]:
        return list(self.classifiers)

    def predict_proba(self, concept: str, texts: Sequence[str]) -> list[float]:
        """P(concept shows | text) for each text; an empty text scores 0 (nothing was said, so nothing shows)."""
        if concept not in self.classifiers:
            raise ValueError(
                f"The detector has no classifier for concept {concept!r}; it was fitted for {self.concepts[:5]}"
                f"{'...' if len(self.concepts) > 5 else ''}. Fit it with this concept among `concepts`."
            )
        texts = list(texts)
        probabilities = [0.0] * len(texts)
        kept = [index for index, text in enumerate(texts) if text and text.strip()]
        if kept:
            classifier = self.classifiers[concept]
            scores = classifier.predict_proba(self.vectorizer.transform([texts[index] for index in kept]))
            positive = list(classifier.classes_).index(1)
            for index, score in zip(kept, scores[:, positive]):
                probabilities[index] = float(score)
        return probabilities

    def detect(self, concept: str, texts: Sequence[str]) -> list[bool]:
        """Whether the concept shows in each text (`predict_proba >= threshold`)."""
        return [probability >= self.threshold for probability in self.predict_proba(concept, texts)]


def _windows(texts: Sequence[str], window_words: int | None) -> list[str]:
    """Each text cut into consecutive windows of `window_words` whitespace-separated words (at most
    `DETECTOR_WINDOWS_PER_TEXT` per text); the texts themselves when `window_words` is `None`."""
    if window_words is None:
        return list(texts)
    if window_words < 1:
        raise ValueError(f"`window_words` must be >= 1 (or None for whole texts), got {window_words}.")
    windows = []
    for text in texts:
        words = text.split()
        starts = range(0, len(words), window_words)
        windows += [" ".join(words[start : start + window_words]) for start in starts][:DETECTOR_WINDOWS_PER_TEXT]
    return windows


def reference_responses(
    rows: Iterable[Mapping[str, Any]],
    max_responses_per_concept: int | None = None,
    max_negative_responses: int | None = None,
    seed: int = 0,
) -> tuple[dict[str, list[str]], list[str]]:
    """`({concept: responses of its positive rows}, responses of the negative rows)` from concept-data rows.

    Each list keeps at most its cap (`None`: all), a seeded random sample, so the detector is the same for the same
    data and seed.
    """
    positives: dict[str, list[str]] = defaultdict(list)
    negatives: list[str] = []
    for row in rows:
        text = row.get("output")
        if not isinstance(text, str) or not text.strip():
            continue
        if row.get("is_negative"):
            negatives.append(text)
        else:
            positives[row["output_concept"]].append(text)
    rng = random.Random(seed)

    def sample(texts: list[str], cap: int | None) -> list[str]:
        if cap is None or len(texts) <= cap:
            return texts
        return rng.sample(texts, cap)

    return {concept: sample(texts, max_responses_per_concept) for concept, texts in sorted(positives.items())}, sample(
        negatives, max_negative_responses
    )


# ---------------------------------------------------------------------------------------------------------------
# Fluency and repetition
# ---------------------------------------------------------------------------------------------------------------


def distinct_bigram_share(text: str) -> float:
    """Distinct bigrams / bigrams of the words and punctuation marks of `text` (case-insensitive; a word is `\\w+`,
    every other non-space character is a token of its own).

    1.0 means no bigram repeats; "akin akin akin akin" gives 1/3. Punctuation counts because a collapsed model
    repeats it too: a trained SmolLM2 steered too hard wrote "A SQL query like `WHERE ` WHERE ` and ` ` ` ` ...",
    which has almost no repeated *word* bigram. A text of fewer than two tokens has no bigram to repeat and gives 1.0
    (an empty generation is caught by the detector and the NLL instead).
    """
    words = [word.lower() for word in _TOKEN.findall(text or "")]
    bigrams = list(zip(words, words[1:]))
    if not bigrams:
        return 1.0
    return len(set(bigrams)) / len(bigrams)


@torch.no_grad()
def generation_nll(
    language_model,
    tokenizer,
    instructions: Sequence[str],
    generations: Sequence[str],
    batch_size: int = 8,
    desc: str = "Fluency NLL",
) -> list[float]:
    """Mean per-token NLL (nats) of each generation under `language_model`, teacher-forced after its instruction.

    The input of row `i` is `format_prompt(tokenizer, instructions[i])` (the plain chat prompt: no steering and no
    steering system prompt, so every method is scored against the same context) followed by the re-tokenised
    `generations[i]`. Only the generation's tokens are scored:

        NLL_i = -1/T_i * sum_{t=1..T_i} log p(y_t | prompt_i, y_<t)

    Generations are stored as decoded text, so re-tokenising may split a few tokens differently from the ones
    generated; the score is then that of the text, which is what the other measures see too.

    Args:
        language_model: the unsteered base causal LM (e.g. `HyperSteerModel.language_model`).
        instructions (`Sequence[str]`), generations (`Sequence[str]`): one of each per row.
        batch_size (`int`, *optional*, defaults to 8): rows per forward pass (left-padded).

    Returns:
        `list[float]`: one NLL per row; `nan` for an empty generation (no token to score).
    """
    if len(instructions) != len(generations):
        raise ValueError(f"Got {len(instructions)} instructions for {len(generations)} generations; pass one each.")
    device = language_model.get_input_embeddings().weight.device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = []
    for instruction, generation in zip(instructions, generations):
        prompt_ids = tokenizer(format_prompt(tokenizer, instruction), add_special_tokens=False)["input_ids"]
        generated_ids = tokenizer(generation, add_special_tokens=False)["input_ids"] if generation.strip() else []
        encoded.append((prompt_ids, generated_ids))
    nlls = [math.nan] * len(encoded)
    scored = [index for index, (_, generated) in enumerate(encoded) if generated]
    for start in tqdm(range(0, len(scored), batch_size), desc=desc, unit="batch", disable=len(scored) <= batch_size):
        indices = scored[start : start + batch_size]
        length = max(len(encoded[i][0]) + len(encoded[i][1]) for i in indices)
        generated_length = max(len(encoded[i][1]) for i in indices)
        # (batch_size, sequence_length), left-padded so every generation ends at the last position; labels are -100
        # on the prompt and the padding.
        input_ids = torch.full((len(indices), length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(indices), length), dtype=torch.long)
        labels = torch.full((len(indices), length), -100, dtype=torch.long)
        for row, index in enumerate(indices):
            prompt_ids, generated_ids = encoded[index]
            ids = prompt_ids + generated_ids
            input_ids[row, length - len(ids) :] = torch.tensor(ids)
            attention_mask[row, length - len(ids) :] = 1
            labels[row, length - len(generated_ids) :] = torch.tensor(generated_ids)
        # Only the last `generated_length + 1` positions predict generated tokens: the LM head (a vocabulary-sized
        # projection) runs on those alone. Logits: (batch_size, generated_length + 1, vocab_size).
        logits = language_model(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            position_ids=positions_from_mask(attention_mask).to(device),
            logits_to_keep=generated_length + 1,
        ).logits
        # Position t predicts token t + 1: (batch_size, generated_length, vocab_size) against the last labels.
        shift_logits = logits[:, :-1].float()
        shift_labels = labels[:, length - generated_length :].to(shift_logits.device)
        token_nll = torch.nn.functional.cross_entropy(
            shift_logits.transpose(1, 2), shift_labels, ignore_index=-100, reduction="none"
        )
        counts = (shift_labels != -100).sum(-1)
        for row, index in enumerate(indices):
            nlls[index] = float(token_nll[row].sum() / counts[row])
    return nlls


# ---------------------------------------------------------------------------------------------------------------
# Scoring, aggregation and factor selection
# ---------------------------------------------------------------------------------------------------------------


def score_samples(
    samples: Sequence[dict[str, Any]],
    detector: ConceptDetector,
    language_model,
    tokenizer,
    batch_size: int = 8,
) -> list[dict[str, Any]]:
    """Adds `concept_probability`, `concept_detected`, `nll`, `distinct_bigrams` and `degenerate` to copies of
    `samples` (the output of [`~modeling_hypersteer.evaluation.generate_samples`]), and with two or more concepts
    `wrong_concept`, `wrong_concept_probability` and `wrong_concept_detected`: the same generation read by the detector
    of another concept (the next one in sorted order). A vector that only moves every answer toward what the concepts
    share (the data's topic, or the style of their descriptions) is detected about as often for the wrong concept as
    for the right one.

    Identical (instruction, generation) pairs are scored by the base once: the unsteered generations repeat across
    concepts, and a collapsed model repeats itself.
    """
    samples = [dict(sample) for sample in samples]
    by_concept = defaultdict(list)
    for index, sample in enumerate(samples):
        by_concept[sample["concept"]].append(index)
    # With one concept there is no wrong one to read the generations with.
    wrong_of = concept_derangement(by_concept) if len(by_concept) > 1 else {}
    for concept, indices in tqdm(
        by_concept.items(), desc="Detecting concepts", unit="concept", disable=len(by_concept) < 8
    ):
        texts = [samples[index]["generation"] for index in indices]
        for index, probability in zip(indices, detector.predict_proba(concept, texts)):
            samples[index]["concept_probability"] = probability
            samples[index]["concept_detected"] = probability >= detector.threshold
        if not wrong_of:
            continue
        wrong = wrong_of[concept]
        for index, probability in zip(indices, detector.predict_proba(wrong, texts)):
            samples[index]["wrong_concept"] = wrong
            samples[index]["wrong_concept_probability"] = probability
            samples[index]["wrong_concept_detected"] = probability >= detector.threshold
    pairs = list(dict.fromkeys((sample["instruction"], sample["generation"]) for sample in samples))
    nlls = generation_nll(
        language_model, tokenizer, [pair[0] for pair in pairs], [pair[1] for pair in pairs], batch_size=batch_size
    )
    nll_of = dict(zip(pairs, nlls))
    for sample in samples:
        sample["nll"] = nll_of[(sample["instruction"], sample["generation"])]
        sample["distinct_bigrams"] = distinct_bigram_share(sample["generation"])
        sample["degenerate"] = sample["distinct_bigrams"] < DEGENERATE_DISTINCT_BIGRAMS
    return samples


def _mean(values: Sequence[float]) -> float | None:
    values = [value for value in values if value is not None and not (isinstance(value, float) and math.isnan(value))]
    return sum(values) / len(values) if values else None


def aggregate_scores(samples: Sequence[dict[str, Any]], split: str | None = None) -> list[dict[str, Any]]:
    """One row per (method, factor) over the scored samples (of one `split`, or all): `detector_accuracy`,
    `detector_probability`, `wrong_concept_accuracy` (the share detected as another concept, see [`score_samples`];
    `None` with a single concept), `nll` (mean over non-empty generations), `distinct_bigrams`, `degenerate_share`,
    `empty_share` and `num_samples`, sorted by method then factor."""
    groups = defaultdict(list)
    for sample in samples:
        if split is None or sample.get("split") == split:
            groups[(sample["method"], float(sample["factor"]))].append(sample)
    rows = []
    for (method, factor), group in sorted(groups.items()):
        rows.append(
            {
                "method": method,
                "factor": factor,
                "detector_accuracy": _mean([float(s["concept_detected"]) for s in group]),
                "detector_probability": _mean([s["concept_probability"] for s in group]),
                "wrong_concept_accuracy": _mean(
                    [float(s["wrong_concept_detected"]) for s in group if "wrong_concept_detected" in s]
                ),
                "nll": _mean([s["nll"] for s in group]),
                "distinct_bigrams": _mean([s["distinct_bigrams"] for s in group]),
                "degenerate_share": _mean([float(s["degenerate"]) for s in group]),
                "empty_share": _mean([float(not s["generation"].strip()) for s in group]),
                "num_samples": len(group),
            }
        )
    return rows


def select_steering_factor(
    candidates: Sequence[Mapping[str, Any]],
    reference: Mapping[str, Any],
    nll_margin: float = DEFAULT_NLL_MARGIN,
    distinct_fraction: float = DEFAULT_DISTINCT_FRACTION,
) -> tuple[float | None, list[dict[str, Any]]]:
    """The factor with the highest detector accuracy among those within the fluency bound.

    Ties in accuracy (common: a few dozen answers, of which a small base shows the concept in a handful) go to the
    higher mean detector probability, the same detector's graded score on the same answers, and only then to the
    smaller factor.

    A factor passes when

        nll <= reference nll + nll_margin    and    distinct_bigrams >= distinct_fraction * reference distinct_bigrams

    The reference is prompting (a fluent way to put the concept in); pass the unsteered row when prompting was not
    measured. The NLL bound rejects broken text, the bigram bound rejects degenerate repetition, whose NLL is low.

    Args:
        candidates (`Sequence[dict]`): one row per factor with `factor`, `detector_accuracy`, `nll` and
            `distinct_bigrams`, and optionally `detector_probability` (as [`aggregate_scores`] returns them).
        reference (`dict`): the reference row, with `nll` and `distinct_bigrams`.

    Returns:
        `(factor, table)`: the chosen factor (`None` when no factor passes) and the candidates, each with `passes`
        and, when it fails, `rejected_because`.
    """
    if not candidates:
        raise ValueError("No candidate factors to select from; give a non-empty factor grid.")
    reference_nll, reference_distinct = reference.get("nll"), reference.get("distinct_bigrams")
    if reference_nll is None or reference_distinct is None:
        raise ValueError(
            f"The fluency reference needs `nll` and `distinct_bigrams`, got {dict(reference)}; the reference method "
            "produced only empty generations. Raise max_new_tokens or check the base model."
        )
    max_nll = reference_nll + nll_margin
    min_distinct = distinct_fraction * reference_distinct
    table = []
    for row in sorted(candidates, key=lambda row: float(row["factor"])):
        reasons = []
        if row.get("nll") is None or not row["nll"] <= max_nll:
            reasons.append(
                f"NLL {_fmt(row.get('nll'))} > {max_nll:.3f} (reference {reference_nll:.3f} + {nll_margin})"
            )
        if row.get("distinct_bigrams") is None or not row["distinct_bigrams"] >= min_distinct:
            reasons.append(
                f"distinct-bigram share {_fmt(row.get('distinct_bigrams'))} < {min_distinct:.3f} "
                f"({distinct_fraction} x reference {reference_distinct:.3f})"
            )
        entry = {**row, "passes": not reasons}
        if reasons:
            entry["rejected_because"] = "; ".join(reasons)
        table.append(entry)
    passing = [row for row in table if row["passes"]]
    if not passing:
        return None, table
    # Sorted by factor, and `max` keeps the first of equal maxima: full ties go to the smaller factor.
    best = max(passing, key=lambda row: (row["detector_accuracy"] or 0.0, row.get("detector_probability") or 0.0))
    return float(best["factor"]), table


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def check_factor_grid(factors: Sequence[float], flag: str = "steering factors") -> list[float]:
    """The factors as floats, sorted and deduplicated.

    Raises:
        `ValueError` for an empty grid or a factor that is not a finite positive number, naming it.
    """
    values = []
    for factor in factors:
        if (
            isinstance(factor, bool)
            or not isinstance(factor, (int, float))
            or not math.isfinite(factor)
            or factor <= 0
        ):
            raise ValueError(
                f"The {flag} must be finite positive numbers, got {factor!r}; factor 0 is the unsteered model, "
                "which the metric measures as the `none` method."
            )
        values.append(float(factor))
    if not values:
        raise ValueError(f"The {flag} grid is empty; give at least one factor, e.g. 1,2,4,8.")
    return sorted(set(values))


# ---------------------------------------------------------------------------------------------------------------
# Generation + scoring
# ---------------------------------------------------------------------------------------------------------------


def _generate(model, tokenizer, tasks, methods, factors, **generation_kwargs) -> list[dict[str, Any]]:
    """`generate_samples` for every method, with the unsteered generations made once per instruction and shared by
    every concept (they do not depend on it)."""
    steered = [method for method in methods if method != "none"]
    samples = generate_samples(model, tokenizer, tasks, steered, factors, **generation_kwargs) if steered else []
    if "none" in methods:
        unique = {task["instruction"]: {**task, "concept": "", "concept_id": None} for task in tasks}
        plain = generate_samples(model, tokenizer, list(unique.values()), ["none"], factors, **generation_kwargs)
        generation_of = {sample["instruction"]: sample for sample in plain}
        samples += [{**generation_of[task["instruction"]], **task, "method": "none", "factor": 0.0} for task in tasks]
    return samples


def text_metric(
    model,
    tokenizer,
    detector: ConceptDetector,
    concepts: Sequence[str],
    methods: Sequence[str],
    steering_factors: Sequence[float],
    instructions: Sequence[str] = GENERIC_INSTRUCTIONS,
    num_instructions: int = 4,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    generations_path=None,
    concept_vectors: dict[str, dict[str, torch.Tensor]] | None = None,
    nll_margin: float = DEFAULT_NLL_MARGIN,
    distinct_fraction: float = DEFAULT_DISTINCT_FRACTION,
    prompt_placement: str = "user",
) -> dict[str, Any]:
    """Greedy generations for `num_instructions` generic instructions per concept, scored by the detector, the
    base's NLL and the distinct-bigram share (see the module docstring).

    Args:
        model ([`HyperSteerModel`]): the model; its `language_model` gives `none`, `prompt` and the NLL.
        detector ([`ConceptDetector`]): fitted for every concept of `concepts`.
        methods (`Sequence[str]`): from `evaluation.METHODS`; the gain needs `none`, the ratio also `prompt`.
        steering_factors (`Sequence[float]`): the factor grid of `hypersteer` and the baselines.
        instructions (`Sequence[str]`, *optional*): the instruction pool (default [`GENERIC_INSTRUCTIONS`]); the first
            `num_instructions` are used, the first half selects the factor and the second half reports.
        generations_path (*optional*): JSONL cache of the generations (see `generate_samples`).
        concept_vectors (*optional*): the baselines' `{method: {concept: vector}}`.
        prompt_placement (`str`, *optional*, defaults to `"user"`): where `prompt` puts the steering instruction
            (see `evaluation.prompt_steering_turns`).

    Returns:
        `dict` with `rows` (per method and factor, all instructions, with `gain_over_none` and `gain_ratio` against
        prompting), `headline` (`factor` chosen on the select half, `hypersteer_gain` and `prompt_gain` on the test
        half, `gain_ratio` or `None` with `undefined_reason`), `selection` (the select-half table), `instructions`,
        `num_concepts`, `detection_threshold`, `rule` and `samples` (every scored generation).
    """
    factors = check_factor_grid(steering_factors, "steering factors")
    missing = sorted(set(concepts) - set(detector.concepts))
    if missing:
        raise ValueError(f"The detector has no classifier for the concept(s) {missing[:5]}; fit it for them.")
    chosen = list(dict.fromkeys(instructions))[:num_instructions]
    tasks = generation_tasks({concept: chosen for concept in concepts}, num_instructions)
    samples = _generate(
        model,
        tokenizer,
        tasks,
        list(methods),
        factors,
        generations_path=generations_path,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        batch_size=batch_size,
        concept_vectors=concept_vectors,
        prompt_placement=prompt_placement,
    )
    scored = score_samples(samples, detector, model.language_model, tokenizer, batch_size=batch_size)
    result = summarize_text_metric(
        scored, nll_margin=nll_margin, distinct_fraction=distinct_fraction, instructions=chosen
    )
    return {**result, "prompt_placement": prompt_placement}


def _reference_row(rows: Sequence[dict]) -> dict | None:
    by_method = {row["method"]: row for row in rows if row["method"] in ("prompt", "none")}
    return by_method.get("prompt") or by_method.get("none")


def summarize_text_metric(
    samples: Sequence[dict[str, Any]],
    nll_margin: float = DEFAULT_NLL_MARGIN,
    distinct_fraction: float = DEFAULT_DISTINCT_FRACTION,
    instructions: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The text-metric summary of scored samples ([`score_samples`]); see [`text_metric`] for its keys."""
    rows = aggregate_scores(samples)
    accuracy = {(row["method"], row["factor"]): row["detector_accuracy"] for row in rows}
    none_accuracy = next((row["detector_accuracy"] for row in rows if row["method"] == "none"), None)
    prompt_accuracy = next((row["detector_accuracy"] for row in rows if row["method"] == "prompt"), None)
    for row in rows:
        row["gain_over_none"] = None if none_accuracy is None else row["detector_accuracy"] - none_accuracy
        if row["method"] not in ("none", "prompt") and none_accuracy is not None and prompt_accuracy is not None:
            row["gain_ratio"], _ = _ratio(
                accuracy[(row["method"], row["factor"])] - none_accuracy,
                prompt_accuracy - none_accuracy,
                "acc_prompt - acc_none",
            )
    headline = _headline(samples, nll_margin, distinct_fraction)
    selection = headline.pop("selection_table", [])
    return {
        "rows": rows,
        "headline": headline,
        "selection": selection,
        "instructions": list(instructions)
        if instructions is not None
        else sorted({s["instruction"] for s in samples}),
        "num_concepts": len({sample["concept"] for sample in samples if sample["method"] != "none"}),
        "detection_threshold": DETECTION_THRESHOLD,
        "rule": _rule_text(nll_margin, distinct_fraction),
        "samples": list(samples),
    }


def _rule_text(nll_margin: float, distinct_fraction: float) -> str:
    return (
        "highest detector accuracy among factors with NLL <= reference NLL + "
        f"{nll_margin} nats and distinct-bigram share >= {distinct_fraction} x the reference's (reference: "
        "prompting, else unsteered); ties to the higher mean detector probability, then to the smaller factor"
    )


def _headline(samples, nll_margin, distinct_fraction) -> dict[str, Any]:
    """HyperSteer's gain ratio on the test half at the factor the fluency-bounded rule picks on the select half."""
    select = aggregate_scores(samples, SELECT_SPLIT)
    test = {(row["method"], row["factor"]): row for row in aggregate_scores(samples, TEST_SPLIT)}
    candidates = [row for row in select if row["method"] == "hypersteer"]
    reference = _reference_row(select)
    headline: dict[str, Any] = {"factor": None, "gain_ratio": None, "split": TEST_SPLIT}
    if not candidates or reference is None or reference.get("nll") is None:
        headline["undefined_reason"] = "needs hypersteer and prompt (or none) generations with text"
        return headline
    factor, table = select_steering_factor(candidates, reference, nll_margin, distinct_fraction)
    headline["selection_table"] = table
    test_none = next((row for (method, _), row in test.items() if method == "none"), None)
    test_prompt = next((row for (method, _), row in test.items() if method == "prompt"), None)
    if factor is None:
        headline["undefined_reason"] = "no factor passed the fluency bound on the select half"
        return headline
    headline["factor"] = factor
    if test_none is None or test_prompt is None:
        headline["undefined_reason"] = "the gain ratio needs both the none and the prompt method"
        return headline
    hypersteer = test[("hypersteer", factor)]
    headline.update(
        hypersteer_accuracy=hypersteer["detector_accuracy"],
        prompt_accuracy=test_prompt["detector_accuracy"],
        none_accuracy=test_none["detector_accuracy"],
        hypersteer_gain=hypersteer["detector_accuracy"] - test_none["detector_accuracy"],
        prompt_gain=test_prompt["detector_accuracy"] - test_none["detector_accuracy"],
        hypersteer_nll=hypersteer["nll"],
        hypersteer_distinct_bigrams=hypersteer["distinct_bigrams"],
    )
    ratio, reason = _ratio(headline["hypersteer_gain"], headline["prompt_gain"], "acc_prompt - acc_none")
    headline["gain_ratio"] = ratio
    if reason:
        headline["undefined_reason"] = f"prompting did not raise the detector accuracy ({reason})"
    return headline


# ---------------------------------------------------------------------------------------------------------------
# Calibration of the default steering factor
# ---------------------------------------------------------------------------------------------------------------


# The config field each calibrated method's factor is saved in.
CALIBRATED_FACTOR_FIELDS = {"hypersteer": "default_steering_factor", "prompt_hypersteer": "prompted_steering_factor"}


def calibrate_steering_factors(
    model,
    tokenizer,
    rows: Iterable[Mapping[str, Any]],
    grids: Mapping[str, Sequence[float]],
    num_concepts: int | None = 8,
    num_instructions: int = 6,
    max_new_tokens: int = 48,
    batch_size: int = 24,
    instructions: Sequence[str] = CALIBRATION_INSTRUCTIONS,
    nll_margin: float = DEFAULT_NLL_MARGIN,
    distinct_fraction: float = DEFAULT_DISTINCT_FRACTION,
    seed: int = 0,
    prompt_placement: str = "user",
) -> dict[str, tuple[float | None, dict[str, Any]]]:
    """Chooses, for each method of `grids`, the factor at which the concept shows, within a fluency bound, on held-in
    concepts.

    `num_concepts` concepts of `rows` (a seeded sample) are steered with every factor of the method's grid on the first
    `num_instructions` of `instructions` each (by default [`CALIBRATION_INSTRUCTIONS`], none of which the text metric
    reports on), next to prompting and the unsteered base, and scored by the text metric (see the module docstring).
    The factor with the highest detector accuracy among those whose fluency NLL is within `nll_margin` nats of
    prompting's and whose distinct-bigram share is at least `distinct_fraction` of prompting's wins, ties going to the
    higher mean detector probability ([`select_steering_factor`]). When none passes, the model's current value of the
    field the method calibrates ([`CALIBRATED_FACTOR_FIELDS`]) is kept, with a warning. Every method is calibrated on
    the same concepts, instructions, detector and reference, which are generated and scored once.

    `hypersteer` calibrates `default_steering_factor`, the vector alone; `prompt_hypersteer` calibrates
    `prompted_steering_factor`, the vector added on top of prompting's prompt for the same concept (the way a
    description the model never trained on shows in text; docs/concept_steering.md, "On top of a prompt").

    Args:
        model ([`HyperSteerModel`]): the trained model (not modified: the caller stores the factors).
        rows (`Iterable[dict]`): concept-data rows of the concepts to calibrate on (the training run's held-in
            concepts) plus any negative rows; they train the concept detector.
        grids (`Mapping[str, Sequence[float]]`): the candidate factors of each method to calibrate (keys of
            [`CALIBRATED_FACTOR_FIELDS`]), each finite and positive.
        batch_size (`int`, *optional*, defaults to 24): generation and NLL batch size. One factor's generations for
            8 concepts x 6 instructions are two batches; on CPU batches of 24 take half the time of batches of 8
            (SmolLM2-135M, 48 tokens: 25 s against 48 s for 24 generations).
        prompt_placement (`str`, *optional*, defaults to `"user"`): where the reference, prompting, puts the steering
            instruction (see `evaluation.prompt_steering_turns`); `prompt_hypersteer` puts it there too.

    Returns:
        `{method: (factor, record)}`: the chosen (or kept; `None` when `prompted_steering_factor` was never set) factor
        and a JSON-ready record with `method`, `field`, `factor`, `chosen_by` (`"rule"` or `"kept_default"`), `grid`,
        `table` (per-factor numbers, with `passes` and why not), `reference` (prompting's and the unsteered numbers),
        `prompt_placement`, `rule`, `concepts`, `instructions` and `max_new_tokens`.

    Raises:
        `ValueError` for no or an unknown method, an empty grid, a non-positive factor, fewer than `num_instructions`
        instructions, or rows without any concept.
    """
    if not grids:
        raise ValueError(f"Give at least one method to calibrate, from {list(CALIBRATED_FACTOR_FIELDS)}.")
    for method in grids:
        if method not in CALIBRATED_FACTOR_FIELDS:
            raise ValueError(f"`method` must be one of {list(CALIBRATED_FACTOR_FIELDS)}, got {method!r}.")
    grids = {method: check_factor_grid(factors, f"{method} calibration factors") for method, factors in grids.items()}
    if num_concepts is not None and num_concepts < 1:
        raise ValueError(f"`num_concepts` must be >= 1 (or None for all), got {num_concepts}.")
    if num_instructions < 2 or len(dict.fromkeys(instructions)) < num_instructions:
        raise ValueError(
            f"Calibration needs at least 2 instructions and as many as `num_instructions`={num_instructions}; "
            f"got {len(dict.fromkeys(instructions))} distinct instruction(s)."
        )
    rows = [dict(row) for row in rows]
    available = sorted({row["output_concept"] for row in rows if not row.get("is_negative")})
    if not available:
        raise ValueError("No concept to calibrate on: `rows` holds no positive row (`is_negative` False).")
    concepts = available
    if num_concepts is not None and len(available) > num_concepts:
        concepts = sorted(random.Random(seed).sample(available, num_concepts))
    detector = ConceptDetector.from_rows(rows, concepts=concepts, seed=seed)
    chosen = list(dict.fromkeys(instructions))[:num_instructions]
    tasks = generation_tasks({concept: chosen for concept in concepts}, num_instructions)
    samples = _generate(
        model,
        tokenizer,
        tasks,
        [*grids, "prompt", "none"],
        grids,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        batch_size=batch_size,
        prompt_placement=prompt_placement,
    )
    scored = score_samples(samples, detector, model.language_model, tokenizer, batch_size=batch_size)
    table = aggregate_scores(scored)
    reference = _reference_row(table)
    rule = _rule_text(nll_margin, distinct_fraction)
    results = {}
    for method, grid in grids.items():
        factor, checked = select_steering_factor(
            [row for row in table if row["method"] == method], reference, nll_margin, distinct_fraction
        )
        field = CALIBRATED_FACTOR_FIELDS[method]
        current = getattr(model.config, field)
        current = None if current is None else float(current)
        record = {
            "method": method,
            "field": field,
            "factor": factor if factor is not None else current,
            "chosen_by": "rule" if factor is not None else "kept_default",
            "grid": grid,
            "table": checked,
            "reference": {row["method"]: row for row in table if row["method"] in ("prompt", "none")},
            "prompt_placement": prompt_placement,
            "rule": rule,
            "concepts": concepts,
            "instructions": chosen,
            "max_new_tokens": max_new_tokens,
        }
        if factor is None:
            logger.warning(
                f"No {method} factor of {grid} passed the fluency bound ({rule}); keeping {field}={current}. Try a "
                "grid of smaller factors."
            )
        results[method] = (record["factor"], record)
    return results


def calibrate_steering_factor(
    model, tokenizer, rows: Iterable[Mapping[str, Any]], factors: Sequence[float], method: str = "hypersteer", **kwargs
) -> tuple[float | None, dict[str, Any]]:
    """[`calibrate_steering_factors`] for one method (`"hypersteer"` or `"prompt_hypersteer"`) over `factors`;
    returns `(factor, record)`."""
    return calibrate_steering_factors(model, tokenizer, rows, {method: factors}, **kwargs)[method]


# ---------------------------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------------------------


# Fixed per method, so prompting's dashed level never shares a colour with a steered method's line.
METHOD_COLORS = {
    "hypersteer": "tab:blue",
    "prompt_hypersteer": "tab:red",
    "vector": "tab:purple",
    "diffmean": "tab:green",
    "prompt": "tab:orange",
    "none": "tab:gray",
}


def plot_text_metric(result: Mapping[str, Any], path) -> Any:
    """Detector accuracy, fluency NLL and distinct-bigram share against the factor, one line per method with a factor
    grid and a dashed level for `prompt` and `none`."""
    from pathlib import Path

    plt = pyplot()
    rows = result["rows"]
    panels = (
        ("detector_accuracy", "detector accuracy"),
        ("nll", "fluency NLL (nats/token, base)"),
        ("distinct_bigrams", "distinct-bigram share"),
    )
    factors = sorted({row["factor"] for row in rows if row["method"] not in ("prompt", "none")}) or [1.0]
    figure, axes = plt.subplots(1, len(panels), figsize=(13, 3.8))
    for axis, (key, label) in zip(axes, panels):
        by_method = defaultdict(list)
        for row in rows:
            if row.get(key) is not None:
                by_method[row["method"]].append((row["factor"], row[key]))
        for method, points in sorted(by_method.items()):
            if method in ("prompt", "none"):
                axis.hlines(
                    points[0][1],
                    factors[0],
                    factors[-1],
                    linestyles="--",
                    label=method,
                    colors=METHOD_COLORS[method],
                )
            else:
                points.sort()
                axis.plot(
                    [p[0] for p in points],
                    [p[1] for p in points],
                    marker="o",
                    label=method,
                    color=METHOD_COLORS.get(method),
                )
        axis.set_xlabel("steering factor")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle("Judge-free text metric vs steering factor")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)


def text_metric_markdown(result: Mapping[str, Any]) -> str:
    """A Markdown table of the text metric per method and factor, with the headline gain ratio."""
    headline = result.get("headline") or {}
    if headline.get("gain_ratio") is not None:
        ratio = f"{headline['gain_ratio']:.3f} at factor {headline['factor']}"
    else:
        ratio = f"undefined ({headline.get('undefined_reason', 'not measured')})"
    lines = [
        f"Judge-free text metric ({result.get('num_concepts', 0)} concept(s), generic instructions, greedy): "
        "detector accuracy = share of generations in which a TF-IDF + logistic-regression detector trained on the "
        "concept's reference responses finds the concept (wrong-concept: the detector of another concept, read on "
        "the same generations); NLL = the unsteered base's per-token NLL of the "
        "generation; distinct = distinct word bigrams / bigrams. Not comparable with papers (they use the judged "
        "protocol).",
        "",
        f"Gain ratio (HyperSteer gain / prompting gain over unsteered, factor chosen on the select half, test half): "
        f"{ratio}.",
        "",
        "| method | factor | detector accuracy | wrong-concept accuracy | detector probability | gain over none | NLL "
        "| distinct bigrams | degenerate | samples |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result.get("rows", []):
        lines.append(
            f"| {row['method']} | {row['factor']:g} | {_fmt(row['detector_accuracy'])} | "
            f"{_fmt(row.get('wrong_concept_accuracy'))} | {_fmt(row['detector_probability'])} | "
            f"{_fmt(row.get('gain_over_none'))} | {_fmt(row['nll'])} | "
            f"{_fmt(row['distinct_bigrams'])} | {_fmt(row['degenerate_share'])} | {row['num_samples']} |"
        )
    lines.append("")
    return "\n".join(lines)


__all__ = [
    "CALIBRATED_FACTOR_FIELDS",
    "DEGENERATE_DISTINCT_BIGRAMS",
    "GENERIC_INSTRUCTIONS",
    "METHOD_COLORS",
    "ConceptDetector",
    "aggregate_scores",
    "calibrate_steering_factor",
    "calibrate_steering_factors",
    "check_factor_grid",
    "distinct_bigram_share",
    "generation_nll",
    "plot_text_metric",
    "reference_responses",
    "score_samples",
    "select_steering_factor",
    "summarize_text_metric",
    "text_metric",
    "text_metric_markdown",
]
