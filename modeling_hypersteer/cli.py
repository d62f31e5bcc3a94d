"""Argument parsing shared by the command-line scripts (`train_hypersteer.py`, `evaluate_steering.py`,
`generate_concept_data.py`, `quickstart.py`).

Every script accepts the same three forms:

    python script.py --flag value ...                  # flags only
    python script.py args.json                         # a lone .json (or .yaml / .yml) file of arguments
    python script.py --config args.yaml --flag value   # a file of arguments, with command-line flags overriding it

File values keep their types: a YAML list stays a list, a bool a bool, a mapping a mapping (e.g.
`activation_checkpointing_kwargs: {use_reentrant: false}`). Strings are converted with the flag's own type, exactly as
on the command line, so `learning_rate: 1e-3` (a string to YAML) is still a float.
"""

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool


CONFIG_FLAG = "--config"
_ARGUMENT_FILE_SUFFIXES = (".json", ".yaml", ".yml")
# Values of the scripts' dtype flags; "auto" keeps the dtype the checkpoint was saved in.
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def resolve_dtype(name: str):
    """`"auto"` or the `torch.dtype` named by a dtype flag (one of `DTYPE_CHOICES`), for `from_pretrained(dtype=...)`."""
    if name not in DTYPE_CHOICES:
        raise ValueError(f"Unknown dtype {name!r}; choose one of {list(DTYPE_CHOICES)}.")
    if name == "auto":
        return name
    import torch

    return getattr(torch, name)


def parse_arguments(parser: HfArgumentParser, argv: Sequence[str] | None = None) -> tuple:
    """Parses `argv` (default `sys.argv[1:]`) into the parser's dataclasses; see the module docstring for the forms.

    Raises:
        `ValueError` for an unreadable argument file, a key no dataclass has, or a value of the wrong type (naming the
        file and the key); `SystemExit` (argparse's usage error) when a required argument is given nowhere.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    config_path, argv = _pop_config_flag(argv)
    if config_path is None and len(argv) == 1 and argv[0].endswith(_ARGUMENT_FILE_SUFFIXES):
        config_path, argv = argv[0], []
    file_values = load_argument_file(config_path) if config_path is not None else {}

    actions = {action.dest: action for action in parser._actions if action.dest != "help"}
    unknown = sorted(set(file_values) - set(actions))
    if unknown:
        raise ValueError(
            f"{config_path} has key(s) {unknown} that are not arguments of this script; see `--help` for the names."
        )
    values = {key: _typed_file_value(actions[key], value, config_path) for key, value in file_values.items()}
    values.update(_given_flags(parser, argv))

    missing = [action.option_strings[0] for action in parser._actions if action.required and action.dest not in values]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    return parser.parse_dict(values)


def load_argument_file(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping of argument names to values in a `.json`, `.yaml` or `.yml` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Argument file {str(path)!r} does not exist.")
    if path.suffix not in _ARGUMENT_FILE_SUFFIXES:
        raise ValueError(f"Argument file {str(path)!r} must end in one of {_ARGUMENT_FILE_SUFFIXES}.")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            content = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"Argument file {str(path)!r} is not valid JSON ({error}).") from error
    else:
        import yaml

        try:
            content = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ValueError(f"Argument file {str(path)!r} is not valid YAML ({error}).") from error
    content = {} if content is None else content
    if not isinstance(content, dict):
        raise ValueError(
            f"Argument file {str(path)!r} must hold a mapping of argument names to values, got "
            f"{type(content).__name__}."
        )
    return content


def _pop_config_flag(argv: list[str]) -> tuple[str | None, list[str]]:
    for index, item in enumerate(argv):
        if item == CONFIG_FLAG:
            if index + 1 >= len(argv):
                raise ValueError(f"{CONFIG_FLAG} needs the path of a YAML or JSON file of arguments.")
            return argv[index + 1], argv[:index] + argv[index + 2 :]
        if item.startswith(CONFIG_FLAG + "="):
            return item.split("=", 1)[1], argv[:index] + argv[index + 1 :]
    return None, argv


def _given_flags(parser: argparse.ArgumentParser, argv: list[str]) -> dict[str, Any]:
    """The flags present in `argv`, converted by argparse; flags not given are absent (not filled with defaults)."""
    saved = [(action, action.default, action.required) for action in parser._actions]
    try:
        for action in parser._actions:
            if action.dest != "help":
                action.default, action.required = argparse.SUPPRESS, False
        namespace, remaining = parser.parse_known_args(argv)
    finally:
        for action, default, required in saved:
            action.default, action.required = default, required
    if remaining:
        raise ValueError(f"Unknown command-line argument(s) {remaining}; see `--help` for the accepted flags.")
    return vars(namespace)


def _typed_file_value(action: argparse.Action, value: Any, source: str) -> Any:
    if action.nargs in ("+", "*"):
        items = value if isinstance(value, list) else [value]
        return [_typed_scalar(action, item, source) for item in items]
    return _typed_scalar(action, value, source)


def _typed_scalar(action: argparse.Action, value: Any, source: str) -> Any:
    kind = action.type
    where = f"{source}: `{action.dest}`"
    if value is None:
        return None
    if isinstance(value, str) and kind is not None:
        try:
            value = kind(value)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as error:
            raise ValueError(
                f"{where} has the value {value!r}, which is not valid for this argument ({error})."
            ) from error
    elif kind is string_to_bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}.")
    elif kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where} must be a number, got {value!r}.")
        if kind is int and value != int(value):
            raise ValueError(f"{where} must be an integer, got {value!r}.")
        value = kind(value)
    elif kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        # e.g. `heldout_concepts: 3`, a count written without quotes, for a string argument.
        value = str(value)
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"{where} must be one of {list(action.choices)}, got {value!r}.")
    return value


__all__ = ["CONFIG_FLAG", "DTYPE_CHOICES", "load_argument_file", "parse_arguments", "resolve_dtype"]
