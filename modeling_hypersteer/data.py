"""AxBench-schema concept data for HyperSteer: loading, concept-level splits, tokenisation and the collator.

Rows follow the AxBench schema (https://github.com/stanfordnlp/axbench): `input` (an instruction), `output` (a
response that weaves in the concept), `output_concept` (the concept description, used as the steering prompt),
`concept_id`, `category` (`positive`, `negative` or `hard negative`) and optionally `concept_genre`.

Concepts are keyed by their description text, never by `concept_id`: ids restart at 0 in every AxBench folder, so
the same id names different concepts in different files. Negative rows (any `category` other than `positive`,
including AxBench's shared negatives whose `output_concept` is the placeholder `"EEEEE"`) are kept and marked with
`is_negative=True`; they never define a concept.

The pipeline is

>>> from modeling_hypersteer.data import (
...     HyperSteerDataCollator, build_splits, load_concept_data, split_concepts, tokenize_dataset)
>>> data = load_concept_data("../shared/data/axbench/concept10")             # 3 folders -> 30 concepts
>>> split = split_concepts(data, heldout=0.2, seed=42)                       # 6 concepts never trained on
>>> splits = build_splits(data, split, eval_fraction=0.1, seed=42)           # train / eval_heldin / eval_heldout
>>> features = tokenize_dataset(splits, tokenizer, max_length=1024)          # model inputs only
>>> batch = HyperSteerDataCollator(tokenizer)([features["train"][i] for i in range(4)])
"""

import difflib
import glob
import json
import numbers
import os
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import pyarrow
import pyarrow.parquet as pq
import torch
from datasets import Dataset, DatasetDict, Value, concatenate_datasets
from huggingface_hub.errors import HfHubHTTPError
from jinja2.exceptions import TemplateError
from transformers import PreTrainedTokenizerBase
from transformers.utils import logging

from .modeling_hypersteer import tokenize_steering_prompts
from .utils import split_sources as _split_sources


logger = logging.get_logger(__name__)

REQUIRED_COLUMNS = ("input", "output", "output_concept", "concept_id", "category")
OPTIONAL_COLUMN_DEFAULTS = {"concept_genre": "text"}
KNOWN_CATEGORIES = ("positive", "negative", "hard negative")
EMPTY_CONCEPT = "EEEEE"  # AxBench's placeholder `output_concept` for shared negatives; not a concept.
MODEL_INPUT_COLUMNS = (
    "input_ids",
    "attention_mask",
    "labels",
    "steering_input_ids",
    "steering_attention_mask",
    "steering_factor",
)
SPLIT_NAMES = ("train", "eval_heldin", "eval_heldout")
_FILE_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}
_GLOB_CHARACTERS = re.compile(r"[*?\[]")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


def _files_in_directory(directory: Path, file_name: str) -> list[Path]:
    direct = directory / file_name
    if direct.is_file():
        return [direct]
    found = sorted(path for path in directory.rglob(file_name) if path.is_file())
    if not found:
        raise FileNotFoundError(
            f"The folder {str(directory)!r} holds no {file_name!r}, neither directly nor in any subfolder. Pass "
            f"`file_name=` to read another file (e.g. 'latent_eval_data.parquet') or point at the file itself."
        )
    return found


