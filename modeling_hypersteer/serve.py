"""Serve a HyperSteer model over the OpenAI chat-completions API, steered per request by a sentence.

Ready-to-copy commands:

    hypersteer-serve outputs/quickstart                                 # 127.0.0.1:8000
    python -m modeling_hypersteer.serve outputs/quickstart --port 8001 --max_batch_size 8 --batch_window_ms 10
    HYPERSTEER_API_KEY=secret hypersteer-serve outputs/quickstart --host 0.0.0.0   # on a network: require a key
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' -d '{"model":
        "outputs/quickstart", "messages": [{"role": "user", "content": "Describe a city."}], "max_tokens": 48,
        "temperature": 0, "steering": {"prompt": "references to oceans, tides and marine life", "factor": 1.0}}'

Endpoints: `POST /v1/chat/completions` (JSON or, with `"stream": true`, server-sent events in OpenAI's chunk shapes),
`GET /v1/models` and `GET /v1/models/{id}` (each model with a `steering` field: its calibrated factors and this
server's limits), `GET /health`. The extra request field `steering` (`extra_body={"steering": ...}` with the official
client) is `{"prompt": str, "factor": float}`, a list of such objects (composed: the row is steered by
`sum_k factor_k * v_k`, see `HyperSteerModel.generate`), or absent/`null` for the unsteered base. A concept with
`"in_prompt": true` is also asked for in the last user turn, in the prompting baseline's words
(`evaluation.prompt_steering_turns`), and its factor defaults to the model's `prompted_steering_factor`: the use that
shows concepts the model never trained on. The OpenAI fields `stop`, `seed`, `n`, `presence_penalty`,
`frequency_penalty`, `logit_bias`, `max_completion_tokens`, `stream_options.include_usage` and `user` are honoured;
what cannot be honoured (`tools`, a non-text `response_format`, image or audio content, `logprobs`) is refused with a
400 naming the field.

How requests run: one background thread owns the model and its tokenizer (which it also uses to turn tokens into
text, incrementally). Requests are validated, chat-templated and tokenized on a second thread with its own copy of the
tokenizer: a fast tokenizer switches its truncation setting inside every call and fails with "Already borrowed" if two
threads do it at once, and the event loop stays free. The model thread takes the first queued request, waits up to
`--batch_window_ms` (or until `--max_batch_size` rows are queued; a request with `n` choices is `n` rows) for more,
and runs ONE greedy `model.generate` over the left-padded prompts, with each row's own steering prompts and factors.
Each row's own sampling settings (temperature, top_p, seed, penalties, logit_bias) are applied by logits processors,
and a sampled row draws its token from its own `torch.Generator` (seeded by the request's `seed`), so greedy and
sampled requests share a batch and a seeded request gives the same text whatever it is batched with. Rows end at
their own `max_tokens`, EOS or stop string (and when their client goes away); a request is answered as soon as all
its rows have ended, not when the batch ends. A request arriving while a batch runs waits for the next batch.
`no_context` models keep each steering prompt's vector in a bounded LRU cache; other types compute `v` at the prefill
of every batch, from each row's own prompt.

Built on FastAPI + uvicorn rather than `transformers serve`: the latter (transformers 5.x, `transformers.cli.serving`)
rejects request fields outside the OpenAI schema, runs requests one at a time (its continuous batching bypasses
`generate` and so the steering hook), and its handler classes are internal, without a stable API to extend.
"""

import argparse
import asyncio
import copy
import hmac
import importlib.util
import json
import logging as std_logging
import math
import os
import queue
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from jinja2.exceptions import TemplateError
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.logits_process import TopPLogitsWarper
from transformers.utils import logging

from .cli import DTYPE_CHOICES, resolve_dtype
from .evaluation import prompt_steering_turns
from .modeling_hypersteer import HyperSteerModel


logger = logging.get_logger(__name__)

# Request fields this server reads and honours; any other field is rejected (never silently ignored).
SUPPORTED_FIELDS = (
    "model",
    "messages",
    "steering",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "n",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "user",
    "metadata",
    # Accepted only with values that ask for nothing this server cannot do (checked in `_check_inert_fields`).
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "functions",
    "function_call",
    "response_format",
    "logprobs",
    "top_logprobs",
    "store",
    "modalities",
    "service_tier",
)
STEERING_KEYS = ("prompt", "factor", "in_prompt")
MESSAGE_ROLES = ("system", "developer", "user", "assistant")
MAX_STOP_SEQUENCES = 4
# torch.Generator.manual_seed accepts this range.
SEED_RANGE = (-(2**63), 2**64 - 1)
# How often a non-streaming request checks that its client is still connected.
DISCONNECT_POLL_S = 0.5
# Seconds uvicorn waits for open requests at shutdown before cancelling them (which stops their rows).
GRACEFUL_SHUTDOWN_S = 5
API_KEY_ENV = "HYPERSTEER_API_KEY"


class ServeError(Exception):
    """An error returned to the client in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        status_code: int = 400,
        error_type: str = "invalid_request_error",
        code: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        self.status_code = status_code
        self.error_type = error_type
        self.code = code
        self.headers = headers

    def to_dict(self) -> dict:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


@dataclass
class ServeSettings:
    """Limits that every request is validated against."""

    model_id: str
    max_batch_size: int = 8
    batch_window_ms: float = 10.0
    max_steering_factor: float = 10.0
    max_concepts: int = 4
    default_max_tokens: int = 256
    max_tokens_limit: int = 4096
    max_queued_requests: int = 256
    max_request_bytes: int = 1_000_000
    api_key: str | None = None
    vector_cache_size: int = 1024
    default_steering_factor: float = 1.0
    # The factor of a concept also asked for in the prompt (`"in_prompt": true`); None when the model was never
    # calibrated for that use, so such a request must name its factor.
    prompted_steering_factor: float | None = None


# ---------------------------------------------------------------------------------------------------------------
# Incremental detokenization and stop strings
# ---------------------------------------------------------------------------------------------------------------


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas whose concatenation is the decoded text.

    Each step decodes only a short window: the tokens since the last emitted text plus the token before them (whose
    text is subtracted), so the cost does not grow with the completion, and tokenizers that change a word's leading
    space depending on what precedes it still join up. A decoded window ending in U+FFFD is an incomplete multi-byte
    character (an emoji or accented letter split across byte-level tokens); it is held back until a later token
    completes it. `flush()` returns what is still held at the end (U+FFFD included if the bytes never completed).

    >>> detokenizer = IncrementalDetokenizer(tokenizer)
    >>> "".join(detokenizer.add(token) for token in tokens) + detokenizer.flush() == tokenizer.decode(tokens)
    True
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        self.tokens.append(token_id)
        prefix_text = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.tokens[self.prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        prefix_text = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.tokens[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.tokens)
        return new_text[len(prefix_text) :]


def _held_back_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that is the start of a stop string (it may still become one)."""
    longest = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:length]):
                longest = length
                break
    return longest


