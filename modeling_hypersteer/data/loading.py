"""Loading AxBench-schema concept data from files, folders or the Hub, normalised to one schema."""

import glob
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import pyarrow
import pyarrow.parquet as pq
from datasets import Dataset, Value, concatenate_datasets
from huggingface_hub.errors import HfHubHTTPError
from transformers.utils import logging

from ..utils import split_sources as _split_sources


logger = logging.get_logger(__name__)

REQUIRED_COLUMNS = ("input", "output", "output_concept", "concept_id", "category")
OPTIONAL_COLUMN_DEFAULTS = {"concept_genre": "text"}
KNOWN_CATEGORIES = ("positive", "negative", "hard negative")
EMPTY_CONCEPT = "EEEEE"  # AxBench's placeholder `output_concept` for shared negatives; not a concept.
_FILE_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}
_GLOB_CHARACTERS = re.compile(r"[*?\[]")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


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


__all__ = [
    "EMPTY_CONCEPT",
    "KNOWN_CATEGORIES",
    "OPTIONAL_COLUMN_DEFAULTS",
    "REQUIRED_COLUMNS",
    "concept_names",
    "load_concept_data",
]