def _resolve_source(source: str, file_name: str) -> tuple[str, list[Path]]:
    """Returns `("files", paths)` for local data, `("remote", [])` for an `hf://` URL or `("hub", [])` for a Hub id."""
    if source.startswith("hf://"):
        return "remote", []
    path = Path(source).expanduser()
    if path.is_file():
        return "files", [path]
    if path.is_dir():
        return "files", _files_in_directory(path, file_name)
    if _GLOB_CHARACTERS.search(source):
        matches = sorted(glob.glob(str(path), recursive=True))
        if not matches:
            raise FileNotFoundError(f"The glob {source!r} matches no file or folder.")
        files = []
        for match in matches:
            match_path = Path(match)
            files.extend(_files_in_directory(match_path, file_name) if match_path.is_dir() else [match_path])
        return "files", files
    # A Hub id is `name` or `owner/name`; anything else (`./x`, `/abs/x`, `a/b/c`, `x.parquet`) is a missing path.
    if source.startswith((".", "/", "~")) or path.suffix.lower() in _FILE_BUILDERS or not _HUB_ID.match(source):
        raise FileNotFoundError(
            f"No such file or folder: {source!r} (resolved to {str(path.resolve())!r}). Pass an existing parquet/JSONL "
            "file, a folder holding one, a glob, or a Hub dataset id such as 'pyvene/axbench-concept500'."
        )
    return "hub", []


def _check_not_empty(path: Path) -> None:
    if path.stat().st_size == 0:
        raise ValueError(f"The data file {str(path)!r} is empty (0 bytes); it must hold AxBench-schema rows.")
    if path.suffix.lower() == ".parquet":
        try:
            num_rows = pq.ParquetFile(path).metadata.num_rows
        except (pyarrow.ArrowInvalid, OSError) as err:
            raise ValueError(f"Could not read {str(path)!r} as parquet: {err}") from err
        if num_rows == 0:
            raise ValueError(f"The data file {str(path)!r} has no rows; it must hold AxBench-schema rows.")
    elif path.suffix.lower() in (".jsonl", ".json"):
        with path.open("rb") as handle:
            head = handle.read(65536)
        if not head.strip() and path.stat().st_size <= 65536:
            raise ValueError(f"The data file {str(path)!r} holds only whitespace; it must hold AxBench-schema rows.")


def _load_file(path: Path) -> Dataset:
    builder = _FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ValueError(
            f"Unsupported data file {str(path)!r}: the extension {path.suffix!r} is not one of "
            f"{sorted(_FILE_BUILDERS)}. Convert it to parquet or JSON lines."
        )
    _check_not_empty(path)
    try:
        dataset = datasets.load_dataset(builder, data_files=str(path), split="train")
    except (datasets.exceptions.DatasetGenerationError, pyarrow.ArrowInvalid) as err:
        raise ValueError(f"Could not read {str(path)!r} as {builder}: {err}") from err
    return dataset


def _load_hub(source: str, split: str, load_dataset_kwargs: dict[str, Any]) -> Dataset:
    try:
        if source.startswith("hf://"):
            builder = _FILE_BUILDERS.get(Path(source).suffix.lower())
            if builder is None:
                raise ValueError(f"Cannot tell the format of {source!r}; use a .parquet, .jsonl, .json or .csv file.")
            return datasets.load_dataset(builder, data_files=source, split=split, **load_dataset_kwargs)
        return datasets.load_dataset(source, split=split, **load_dataset_kwargs)
    except (ConnectionError, FileNotFoundError, HfHubHTTPError) as err:
        raise FileNotFoundError(
            f"{source!r} is not a local file or folder, and loading it as a Hugging Face Hub dataset failed "
            f"({type(err).__name__}: {err}). Offline, pass a local path instead, e.g. a parquet/JSONL file or a "
            "folder such as '../shared/data/axbench/concept10'."
        ) from err


