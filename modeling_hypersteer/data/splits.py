"""Concept-level splits (held-in / held-out concepts) and the train / eval row splits built from them."""

import difflib
import json
import numbers
import os
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, Value, concatenate_datasets
from transformers.utils import logging

from .loading import _normalise, concept_names


logger = logging.get_logger(__name__)

SPLIT_NAMES = ("train", "eval_heldin", "eval_heldout")


@dataclass
class ConceptSplit:
    """Which concepts are trained on (held-in) and which are never seen in training (held-out).

    Args:
        heldin_concepts (`list[str]`): concept descriptions used for training and held-in evaluation.
        heldout_concepts (`list[str]`): concept descriptions kept out of training entirely.
        sources (`list[str]`, *optional*): the data sources the split was drawn from, for the record.
        seed (`int`, *optional*, defaults to 0): the seed that drew the split.

    >>> split = ConceptSplit(["legal terminology"], ["C/C++ syntax"], sources=["data.parquet"], seed=0)
    >>> split.to_json("out/concept_split.json")
    >>> ConceptSplit.from_json("out/concept_split.json") == split
    True
    """

    heldin_concepts: list[str]
    heldout_concepts: list[str]
    sources: list[str] = field(default_factory=list)
    seed: int = 0

    def __post_init__(self):
        for name in ("heldin_concepts", "heldout_concepts", "sources"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(item, str) for item in value):
                raise ValueError(f"`ConceptSplit.{name}` must be a list of strings, got {value!r}.")
            setattr(self, name, list(value))
        overlap = sorted(set(self.heldin_concepts) & set(self.heldout_concepts))
        if overlap:
            raise ValueError(f"Concepts cannot be both held-in and held-out; these are in both lists: {overlap}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "ConceptSplit":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"No concept split file at {str(path)!r}.")
        content = json.loads(path.read_text(encoding="utf-8"))
        expected = {"heldin_concepts", "heldout_concepts", "sources", "seed"}
        if not isinstance(content, dict) or not {"heldin_concepts", "heldout_concepts"} <= set(content):
            raise ValueError(f"{str(path)!r} is not a concept split: it needs keys {sorted(expected)}.")
        unknown = sorted(set(content) - expected)
        if unknown:
            raise ValueError(f"{str(path)!r} has unknown key(s) {unknown}; a concept split has {sorted(expected)}.")
        return cls(**content)


def parse_heldout_concepts(value: str) -> int | float | list[str]:
    """Read a held-out rule from text: `"3"` (a count), `"0.1"` (a ratio in [0, 1)), or `"|"`-separated concept
    descriptions (a single description is also accepted)."""
    value = value.strip()
    if "|" in value:
        return [part.strip() for part in value.split("|") if part.strip()]
    try:
        return int(value)
    except ValueError:
        pass
    try:
        ratio = float(value)
    except ValueError:
        return [value]
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"A held-out ratio must be in [0, 1), got {ratio}; give a count like 3 or a ratio like 0.1.")
    return ratio