# ---------------------------------------------------------------------------------------------------------------
# Requests: validation and per-request state
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ChatChoice:
    """One choice (one batch row) of a request: its tokens, its text so far and how it ended."""

    index: int
    generator: torch.Generator | None = None
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    # Decoded text not yet released: it ends like the start of a stop string.
    pending: str = ""
    detokenizer: IncrementalDetokenizer | None = None
    finish_reason: str | None = None


@dataclass
class ChatJob:
    """One chat-completion request, from validation to its last token.

    The worker thread appends tokens and text to its choices and finishes them; the event loop that owns the HTTP
    request receives every event through `events` (an `asyncio.Queue` fed with `call_soon_threadsafe`): `("text",
    index, delta)`, `("finish", index, reason)`, `("end",)` once every choice has finished, or `("error", ServeError)`.
    """

    prompt_ids: list[int]
    concepts: list[tuple[str, float]]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    n: int = 1
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    stream: bool = False
    include_usage: bool = False
    request_id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    choices: list[ChatChoice] = field(default_factory=list)
    failed: bool = False
    batch_rows: int = 0

    def __post_init__(self):
        if not self.choices:
            self.choices = [ChatChoice(index=index) for index in range(self.n)]

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0

    @property
    def done(self) -> bool:
        return self.failed or all(choice.finish_reason is not None for choice in self.choices)

    @property
    def completion_tokens(self) -> int:
        return sum(len(choice.tokens) for choice in self.choices)

    def _emit(self, event: tuple) -> None:
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def prepare(self, tokenizer) -> None:
        """Called by the worker thread before the job's first step: detokenizers and per-choice generators."""
        for choice in self.choices:
            choice.detokenizer = IncrementalDetokenizer(tokenizer)
            if self.do_sample and self.seed is not None:
                # Choice k of a request seeded `s` samples from its own generator seeded `s + k`: the n choices
                # differ, and each is reproducible whatever else shares the batch.
                choice.generator = torch.Generator().manual_seed((self.seed + choice.index) % 2**64)

    def _release(self, choice: ChatChoice, text: str, final: bool) -> None:
        """Append decoded `text` to the choice, cutting at a stop string and holding back a possible stop start."""
        if not text and not final:
            return
        pending = choice.pending + text
        if self.stop:
            cut = min((index for index in (pending.find(stop) for stop in self.stop) if index >= 0), default=-1)
            if cut >= 0:
                self._send_text(choice, pending[:cut])
                choice.pending = ""
                self.finish_choice(choice, "stop", flush=False)
                return
        held = 0 if final else _held_back_length(pending, self.stop)
        self._send_text(choice, pending[: len(pending) - held])
        choice.pending = pending[len(pending) - held :]

    def _send_text(self, choice: ChatChoice, text: str) -> None:
        if text:
            choice.text += text
            self._emit(("text", choice.index, text))

    def add_token(self, choice: ChatChoice, token_id: int) -> None:
        choice.tokens.append(token_id)
        self._release(choice, choice.detokenizer.add(token_id), final=False)
        if choice.finish_reason is None and len(choice.tokens) >= self.max_tokens:
            self.finish_choice(choice, "length")

    def finish_choice(self, choice: ChatChoice, reason: str, flush: bool = True) -> None:
        if choice.finish_reason is not None or self.failed:
            return
        if flush and choice.detokenizer is not None:
            # The held-back text (an incomplete character, or a possible stop start) is part of the answer...
            self._release(choice, choice.detokenizer.flush(), final=True)
            if choice.finish_reason is not None:  # ... unless it completes a stop string
                return
        choice.finish_reason = reason
        self._emit(("finish", choice.index, reason))
        if self.done:
            self._emit(("end",))

    def finish(self, reason: str) -> None:
        for choice in self.choices:
            self.finish_choice(choice, reason)

    def fail(self, error: ServeError) -> None:
        if not self.done:
            self.failed = True
            self._emit(("error", error))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class SteeringItem(NamedTuple):
    """One concept of a request's `steering` field."""

    prompt: str
    factor: float
    # Also ask for the concept in the last user turn (`evaluation.prompt_steering_turns`), as `prompt_hypersteer` does.
    in_prompt: bool = False