def _normalise(dataset: Dataset, origin: str) -> Dataset:
    """Validates the AxBench schema and adds `concept_genre` (if absent) and `is_negative`."""
    missing = [column for column in REQUIRED_COLUMNS if column not in dataset.column_names]
    if missing:
        raise ValueError(
            f"{origin} is missing the required column(s) {missing}; it has {dataset.column_names}. AxBench-schema "
            f"data needs {list(REQUIRED_COLUMNS)} (`concept_genre` is optional). Rename the columns, e.g. "
            "`dataset.rename_column('concept', 'output_concept')`."
        )
    if len(dataset) == 0:
        raise ValueError(f"{origin} has no rows; it must hold AxBench-schema rows.")
    for column, default in OPTIONAL_COLUMN_DEFAULTS.items():
        if column not in dataset.column_names:
            dataset = dataset.add_column(column, [default] * len(dataset))
    for column in REQUIRED_COLUMNS + tuple(OPTIONAL_COLUMN_DEFAULTS):
        values = dataset[column]
        bad = [index for index, value in enumerate(values) if value is None]
        if bad:
            raise ValueError(
                f"{origin}: column {column!r} is empty (null) in {len(bad)} row(s), first at row {bad[0]}. Fill or "
                "drop those rows."
            )
    categories = list(dataset["category"])
    unknown = sorted({category for category in categories if category not in KNOWN_CATEGORIES})
    if unknown:
        raise ValueError(f"{origin}: column 'category' holds {unknown}; allowed values are {list(KNOWN_CATEGORIES)}.")
    is_negative = [category != "positive" for category in categories]
    concepts = list(dataset["output_concept"])
    bad_positive = [
        index
        for index, (negative, concept) in enumerate(zip(is_negative, concepts))
        if not negative and (not concept.strip() or concept == EMPTY_CONCEPT)
    ]
    if bad_positive:
        raise ValueError(
            f"{origin}: {len(bad_positive)} positive row(s) (first at row {bad_positive[0]}) have no concept "
            f"description in 'output_concept' ({concepts[bad_positive[0]]!r}); positive rows need the steering "
            f"prompt text, and {EMPTY_CONCEPT!r} marks negatives only."
        )
    if "concept_id" in dataset.features and dataset.features["concept_id"] != Value("int64"):
        try:
            dataset = dataset.cast_column("concept_id", Value("int64"))
        except (ValueError, TypeError, pyarrow.ArrowInvalid) as err:
            raise ValueError(f"{origin}: column 'concept_id' must hold integers ({err}).") from err
    if "is_negative" in dataset.column_names:
        dataset = dataset.remove_columns("is_negative")
    return dataset.add_column("is_negative", is_negative)


