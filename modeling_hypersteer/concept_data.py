# Copyright 2025 The HyperSteer Authors. Licensed under the Apache License, Version 2.0.
"""Concept-steering training data from a teacher LLM, in the AxBench schema (the library behind
`generate_concept_data.py`).

For every concept description, a fixed random sample of instructions ([`plan_pairs`]) is answered by a teacher asked
to weave the concept into its answer, or (`--response_style about`) paired with text the teacher writes about the
concept itself ([`teacher_prompts`]): an OpenAI-compatible endpoint
([`generate_with_openai`]) or a local HF chat model ([`generate_with_hf`]). Each finished row goes at once to a JSONL
progress file through a [`RowWriter`], so a killed run resumes ([`read_finished_rows`]); the final parquet is written
atomically ([`write_parquet_atomically`]).

An answer is only written when it is complete: failed requests, empty answers and answers cut off by the token limit
(`finish_reason == "length"`) are counted in `RowWriter.failures` instead.
"""

import os
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers.utils import logging

from .cli import DTYPE_CHOICES, resolve_dtype
from .utils import JsonlAppender, read_jsonl


logger = logging.get_logger(__name__)

BUNDLED_INSTRUCTIONS = Path(__file__).resolve().parent / "resources" / "quickstart_concepts.jsonl"
TEACHER_BACKENDS = ("openai", "hf")
RESPONSE_STYLES = ("answer", "about")
OUTPUT_COLUMNS = ("input", "output", "output_concept", "concept_id", "category", "concept_genre", "source")

TEACHER_PROMPT_TEMPLATE = """Answer the instruction below, and make the following concept clearly present in your \
answer: let it shape the content, the vocabulary or the examples, so that any reader would notice it, while the \
answer still genuinely responds to the instruction.

Concept: {concept}

Instruction: {instruction}

Reply with the answer only: no preface, no title, and no remark about the concept or about these directions."""

# `--response_style about`: the k-th row of a concept asks for the k-th of these (cycling), so a concept's rows are
# different kinds of text about it. A small local base writes on-topic text this way, where it rarely weaves a
# concept into the answer to an unrelated instruction; vectors trained on such text show the concept in generations.
ABOUT_PROMPT_TEMPLATES = (
    "Write a short paragraph about the following topic: {concept}",
    "Write three sentences that a person interested in this might say: {concept}",
    "Explain to a friend what this is about, with an example: {concept}",
    "Write a short story in which this plays a central part: {concept}",
    "Write a brief news report whose main subject is this: {concept}",
    "List five examples of this, one per line: {concept}",
    "Write a short dialogue between two people about this: {concept}",
    "Describe an everyday situation in which this comes up: {concept}",
)