def parse_steering(value, tokenizer, settings: ServeSettings, max_prompt_tokens: int) -> list[SteeringItem]:
    """Validate the `steering` field and return its concepts in order (none for the unsteered base)."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    if len(items) > settings.max_concepts:
        raise ServeError(
            f"`steering` names {len(items)} concepts but this server allows at most {settings.max_concepts} per "
            "request (`--max_concepts`).",
            param="steering",
        )
    concepts = []
    for index, item in enumerate(items):
        where = "steering" if not isinstance(value, list) else f"steering[{index}]"
        if not isinstance(item, dict):
            raise ServeError(
                f'`{where}` must be an object like {{"prompt": "references to legal terminology", "factor": '
                f"1.0}}, got {json.dumps(item)}.",
                param=where,
            )
        unknown = sorted(set(item) - set(STEERING_KEYS))
        if unknown:
            raise ServeError(
                f"`{where}` has unknown keys {unknown}; allowed keys are {list(STEERING_KEYS)}.",
                param=f"{where}.{unknown[0]}",
            )
        prompt = item.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ServeError(
                f"`{where}.prompt` must be a non-empty string (a natural-language concept such as 'references to "
                f"legal terminology'), got {json.dumps(prompt)}.",
                param=f"{where}.prompt",
            )
        num_tokens = len(tokenizer(prompt, add_special_tokens=True).input_ids)
        if num_tokens > max_prompt_tokens:
            raise ServeError(
                f"`{where}.prompt` is {num_tokens} tokens long; this model reads at most {max_prompt_tokens} "
                "(`max_steering_prompt_length` in its config). Shorten it.",
                param=f"{where}.prompt",
            )
        in_prompt = item.get("in_prompt", False)
        if not isinstance(in_prompt, bool):
            raise ServeError(
                f"`{where}.in_prompt` must be true or false, got {json.dumps(in_prompt)}.", param=f"{where}.in_prompt"
            )
        if in_prompt and "factor" not in item and settings.prompted_steering_factor is None:
            raise ServeError(
                f"`{where}` asks for its concept in the prompt too (`in_prompt`) without a `factor`, and this model "
                "has no calibrated factor for that use (`prompted_steering_factor` in its config; "
                "`train_hypersteer.py --calibrate_prompted_steering_factor` sets it). Pass a factor, e.g. 0.5.",
                param=f"{where}.factor",
            )
        default_factor = settings.prompted_steering_factor if in_prompt else settings.default_steering_factor
        factor = item.get("factor", default_factor)
        if not _is_number(factor) or not math.isfinite(factor):
            raise ServeError(
                f"`{where}.factor` must be a finite number, got {factor!r}.",
                param=f"{where}.factor",
            )
        if abs(factor) > settings.max_steering_factor:
            raise ServeError(
                f"`{where}.factor` is {factor}, outside [-{settings.max_steering_factor}, "
                f"{settings.max_steering_factor}] (`--max_steering_factor`).",
                param=f"{where}.factor",
            )
        concepts.append(SteeringItem(prompt, float(factor), in_prompt))
    return concepts


def ask_for_concepts_in_prompt(messages: list[dict], concepts: Sequence[SteeringItem]) -> list[dict]:
    """`messages` with the `in_prompt` concepts asked for in the last user turn, as the prompting baseline words it.

    Raises:
        [`ServeError`] when the conversation has no user turn to put them in.
    """
    prompted = [item.prompt for item in concepts if item.in_prompt]
    if not prompted:
        return messages
    for index in range(len(messages) - 1, -1, -1):
        if messages[index]["role"] == "user":
            user_turn, _ = prompt_steering_turns(prompted, messages[index]["content"])
            return [*messages[:index], {**messages[index], "content": user_turn}, *messages[index + 1 :]]
    raise ServeError(
        "`steering` asks for a concept in the prompt (`in_prompt`), but `messages` has no user turn to ask in; add "
        "one or drop `in_prompt`.",
        param="messages",
    )


def _check_inert_fields(body: dict) -> None:
    """Fields that clients send by default are accepted when they ask for nothing this server cannot do."""
    for name in ("tools", "functions"):
        if body.get(name):
            raise ServeError(
                f"`{name}` is not supported: this server generates text only and cannot call tools. Remove `{name}`.",
                param=name,
            )
    for name, allowed in (("tool_choice", ("none", "auto")), ("function_call", ("none", "auto"))):
        if name in body and body[name] not in allowed:
            raise ServeError(
                f"`{name}` is {json.dumps(body[name])}, but this server cannot call tools; use one of "
                f"{list(allowed)} or leave it out.",
                param=name,
            )
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        kind = response_format.get("type") if isinstance(response_format, dict) else response_format
        raise ServeError(
            f"`response_format` {json.dumps(kind)} is not supported: this server cannot constrain the output to JSON. "
            'Use {"type": "text"} or leave it out.',
            param="response_format",
        )
    if body.get("logprobs") not in (None, False):
        raise ServeError(
            "`logprobs` is not supported by this server; leave it out or set it to false.", param="logprobs"
        )
    if body.get("top_logprobs") not in (None, 0):
        raise ServeError(
            "`top_logprobs` is not supported by this server; leave it out or set it to 0.", param="top_logprobs"
        )
    if body.get("store") not in (None, False):
        raise ServeError(
            "`store` is not supported: this server keeps no completions. Leave it out or set it to false.",
            param="store",
        )
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise ServeError(
            f'`modalities` must be ["text"] on this text-only server, got {json.dumps(modalities)}.',
            param="modalities",
        )
    for name in ("user", "service_tier"):
        if name in body and not isinstance(body[name], str):
            raise ServeError(f"`{name}` must be a string, got {json.dumps(body[name])}.", param=name)
    if "metadata" in body and not isinstance(body["metadata"], dict):
        raise ServeError(f"`metadata` must be an object, got {json.dumps(body['metadata'])}.", param="metadata")
    if "parallel_tool_calls" in body and not isinstance(body["parallel_tool_calls"], bool):
        raise ServeError("`parallel_tool_calls` must be true or false.", param="parallel_tool_calls")


def _parse_messages(messages) -> list[dict]:
    """OpenAI messages as `{role, content: str}` dicts for the chat template; refuses what a text model cannot read."""
    if not isinstance(messages, list) or not messages:
        raise ServeError("`messages` must be a non-empty list of {role, content} objects.", param="messages")
    parsed = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ServeError(f"`{where}` must be an object with a string `role`.", param=where)
        role = message["role"]
        if role not in MESSAGE_ROLES:
            raise ServeError(
                f"`{where}.role` is {role!r}; this server reads {list(MESSAGE_ROLES)} (it cannot call tools, so "
                "`tool` and `function` results have nothing to answer).",
                param=f"{where}.role",
            )
        if message.get("tool_calls") or message.get("function_call"):
            name = "tool_calls" if message.get("tool_calls") else "function_call"
            raise ServeError(
                f"`{where}.{name}` is not supported: this server cannot call tools.", param=f"{where}.{name}"
            )
        content = message.get("content")
        if content is None and role == "assistant":
            content = ""  # an assistant turn whose content was a tool call or a refusal; clients send `null`
        elif isinstance(content, list):
            texts = []
            for part_index, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind in ("text", "refusal") and isinstance(part.get(kind), str):
                    texts.append(part[kind])
                else:
                    raise ServeError(
                        f"`{where}.content[{part_index}]` is a {json.dumps(kind)} part; this text-only model reads "
                        'only {"type": "text", "text": "..."} parts.',
                        param=f"{where}.content[{part_index}]",
                    )
            content = "".join(texts)
        elif not isinstance(content, str):
            raise ServeError(
                f"`{where}.content` must be a string or a list of text parts, got {json.dumps(content)}.",
                param=f"{where}.content",
            )
        # Few chat templates know OpenAI's newer `developer` role; it is the system prompt under another name.
        parsed.append({"role": "system" if role == "developer" else role, "content": content})
    return parsed


def _parse_sampling(body: dict, vocab_size: int | None, max_n: int) -> dict:
    """The sampling fields of a request, validated, as `ChatJob` keyword arguments."""
    temperature = body.get("temperature", 1.0)
    if not _is_number(temperature) or not math.isfinite(temperature) or not 0 <= temperature <= 2:
        raise ServeError(f"`temperature` must be a number in [0, 2], got {temperature!r}.", param="temperature")
    top_p = body.get("top_p", 1.0)
    if not _is_number(top_p) or not 0 < top_p <= 1:
        raise ServeError(f"`top_p` must be a number in (0, 1], got {top_p!r}.", param="top_p")
    n = body.get("n", 1)
    if not _is_int(n) or not 1 <= n <= max_n:
        raise ServeError(
            f"`n` must be an integer from 1 to {max_n} (`--max_batch_size`: one batch row per choice), got "
            f"{json.dumps(n)}.",
            param="n",
        )
    stop = body.get("stop", [])
    stop = [stop] if isinstance(stop, str) else stop
    if (
        not isinstance(stop, list)
        or len(stop) > MAX_STOP_SEQUENCES
        or not all(isinstance(item, str) and item for item in stop)
    ):
        raise ServeError(
            f"`stop` must be a non-empty string or a list of up to {MAX_STOP_SEQUENCES} non-empty strings, got "
            f"{json.dumps(body.get('stop'))}.",
            param="stop",
        )
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not SEED_RANGE[0] <= seed <= SEED_RANGE[1]):
        raise ServeError(f"`seed` must be an integer (a 64-bit value), got {json.dumps(seed)}.", param="seed")
    penalties = {}
    for name in ("presence_penalty", "frequency_penalty"):
        value = body.get(name, 0.0)
        if not _is_number(value) or not math.isfinite(value) or not -2 <= value <= 2:
            raise ServeError(f"`{name}` must be a number in [-2, 2], got {value!r}.", param=name)
        penalties[name] = float(value)
    logit_bias = body.get("logit_bias", {})
    if not isinstance(logit_bias, dict):
        raise ServeError(
            f'`logit_bias` must be an object mapping token ids to biases, like {{"50256": -100}}, got '
            f"{json.dumps(logit_bias)}.",
            param="logit_bias",
        )
    biases = {}
    for key, bias in logit_bias.items():
        token_id = int(key) if isinstance(key, str) and key.strip().isdigit() else None
        if token_id is None or (vocab_size is not None and token_id >= vocab_size):
            raise ServeError(
                f"`logit_bias` key {key!r} is not a token id of this model (integers from 0 to "
                f"{(vocab_size or 1) - 1}).",
                param="logit_bias",
            )
        if not _is_number(bias) or not math.isfinite(bias) or not -100 <= bias <= 100:
            raise ServeError(
                f"`logit_bias[{key!r}]` must be a number in [-100, 100], got {bias!r}.", param="logit_bias"
            )
        biases[token_id] = float(bias)
    return {
        "temperature": float(temperature),
        "top_p": float(top_p),
        "n": n,
        "stop": stop,
        "seed": seed,
        "logit_bias": biases,
        **penalties,
    }


def parse_chat_request(
    body, tokenizer, settings: ServeSettings, max_prompt_tokens: int, context_limit, vocab_size: int | None = None
) -> ChatJob:
    """Validate a `/v1/chat/completions` body and tokenize its prompt; raises [`ServeError`] naming the bad field."""
    if not isinstance(body, dict):
        raise ServeError("The request body must be a JSON object.")
    unknown = sorted(set(body) - set(SUPPORTED_FIELDS))
    if unknown:
        raise ServeError(
            f"Unsupported request fields {unknown}; this server reads {list(SUPPORTED_FIELDS)}.", param=unknown[0]
        )
    # OpenAI clients send `null` for "not set" (e.g. `"stop": null`); it means the default, as on OpenAI's API.
    steering = body.get("steering")
    body = {name: value for name, value in body.items() if value is not None}
    model = body.get("model")
    if model is not None and model != settings.model_id:
        raise ServeError(
            f"The model {model!r} does not exist on this server; it serves {settings.model_id!r}.",
            param="model",
            status_code=404,
            code="model_not_found",
        )
    _check_inert_fields(body)
    messages = _parse_messages(body.get("messages"))
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ServeError(f"`stream` must be true or false, got {json.dumps(stream)}.", param="stream")
    stream_options = body.get("stream_options", {})
    if not isinstance(stream_options, dict) or set(stream_options) - {"include_usage"}:
        raise ServeError(
            f"`stream_options` may only hold `include_usage`, got {json.dumps(stream_options)}.",
            param="stream_options",
        )
    sampling = _parse_sampling(body, vocab_size, settings.max_batch_size)
    concepts = parse_steering(steering, tokenizer, settings, max_prompt_tokens)
    messages = ask_for_concepts_in_prompt(messages, concepts)

    try:
        prompt_ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )
    except (TemplateError, ValueError, TypeError, KeyError) as error:
        # e.g. a template that raises "roles must alternate user/assistant"
        raise ServeError(f"The chat template could not render `messages`: {error}", param="messages") from error
    prompt_ids = list(prompt_ids["input_ids"])

    if "max_tokens" in body and "max_completion_tokens" in body:
        raise ServeError(
            "Pass `max_completion_tokens` or its older name `max_tokens`, not both.", param="max_completion_tokens"
        )
    max_tokens_param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = body.get(max_tokens_param)
    room = None if context_limit is None else context_limit - len(prompt_ids)
    if max_tokens is None:
        max_tokens = min(
            settings.default_max_tokens, settings.max_tokens_limit, room if room is not None else math.inf
        )
        if max_tokens < 1:
            raise ServeError(
                f"The prompt is {len(prompt_ids)} tokens long, which fills the model's context of {context_limit} "
                "tokens; shorten `messages`.",
                param="messages",
            )
    elif not _is_int(max_tokens) or max_tokens < 1:
        raise ServeError(
            f"`{max_tokens_param}` must be a positive integer, got {max_tokens!r}.", param=max_tokens_param
        )
    elif max_tokens > settings.max_tokens_limit:
        raise ServeError(
            f"`{max_tokens_param}` is {max_tokens}, above this server's limit of {settings.max_tokens_limit} "
            f"(`--max_tokens_limit`); ask for at most {settings.max_tokens_limit}.",
            param=max_tokens_param,
        )
    elif room is not None and max_tokens > room:
        raise ServeError(
            f"The prompt ({len(prompt_ids)} tokens) plus `{max_tokens_param}` ({max_tokens}) exceeds the model's "
            f"context of {context_limit} tokens; lower `{max_tokens_param}` to at most {room} or shorten "
            "`messages`.",
            param=max_tokens_param,
        )
    return ChatJob(
        prompt_ids=prompt_ids,
        concepts=[(item.prompt, item.factor) for item in concepts],
        max_tokens=max_tokens,
        stream=stream,
        include_usage=bool(stream_options.get("include_usage", False)),
        **sampling,
    )


# ---------------------------------------------------------------------------------------------------------------
# Batched generation
# ---------------------------------------------------------------------------------------------------------------


class PresenceFrequencyPenaltyLogitsProcessor(LogitsProcessor):
    """OpenAI's `presence_penalty` and `frequency_penalty`, per row, counting generated tokens only.

    For every row with generated-token counts `count[t]` (prompt tokens are not counted, unlike transformers'
    `RepetitionPenaltyLogitsProcessor`):

        logits[t] <- logits[t] - presence_penalty * (count[t] > 0) - frequency_penalty * count[t]

    Args:
        presence_penalty (`torch.Tensor` of shape `(batch_size,)`): each row's presence penalty.
        frequency_penalty (`torch.Tensor` of shape `(batch_size,)`): each row's frequency penalty.
        prompt_length (`int`): length of the (left-padded) prompts; tokens after it are the generated ones.

    >>> processor = PresenceFrequencyPenaltyLogitsProcessor(torch.tensor([0.5]), torch.tensor([1.0]), prompt_length=1)
    >>> processor(torch.tensor([[7, 3, 3]]), torch.zeros(1, 5))
    tensor([[ 0.0000,  0.0000,  0.0000, -2.5000,  0.0000]])
    """

    def __init__(self, presence_penalty: torch.Tensor, frequency_penalty: torch.Tensor, prompt_length: int):
        self.presence_penalty = presence_penalty
        self.frequency_penalty = frequency_penalty
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_length :]
        counts = torch.zeros_like(scores)
        counts.scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        presence = self.presence_penalty.to(scores)[:, None]
        frequency = self.frequency_penalty.to(scores)[:, None]
        return scores - presence * (counts > 0).to(scores.dtype) - frequency * counts


class _RowLogitBias(LogitsProcessor):
    """Adds each row's `logit_bias` (a dense `(batch_size, vocab_size)` tensor) to its logits."""

    def __init__(self, bias: torch.Tensor):
        self.bias = bias

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return scores + self.bias.to(scores)