def load_concept_data(
    sources: str | Sequence[str],
    file_name: str = "train_data.parquet",
    split: str = "train",
    **load_dataset_kwargs,
) -> Dataset:
    """Loads AxBench-schema concept data from local files, folders, globs or Hub datasets into one `Dataset`.

    Args:
        sources (`str` or `list[str]`):
            Each source is a `.parquet`, `.jsonl`, `.json` or `.csv` file; a folder holding `file_name` directly or in
            subfolders (e.g. `../shared/data/axbench/concept10`, whose three `prod_*` folders each hold one); a glob;
            an `hf://datasets/...` file URL; or a Hub dataset id (e.g. `pyvene/axbench-concept500`), loaded with
            `datasets.load_dataset`. Comma-separated strings are split into several sources.
        file_name (`str`, *optional*, defaults to `"train_data.parquet"`):
            The file to look for inside folders (`"latent_eval_data.parquet"` for AxBench's unseen prompts).
        split (`str`, *optional*, defaults to `"train"`):
            The split to read from Hub datasets.
        load_dataset_kwargs:
            Passed to `datasets.load_dataset` for Hub sources (e.g. `data_files=`, `revision=`).

    Returns:
        `datasets.Dataset` with the AxBench columns, `concept_genre` (`"text"` when a file has none), `source` (the file
        path or Hub id, unless the data already has one) and `is_negative` (`True` for every non-`positive` row).
        Columns that only some sources have are dropped. Concepts are the distinct `output_concept` texts of
        positive rows; `concept_id` is kept for reference only, as it is unique only within one AxBench folder.

    Raises:
        `FileNotFoundError`: a local path does not exist, a folder has no `file_name`, or a Hub id is unreachable.
        `ValueError`: a file is empty, unreadable, lacks a required column, or holds no positive (concept) rows.
    """
    parts = []
    for source in _split_sources(sources):
        kind, files = _resolve_source(source, file_name)
        if kind == "files":
            for path in files:
                parts.append((str(path.resolve()), _load_file(path)))
        else:
            parts.append((source, _load_hub(source, split, load_dataset_kwargs)))

    normalised = []
    for origin, dataset in parts:
        dataset = _normalise(dataset, f"Data source {origin!r}")
        if "source" not in dataset.column_names:
            dataset = dataset.add_column("source", [origin] * len(dataset))
        normalised.append((origin, dataset))

    common = [
        column for column in normalised[0][1].column_names if all(column in d.column_names for _, d in normalised)
    ]
    dropped = sorted({column for _, d in normalised for column in d.column_names} - set(common))
    if dropped:
        logger.info(f"Dropping column(s) {dropped}: not every data source has them.")
    reference = normalised[0][1].select_columns(common).features
    aligned = []
    for origin, dataset in normalised:
        dataset = dataset.select_columns(common)
        if dataset.features != reference:
            try:
                dataset = dataset.cast(reference)
            except (ValueError, TypeError, pyarrow.ArrowInvalid) as err:
                raise ValueError(
                    f"Data source {origin!r} has column types {dataset.features} that do not match the first "
                    f"source's {reference}: {err}"
                ) from err
        aligned.append(dataset)
    dataset = aligned[0] if len(aligned) == 1 else concatenate_datasets(aligned)

    concepts = concept_names(dataset)
    if not concepts:
        raise ValueError(
            f"The data from {[origin for origin, _ in parts]} holds no positive rows, so it defines no concept; "
            "HyperSteer needs rows with category == 'positive' and a concept description in 'output_concept'."
        )
    num_negative = sum(dataset["is_negative"])
    logger.info(
        f"Loaded {len(dataset)} rows ({len(dataset) - num_negative} positive, {num_negative} negative) covering "
        f"{len(concepts)} concepts from {len(parts)} file(s)."
    )
    return dataset


def concept_names(dataset: Dataset) -> list[str]:
    """The sorted distinct concept descriptions (`output_concept` of positive rows) of an AxBench-schema dataset."""
    is_negative = dataset["is_negative"] if "is_negative" in dataset.column_names else None
    if is_negative is None:
        is_negative = [category != "positive" for category in dataset["category"]]
    return sorted({concept for concept, negative in zip(dataset["output_concept"], is_negative) if not negative})


# ---------------------------------------------------------------------------------------------------------------
# Concept split
# ---------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------
# Train / eval splits
# ---------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------
# Tokenisation
# ---------------------------------------------------------------------------------------------------------------