@dataclass
class ConceptDataArguments:
    """Arguments of `generate_concept_data.py`."""

    concepts_file: str = field(
        metadata={
            "help": "Concept descriptions: a text file (one per line), a JSONL file with a `concept` field, an "
            "AxBench metadata.jsonl, or AxBench data rows (JSONL/parquet with `output_concept`)."
        }
    )
    output_path: str = field(
        metadata={
            "help": "Output parquet file. Progress is kept beside it in <name>.partial.jsonl (finished rows) and "
            "<name>.teacher_cache.sqlite (API answers), so rerunning the command resumes."
        }
    )
    max_concepts: int | None = field(
        default=None, metadata={"help": "Use only the first N concepts of --concepts_file (default: all)."}
    )
    instructions_file: str | None = field(
        default=None,
        metadata={
            "help": "Instruction pool: a text file (one per line), a JSONL file with an `input` field, or a parquet "
            "file with an `input` column (e.g. an AxBench train_data.parquet). Default: the package's bundled "
            "instruction set, if installed."
        },
    )
    examples_per_concept: int = field(
        default=8, metadata={"help": "Number of instructions sampled (without replacement) per concept."}
    )
    seed: int = field(
        default=42,
        metadata={"help": "Seed of the per-concept instruction sampling and of the HF teacher's sampling."},
    )
    response_style: str = field(
        default="answer",
        metadata={
            "help": "`answer`: the teacher answers each instruction with the concept woven in (AxBench's rows; needs "
            "a capable teacher). `about`: each row pairs the instruction with text the teacher writes about the "
            "concept itself (a paragraph, a story, a dialogue, examples...), which even the small base being "
            "steered writes on topic: rows for any description without a paid teacher.",
            "choices": list(RESPONSE_STYLES),
        },
    )
    teacher_backend: str = field(
        default="openai",
        metadata={
            "help": "`openai`: any OpenAI-compatible chat-completions endpoint; `hf`: a local HuggingFace causal LM "
            "with a chat template.",
            "choices": list(TEACHER_BACKENDS),
        },
    )
    teacher_model: str = field(
        default="gpt-4o-mini",
        metadata={"help": "Teacher model: the endpoint's model name (openai) or a local model directory (hf)."},
    )
    teacher_base_url: str | None = field(
        default=None,
        metadata={
            "help": "Base URL of the OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 "
            "(default: $OPENAI_BASE_URL, else OpenAI's API)."
        },
    )
    api_key_env: str = field(
        default="OPENAI_API_KEY",
        metadata={"help": "Environment variable holding the API key (required only for OpenAI's own API)."},
    )
    max_concurrency: int = field(default=16, metadata={"help": "Maximum number of API requests in flight."})
    max_retries: int = field(
        default=5, metadata={"help": "Retries per request on 429, 5xx, timeouts and connection errors."}
    )
    initial_backoff: float = field(
        default=1.0, metadata={"help": "Seconds before the first retry; doubles at each retry (with jitter)."}
    )
    request_timeout: float = field(default=120.0, metadata={"help": "Seconds before one API request is abandoned."})
    cache_path: str | None = field(
        default=None,
        metadata={"help": "sqlite cache of API answers (default: <output_path stem>.teacher_cache.sqlite)."},
    )
    temperature: float = field(
        default=0.7, metadata={"help": "Teacher sampling temperature (0 means greedy decoding for the hf backend)."}
    )
    max_new_tokens: int = field(default=256, metadata={"help": "Maximum length of each teacher answer, in tokens."})
    batch_size: int = field(default=8, metadata={"help": "Prompts per `generate` call (hf backend)."})
    device: str | None = field(
        default=None, metadata={"help": "Device of the hf teacher (default: cuda if available, else cpu)."}
    )
    dtype: str = field(
        default="auto",
        metadata={"help": "dtype of the hf teacher.", "choices": list(DTYPE_CHOICES)},
    )

    def __post_init__(self):
        if self.teacher_backend not in TEACHER_BACKENDS:
            raise ValueError(f"--teacher_backend must be one of {TEACHER_BACKENDS}, got {self.teacher_backend!r}.")
        if self.response_style not in RESPONSE_STYLES:
            raise ValueError(f"--response_style must be one of {RESPONSE_STYLES}, got {self.response_style!r}.")
        if self.response_style == "about" and self.examples_per_concept > len(ABOUT_PROMPT_TEMPLATES):
            # More would repeat a request, which an API cache (or greedy decoding) answers with the same text.
            raise ValueError(
                f"--response_style about writes at most {len(ABOUT_PROMPT_TEMPLATES)} rows per concept (one per kind "
                f"of text), got --examples_per_concept {self.examples_per_concept}; lower it or add concepts."
            )
        if Path(self.output_path).suffix != ".parquet":
            raise ValueError(f"--output_path must end in .parquet, got {self.output_path!r}.")
        if self.max_concepts is not None and self.max_concepts < 1:
            raise ValueError(f"--max_concepts must be >= 1 (or omitted for all concepts), got {self.max_concepts}.")
        for name in ("examples_per_concept", "max_concurrency", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}.")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}.")
        if self.teacher_backend == "hf" and self.teacher_base_url is not None:
            raise ValueError(
                "--teacher_base_url is for --teacher_backend openai; with --teacher_backend hf, --teacher_model is a "
                f"local model directory (got --teacher_base_url {self.teacher_base_url!r})."
            )

    @property
    def row_source(self) -> str:
        """The rows' `source`: the teacher, marked when its text is about the concept rather than an answer."""
        return self.teacher_model if self.response_style == "answer" else f"{self.teacher_model} (about)"

    @property
    def partial_path(self) -> Path:
        return Path(self.output_path).with_suffix(".partial.jsonl")

    @property
    def resolved_cache_path(self) -> Path:
        if self.cache_path:
            return Path(self.cache_path)
        return Path(self.output_path).with_suffix(".teacher_cache.sqlite")