class _RowSampler(LogitsProcessor):
    """Samples the next token of every sampled row with its own temperature, top_p and generator.

    `generate` runs greedy; this last processor turns a sampled row's logits into a one-hot choice (0 for the drawn
    token, -inf elsewhere) that greedy decoding then picks. Greedy rows pass through unchanged. This lets rows with
    different sampling settings and seeds share one batch, and a seeded row's draws do not depend on its neighbours.
    """

    def __init__(self, rows: Sequence[tuple[ChatJob, ChatChoice]]):
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        for row, (job, choice) in enumerate(self.rows):
            if not job.do_sample or choice.finish_reason is not None:
                continue
            row_scores = scores[row : row + 1].float() / job.temperature
            if job.top_p < 1.0:
                row_scores = TopPLogitsWarper(job.top_p)(input_ids[row : row + 1], row_scores)
            probabilities = torch.softmax(row_scores, dim=-1)
            token = torch.multinomial(probabilities, 1, generator=choice.generator).item()
            scores[row] = -math.inf
            scores[row, token] = 0.0
        return scores


class _RowStop(StoppingCriteria):
    """Ends each row at its own `max_tokens`, EOS or stop string, or as soon as its client has gone away."""

    def __init__(self, rows: Sequence[tuple[ChatJob, ChatChoice]], prompt_length: int):
        self.rows = rows
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        generated = input_ids.shape[1] - self.prompt_length
        done = [
            generated >= job.max_tokens or choice.finish_reason is not None or job.cancelled.is_set()
            for job, choice in self.rows
        ]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class _RowStreamer:
    """The `streamer` protocol of `generate` (`put(tokens)` per step, `end()`), routed to each row's choice.

    `generate` puts the prompt first, then one token per row per step; rows that have finished keep receiving
    padding, which is ignored. A request is answered as soon as its own rows have finished.
    """

    def __init__(self, rows: Sequence[tuple[ChatJob, ChatChoice]], eos_token_ids: set[int]):
        self.rows = rows
        self.eos_token_ids = eos_token_ids
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for (job, choice), token_id in zip(self.rows, value.reshape(-1).tolist()):
            if choice.finish_reason is not None or job.failed:
                continue
            if job.cancelled.is_set():
                job.finish_choice(choice, "cancelled")
            elif token_id in self.eos_token_ids:
                job.finish_choice(choice, "stop")
            else:
                job.add_token(choice, token_id)

    def end(self) -> None:
        for job, choice in self.rows:
            job.finish_choice(choice, "cancelled" if job.cancelled.is_set() else "length")