def format_prompt(tokenizer: PreTrainedTokenizerBase, instruction: str, system_prompt: str | None = None) -> str:
    """Renders one user turn (and an optional system turn) with the tokenizer's chat template, ready for the reply.

    The text comes from `apply_chat_template(..., tokenize=False, add_generation_prompt=True)`, so it already holds
    BOS when the template writes it: tokenise it with `add_special_tokens=False`. If the template rejects a system
    role (e.g. Gemma-2's), the system text is folded into the user turn as `"{system_prompt}\\n\\n{instruction}"`.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"The tokenizer {type(tokenizer).__name__} ({getattr(tokenizer, 'name_or_path', '')!r}) has no chat "
            "template; HyperSteer formats prompts like the instruction-tuned base does. Load the base's "
            "instruction-tuned tokenizer or set `tokenizer.chat_template`."
        )
    user = {"role": "user", "content": instruction}
    if system_prompt is None:
        return tokenizer.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
    try:
        return tokenizer.apply_chat_template(
            [{"role": "system", "content": system_prompt}, user], tokenize=False, add_generation_prompt=True
        )
    except TemplateError as err:
        logger.warning_once(
            f"The chat template rejects a system turn ({err}); folding the system prompt into the user turn instead."
        )
        folded = {"role": "user", "content": f"{system_prompt}\n\n{instruction}"}
        return tokenizer.apply_chat_template([folded], tokenize=False, add_generation_prompt=True)


# Rendered as the assistant's reply to find what the chat template writes after a reply; plain ASCII words that no
# template trims or escapes.
_SENTINEL_REPLY = "HyperSteer sentinel reply"


def turn_end_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokens that end an assistant turn in the tokenizer's chat template, i.e. what the chat model generates when
    its reply is done: `<end_of_turn>` for Gemma-2, `<|im_end|>` for SmolLM2 and Qwen2, `<|eot_id|>` for Llama-3.

    Read from the template itself: a user turn and an assistant turn whose text is a sentinel are rendered, and the
    text after the sentinel (without the whitespace that separates turns) is tokenised. A template that writes nothing
    after a reply falls back to the EOS token, with a warning.
    """
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _SENTINEL_REPLY}]
    rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
    position = rendered.rfind(_SENTINEL_REPLY)
    tail = rendered[position + len(_SENTINEL_REPLY) :].strip() if position >= 0 else ""
    if tail:
        return tokenizer(tail, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"The chat template of {type(tokenizer).__name__} writes no turn end after an assistant reply and the "
            "tokenizer has no EOS token, so labels could not teach steered generation to stop. Set "
            "`tokenizer.eos_token`."
        )
    logger.warning_once(
        f"The chat template writes nothing after an assistant reply; labels end with the EOS token "
        f"{tokenizer.eos_token!r} instead."
    )
    return [tokenizer.eos_token_id]


def _tokenize_batch(
    batch: dict[str, list],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    max_steering_prompt_length: int,
    system_prompt: str | None,
) -> dict[str, list]:
    """Tokenises a batch of rows; rows whose prompt leaves no room for a response token are left out."""
    turn_end = turn_end_ids(tokenizer)
    prompts = [format_prompt(tokenizer, instruction, system_prompt) for instruction in batch["input"]]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(list(batch["output"]), add_special_tokens=False)["input_ids"]
    steering = tokenize_steering_prompts(tokenizer, list(batch["output_concept"]), max_steering_prompt_length)
    steering_lengths = steering["steering_attention_mask"].sum(dim=1).tolist()
    steering_ids = steering["steering_input_ids"].tolist()
    factors = batch.get("steering_factor") or [1.0] * len(prompts)

    features = {name: [] for name in MODEL_INPUT_COLUMNS}
    for row, (prompt, response) in enumerate(zip(prompt_ids, response_ids)):
        budget = max_length - len(prompt)
        if budget <= 0:
            continue
        response = (response + turn_end)[:budget]
        features["input_ids"].append(prompt + response)
        features["attention_mask"].append([1] * (len(prompt) + len(response)))
        features["labels"].append([-100] * len(prompt) + response)
        length = steering_lengths[row]
        features["steering_input_ids"].append(steering_ids[row][:length])
        features["steering_attention_mask"].append([1] * length)
        features["steering_factor"].append(float(factors[row]))
    return features