@dataclass(frozen=True)
class Concept:
    """A concept description with its id and AxBench genre (`text`, `code` or `math`)."""

    concept_id: int
    concept: str
    genre: str = "text"


# ---------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------
def _check_file(path: str, flag: str) -> Path:
    resolved = Path(path)
    if not resolved.is_file():
        raise FileNotFoundError(f"{flag} {path!r} does not exist or is not a file.")
    return resolved


def _genre_of(record: dict[str, Any], concept: str) -> str:
    if isinstance(record.get("concept_genre"), str):
        return record["concept_genre"]
    genres = (record.get("concept_genres_map") or {}).get(concept)
    if isinstance(genres, list) and genres:
        return str(genres[0])
    return "text"


def load_concepts(path: str, max_concepts: int | None = None) -> list[Concept]:
    """Reads concept descriptions from a text file, a JSONL file, an AxBench `metadata.jsonl`, or AxBench data rows.

    - text: one description per line; ids are the positions (0-based) of the non-empty lines;
    - JSONL: one object per line with `concept` (and optionally `concept_id`, `concept_genre`, or AxBench's
      `concept_genres_map`), or Concept16K's `description` (with `feature_index` as the id); ids default to the line
      position;
    - AxBench data rows (JSONL or parquet with `output_concept` and `concept_id`, e.g. a `train_data.parquet`): the
      distinct concepts of the positive rows.

    Repeated (id, description) pairs collapse into one; a description repeated under another id is dropped with a
    warning; an id used for two descriptions is an error. Only the first `max_concepts` are kept.
    """
    resolved = _check_file(path, "--concepts_file")
    if resolved.suffix == ".parquet":
        import pyarrow.parquet as pq

        records = pq.read_table(resolved).to_pylist()
    elif resolved.suffix in (".jsonl", ".json"):
        records = read_jsonl(resolved)
    else:
        lines = [line.strip() for line in resolved.read_text(encoding="utf-8").splitlines()]
        records = [{"concept": line} for line in lines if line]

    concepts: list[Concept] = []
    for position, record in enumerate(records):
        key = next((key for key in ("concept", "output_concept", "description") if key in record), "concept")
        text = record.get(key)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(
                f"--concepts_file {path!r}: record {position} has no non-empty string `concept` (or "
                f"`output_concept`, or Concept16K's `description`) field (keys: {sorted(record)})."
            )
        concept_id = record.get("concept_id", record.get("feature_index", position))
        if isinstance(concept_id, bool) or not isinstance(concept_id, int):
            raise ValueError(
                f"--concepts_file {path!r}: record {position} has a non-integer concept_id {concept_id!r}."
            )
        if key == "output_concept" and (record.get("category", "positive") != "positive" or concept_id < 0):
            continue  # AxBench negatives carry no concept
        concepts.append(Concept(concept_id, text.strip(), _genre_of(record, text)))
    if not concepts:
        raise ValueError(f"--concepts_file {path!r} contains no concepts; give one description per line.")

    unique: dict[int, Concept] = {}
    seen_text: set[str] = set()
    for concept in concepts:
        if concept.concept_id in unique:
            if unique[concept.concept_id].concept != concept.concept:
                raise ValueError(
                    f"--concepts_file {path!r}: concept_id {concept.concept_id} names two concepts, "
                    f"{unique[concept.concept_id].concept!r} and {concept.concept!r}."
                )
            continue
        if concept.concept in seen_text:
            logger.warning(f"Skipping the duplicate concept {concept.concept!r} (id {concept.concept_id}).")
            continue
        seen_text.add(concept.concept)
        unique[concept.concept_id] = concept
    selected = list(unique.values())
    return selected[:max_concepts] if max_concepts is not None else selected


