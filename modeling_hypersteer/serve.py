"""Serve a HyperSteer model over the OpenAI chat-completions API, steered per request by a sentence.

Ready-to-copy commands:

    hypersteer-serve outputs/quickstart                                 # 127.0.0.1:8000
    python -m modeling_hypersteer.serve outputs/quickstart --port 8001 --max_batch_size 8 --batch_window_ms 10
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' -d '{"model":
        "outputs/quickstart", "messages": [{"role": "user", "content": "Describe a city."}], "max_tokens": 48,
        "temperature": 0, "steering": {"prompt": "references to oceans, tides and marine life", "factor": 1.0}}'

Endpoints: `POST /v1/chat/completions` (JSON or, with `"stream": true`, server-sent events in OpenAI's chunk shapes),
`GET /v1/models`, `GET /health`. The extra request field `steering` (`extra_body={"steering": ...}` with the official
client) is `{"prompt": str, "factor": float}`, a list of such objects (composed: the row is steered by
`sum_k factor_k * v_k`, see `HyperSteerModel.generate`), or absent/`null` for the unsteered base.

How requests run: one background thread owns the model. It takes the first queued request, waits up to
`--batch_window_ms` (or until `--max_batch_size` requests are queued) for more, groups them by sampling settings
(greedy, or the same temperature and top_p) and runs ONE `model.generate` per group over left-padded prompts, with each
row's own steering prompts and factors. `max_tokens` may differ inside a group: a stopping criterion ends every row at
its own budget (and for a client that went away), so no row gets a wrong or extra token. A request arriving while a
batch runs waits for the next batch. `no_context` models keep each steering prompt's vector in a bounded LRU cache;
other types compute `v` at the prefill of every batch, from each row's own prompt.

Built on FastAPI + uvicorn rather than `transformers serve`: the latter (transformers 5.x, `transformers.cli.serving`)
rejects request fields outside the OpenAI schema, runs requests one at a time (its continuous batching bypasses
`generate` and so the steering hook), and its handler classes are internal, without a stable API to extend.
"""

import argparse
import asyncio
import importlib.util
import json
import logging as std_logging
import math
import queue
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from jinja2.exceptions import TemplateError
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.utils import logging

from .modeling_hypersteer import HyperSteerModel


logger = logging.get_logger(__name__)