class SteeringVectorCache:
    """Bounded LRU cache of `no_context` steering vectors, one per steering prompt (used by the worker thread only)."""

    def __init__(self, model: HyperSteerModel, max_size: int):
        self.model = model
        self.max_size = max_size
        self.vectors: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The vector of every prompt, computing the missing ones in one hypernetwork pass."""
        missing = list(dict.fromkeys(prompt for prompt in prompts if prompt not in self.vectors))
        self.hits += sum(prompt in self.vectors for prompt in prompts)
        self.misses += len(missing)
        found = {prompt: self.vectors[prompt] for prompt in prompts if prompt in self.vectors}
        if missing:
            computed = self.model.compute_steering_vectors(steering_prompt=missing)
            found.update(zip(missing, computed))
        for prompt in prompts:
            self.vectors[prompt] = found[prompt]
            self.vectors.move_to_end(prompt)
        while len(self.vectors) > self.max_size:
            self.vectors.popitem(last=False)
        return found


class BatchingEngine:
    """Owns the model in one background thread and runs queued requests in batches (see the module docstring)."""

    def __init__(self, model: HyperSteerModel, settings: ServeSettings):
        self.model = model
        # The worker thread's tokenizer (steering prompts inside `generate`, and detokenization). Requests are
        # tokenized on another thread with `request_tokenizer`, a copy: a fast tokenizer is not thread-safe.
        self.tokenizer = model.tokenizer
        self.request_tokenizer = copy.deepcopy(model.tokenizer)
        self.settings = settings
        self.pad_token_id = self.tokenizer.pad_token_id
        if self.pad_token_id is None:
            self.pad_token_id = self.tokenizer.eos_token_id
        eos = model.generation_config.eos_token_id
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        self.eos_token_ids = set(eos if isinstance(eos, (list, tuple)) else [eos])
        base_config = model.language_model.config.get_text_config()
        self.context_limit = getattr(base_config, "max_position_embeddings", None)
        self.vocab_size = model.language_model.get_output_embeddings().weight.shape[0]
        self.vector_cache = (
            SteeringVectorCache(model, settings.vector_cache_size)
            if model.config.hypernet_type == "no_context"
            else None
        )
        self.stats = {"batches": 0, "largest_batch": 0, "completed": 0, "cancelled": 0, "running": 0}
        self._queue: queue.Queue[ChatJob] = queue.Queue()
        self._carry: ChatJob | None = None  # a job that did not fit in the last batch; it opens the next one
        self._admitted = 0
        self._admission_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hypersteer-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop taking batches, cancel every queued request and let the running batch end at its next step."""
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait().cancelled.set()
            except queue.Empty:
                break
        self._thread.join(timeout=30)

    def admit(self) -> None:
        """Reserve a place for a request about to be tokenized and queued; 429 when `--max_queued_requests` wait."""
        with self._admission_lock:
            if self._admitted >= self.settings.max_queued_requests:
                raise ServeError(
                    f"The server is busy: {self._admitted} requests are already waiting (`--max_queued_requests` "
                    f"{self.settings.max_queued_requests}). Retry shortly.",
                    status_code=429,
                    error_type="requests",
                    code="rate_limit_exceeded",
                    headers={"Retry-After": "1"},
                )
            self._admitted += 1

    def release(self) -> None:
        """Free the place of an admitted request: it was refused, or a batch has taken it."""
        with self._admission_lock:
            self._admitted -= 1

    def submit(self, job: ChatJob) -> None:
        self._queue.put(job)

    @property
    def queued(self) -> int:
        return self._admitted

    def _next_job(self, timeout: float | None) -> ChatJob:
        if self._carry is not None:
            job, self._carry = self._carry, None
            return job
        job = self._queue.get(timeout=timeout) if timeout is None or timeout > 0 else self._queue.get_nowait()
        self.release()
        return job

    def _collect(self) -> list[ChatJob]:
        """The next batch: the first queued job, plus whatever arrives within the window, up to `max_batch_size` rows."""
        try:
            batch = [self._next_job(timeout=0.1)]
        except queue.Empty:
            return []
        rows = batch[0].n
        deadline = time.monotonic() + self.settings.batch_window_ms / 1000
        while rows < self.settings.max_batch_size:
            try:
                job = self._next_job(timeout=0)
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    job = self._next_job(timeout=remaining)
                except queue.Empty:
                    break
            if rows + job.n > self.settings.max_batch_size:
                self._carry = job
                break
            batch.append(job)
            rows += job.n
        return batch

    def _run(self) -> None:
        while not self._stop.is_set():
            batch = self._collect()
            live = []
            for job in batch:
                if job.cancelled.is_set():
                    job.finish("cancelled")
                    self.stats["cancelled"] += 1
                else:
                    live.append(job)
            if live:
                self._run_batch(live)

    def _run_batch(self, jobs: list[ChatJob]) -> None:
        rows = [(job, choice) for job in jobs for choice in job.choices]
        self.stats["batches"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(rows))
        self.stats["running"] = len(rows)
        for job in jobs:
            job.batch_rows = len(rows)
        try:
            for job in jobs:
                job.prepare(self.tokenizer)
            self.generate(rows)
        except Exception as error:  # a failed batch must not take the server down; every client gets the error
            logger.error(f"Generation failed for a batch of {len(jobs)} requests: {error!r}")
            for job in jobs:
                job.fail(ServeError(f"Generation failed: {error}", status_code=500, error_type="server_error"))
        finally:
            self.stats["running"] = 0
        for job in jobs:
            self.stats["cancelled" if job.cancelled.is_set() else "completed"] += 1

    def steering_arguments(self, rows: Sequence[tuple[ChatJob, ChatChoice]]) -> dict | None:
        """`generate` keyword arguments that steer each row by its own concepts; `None` when no row is steered.

        Every row is composed (`steering_prompt=[[...], ...]`; an unsteered row has no concepts and gets exactly the
        base's output). `no_context` models instead pass cached per-prompt vectors: a row's `v_1` with its factor,
        or `sum_k factor_k * v_k` with factor 1 — except with a token gate, whose per-concept gates need the
        composed prompts.
        """
        row_concepts = [job.concepts for job, _ in rows]
        if not any(row_concepts):
            return None
        composable = not self.model.config.token_gate or all(len(concepts) <= 1 for concepts in row_concepts)
        if self.vector_cache is not None and composable:
            vectors = self.vector_cache.get([prompt for concepts in row_concepts for prompt, _ in concepts])
            parameter = self.model.hypernetwork.output_projection.weight
            row_vectors, factors = [], []
            for concepts in row_concepts:
                if len(concepts) == 1:
                    prompt, factor = concepts[0]
                    row_vectors.append(vectors[prompt])
                    factors.append(factor)
                else:
                    row_vectors.append(
                        sum(
                            (factor * vectors[prompt] for prompt, factor in concepts),
                            parameter.new_zeros(parameter.shape[0]),
                        )
                    )
                    factors.append(1.0)
            return {"steering_vectors": torch.stack(row_vectors), "steering_factor": factors}
        return {
            "steering_prompt": [[prompt for prompt, _ in concepts] for concepts in row_concepts],
            "steering_factor": [[factor for _, factor in concepts] for concepts in row_concepts],
        }

    def logits_processors(self, rows: Sequence[tuple[ChatJob, ChatChoice]], prompt_length: int) -> LogitsProcessorList:
        """Each row's penalties, logit bias and sampling, as processors after the base's own (greedy) ones."""
        jobs = [job for job, _ in rows]
        processors = LogitsProcessorList()
        if any(job.presence_penalty or job.frequency_penalty for job in jobs):
            processors.append(
                PresenceFrequencyPenaltyLogitsProcessor(
                    torch.tensor([job.presence_penalty for job in jobs]),
                    torch.tensor([job.frequency_penalty for job in jobs]),
                    prompt_length,
                )
            )
        if any(job.logit_bias for job in jobs):
            bias = torch.zeros(len(jobs), self.vocab_size)
            for row, job in enumerate(jobs):
                for token_id, value in job.logit_bias.items():
                    bias[row, token_id] = value
            processors.append(_RowLogitBias(bias))
        if any(job.do_sample for job in jobs):
            processors.append(_RowSampler(rows))
        return processors

    def generate(self, rows: Sequence[tuple[ChatJob, ChatChoice]]) -> None:
        """Run one `generate` over the rows' left-padded prompts; tokens reach each choice through the streamer."""
        length = max(len(job.prompt_ids) for job, _ in rows)
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for row, (job, _) in enumerate(rows):
            input_ids[row, length - len(job.prompt_ids) :] = torch.tensor(job.prompt_ids)
            attention_mask[row, length - len(job.prompt_ids) :] = 1
        device = self.model.get_input_embeddings().weight.device
        generation_kwargs = {
            "input_ids": input_ids.to(device),
            "attention_mask": attention_mask.to(device),
            "max_new_tokens": max(job.max_tokens for job, _ in rows),
            "pad_token_id": self.pad_token_id,
            # Greedy over the processed logits: `_RowSampler` has already drawn each sampled row's token.
            "do_sample": False,
            "logits_processor": self.logits_processors(rows, length),
            "stopping_criteria": StoppingCriteriaList([_RowStop(rows, length)]),
            "streamer": _RowStreamer(rows, self.eos_token_ids),
        }
        steering = self.steering_arguments(rows)
        if steering is None:
            self.model.language_model.generate(**generation_kwargs)
        else:
            self.model.generate(**generation_kwargs, **steering)