def tokenize_example(
    example: dict[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int = 1024,
    max_steering_prompt_length: int = 64,
    system_prompt: str | None = None,
) -> dict[str, list] | None:
    """Tokenises one AxBench row into HyperSteer model inputs.

    The prompt (`input` through `format_prompt`) and the response (`output`) are tokenised separately and their ids
    concatenated, so the labels are exactly the response tokens followed by the chat template's turn end
    (`turn_end_ids`, e.g. `<end_of_turn>` for Gemma-2); prompt positions get -100. When the row exceeds `max_length`,
    the response is cut from the right (then without the turn end). The steering prompt
    (`output_concept`) goes through `tokenize_steering_prompts`, exactly as at inference.

    Returns:
        `dict` with `input_ids`, `attention_mask`, `labels` (lists of length `sequence_length`),
        `steering_input_ids`, `steering_attention_mask` (lists of length `steering_sequence_length`) and
        `steering_factor` (`float`, the row's own or 1.0), or `None` when the prompt alone fills `max_length`.
    """
    batch = {key: [value] for key, value in example.items()}
    features = _tokenize_batch(batch, tokenizer, max_length, max_steering_prompt_length, system_prompt)
    if not features["input_ids"]:
        return None
    return {name: values[0] for name, values in features.items()}


def tokenize_dataset(
    dataset: Dataset | DatasetDict,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int = 1024,
    max_steering_prompt_length: int = 64,
    system_prompt: str | None = None,
    num_proc: int | None = None,
    batch_size: int = 256,
) -> Dataset | DatasetDict:
    """Maps `tokenize_example` over a dataset (or each split of a `DatasetDict`), keeping only model input columns.

    Rows whose prompt alone fills `max_length` are dropped and counted in a warning. `max_steering_prompt_length`
    should be the model's `config.max_steering_prompt_length` so that training and inference truncate alike.

    Returns:
        The same container with the columns `input_ids`, `attention_mask`, `labels`, `steering_input_ids`,
        `steering_attention_mask` and `steering_factor` (`float32`).
    """
    if isinstance(dataset, DatasetDict):
        return DatasetDict(
            {
                name: tokenize_dataset(
                    split, tokenizer, max_length, max_steering_prompt_length, system_prompt, num_proc, batch_size
                )
                for name, split in dataset.items()
            }
        )
    missing = [column for column in ("input", "output", "output_concept") if column not in dataset.column_names]
    if missing:
        raise ValueError(
            f"Cannot tokenize: the dataset lacks column(s) {missing} (it has {dataset.column_names}); load it with "
            "`load_concept_data` or rename the columns to the AxBench schema."
        )
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"`max_length` must be an int >= 2, got {max_length!r}.")
    if len(dataset) == 0:
        empty = {name: [] for name in MODEL_INPUT_COLUMNS}
        return Dataset.from_dict(empty, features=_model_input_features())
    tokenized = dataset.map(
        _tokenize_batch,
        batched=True,
        batch_size=batch_size,
        num_proc=num_proc,
        remove_columns=dataset.column_names,
        fn_kwargs={
            "tokenizer": tokenizer,
            "max_length": max_length,
            "max_steering_prompt_length": max_steering_prompt_length,
            "system_prompt": system_prompt,
        },
        features=_model_input_features(),
        desc="Tokenizing",
    )
    dropped = len(dataset) - len(tokenized)
    if dropped == len(dataset):
        raise ValueError(
            f"All {dropped} rows were dropped: no prompt leaves room for a response within max_length={max_length}. "
            "Raise `max_length`."
        )
    if dropped:
        logger.warning(
            f"Dropped {dropped} of {len(dataset)} rows whose chat-formatted prompt alone fills max_length={max_length} "
            "tokens, leaving no response token to train on. Raise `max_length` to keep them."
        )
    return tokenized


def _model_input_features(with_distillation: bool = False) -> datasets.Features:
    ids = datasets.List(Value("int64"))
    features = datasets.Features(
        input_ids=ids,
        attention_mask=ids,
        labels=ids,
        steering_input_ids=ids,
        steering_attention_mask=ids,
        steering_factor=Value("float32"),
    )
    if with_distillation:
        features.update({name: ids for name in DISTILLATION_COLUMNS})
    return features


# ---------------------------------------------------------------------------------------------------------------
# Teacher-free distillation rows: concept descriptions without responses
# ---------------------------------------------------------------------------------------------------------------