def load_instructions(path: str | None, flag: str = "--instructions_file") -> list[str]:
    """Reads the instruction pool (text lines, or the `input` / `instruction` field of JSONL records or parquet rows).

    With `path=None`, reads the package's bundled set if it exists. Empty and repeated instructions are dropped.
    `flag` names the command-line flag in error messages (`evaluate_steering.py` reads `--instructions` with it).
    """
    if path is None:
        if not BUNDLED_INSTRUCTIONS.is_file():
            raise ValueError(
                f"No --instructions_file given and no bundled instruction set at {str(BUNDLED_INSTRUCTIONS)!r}; pass "
                "--instructions_file (a text file, a JSONL with `input`, or a parquet such as an AxBench "
                "train_data.parquet)."
            )
        logger.info(f"Using the bundled instructions of {BUNDLED_INSTRUCTIONS}.")
        path = str(BUNDLED_INSTRUCTIONS)
    resolved = _check_file(path, flag)
    if resolved.suffix == ".parquet":
        import pyarrow.parquet as pq

        schema_names = pq.read_schema(resolved).names
        column = next((name for name in ("input", "instruction") if name in schema_names), None)
        if column is None:
            raise ValueError(f"{flag} {path!r} has no `input` or `instruction` column (columns: {schema_names}).")
        raw = pq.read_table(resolved, columns=[column]).column(column).to_pylist()
    elif resolved.suffix in (".jsonl", ".json"):
        raw = []
        for position, record in enumerate(read_jsonl(resolved)):
            key = "input" if "input" in record else "instruction" if "instruction" in record else None
            if key is None:
                raise ValueError(
                    f"{flag} {path!r}: record {position} has neither an `input` nor an `instruction` "
                    f"field (keys: {sorted(record)})."
                )
            raw.append(record[key])
    else:
        raw = resolved.read_text(encoding="utf-8").splitlines()
    instructions = list(dict.fromkeys(str(text).strip() for text in raw if text is not None and str(text).strip()))
    if not instructions:
        raise ValueError(f"{flag} {path!r} contains no instructions.")
    return instructions


def plan_pairs(
    concepts: Sequence[Concept], instructions: Sequence[str], examples_per_concept: int, seed: int
) -> list[tuple[Concept, str]]:
    """The (concept, instruction) pairs to generate: per concept, a sample without replacement of the pool.

    Each concept's sample depends only on the seed, the concept and the pool, so adding concepts or raising
    `--max_concepts` leaves the earlier concepts' pairs (and thus the resume state) unchanged.
    """
    count = examples_per_concept
    if count > len(instructions):
        logger.warning(
            f"--examples_per_concept {examples_per_concept} exceeds the {len(instructions)} instructions available; "
            f"using {len(instructions)} per concept."
        )
        count = len(instructions)
    pairs = []
    for concept in concepts:
        rng = random.Random(f"{seed}:{concept.concept_id}:{concept.concept}")
        pairs.extend((concept, instruction) for instruction in rng.sample(list(instructions), count))
    return pairs


def build_teacher_prompt(concept: str, instruction: str) -> str:
    """The teacher's user message: answer `instruction` while clearly incorporating `concept`."""
    return TEACHER_PROMPT_TEMPLATE.format(concept=concept, instruction=instruction)


def teacher_prompts(
    pairs: Sequence[tuple[Concept, str]], pending: Sequence[tuple[Concept, str]], response_style: str
) -> list[str]:
    """The teacher's user message for every pair of `pending` (a subset of the plan `pairs`).

    With `"about"`, a pair's message depends on its position among its concept's pairs in the whole plan, not in
    `pending`, so a resumed run asks what the first run would have asked.
    """
    if response_style == "answer":
        return [build_teacher_prompt(concept.concept, instruction) for concept, instruction in pending]
    if response_style != "about":
        raise ValueError(f"`response_style` must be one of {RESPONSE_STYLES}, got {response_style!r}.")
    position, seen = {}, defaultdict(int)
    for concept, instruction in pairs:
        position[(concept.concept, instruction)] = seen[concept.concept]
        seen[concept.concept] += 1
    return [
        ABOUT_PROMPT_TEMPLATES[position[(concept.concept, instruction)] % len(ABOUT_PROMPT_TEMPLATES)].format(
            concept=concept.concept
        )
        for concept, instruction in pending
    ]