def split_concepts(
    dataset: Dataset, heldout: int | float | Sequence[str] | None = None, seed: int = 0
) -> ConceptSplit:
    """Splits the concepts of `dataset` into held-in and held-out concepts with a seeded, row-order-free rule.

    The concept descriptions are sorted, then permuted with `random.Random(seed)`; the first K of the permutation
    are held out. The same concepts and seed therefore always give the same split, however the rows are ordered.

    Args:
        dataset (`datasets.Dataset`): AxBench-schema data, e.g. from `load_concept_data`.
        heldout (`int`, `float`, `list[str]` or `None`):
            `int` K: hold out K concepts (0 <= K < number of concepts). `float` r in [0, 1): hold out `round(r * n)`
            concepts (at least one when r > 0). `list[str]`: hold out exactly these concept descriptions. `None`:
            hold out nothing.
        seed (`int`, *optional*, defaults to 0): seeds the permutation.

    Returns:
        `ConceptSplit` with both lists sorted.
    """
    concepts = concept_names(dataset)
    num_concepts = len(concepts)
    if isinstance(heldout, bool) or not (heldout is None or isinstance(heldout, (numbers.Real, list, tuple))):
        raise TypeError(
            f"`heldout` must be an int (number of concepts), a float in [0, 1) (ratio), a list of concept "
            f"descriptions or None; got {heldout!r} ({type(heldout).__name__})."
        )
    if isinstance(heldout, (list, tuple)):
        known = set(concepts)
        unknown = [name for name in heldout if name not in known]
        if unknown:
            hints = {name: difflib.get_close_matches(str(name), concepts, n=3, cutoff=0.4) for name in unknown}
            raise ValueError(
                f"{len(unknown)} held-out concept(s) are not concepts of this data ({num_concepts} concepts): "
                + "; ".join(f"{name!r} (close matches: {hints[name] or 'none'})" for name in unknown)
            )
        heldout_concepts = sorted(set(heldout))
    else:
        if heldout is None:
            num_heldout = 0
        elif isinstance(heldout, numbers.Integral):
            num_heldout = int(heldout)
        else:
            if not 0.0 <= heldout < 1.0:
                raise ValueError(
                    f"A held-out ratio must be in [0, 1), got {heldout}; pass an int to hold out K concepts."
                )
            num_heldout = max(1, round(heldout * num_concepts)) if heldout > 0 else 0
        if not 0 <= num_heldout < num_concepts:
            raise ValueError(
                f"Cannot hold out {num_heldout} of {num_concepts} concepts (heldout={heldout!r}); at least one concept "
                "must stay held-in for training."
            )
        order = list(range(num_concepts))
        random.Random(seed).shuffle(order)
        heldout_concepts = sorted(concepts[index] for index in order[:num_heldout])
    held_out = set(heldout_concepts)
    heldin_concepts = [concept for concept in concepts if concept not in held_out]
    if not heldin_concepts:
        raise ValueError(f"All {num_concepts} concepts are held out; at least one must stay held-in for training.")
    sources = sorted(set(dataset["source"])) if "source" in dataset.column_names else []
    logger.info(f"Concept split (seed {seed}): {len(heldin_concepts)} held-in, {len(heldout_concepts)} held-out.")
    return ConceptSplit(heldin_concepts, heldout_concepts, sources=sources, seed=seed)


def _rng(seed: int, *keys: str) -> random.Random:
    # A string seed is hashed with SHA-512 by `random`, so each (seed, purpose, concept) stream is stable across
    # processes and independent of every other concept: adding a concept does not reshuffle the others.
    return random.Random("\x1f".join([str(seed), *keys]))


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _seeded_order(indices: list[int], sort_keys: list[tuple], seed: int, *keys: str) -> list[int]:
    ordered = [index for _, index in sorted(zip(sort_keys, indices))]
    _rng(seed, *keys).shuffle(ordered)
    return ordered