# Keys a description file may use for its text, tried in this order (Concept16K, concept500 metadata, AxBench rows).
DESCRIPTION_KEYS = ("description", "concept", "output_concept")
# Columns a distillation row adds to `MODEL_INPUT_COLUMNS`, with the value each is padded with. `contrast_*` is the
# second description the row is steered by (on the same text); `teacher_*` / `teacher_contrast_*` are the prompt and
# response under the frozen base with the first / second description in the prompt (see `HyperSteerTrainer`).
DISTILLATION_COLUMNS = {
    "contrast_steering_input_ids": "pad",
    "contrast_steering_attention_mask": 0,
    "teacher_input_ids": "pad",
    "teacher_attention_mask": 0,
    "teacher_labels": -100,
    "teacher_contrast_input_ids": "pad",
    "teacher_contrast_attention_mask": 0,
    "teacher_contrast_labels": -100,
}


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


# ---------------------------------------------------------------------------------------------------------------
# Collator
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class HyperSteerDataCollator:
    """Pads tokenised HyperSteer rows (from `tokenize_dataset`) into a batch of tensors.

    Args:
        tokenizer (`PreTrainedTokenizerBase`): supplies `pad_token_id`; it must have a pad token.
        padding_side (`str`, *optional*, defaults to `"right"`): `"right"` or `"left"`, for the base-prompt tensors.
            Steering prompts are always right-padded, as `tokenize_steering_prompts` does at inference.
        pad_to_multiple_of (`int`, *optional*): round the base sequence length up to a multiple of this.
        label_pad_token_id (`int`, *optional*, defaults to -100): label of padding positions.

    Returns a `dict` with (each key present when the rows have it):
        - `input_ids` (`torch.LongTensor` of shape `(batch_size, sequence_length)`), padded with `pad_token_id`;
        - `attention_mask` (`torch.LongTensor` of shape `(batch_size, sequence_length)`), 0 on padding;
        - `labels` (`torch.LongTensor` of shape `(batch_size, sequence_length)`), -100 on prompt and padding;
        - `steering_input_ids` (`torch.LongTensor` of shape `(batch_size, steering_sequence_length)`), right-padded;
        - `steering_attention_mask` (`torch.LongTensor` of shape `(batch_size, steering_sequence_length)`);
        - `steering_factor` (`torch.FloatTensor` of shape `(batch_size,)`).

    >>> collator = HyperSteerDataCollator(tokenizer, padding_side="left")
    >>> batch = collator([
    ...     {"input_ids": [1, 5, 6, 7], "attention_mask": [1, 1, 1, 1], "labels": [-100, -100, 6, 7],
    ...      "steering_input_ids": [9, 8], "steering_attention_mask": [1, 1], "steering_factor": 1.0},
    ...     {"input_ids": [1, 5, 7], "attention_mask": [1, 1, 1], "labels": [-100, -100, 7],
    ...      "steering_input_ids": [9], "steering_attention_mask": [1], "steering_factor": 0.5},
    ... ])
    >>> batch["input_ids"]
    tensor([[1, 5, 6, 7],
            [0, 1, 5, 7]])
    >>> batch["labels"]
    tensor([[-100, -100,    6,    7],
            [-100, -100, -100,    7]])
    >>> batch["steering_input_ids"], batch["steering_factor"]
    (tensor([[9, 8],
            [9, 0]]), tensor([1.0000, 0.5000]))
    """

    tokenizer: PreTrainedTokenizerBase
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None
    label_pad_token_id: int = -100

    def __post_init__(self):
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"`padding_side` must be 'left' or 'right', got {self.padding_side!r}.")
        if self.tokenizer.pad_token_id is None:
            raise ValueError(
                f"The tokenizer {type(self.tokenizer).__name__} has no pad token, so rows of different lengths cannot "
                "be batched. Set one, e.g. `tokenizer.pad_token = tokenizer.eos_token`."
            )
        if self.pad_to_multiple_of is not None and (
            not isinstance(self.pad_to_multiple_of, int) or self.pad_to_multiple_of < 1
        ):
            raise ValueError(f"`pad_to_multiple_of` must be a positive int or None, got {self.pad_to_multiple_of!r}.")

    @staticmethod
    def _as_list(value) -> list[int]:
        return value.tolist() if isinstance(value, torch.Tensor) else list(value)

    def _present(self, features: list[dict], key: str) -> bool:
        count = sum(key in feature for feature in features)
        if 0 < count < len(features):
            raise ValueError(f"{count} of {len(features)} rows have {key!r}; either every row has it or none does.")
        return count == len(features)

    def _pad(self, sequences: list[list[int]], value: int, length: int, side: str) -> torch.Tensor:
        out = torch.full((len(sequences), length), value, dtype=torch.long)
        for row, sequence in enumerate(sequences):
            if sequence:
                tensor = torch.tensor(sequence, dtype=torch.long)
                if side == "left":
                    out[row, length - len(sequence) :] = tensor
                else:
                    out[row, : len(sequence)] = tensor
        return out

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("Cannot collate an empty list of rows.")
        if not self._present(features, "input_ids"):
            raise ValueError(
                f"Every row needs 'input_ids'; got keys {sorted(features[0])}. Run `tokenize_dataset` first."
            )
        ignored = sorted(set().union(*features) - set(MODEL_INPUT_COLUMNS) - set(DISTILLATION_COLUMNS))
        if ignored:
            logger.warning_once(f"HyperSteerDataCollator ignores the non-model column(s) {ignored}.")
        pad_token_id = self.tokenizer.pad_token_id
        input_ids = [self._as_list(feature["input_ids"]) for feature in features]
        length = max(len(ids) for ids in input_ids)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        if self._present(features, "attention_mask"):
            masks = [self._as_list(feature["attention_mask"]) for feature in features]
        else:
            masks = [[1] * len(ids) for ids in input_ids]
        batch = {
            "input_ids": self._pad(input_ids, pad_token_id, length, self.padding_side),
            "attention_mask": self._pad(masks, 0, length, self.padding_side),
        }
        if self._present(features, "labels"):
            labels = [self._as_list(feature["labels"]) for feature in features]
            batch["labels"] = self._pad(labels, self.label_pad_token_id, length, self.padding_side)
        if self._present(features, "steering_input_ids"):
            steering_ids = [self._as_list(feature["steering_input_ids"]) for feature in features]
            if self._present(features, "steering_attention_mask"):
                steering_masks = [self._as_list(feature["steering_attention_mask"]) for feature in features]
            else:
                steering_masks = [[1] * len(ids) for ids in steering_ids]
            steering_length = max(len(ids) for ids in steering_ids)
            batch["steering_input_ids"] = self._pad(steering_ids, pad_token_id, steering_length, "right")
            batch["steering_attention_mask"] = self._pad(steering_masks, 0, steering_length, "right")
        if self._present(features, "steering_factor"):
            batch["steering_factor"] = torch.tensor(
                [float(feature["steering_factor"]) for feature in features], dtype=torch.float32
            )
        for name, pad_value in DISTILLATION_COLUMNS.items():
            # Real rows carry these columns empty; a batch without distillation rows gets `(batch_size, 0)` tensors.
            if self._present(features, name):
                sequences = [self._as_list(feature[name]) for feature in features]
                value = pad_token_id if pad_value == "pad" else pad_value
                batch[name] = self._pad(sequences, value, max(len(sequence) for sequence in sequences), "right")
        return batch


__all__ = [
    "DISTILLATION_COLUMNS",
    "ConceptSplit",
    "HyperSteerDataCollator",
    "build_distillation_rows",
    "build_splits",
    "concept_names",
    "format_prompt",
    "load_concept_data",
    "load_concept_descriptions",
    "parse_heldout_concepts",
    "split_concepts",
    "tokenize_dataset",
    "tokenize_distillation_dataset",
    "tokenize_example",
    "turn_end_ids",
    "with_empty_distillation_columns",
]
