"""Small helpers shared by the training, evaluation and data-generation code: the names of the files a run leaves
behind, data-source lists, JSONL reading and crash-safe appending, a headless matplotlib and module-mode scopes.

Library code: it logs through `transformers.utils.logging` and never prints.
"""

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from transformers.utils import logging


logger = logging.get_logger(__name__)

# Files a training run writes into its `output_dir`; evaluation and the model card read them back from there.
CONCEPT_SPLIT_FILE = "concept_split.json"
TRAINING_SUMMARY_FILE = "training_summary.json"
# Written by `evaluate_steering.py` into its `--output_dir` and into the evaluated checkpoint's folder.
EVALUATION_SUMMARY_FILE = "evaluation_summary.json"


def split_sources(sources: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Data sources as a flat list: one string or a list of them, each possibly comma-separated.

    Raises:
        `TypeError` for anything but strings or paths; `ValueError` when no source remains.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    if not isinstance(sources, Sequence):
        raise TypeError(f"`sources` must be a string or a list of strings, got {type(sources).__name__}.")
    parts = []
    for source in sources:
        if not isinstance(source, (str, os.PathLike)):
            raise TypeError(f"Each data source must be a string or path, got {source!r} ({type(source).__name__}).")
        parts.extend(piece.strip() for piece in str(source).split(","))
    parts = [piece for piece in parts if piece]
    if not parts:
        raise ValueError(f"No data source given (got {sources!r}); pass a parquet/JSONL file, a folder or a Hub id.")
    return parts


def read_jsonl(path: str | os.PathLike, allow_truncated_last_line: bool = False) -> list[dict[str, Any]]:
    """Reads a JSONL file of JSON objects; blank lines are skipped.

    Args:
        path (`str` or `os.PathLike`): the file.
        allow_truncated_last_line (`bool`, *optional*, defaults to `False`):
            Ignore (with a warning) a last line that is not valid JSON *and* has no line end: what a process killed
            while appending leaves behind. Progress files are read this way; input files are not.

    Raises:
        `ValueError` naming the file and the 1-based line number of any other line that is not a JSON object.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    records = []
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            # `split("\n")` leaves the text after the last line end as the last element: it is unterminated.
            if allow_truncated_last_line and index == len(lines) - 1:
                logger.warning(
                    f"{path}, line {index + 1}: ignoring a half-written last line (a run was interrupted while "
                    "writing it)."
                )
                continue
            raise ValueError(f"{path}, line {index + 1}: not valid JSON ({error}).") from error
        if not isinstance(record, dict):
            raise ValueError(f"{path}, line {index + 1}: expected a JSON object, got {record!r}.")
        records.append(record)
    return records


class JsonlAppender:
    """Appends JSON objects to a file, one per line, each flushed at once, so a killed run keeps every row written.

    A half-written last line left by an earlier killed run is cut off first, so new rows never glue onto it and the
    file stays readable by [`read_jsonl`].

    >>> with JsonlAppender("progress.jsonl") as writer:
    ...     writer.write({"input": "Hi", "output": "Hello"})
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _drop_unterminated_tail(self.path)
        self._handle = self.path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._handle.flush()

    def write_many(self, records: Iterable[dict[str, Any]]) -> None:
        for record in records:
            self.write(record)

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> "JsonlAppender":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _drop_unterminated_tail(path: Path) -> None:
    if not path.is_file():
        return
    content = path.read_bytes()
    if not content or content.endswith(b"\n"):
        return
    keep = content.rfind(b"\n") + 1
    logger.warning(f"{path}: removing a half-written last line (a run was interrupted while writing it).")
    with path.open("r+b") as handle:
        handle.truncate(keep)


def pyplot():
    """`matplotlib.pyplot` with the non-interactive Agg backend, so plots render on machines without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@contextmanager
def restored_training_modes(model) -> Iterator[None]:
    """Put every submodule of `model` back in the training mode it had on entry, also on error (e.g. around a
    `Trainer.train()`, which leaves the whole model in training mode)."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@contextmanager
def evaluation_mode(model) -> Iterator[None]:
    """Run the block with `model` in eval mode and restore its modes after.

    Measurements must not depend on the mode a caller left the model in: in training mode dropout is active, and a
    HyperSteer model with running feature statistics updates them at every training step.
    """
    with restored_training_modes(model):
        model.eval()
        yield


__all__ = [
    "CONCEPT_SPLIT_FILE",
    "EVALUATION_SUMMARY_FILE",
    "TRAINING_SUMMARY_FILE",
    "JsonlAppender",
    "evaluation_mode",
    "pyplot",
    "read_jsonl",
    "restored_training_modes",
    "split_sources",
]
