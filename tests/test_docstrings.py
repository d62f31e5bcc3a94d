r"""The ready-to-copy commands of the CLIs' `--help` texts and module docstrings keep their shape.

A docstring is an ordinary string literal: a command continued with a single `\` at the end of a line loses the
line break, and `--help` (which prints the docstring) then shows one run-on line. Such docstrings must be raw.
"""

import ast
import subprocess
import sys

import pytest
from conftest import REPO_ROOT


def tracked_python_files() -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "*.py"], cwd=REPO_ROOT, capture_output=True, text=True, check=False
    ).stdout.split()
    # Outside a git checkout (e.g. an unpacked sdist), fall back to the files on disk.
    return listed or [str(path.relative_to(REPO_ROOT)) for path in REPO_ROOT.rglob("*.py")]


def swallowed_line_breaks(source: str) -> list[int]:
    """Line numbers of docstring lines ending in an unescaped `\\` inside a non-raw docstring."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if not isinstance(body, list) or not body or not isinstance(body[0], ast.Expr):
            continue
        literal = body[0].value
        if not (isinstance(literal, ast.Constant) and isinstance(literal.value, str)):
            continue
        text = ast.get_source_segment(source, literal)
        if text.lower().startswith("r"):
            continue
        for offset, line in enumerate(text.split("\n")):
            backslashes = len(line) - len(line.rstrip("\\"))
            if backslashes % 2 == 1:
                lines.append(literal.lineno + offset)
    return lines


def test_the_check_finds_a_swallowed_continuation_and_accepts_raw_or_escaped_ones():
    plain = 'def f():\n    """Run:\n\n        cmd --a \\\n            --b\n    """\n'
    assert swallowed_line_breaks(plain) == [4]
    assert swallowed_line_breaks(plain.replace('"""Run', 'r"""Run')) == []
    assert swallowed_line_breaks(plain.replace("--a \\\n", "--a \\\\\n")) == []


@pytest.mark.parametrize("path", tracked_python_files())
def test_no_docstring_swallows_a_line_continuation(path):
    lines = swallowed_line_breaks((REPO_ROOT / path).read_text())
    assert not lines, f'{path}: make the docstring raw (r"""...): its lines {lines} end in a lone backslash.'


def test_train_help_shows_each_continued_command_line_on_its_own_line():
    help_text = subprocess.run(
        [sys.executable, str(REPO_ROOT / "train_hypersteer.py"), "--help"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO_ROOT,
    ).stdout
    assert "train_hypersteer.py \\\n" in help_text