# ---------------------------------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------------------------------


def _require_serving_dependencies() -> None:
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(
            f"hypersteer-serve needs {' and '.join(missing)}: `pip install 'modeling-hypersteer[serve]'` (or "
            "`pip install fastapi uvicorn`)."
        )


async def _read_body(request, max_bytes: int) -> bytes:
    """The request body, refused with a 413 as soon as it is known to exceed `max_bytes` (before reading it all)."""
    too_large = ServeError(
        f"The request body exceeds this server's limit of {max_bytes} bytes (`--max_request_bytes`); send a shorter "
        "conversation.",
        status_code=413,
        code="request_too_large",
    )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise too_large
    return bytes(body)


def build_app(engine: BatchingEngine):
    """The FastAPI application serving `engine`'s model."""
    _require_serving_dependencies()
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from openai.types import Model
    from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage
    from openai.types.chat.chat_completion import Choice
    from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
    from openai.types.chat.chat_completion_chunk import ChoiceDelta
    from openai.types.completion_usage import CompletionUsage
    from starlette.exceptions import HTTPException as StarletteHTTPException

    settings = engine.settings
    max_prompt_tokens = engine.model.config.max_steering_prompt_length
    started = int(time.time())
    # Chat templates and tokenization run here, off the event loop, with the engine's request tokenizer; one thread
    # because that tokenizer, like any fast tokenizer, must not be used by two threads at once.
    tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hypersteer-tokenizer")

    def usage(job: ChatJob) -> CompletionUsage:
        return CompletionUsage(
            prompt_tokens=len(job.prompt_ids),
            completion_tokens=job.completion_tokens,
            total_tokens=len(job.prompt_ids) + job.completion_tokens,
        )

    def chunk(job: ChatJob, choices: list, with_usage=False) -> str:
        payload = ChatCompletionChunk(
            id=job.request_id,
            object="chat.completion.chunk",
            created=job.created,
            model=settings.model_id,
            choices=choices,
            **({"usage": usage(job)} if with_usage else {}),
        )
        return f"data: {payload.model_dump_json(exclude_unset=True)}\n\n"

    def chunk_choice(index: int, delta: ChoiceDelta, finish_reason=None) -> ChunkChoice:
        return ChunkChoice(index=index, delta=delta, finish_reason=finish_reason, logprobs=None)

    def error_response(error: ServeError) -> JSONResponse:
        return JSONResponse(error.to_dict(), status_code=error.status_code, headers=error.headers)

    def model_card() -> dict:
        # OpenAI's model object plus what a client needs to steer well: the factors the model was calibrated with
        # (`prompted_steering_factor` is null when it never was) and this server's limits.
        steering = {
            "hypernet_type": engine.model.config.hypernet_type,
            "steering_layer": engine.model.config.steering_layer,
            "default_steering_factor": settings.default_steering_factor,
            "prompted_steering_factor": settings.prompted_steering_factor,
            "max_steering_factor": settings.max_steering_factor,
            "max_concepts": settings.max_concepts,
        }
        return Model(
            id=settings.model_id, created=started, object="model", owned_by="hypersteer", steering=steering
        ).model_dump(exclude_unset=True)

    async def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise ServeError(
                "Incorrect or missing API key: send `Authorization: Bearer <key>` with the key this server was "
                f"started with (`--api_key` or ${API_KEY_ENV}).",
                status_code=401,
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    async def stream_events(job: ChatJob):
        try:
            yield chunk(
                job, [chunk_choice(index, ChoiceDelta(role="assistant", content="")) for index in range(job.n)]
            )
            while True:
                event = await job.events.get()
                if event[0] == "error":
                    yield f"data: {json.dumps(event[1].to_dict())}\n\n"
                    return
                if event[0] == "end":
                    break
                if event[0] == "text":
                    yield chunk(job, [chunk_choice(event[1], ChoiceDelta(content=event[2]))])
                elif event[0] == "finish":
                    yield chunk(job, [chunk_choice(event[1], ChoiceDelta(), finish_reason=event[2])])
            if job.include_usage:
                yield chunk(job, [], with_usage=True)
            yield "data: [DONE]\n\n"
        except Exception as error:
            # The status line has been sent, so the error travels as an event in OpenAI's shape, as the SDK expects.
            logger.error(f"Unexpected error while streaming {job.request_id}: {error!r}")
            failure = ServeError(f"Internal server error: {type(error).__name__}: {error}", error_type="server_error")
            yield f"data: {json.dumps(failure.to_dict())}\n\n"
        finally:
            # A client that disconnects mid-stream ends up here: its rows stop at the next decoding step.
            if not job.done:
                job.cancelled.set()

    app = FastAPI(title="HyperSteer")

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, error: ServeError):
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError):
        return error_response(ServeError(f"Invalid request: {error.errors()}"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException):
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return error_response(
            ServeError(str(error.detail), status_code=error.status_code, error_type=kind, headers=error.headers)
        )

    @app.exception_handler(Exception)
    async def _unexpected_error(request: Request, error: Exception):
        # A bug must still reach OpenAI clients as an error they can parse, not as a plain-text 500.
        logger.error(f"Unexpected error on {request.method} {request.url.path}: {error!r}")
        return error_response(
            ServeError(
                f"Internal server error: {type(error).__name__}: {error}", status_code=500, error_type="server_error"
            )
        )

    @app.get("/health")
    async def health():
        status = {"status": "ok", "model": settings.model_id, "queued": engine.queued, **engine.stats}
        cache = engine.vector_cache
        if cache is not None:
            status["vector_cache"] = {"size": len(cache.vectors), "hits": cache.hits, "misses": cache.misses}
        return status

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        return {"object": "list", "data": [model_card()]}

    # `:path` because model ids are often folders ("outputs/quickstart"); the client percent-encodes the slashes.
    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(authorize)])
    async def model(model_id: str):
        if model_id != settings.model_id:
            raise ServeError(
                f"The model {model_id!r} does not exist on this server; it serves {settings.model_id!r}.",
                param="model",
                status_code=404,
                error_type="not_found_error",
                code="model_not_found",
            )
        return model_card()

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(request: Request):
        raw = await _read_body(request, settings.max_request_bytes)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ServeError(f"The request body is not valid JSON: {error}") from error
        engine.admit()
        try:
            job = await asyncio.get_running_loop().run_in_executor(
                tokenizer_thread,
                parse_chat_request,
                body,
                engine.request_tokenizer,
                settings,
                max_prompt_tokens,
                engine.context_limit,
                engine.vocab_size,
            )
            job.loop = asyncio.get_running_loop()
            job.events = asyncio.Queue()
            engine.submit(job)
        except BaseException:
            # Refused (or failed) before reaching the queue: its place is free again. Once queued, the model
            # thread frees it when a batch takes the job.
            engine.release()
            raise
        if job.stream:
            return StreamingResponse(
                stream_events(job), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        try:
            while True:
                try:
                    event = await asyncio.wait_for(job.events.get(), timeout=DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return None  # nobody to answer; `finally` frees the rows
                    continue
                if event[0] == "error":
                    return error_response(event[1])
                if event[0] == "end":
                    break
        finally:
            # A client that went away (or a server shutting down) stops its rows at the next decoding step.
            if not job.done:
                job.cancelled.set()
        completion = ChatCompletion(
            id=job.request_id,
            object="chat.completion",
            created=job.created,
            model=settings.model_id,
            choices=[
                Choice(
                    index=choice.index,
                    message=ChatCompletionMessage(role="assistant", content=choice.text),
                    finish_reason=choice.finish_reason,
                    logprobs=None,
                )
                for choice in job.choices
            ],
            usage=usage(job),
        )
        return JSONResponse(
            completion.model_dump(exclude_unset=True), headers={"x-hypersteer-batch-rows": str(job.batch_rows)}
        )

    return app


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hypersteer-serve",
        description="Serve a HyperSteer model over the OpenAI chat-completions API, steered per request.",
    )
    parser.add_argument("model", help="A saved HyperSteer folder or Hub id (its base is loaded from its config).")
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on.")
    parser.add_argument("--port", type=int, default=8000, help="Port to listen on.")
    parser.add_argument(
        "--dtype", default="auto", choices=sorted(DTYPE_CHOICES), help="Dtype of the frozen base model."
    )
    parser.add_argument("--device_map", default=None, help="`device_map` for the base model, e.g. 'auto' or 'cuda:0'.")
    parser.add_argument(
        "--max_batch_size", type=int, default=8, help="Most rows in one `generate` call (a request with `n` uses n)."
    )
    parser.add_argument(
        "--batch_window_ms", type=float, default=10.0, help="How long the first request of a batch waits for others."
    )
    parser.add_argument(
        "--max_steering_factor", type=float, default=10.0, help="Largest |factor| a request may ask for."
    )
    parser.add_argument("--max_concepts", type=int, default=4, help="Most steering concepts in one request.")
    parser.add_argument(
        "--default_max_tokens", type=int, default=256, help="`max_tokens` of requests that do not set it."
    )
    parser.add_argument(
        "--max_tokens_limit",
        type=int,
        default=4096,
        help="Largest `max_tokens`/`max_completion_tokens` a request may ask for (also capped by the context).",
    )
    parser.add_argument(
        "--max_queued_requests",
        type=int,
        default=256,
        help="Requests that may wait for a batch; more get a 429 until the queue drains.",
    )
    parser.add_argument(
        "--max_request_bytes", type=int, default=1_000_000, help="Largest request body accepted (413 above it)."
    )
    parser.add_argument(
        "--api_key",
        default=os.environ.get(API_KEY_ENV),
        help=f"Require `Authorization: Bearer <key>` on /v1 routes (401 otherwise). Defaults to ${API_KEY_ENV}, "
        "which keeps the key out of the process list; unset means no key (fine on 127.0.0.1, not on a network).",
    )
    parser.add_argument(
        "--vector_cache_size", type=int, default=1024, help="Steering vectors kept per prompt (no_context models)."
    )
    parser.add_argument("--served_model_name", default=None, help="Model id clients send (defaults to `model`).")
    parser.add_argument("--log_level", default="info", help="uvicorn log level.")
    return parser


def _check_arguments(args: argparse.Namespace) -> None:
    for name in (
        "max_batch_size",
        "max_concepts",
        "default_max_tokens",
        "max_tokens_limit",
        "max_queued_requests",
        "max_request_bytes",
        "vector_cache_size",
    ):
        if getattr(args, name) < 1:
            raise ValueError(f"`--{name}` must be at least 1, got {getattr(args, name)}.")
    if args.default_max_tokens > args.max_tokens_limit:
        raise ValueError(
            f"`--default_max_tokens` ({args.default_max_tokens}) must not exceed `--max_tokens_limit` "
            f"({args.max_tokens_limit}); lower the first or raise the second."
        )
    if args.batch_window_ms < 0:
        raise ValueError(f"`--batch_window_ms` must be >= 0, got {args.batch_window_ms}.")
    if not math.isfinite(args.max_steering_factor) or args.max_steering_factor <= 0:
        raise ValueError(f"`--max_steering_factor` must be a positive finite number, got {args.max_steering_factor}.")
    if args.api_key is not None and not args.api_key.strip():
        raise ValueError(f"`--api_key` (or ${API_KEY_ENV}) is empty; pass a non-empty key or leave it unset.")


def load_engine(args: argparse.Namespace) -> BatchingEngine:
    """Load the model named on the command line and wrap it in a (not yet started) [`BatchingEngine`]."""
    load_kwargs = {"dtype": resolve_dtype(args.dtype)}
    if args.device_map is not None:
        load_kwargs["device_map"] = args.device_map
    model = HyperSteerModel.from_pretrained(args.model, **load_kwargs)
    model.eval()
    if model.tokenizer is None or not model.tokenizer.chat_template:
        raise ValueError(
            f"{args.model} has no tokenizer with a chat template; the chat-completions API needs one. Save the "
            "base's tokenizer (with its chat template) next to the HyperSteer weights."
        )
    settings = ServeSettings(
        model_id=args.served_model_name or args.model,
        max_batch_size=args.max_batch_size,
        batch_window_ms=args.batch_window_ms,
        max_steering_factor=args.max_steering_factor,
        max_concepts=args.max_concepts,
        default_max_tokens=args.default_max_tokens,
        max_tokens_limit=args.max_tokens_limit,
        max_queued_requests=args.max_queued_requests,
        max_request_bytes=args.max_request_bytes,
        api_key=args.api_key,
        vector_cache_size=args.vector_cache_size,
        default_steering_factor=model.config.default_steering_factor,
        prompted_steering_factor=model.config.prompted_steering_factor,
    )
    return BatchingEngine(model, settings)


def main(argv: Sequence[str] | None = None) -> None:
    args = make_parser().parse_args(argv)
    _check_arguments(args)
    _require_serving_dependencies()
    import uvicorn

    std_logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=std_logging.INFO)
    logger.setLevel(std_logging.INFO)

    engine = load_engine(args)
    engine.start()
    if args.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning(f"Listening on {args.host} without `--api_key`: anyone who can reach it can use the model.")
    logger.info(
        f"Serving {engine.settings.model_id} ({engine.model.config.hypernet_type}) on http://{args.host}:{args.port} "
        f"(max_batch_size={args.max_batch_size}, batch_window_ms={args.batch_window_ms}, "
        f"api_key={'required' if args.api_key else 'none'})"
    )
    try:
        uvicorn.run(
            build_app(engine),
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        )
    finally:
        engine.stop()


if __name__ == "__main__":
    main()


__all__ = [
    "BatchingEngine",
    "IncrementalDetokenizer",
    "PresenceFrequencyPenaltyLogitsProcessor",
    "ServeError",
    "ServeSettings",
    "build_app",
    "main",
    "make_parser",
    "parse_chat_request",
]