def build_splits(
    dataset: Dataset,
    split: ConceptSplit | None = None,
    eval_fraction: float | None = 0.1,
    eval_examples_per_concept: int | None = None,
    max_examples_per_concept: int | None = None,
    use_negatives: bool = False,
    negative_steering_factor: float = 1.0,
    seed: int = 0,
) -> DatasetDict:
    """Builds the `train`, `eval_heldin` and `eval_heldout` splits of concept data.

    * `train`: positive rows of held-in concepts (at most `max_examples_per_concept` per concept, a seeded choice),
      plus, with `use_negatives`, negative rows relabelled with a held-in concept (see below).
    * `eval_heldin`: positive rows of held-in concepts whose base prompt (`input`) is never trained on for that
      concept: per concept, a seeded choice of distinct `input` texts goes to evaluation with all of its rows.
    * `eval_heldout`: positive rows of held-out concepts. No held-out concept text reaches `train`.

    Every row of every split gets a float `steering_factor` (1.0 for positives). Every choice is seeded per concept
    and made after sorting, so the result does not depend on row order.

    Negatives (`use_negatives=True`) follow AxBench's `train_on_negative` recipe, which relabels shared negatives
    with a concept's description (`replace_negative_description`) and trains them with the ordinary LM loss while
    steered; here each distinct negative row is dealt to exactly one held-in concept (seeded shuffle, dealt round
    robin, so concepts get different negatives rather than the same first few), at most as many as that concept has
    positive training rows (AxBench's default `negative_example_ratio=1`). A negative whose prompt is a training or
    evaluation prompt of that concept goes to the next concept instead. The negative's `output_concept` becomes the
    assigned concept's text and its `steering_factor` is `negative_steering_factor`: the default 1.0 trains "this
    steering prompt on this prompt gives a concept-free answer" as the reference does. Note that 0.0 makes those rows
    gradient-free for the hypernetwork (`h + 0 * v` does not depend on `v`), so they would only add base-model loss.

    Args:
        dataset (`datasets.Dataset`): AxBench-schema data, e.g. from `load_concept_data`.
        split (`ConceptSplit`, *optional*): from `split_concepts`; `None` makes every concept held-in.
        eval_fraction (`float`, *optional*, defaults to 0.1):
            Fraction of each held-in concept's distinct prompts used for `eval_heldin` (at least one when > 0, and
            never all of them). Ignored when `eval_examples_per_concept` is given.
        eval_examples_per_concept (`int`, *optional*):
            Number of distinct prompts per held-in concept for `eval_heldin`, and the cap on rows per concept in
            `eval_heldout`.
        max_examples_per_concept (`int`, *optional*): cap on positive training rows per concept.
        use_negatives (`bool`, *optional*, defaults to `False`): add negative rows to `train` as described above.
        negative_steering_factor (`float`, *optional*, defaults to 1.0): `steering_factor` of negative rows.
        seed (`int`, *optional*, defaults to 0): seeds every choice.

    Returns:
        `datasets.DatasetDict` with `train`, `eval_heldin` and `eval_heldout`, each with the input columns plus
        `is_negative` and `steering_factor` (`float32`).
    """
    dataset = _normalise(dataset, "The dataset passed to `build_splits`")
    if split is None:
        split = split_concepts(dataset, None, seed)
    if eval_examples_per_concept is not None:
        if not _is_int(eval_examples_per_concept) or eval_examples_per_concept < 0:
            raise ValueError(
                f"`eval_examples_per_concept` must be a non-negative int, got {eval_examples_per_concept!r}."
            )
    elif eval_fraction is not None and not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"`eval_fraction` must be in [0, 1), got {eval_fraction!r}.")
    if max_examples_per_concept is not None and (
        not _is_int(max_examples_per_concept) or max_examples_per_concept < 1
    ):
        raise ValueError(
            f"`max_examples_per_concept` must be a positive int or None, got {max_examples_per_concept!r}."
        )

    inputs = list(dataset["input"])
    outputs = list(dataset["output"])
    concepts = list(dataset["output_concept"])
    is_negative = list(dataset["is_negative"])
    rows_by_concept: dict[str, list[int]] = {}
    for index, (concept, negative) in enumerate(zip(concepts, is_negative)):
        if not negative:
            rows_by_concept.setdefault(concept, []).append(index)

    assigned = set(split.heldin_concepts) | set(split.heldout_concepts)
    unassigned = sorted(set(rows_by_concept) - assigned)
    if unassigned:
        raise ValueError(
            f"{len(unassigned)} concept(s) of the data are in neither list of the concept split, e.g. "
            f"{unassigned[:3]}; the split was made for other data (sources {split.sources}). Make a new split with "
            "`split_concepts(dataset, ...)`."
        )
    without_rows = sorted(assigned - set(rows_by_concept))
    if without_rows:
        raise ValueError(
            f"{len(without_rows)} concept(s) of the split have no positive rows in the data, e.g. {without_rows[:3]}; "
            f"the split was made for other data (sources {split.sources}). Make a new split with "
            "`split_concepts(dataset, ...)`."
        )

    train_rows, eval_heldin_rows, eval_heldout_rows = [], [], []
    used_prompts: dict[str, set[str]] = {}  # held-in concept -> prompts in its train or eval_heldin rows
    train_count: dict[str, int] = {}
    for concept in split.heldin_concepts:
        rows = rows_by_concept[concept]
        prompts = sorted({inputs[index] for index in rows})
        _rng(seed, "eval", concept).shuffle(prompts)
        if eval_examples_per_concept is not None:
            num_eval = eval_examples_per_concept
        elif eval_fraction:
            num_eval = max(1, round(eval_fraction * len(prompts)))
        else:
            num_eval = 0
        if num_eval >= len(prompts):
            logger.warning(
                f"Concept {concept[:60]!r} has {len(prompts)} distinct prompt(s); keeping {len(prompts) - 1} of them "
                f"for evaluation instead of {num_eval} so that it still has training rows."
            )
            num_eval = len(prompts) - 1
        eval_prompts = set(prompts[:num_eval])
        concept_train = [index for index in rows if inputs[index] not in eval_prompts]
        concept_train = _seeded_order(
            concept_train, [(inputs[i], outputs[i]) for i in concept_train], seed, "train", concept
        )[:max_examples_per_concept]
        train_rows.extend(concept_train)
        eval_heldin_rows.extend(index for index in rows if inputs[index] in eval_prompts)
        used_prompts[concept] = eval_prompts | {inputs[index] for index in concept_train}
        train_count[concept] = len(concept_train)
    for concept in split.heldout_concepts:
        rows = rows_by_concept[concept]
        rows = _seeded_order(rows, [(inputs[i], outputs[i]) for i in rows], seed, "heldout", concept)
        eval_heldout_rows.extend(rows[:eval_examples_per_concept])

    negative_rows, negative_concepts = [], []
    all_negatives = [index for index, negative in enumerate(is_negative) if negative]
    if use_negatives:
        unique_negatives = {}
        for index in all_negatives:
            unique_negatives.setdefault((inputs[index], outputs[index]), index)
        order = _seeded_order(list(unique_negatives.values()), list(unique_negatives), seed, "negatives")
        concept_order = list(split.heldin_concepts)
        _rng(seed, "negative-concepts").shuffle(concept_order)
        capacity = dict(train_count)
        position = 0
        for index in order:
            for attempt in range(len(concept_order)):
                concept = concept_order[(position + attempt) % len(concept_order)]
                if capacity[concept] > 0 and inputs[index] not in used_prompts[concept]:
                    negative_rows.append(index)
                    negative_concepts.append(concept)
                    capacity[concept] -= 1
                    position = (position + attempt + 1) % len(concept_order)
                    break
        logger.info(
            f"Dealt {len(negative_rows)} of {len(unique_negatives)} distinct negative rows to "
            f"{len(set(negative_concepts))} held-in concepts with steering_factor={negative_steering_factor} "
            f"({len(all_negatives) - len(unique_negatives)} duplicate negative rows skipped)."
        )
    elif all_negatives:
        logger.info(f"Leaving out {len(all_negatives)} negative rows (use_negatives=False).")

    base = dataset.add_column("steering_factor", [1.0] * len(dataset), feature=Value("float32"))
    train = base.select(sorted(train_rows))
    if negative_rows:
        negatives = base.select(negative_rows).remove_columns(["output_concept", "steering_factor"])
        negatives = negatives.add_column("output_concept", negative_concepts, feature=base.features["output_concept"])
        negatives = negatives.add_column(
            "steering_factor", [float(negative_steering_factor)] * len(negative_rows), feature=Value("float32")
        )
        train = concatenate_datasets([train, negatives])
    splits = DatasetDict(
        train=train,
        eval_heldin=base.select(sorted(eval_heldin_rows)),
        eval_heldout=base.select(sorted(eval_heldout_rows)),
    )
    logger.info(
        "Built splits: "
        + ", ".join(f"{name}={len(splits[name])} rows" for name in SPLIT_NAMES)
        + f" ({len(split.heldin_concepts)} held-in, {len(split.heldout_concepts)} held-out concepts)."
    )
    return splits


__all__ = [
    "SPLIT_NAMES",
    "ConceptSplit",
    "build_splits",
    "parse_heldout_concepts",
    "split_concepts",
]