# ---------------------------------------------------------------------------------------------------------------
# Progress file
# ---------------------------------------------------------------------------------------------------------------
def read_finished_rows(partial_path: Path, source: str) -> dict[tuple[str, str], dict[str, Any]]:
    """Rows already generated, keyed by (concept, instruction).

    A half-written last line (a killed run) is ignored; any other corrupt line raises with the file and line number.
    """
    if not partial_path.exists():
        return {}
    finished: dict[tuple[str, str], dict[str, Any]] = {}
    for row in read_jsonl(partial_path, allow_truncated_last_line=True):
        if row.get("source") != source:
            raise ValueError(
                f"{partial_path} holds rows generated by {row.get('source')!r}, not by {source!r} (--teacher_model, "
                "marked `(about)` with --response_style about). Choose another --output_path, or delete that file "
                "to start over."
            )
        finished[(row["output_concept"], row["input"])] = row
    return finished


TRUNCATED = "cut off at the token limit (finish_reason='length'); raise --max_new_tokens"


class RowWriter:
    """Appends each complete teacher answer to the progress file as one AxBench row, and records every failure.

    Attributes:
        written (`int`): rows written.
        failures (`list[str]`): one line per answer that was not written, naming the concept, the instruction and why.
        truncated (`int`): how many of those failures were answers cut off by the token limit.
    """

    def __init__(self, path: Path, source: str):
        self.path = path
        self.source = source
        self.written = 0
        self.truncated = 0
        self.failures: list[str] = []
        self._appender = JsonlAppender(path)

    def add(
        self,
        concept: "Concept",
        instruction: str,
        output: str | None,
        failure: str | None = None,
        truncated: bool = False,
    ) -> None:
        """Writes the row, unless `failure` is given, the answer is empty, or it was `truncated`."""
        if failure is None and truncated:
            failure = TRUNCATED
            self.truncated += 1
        if failure is None and (output is None or not output.strip()):
            failure = "empty answer"
        if failure is not None:
            self.failures.append(f"concept {concept.concept_id} / {instruction[:40]!r}: {failure}")
            return
        self._appender.write(
            {
                "input": instruction,
                "output": output.strip(),
                "output_concept": concept.concept,
                "concept_id": concept.concept_id,
                "category": "positive",
                "concept_genre": concept.genre,
                "source": self.source,
            }
        )
        self.written += 1

    def close(self) -> None:
        self._appender.close()


# ---------------------------------------------------------------------------------------------------------------
# Teachers
# ---------------------------------------------------------------------------------------------------------------
def generate_with_openai(
    args: ConceptDataArguments, pending: list[tuple[Concept, str]], prompts: Sequence[str], writer: RowWriter
) -> None:
    """Sends `prompts` (one per pair of `pending`) to an OpenAI-compatible endpoint; each answer is written as soon as
    it arrives."""
    from modeling_hypersteer.openai_client import CachedChatClient, ChatRequest, ChatResult

    client = CachedChatClient(
        model=args.teacher_model,
        base_url=args.teacher_base_url,
        api_key_env=args.api_key_env,
        cache_path=args.resolved_cache_path,
        max_concurrency=args.max_concurrency,
        max_retries=args.max_retries,
        initial_backoff=args.initial_backoff,
        timeout=args.request_timeout,
        seed=args.seed,
    )
    requests = [
        ChatRequest(
            messages=[{"role": "user", "content": prompt}],
            temperature=args.temperature,
            max_tokens=args.max_new_tokens,
        )
        for prompt in prompts
    ]

    def on_result(index: int, result: ChatResult) -> None:
        concept, instruction = pending[index]
        writer.add(
            concept,
            instruction,
            result.text,
            None if result.ok else result.status,
            truncated=result.ok and result.finish_reason == "length",
        )

    try:
        client.complete_many_sync(
            requests, desc="Teacher", callback=on_result, cache_filter=lambda text: bool(text.strip())
        )
    finally:
        client.close()
    logger.info(f"Teacher requests sent: {client.requests_sent}; answers from the cache: {client.cache_hits}.")