# Request fields this server reads; anything else is rejected (never silently ignored).
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
    "user",
)
STEERING_KEYS = ("prompt", "factor")
# How often a non-streaming request checks that its client is still connected.
DISCONNECT_POLL_S = 0.5
# Seconds uvicorn waits for open requests at shutdown before cancelling them (which stops their rows).
GRACEFUL_SHUTDOWN_S = 5
DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ServeError(Exception):
    """An error returned to the client in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        status_code: int = 400,
        error_type: str = "invalid_request_error",
        code: str | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        self.status_code = status_code
        self.error_type = error_type
        self.code = code

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
    vector_cache_size: int = 1024
    default_steering_factor: float = 1.0


# ---------------------------------------------------------------------------------------------------------------
# Requests: validation and per-request state
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ChatJob:
    """One chat-completion request, from validation to its last token.

    The worker thread appends tokens and finishes the job; the event loop that owns the HTTP request receives every
    event through `events` (an `asyncio.Queue` fed with `call_soon_threadsafe`).
    """

    prompt_ids: list[int]
    concepts: list[tuple[str, float]]
    max_tokens: int
    do_sample: bool
    temperature: float
    top_p: float
    stream: bool = False
    include_usage: bool = False
    request_id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    batch_rows: int = 0

    @property
    def sampling_key(self) -> tuple:
        """Rows share a `generate` call only if these settings are equal."""
        return (self.do_sample, self.temperature, self.top_p) if self.do_sample else (False,)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def _emit(self, event: tuple) -> None:
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def add_token(self, token_id: int) -> None:
        self.tokens.append(token_id)
        self._emit(("token", token_id))

    def finish(self, reason: str) -> None:
        if self.finish_reason is None:
            self.finish_reason = reason
            self._emit(("end", reason))

    def fail(self, error: ServeError) -> None:
        if self.finish_reason is None:
            self.finish_reason = "error"
            self._emit(("error", error))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_steering(value, tokenizer, settings: ServeSettings, max_prompt_tokens: int) -> list[tuple[str, float]]:
    """Validate the `steering` field and return `[(steering_prompt, factor), ...]` (empty for the unsteered base)."""
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
        factor = item.get("factor", settings.default_steering_factor)
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
        concepts.append((prompt, float(factor)))
    return concepts


def parse_chat_request(body, tokenizer, settings: ServeSettings, max_prompt_tokens: int, context_limit) -> ChatJob:
    """Validate a `/v1/chat/completions` body and tokenize its prompt; raises [`ServeError`] naming the bad field."""
    if not isinstance(body, dict):
        raise ServeError("The request body must be a JSON object.")
    unknown = sorted(set(body) - set(SUPPORTED_FIELDS))
    if unknown:
        raise ServeError(
            f"Unsupported request fields {unknown}; this server reads {list(SUPPORTED_FIELDS)}.", param=unknown[0]
        )
    model = body.get("model")
    if model is not None and model != settings.model_id:
        raise ServeError(
            f"The model {model!r} does not exist on this server; it serves {settings.model_id!r}.",
            param="model",
            status_code=404,
            code="model_not_found",
        )
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ServeError("`messages` must be a non-empty list of {role, content} objects.", param="messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ServeError(
                f"`messages[{index}]` must be an object with a string `role`.", param=f"messages[{index}]"
            )
        content = message.get("content")
        if isinstance(content, list):
            # OpenAI content parts: only text parts can be read by a text-only model.
            if not all(isinstance(part, dict) and part.get("type") == "text" for part in content):
                raise ServeError(
                    f"`messages[{index}].content` may only hold text parts for this text-only model.",
                    param=f"messages[{index}].content",
                )
            messages[index] = {**message, "content": "".join(str(part.get("text", "")) for part in content)}
        elif not isinstance(content, str):
            raise ServeError(
                f"`messages[{index}].content` must be a string, got {json.dumps(content)}.",
                param=f"messages[{index}].content",
            )
    n = body.get("n", 1)
    if n != 1:
        raise ServeError(f"`n` must be 1 (one choice per request), got {json.dumps(n)}.", param="n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ServeError(f"`stream` must be true or false, got {json.dumps(stream)}.", param="stream")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict) or set(stream_options) - {"include_usage"}:
        raise ServeError("`stream_options` may only hold `include_usage`.", param="stream_options")
    temperature = body.get("temperature", 1.0)
    temperature = 1.0 if temperature is None else temperature
    if not _is_number(temperature) or not math.isfinite(temperature) or not 0 <= temperature <= 2:
        raise ServeError(f"`temperature` must be a number in [0, 2], got {temperature!r}.", param="temperature")
    top_p = body.get("top_p", 1.0)
    top_p = 1.0 if top_p is None else top_p
    if not _is_number(top_p) or not 0 < top_p <= 1:
        raise ServeError(f"`top_p` must be a number in (0, 1], got {top_p!r}.", param="top_p")
    concepts = parse_steering(body.get("steering"), tokenizer, settings, max_prompt_tokens)

    try:
        prompt_ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )
    except (TemplateError, ValueError, TypeError, KeyError) as error:
        # e.g. a template that raises "roles must alternate user/assistant"
        raise ServeError(f"The chat template could not render `messages`: {error}", param="messages") from error
    prompt_ids = list(prompt_ids["input_ids"])

    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        raise ServeError(
            "Pass `max_completion_tokens` or its older name `max_tokens`, not both.", param="max_completion_tokens"
        )
    max_tokens_param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(max_tokens_param)
    if max_tokens is None:
        max_tokens = settings.default_max_tokens
        if context_limit is not None:
            max_tokens = min(max_tokens, context_limit - len(prompt_ids))
        if max_tokens < 1:
            raise ServeError(
                f"The prompt is {len(prompt_ids)} tokens long, which fills the model's context of {context_limit} "
                "tokens; shorten `messages`.",
                param="messages",
            )
    elif not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise ServeError(
            f"`{max_tokens_param}` must be a positive integer, got {max_tokens!r}.", param=max_tokens_param
        )
    elif context_limit is not None and len(prompt_ids) + max_tokens > context_limit:
        raise ServeError(
            f"The prompt ({len(prompt_ids)} tokens) plus `{max_tokens_param}` ({max_tokens}) exceeds the model's "
            f"context of {context_limit} tokens; lower `{max_tokens_param}` to at most "
            f"{context_limit - len(prompt_ids)} or shorten `messages`.",
            param=max_tokens_param,
        )
    return ChatJob(
        prompt_ids=prompt_ids,
        concepts=concepts,
        max_tokens=max_tokens,
        do_sample=temperature > 0,
        temperature=float(temperature),
        top_p=float(top_p),
        stream=stream,
        include_usage=bool(stream_options.get("include_usage", False)),
    )


# ---------------------------------------------------------------------------------------------------------------
# Batched generation
# ---------------------------------------------------------------------------------------------------------------


class _RowStop(StoppingCriteria):
    """Ends each row at its own `max_tokens`, or as soon as its client has gone away."""

    def __init__(self, jobs: Sequence[ChatJob], prompt_length: int):
        self.jobs = jobs
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        generated = input_ids.shape[1] - self.prompt_length
        done = [generated >= job.max_tokens or job.cancelled.is_set() for job in self.jobs]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class _RowStreamer:
    """The `streamer` protocol of `generate` (`put(tokens)` per step, `end()`), routed to each row's job.

    `generate` puts the prompt first, then one token per row per step; rows that have finished keep receiving
    padding, which is ignored.
    """

    def __init__(self, jobs: Sequence[ChatJob], eos_token_ids: set[int]):
        self.jobs = jobs
        self.eos_token_ids = eos_token_ids
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for job, token_id in zip(self.jobs, value.reshape(-1).tolist()):
            if job.done:
                continue
            if job.cancelled.is_set():
                job.finish("cancelled")
            elif token_id in self.eos_token_ids:
                job.finish("stop")
            else:
                job.add_token(token_id)
                if len(job.tokens) >= job.max_tokens:
                    job.finish("length")

    def end(self) -> None:
        for job in self.jobs:
            job.finish("cancelled" if job.cancelled.is_set() else "length")


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
        self.tokenizer = model.tokenizer
        self.settings = settings
        self.pad_token_id = self.tokenizer.pad_token_id
        if self.pad_token_id is None:
            self.pad_token_id = self.tokenizer.eos_token_id
        eos = model.generation_config.eos_token_id
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        self.eos_token_ids = set(eos if isinstance(eos, (list, tuple)) else [eos])
        base_config = model.language_model.config.get_text_config()
        self.context_limit = getattr(base_config, "max_position_embeddings", None)
        self.vector_cache = (
            SteeringVectorCache(model, settings.vector_cache_size)
            if model.config.hypernet_type == "no_context"
            else None
        )
        self.stats = {"batches": 0, "largest_batch": 0, "completed": 0, "cancelled": 0, "running": 0}
        self._queue: queue.Queue[ChatJob] = queue.Queue()
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

    def submit(self, job: ChatJob) -> None:
        self._queue.put(job)

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def _collect(self) -> list[ChatJob]:
        """The next batch: the first queued job, plus whatever arrives within the window, up to `max_batch_size`."""
        try:
            batch = [self._queue.get(timeout=0.1)]
        except queue.Empty:
            return []
        deadline = time.monotonic() + self.settings.batch_window_ms / 1000
        while len(batch) < self.settings.max_batch_size:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except queue.Empty:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(self._queue.get(timeout=remaining))
            except queue.Empty:
                break
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
            groups: dict[tuple, list[ChatJob]] = {}
            for job in live:
                groups.setdefault(job.sampling_key, []).append(job)
            for jobs in groups.values():
                self._run_group(jobs)

    def _run_group(self, jobs: list[ChatJob]) -> None:
        self.stats["batches"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(jobs))
        self.stats["running"] = len(jobs)
        for job in jobs:
            job.batch_rows = len(jobs)
        try:
            self.generate(jobs)
        except Exception as error:  # a failed batch must not take the server down; every client gets the error
            logger.error(f"Generation failed for a batch of {len(jobs)} requests: {error!r}")
            for job in jobs:
                job.fail(ServeError(f"Generation failed: {error}", status_code=500, error_type="server_error"))
        finally:
            self.stats["running"] = 0
        for job in jobs:
            self.stats["cancelled" if job.finish_reason == "cancelled" else "completed"] += 1

    def steering_arguments(self, jobs: Sequence[ChatJob]) -> dict | None:
        """`generate` keyword arguments that steer each row by its own concepts; `None` when no row is steered.

        Every row is composed (`steering_prompt=[[...], ...]`; an unsteered row has no concepts and gets exactly the
        base's output). `no_context` models instead pass cached per-prompt vectors: a row's `v_1` with its factor,
        or `sum_k factor_k * v_k` with factor 1 — except with a token gate, whose per-concept gates need the
        composed prompts.
        """
        rows = [job.concepts for job in jobs]
        if not any(rows):
            return None
        composable = not self.model.config.token_gate or all(len(concepts) <= 1 for concepts in rows)
        if self.vector_cache is not None and composable:
            vectors = self.vector_cache.get([prompt for concepts in rows for prompt, _ in concepts])
            parameter = self.model.hypernetwork.output_projection.weight
            row_vectors, factors = [], []
            for concepts in rows:
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
            "steering_prompt": [[prompt for prompt, _ in concepts] for concepts in rows],
            "steering_factor": [[factor for _, factor in concepts] for concepts in rows],
        }

    def generate(self, jobs: Sequence[ChatJob]) -> None:
        """Run one `generate` over the jobs' left-padded prompts; tokens reach each job through the streamer."""
        length = max(len(job.prompt_ids) for job in jobs)
        input_ids = torch.full((len(jobs), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(jobs), length), dtype=torch.long)
        for row, job in enumerate(jobs):
            input_ids[row, length - len(job.prompt_ids) :] = torch.tensor(job.prompt_ids)
            attention_mask[row, length - len(job.prompt_ids) :] = 1
        device = self.model.get_input_embeddings().weight.device
        generation_kwargs = {
            "input_ids": input_ids.to(device),
            "attention_mask": attention_mask.to(device),
            "max_new_tokens": max(job.max_tokens for job in jobs),
            "pad_token_id": self.pad_token_id,
            "stopping_criteria": StoppingCriteriaList([_RowStop(jobs, length)]),
            "streamer": _RowStreamer(jobs, self.eos_token_ids),
        }
        if jobs[0].do_sample:
            generation_kwargs.update(do_sample=True, temperature=jobs[0].temperature, top_p=jobs[0].top_p, top_k=None)
        else:
            generation_kwargs["do_sample"] = False
        steering = self.steering_arguments(jobs)
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


def build_app(engine: BatchingEngine):
    """The FastAPI application serving `engine`'s model."""
    _require_serving_dependencies()
    from fastapi import FastAPI, Request
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
    tokenizer = engine.tokenizer
    max_prompt_tokens = engine.model.config.max_steering_prompt_length
    started = int(time.time())

    def usage(job: ChatJob) -> CompletionUsage:
        return CompletionUsage(
            prompt_tokens=len(job.prompt_ids),
            completion_tokens=len(job.tokens),
            total_tokens=len(job.prompt_ids) + len(job.tokens),
        )

    def decode(token_ids: list[int]) -> str:
        return tokenizer.decode(token_ids, skip_special_tokens=True)

    def chunk(job: ChatJob, delta: ChoiceDelta | None, finish_reason=None, with_usage=False) -> str:
        choices = (
            [] if delta is None else [ChunkChoice(index=0, delta=delta, finish_reason=finish_reason, logprobs=None)]
        )
        payload = ChatCompletionChunk(
            id=job.request_id,
            object="chat.completion.chunk",
            created=job.created,
            model=settings.model_id,
            choices=choices,
            **({"usage": usage(job)} if with_usage else {}),
        )
        return f"data: {payload.model_dump_json(exclude_unset=True)}\n\n"

    def error_response(error: ServeError) -> JSONResponse:
        return JSONResponse(error.to_dict(), status_code=error.status_code)

    async def stream_events(job: ChatJob):
        try:
            yield chunk(job, ChoiceDelta(role="assistant", content=""))
            sent = ""
            while True:
                kind, value = await job.events.get()
                if kind == "error":
                    yield f"data: {json.dumps(value.to_dict())}\n\n"
                    return
                if kind == "end":
                    break
                text = decode(job.tokens)
                # Hold back an incomplete multi-byte character until the next token completes it.
                if not text.endswith("\ufffd") and text.startswith(sent) and len(text) > len(sent):
                    yield chunk(job, ChoiceDelta(content=text[len(sent) :]))
                    sent = text
            text = decode(job.tokens)
            if text.startswith(sent) and len(text) > len(sent):
                yield chunk(job, ChoiceDelta(content=text[len(sent) :]))
            yield chunk(job, ChoiceDelta(), finish_reason=job.finish_reason)
            if job.include_usage:
                yield chunk(job, None, with_usage=True)
            yield "data: [DONE]\n\n"
        finally:
            # A client that disconnects mid-stream ends up here: its row stops at the next decoding step.
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
        return JSONResponse(
            ServeError(str(error.detail), status_code=error.status_code, error_type=kind).to_dict(),
            status_code=error.status_code,
        )

    @app.get("/health")
    async def health():
        status = {"status": "ok", "model": settings.model_id, "queued": engine.queued, **engine.stats}
        cache = engine.vector_cache
        if cache is not None:
            status["vector_cache"] = {"size": len(cache.vectors), "hits": cache.hits, "misses": cache.misses}
        return status

    @app.get("/v1/models")
    async def models():
        model = Model(id=settings.model_id, created=started, object="model", owned_by="hypersteer")
        return {"object": "list", "data": [model.model_dump(exclude_unset=True)]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ServeError(f"The request body is not valid JSON: {error}") from error
        job = parse_chat_request(body, tokenizer, settings, max_prompt_tokens, engine.context_limit)
        job.loop = asyncio.get_running_loop()
        job.events = asyncio.Queue()
        engine.submit(job)
        if job.stream:
            return StreamingResponse(
                stream_events(job), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(job.events.get(), timeout=DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return None  # nobody to answer; `finally` frees the row
                    continue
                if kind == "error":
                    return error_response(value)
                if kind == "end":
                    break
        finally:
            # A client that went away (or a server shutting down) stops its row at the next decoding step.
            if not job.done:
                job.cancelled.set()
        completion = ChatCompletion(
            id=job.request_id,
            object="chat.completion",
            created=job.created,
            model=settings.model_id,
            choices=[
                Choice(
                    index=0,
                    message=ChatCompletionMessage(role="assistant", content=decode(job.tokens)),
                    finish_reason=job.finish_reason,
                    logprobs=None,
                )
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
    parser.add_argument("--dtype", default="auto", choices=sorted(DTYPES), help="Dtype of the frozen base model.")
    parser.add_argument("--device_map", default=None, help="`device_map` for the base model, e.g. 'auto' or 'cuda:0'.")
    parser.add_argument("--max_batch_size", type=int, default=8, help="Most requests run in one `generate` call.")
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
        "--vector_cache_size", type=int, default=1024, help="Steering vectors kept per prompt (no_context models)."
    )
    parser.add_argument("--served_model_name", default=None, help="Model id clients send (defaults to `model`).")
    parser.add_argument("--log_level", default="info", help="uvicorn log level.")
    return parser


def _check_arguments(args: argparse.Namespace) -> None:
    for name in ("max_batch_size", "max_concepts", "default_max_tokens", "vector_cache_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"`--{name}` must be at least 1, got {getattr(args, name)}.")
    if args.batch_window_ms < 0:
        raise ValueError(f"`--batch_window_ms` must be >= 0, got {args.batch_window_ms}.")
    if not math.isfinite(args.max_steering_factor) or args.max_steering_factor <= 0:
        raise ValueError(f"`--max_steering_factor` must be a positive finite number, got {args.max_steering_factor}.")


def load_engine(args: argparse.Namespace) -> BatchingEngine:
    """Load the model named on the command line and wrap it in a (not yet started) [`BatchingEngine`]."""
    load_kwargs = {"dtype": DTYPES[args.dtype]}
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
        vector_cache_size=args.vector_cache_size,
        default_steering_factor=model.config.default_steering_factor,
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
    logger.info(
        f"Serving {engine.settings.model_id} ({engine.model.config.hypernet_type}) on http://{args.host}:{args.port} "
        f"(max_batch_size={args.max_batch_size}, batch_window_ms={args.batch_window_ms})"
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


__all__ = ["BatchingEngine", "ServeError", "ServeSettings", "build_app", "main", "make_parser", "parse_chat_request"]