def generate_with_hf(
    args: ConceptDataArguments, pending: list[tuple[Concept, str]], prompts: Sequence[str], writer: RowWriter
) -> None:
    """Sends `prompts` (one per pair of `pending`) to a local causal LM (chat template, left-padded batches, one
    `generate` per batch)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.logging import tqdm

    if not Path(args.teacher_model).is_dir():
        raise ValueError(
            f"--teacher_backend hf needs --teacher_model to be a local model directory, got {args.teacher_model!r} "
            "(no model hub is reachable from here; save the model with save_pretrained first)."
        )
    tokenizer = AutoTokenizer.from_pretrained(args.teacher_model)
    if tokenizer.chat_template is None:
        raise ValueError(
            f"The tokenizer of {args.teacher_model!r} has no chat template; the teacher must be a chat model."
        )
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(args.teacher_model, dtype=resolve_dtype(args.dtype)).to(device).eval()
    stop_ids = _stop_token_ids(model, tokenizer)
    sampling = args.temperature > 0
    generation_kwargs: dict[str, Any] = dict(
        max_new_tokens=args.max_new_tokens, do_sample=sampling, pad_token_id=tokenizer.pad_token_id
    )
    if sampling:
        generation_kwargs["temperature"] = args.temperature

    starts = range(0, len(pending), args.batch_size)
    for start in tqdm(starts, desc="Teacher (hf)"):
        batch = pending[start : start + args.batch_size]
        conversations = [[{"role": "user", "content": prompt}] for prompt in prompts[start : start + args.batch_size]]
        encoded = tokenizer.apply_chat_template(
            conversations, add_generation_prompt=True, return_tensors="pt", return_dict=True, padding=True
        ).to(device)
        with torch.no_grad():
            generated = model.generate(**encoded, **generation_kwargs)
        new_tokens = generated[:, encoded["input_ids"].shape[1] :]
        texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        # An answer that never produced an end-of-turn token was stopped by max_new_tokens, like finish_reason
        # "length" from an API (finished rows are padded after their end token, so this is per row).
        finished = torch.isin(new_tokens, torch.tensor(stop_ids, device=new_tokens.device)).any(dim=1).tolist()
        for (concept, instruction), text, complete in zip(batch, texts, finished):
            writer.add(concept, instruction, text, truncated=not complete)


def _stop_token_ids(model, tokenizer) -> list[int]:
    configured = model.generation_config.eos_token_id
    configured = configured if isinstance(configured, list) else [configured]
    ids = sorted({token for token in [*configured, tokenizer.eos_token_id] if token is not None})
    if not ids:
        raise ValueError(
            f"Neither the generation config nor the tokenizer of {model.name_or_path!r} names an EOS token, so a "
            "finished answer cannot be told from one cut off by --max_new_tokens."
        )
    return ids


# ---------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------
def write_parquet_atomically(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Writes `rows` (AxBench schema) to a temporary file beside `path`, then renames it into place."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(name, pa.int64() if name == "concept_id" else pa.string()) for name in OUTPUT_COLUMNS])
    table = pa.Table.from_pylist([{name: row[name] for name in OUTPUT_COLUMNS} for row in rows], schema=schema)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, temporary)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


__all__ = [
    "ABOUT_PROMPT_TEMPLATES",
    "BUNDLED_INSTRUCTIONS",
    "OUTPUT_COLUMNS",
    "RESPONSE_STYLES",
    "TEACHER_BACKENDS",
    "Concept",
    "ConceptDataArguments",
    "RowWriter",
    "build_teacher_prompt",
    "teacher_prompts",
    "generate_with_hf",
    "generate_with_openai",
    "load_concepts",
    "load_instructions",
    "plan_pairs",
    "read_finished_rows",
    "write_parquet_atomically",
]
