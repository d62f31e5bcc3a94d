# Copyright 2025 The HyperSteer Authors. Licensed under the Apache License, Version 2.0.
"""A cached, concurrent, retrying client for OpenAI-compatible chat-completion endpoints.

It is shared by the AxBench judge (`modeling_hypersteer.judge`) and the teacher of `generate_concept_data.py`.
Any endpoint that speaks the OpenAI chat-completions protocol works (OpenAI, vLLM, llama.cpp's server, TGI...).

Guarantees:

- **Nothing is paid for twice.** Every successful answer is written to an sqlite cache on disk the moment it
  arrives (one committed transaction per answer, WAL journal), so a run killed at any point (even `kill -9`) resumes
  from what it already received. The key is a SHA-256 of the endpoint (`base_url`), the model, the messages and every
  sampling setting, so one cache file shared by several servers never answers for the wrong one.
  Identical requests inside one batch are sent once.
- **Failures are explicit.** Rate limits (429), server errors (5xx), timeouts and connection errors are retried
  with exponential backoff and jitter (honouring `Retry-After`); other errors fail at once. A request that still
  fails comes back as a [`ChatResult`] whose `status` is `"failed: <reason>"`: nothing is silently replaced.
- **Observable cost.** `requests_sent` counts HTTP requests actually sent (retries included) and `cache_hits` the
  answers served from disk, so tests and users can check that a repeated run sends nothing.

Example:

```python
>>> from modeling_hypersteer.openai_client import CachedChatClient, ChatRequest
>>> client = CachedChatClient(model="gpt-4o-mini", cache_path="judge_cache.sqlite")  # reads OPENAI_API_KEY
>>> results = client.complete_many_sync([ChatRequest(messages=[{"role": "user", "content": "Say hi."}])])
>>> results[0].status, results[0].text
('ok', 'Hi!')
```
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import random
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import openai
from transformers.utils import logging


logger = logging.get_logger(__name__)

DEFAULT_OPENAI_BASE_URL = "https://api.openai.com/v1"
_OPENAI_HOSTS = ("api.openai.com",)
# Status codes worth retrying: request timeout, conflict/lock, rate limit, and every server error.
_RETRYABLE_STATUS_CODES = frozenset({408, 409, 429})
_T = TypeVar("_T")


@dataclass
class ChatRequest:
    """One chat-completion request.

    Args:
        messages (`list[dict[str, str]]`):
            The conversation, e.g. `[{"role": "user", "content": "..."}]`.
        model (`str`, *optional*):
            The model to ask; defaults to the client's `model`.
        temperature (`float`, *optional*, defaults to 0.0):
            Sampling temperature. Part of the cache key.
        max_tokens (`int`, *optional*):
            Maximum number of generated tokens (not sent when `None`). Part of the cache key.
        sampling_kwargs (`dict`, *optional*):
            Any other sampling setting passed to `chat.completions.create` (`top_p`, `seed`, `stop`...). Part of
            the cache key.
    """

    messages: list[dict[str, str]]
    model: str | None = None
    temperature: float = 0.0
    max_tokens: int | None = None
    sampling_kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_any(cls, request: ChatRequest | Mapping[str, Any] | str) -> ChatRequest:
        """Builds a request from a `ChatRequest`, a dict of its fields, or a plain user-message string."""
        if isinstance(request, ChatRequest):
            return request
        if isinstance(request, str):
            return cls(messages=[{"role": "user", "content": request}])
        if isinstance(request, Mapping):
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(request) - known)
            if unknown:
                raise ValueError(
                    f"Unknown ChatRequest field(s) {unknown}; allowed fields are {sorted(known)} "
                    "(put other sampling settings under `sampling_kwargs`)."
                )
            return cls(**request)
        raise TypeError(
            f"A request must be a ChatRequest, a dict of its fields or a string, got {type(request).__name__}."
        )

    def validate(self) -> None:
        if not isinstance(self.messages, list) or not self.messages:
            raise ValueError(f"ChatRequest.messages must be a non-empty list of messages, got {self.messages!r}.")
        for message in self.messages:
            if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
                raise ValueError(f"Each message must be a dict with 'role' and 'content' keys, got {message!r}.")


@dataclass
class ChatResult:
    """The outcome of one [`ChatRequest`].

    Args:
        text (`str`, *optional*):
            The answer's text; `None` when the request failed.
        status (`str`):
            `"ok"`, or `"failed: <reason>"` after all retries (the reason names the last error).
        from_cache (`bool`):
            Whether the answer was read from the disk cache (no request sent).
        attempts (`int`):
            HTTP requests sent for this result (0 for a cache hit).
        finish_reason (`str`, *optional*):
            The endpoint's `finish_reason` (`"stop"`, `"length"`...).
    """

    text: str | None
    status: str
    from_cache: bool = False
    attempts: int = 0
    finish_reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def request_cache_key(request: ChatRequest, model: str, base_url: str) -> str:
    """SHA-256 of everything that determines an answer: the endpoint, model, messages, temperature, max_tokens and
    other settings. The same model name on two servers (e.g. two vLLM hosts serving different weights as "judge") gets
    two keys."""
    payload = {
        "base_url": base_url.rstrip("/"),
        "model": model,
        "messages": [dict(message) for message in request.messages],
        "temperature": float(request.temperature),
        "max_tokens": request.max_tokens,
        "sampling_kwargs": request.sampling_kwargs,
    }
    encoded = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(encoded.encode("utf-8")).hexdigest()


class ResponseCache:
    """A crash-safe key → answer store in one sqlite file.

    Each answer is committed on its own (WAL journal), so a process killed at any moment loses at most the
    answers that had not arrived yet. Safe to share between processes; sqlite serialises the writers.

    Args:
        path (`str` or `os.PathLike`):
            The sqlite file; its parent folder is created if needed.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.exists() and self.path.is_dir():
            raise ValueError(f"cache_path {str(self.path)!r} is a directory; pass a file path such as 'cache.sqlite'.")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._connection = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False, timeout=60)
        try:
            self._connection.execute("PRAGMA journal_mode=WAL")
            self._connection.execute("PRAGMA synchronous=NORMAL")
            self._connection.execute(
                "CREATE TABLE IF NOT EXISTS completions ("
                "key TEXT PRIMARY KEY, model TEXT NOT NULL, request TEXT NOT NULL, response TEXT NOT NULL, "
                "created REAL NOT NULL)"
            )
        except sqlite3.DatabaseError as error:
            self._connection.close()
            raise ValueError(
                f"cache_path {str(self.path)!r} is not a usable sqlite cache ({error}); delete it or choose another "
                "path."
            ) from error

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._connection.execute("SELECT response FROM completions WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, key: str, model: str, request: ChatRequest, response: Mapping[str, Any]) -> None:
        request_json = json.dumps(dataclasses.asdict(request), ensure_ascii=False, default=str)
        with self._lock:
            self._connection.execute(
                "INSERT OR REPLACE INTO completions (key, model, request, response, created) VALUES (?, ?, ?, ?, ?)",
                (key, model, request_json, json.dumps(dict(response), ensure_ascii=False), time.time()),
            )

    def __len__(self) -> int:
        with self._lock:
            return self._connection.execute("SELECT COUNT(*) FROM completions").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._connection.close()


def _is_openai_host(base_url: str) -> bool:
    return (urlparse(base_url).hostname or "").lower() in _OPENAI_HOSTS


def _retry_after_seconds(error: openai.APIStatusError) -> float | None:
    """Seconds asked for by a `Retry-After` / `retry-after-ms` header, if any and numeric."""
    headers = getattr(error.response, "headers", None)
    if headers is None:
        return None
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return max(0.0, float(value) / divisor)
        except ValueError:
            continue
    return None


def _describe_error(error: Exception) -> str:
    if isinstance(error, openai.APIStatusError):
        message = str(error).replace("\n", " ")
        return f"{type(error).__name__} {error.status_code}: {message[:200]}"
    return f"{type(error).__name__}: {str(error)[:200]}"


class CachedChatClient:
    """Concurrent chat completions against an OpenAI-compatible endpoint, with retries and a disk cache.

    The `openai.AsyncOpenAI` client is built with `max_retries=0`: retries are done here so that each attempt is
    counted and the backoff is under our control (exponential, `initial_backoff * 2**k` up to `max_backoff`, times a
    random jitter in [0.5, 1.5), and at least the server's `Retry-After`).

    Args:
        model (`str`, *optional*, defaults to `"gpt-4o-mini"`):
            Default model for requests that do not name one.
        base_url (`str`, *optional*):
            The endpoint, e.g. `"http://127.0.0.1:8000/v1"` for a local vLLM server. Defaults to `$OPENAI_BASE_URL`
            if set, else OpenAI's API.
        api_key_env (`str`, *optional*, defaults to `"OPENAI_API_KEY"`):
            Name of the environment variable holding the API key. Required for OpenAI's API; for any other
            endpoint a missing key is replaced by a dummy one.
        cache_path (`str` or `os.PathLike`, *optional*):
            sqlite file of cached answers. `None` disables the cache (every call is paid).
        max_concurrency (`int`, *optional*, defaults to 16):
            Maximum number of requests in flight.
        max_retries (`int`, *optional*, defaults to 5):
            Retries after the first attempt for retryable errors (429, 408, 409, 5xx, timeouts, connection errors).
        initial_backoff (`float`, *optional*, defaults to 1.0):
            Seconds before the first retry; doubles at each retry.
        max_backoff (`float`, *optional*, defaults to 60.0):
            Upper bound of one wait, including a server's `Retry-After`.
        timeout (`float`, *optional*, defaults to 60.0):
            Seconds before one HTTP request is abandoned (and retried).
        seed (`int`, *optional*):
            Seed of the jitter's random generator, for reproducible waits.

    Attributes:
        requests_sent (`int`): HTTP requests sent so far, retries included.
        cache_hits (`int`): results served from the disk cache.
        failed_results (`int`): results returned with a `"failed: ..."` status.
    """

    def __init__(
        self,
        model: str = "gpt-4o-mini",
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        cache_path: str | os.PathLike | None = None,
        max_concurrency: int = 16,
        max_retries: int = 5,
        initial_backoff: float = 1.0,
        max_backoff: float = 60.0,
        timeout: float = 60.0,
        seed: int | None = None,
    ):
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}.")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}.")
        if initial_backoff < 0 or max_backoff < 0:
            raise ValueError(f"initial_backoff and max_backoff must be >= 0, got {initial_backoff} and {max_backoff}.")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}.")
        self.model = model
        self.base_url = base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_OPENAI_BASE_URL
        self.api_key_env = api_key_env
        api_key = os.environ.get(api_key_env)
        if not api_key:
            if _is_openai_host(self.base_url):
                raise ValueError(
                    f"The environment variable {api_key_env} is not set, and the endpoint {self.base_url} needs an "
                    f"API key. Export it (`export {api_key_env}=...`), name another variable with `api_key_env`, or "
                    "point `base_url` at a local OpenAI-compatible server."
                )
            api_key = "EMPTY"
        self._api_key = api_key
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self.timeout = timeout
        self._rng = random.Random(seed)
        self.cache = ResponseCache(cache_path) if cache_path is not None else None
        self.requests_sent = 0
        self.cache_hits = 0
        self.failed_results = 0

    def __repr__(self) -> str:
        cache = None if self.cache is None else str(self.cache.path)
        return (
            f"{type(self).__name__}(model={self.model!r}, base_url={self.base_url!r}, cache_path={cache!r}, "
            f"max_concurrency={self.max_concurrency}, max_retries={self.max_retries})"
        )

    def reset_counters(self) -> None:
        """Sets `requests_sent`, `cache_hits` and `failed_results` back to 0."""
        self.requests_sent = self.cache_hits = self.failed_results = 0

    def close(self) -> None:
        """Closes the cache file."""
        if self.cache is not None:
            self.cache.close()

    def _backoff_seconds(self, retry_index: int, retry_after: float | None) -> float:
        delay = min(self.max_backoff, self.initial_backoff * (2**retry_index)) * self._rng.uniform(0.5, 1.5)
        if retry_after is not None:
            delay = max(delay, retry_after)
        return min(delay, self.max_backoff)

    async def _send(
        self,
        client: openai.AsyncOpenAI,
        request: ChatRequest,
        model: str,
        key: str,
        semaphore: asyncio.Semaphore,
        cache_filter: Callable[[str], bool] | None,
    ) -> ChatResult:
        """Sends one request with retries; caches the answer if it is a success (and passes `cache_filter`)."""
        kwargs: dict[str, Any] = dict(request.sampling_kwargs)
        if request.max_tokens is not None:
            kwargs["max_tokens"] = request.max_tokens
        attempts = 0
        reason = "not attempted"
        while True:
            retry_after: float | None = None
            async with semaphore:
                attempts += 1
                self.requests_sent += 1
                try:
                    completion = await client.chat.completions.create(
                        model=model, messages=request.messages, temperature=request.temperature, **kwargs
                    )
                except openai.APIStatusError as error:
                    reason = _describe_error(error)
                    retryable = error.status_code in _RETRYABLE_STATUS_CODES or error.status_code >= 500
                    retry_after = _retry_after_seconds(error)
                except (openai.APITimeoutError, openai.APIConnectionError) as error:
                    reason = _describe_error(error)
                    retryable = True
                except openai.APIResponseValidationError as error:
                    reason = _describe_error(error)
                    retryable = False
                else:
                    choices = completion.choices or []
                    text = choices[0].message.content if choices else None
                    if text is None:
                        reason = "the response has no message content"
                        retryable = False
                    else:
                        finish_reason = choices[0].finish_reason
                        if self.cache is not None and (cache_filter is None or cache_filter(text)):
                            # Written inside the semaphore, before the next request can start: a kill at any later
                            # point keeps this answer.
                            self.cache.put(key, model, request, {"text": text, "finish_reason": finish_reason})
                        return ChatResult(text=text, status="ok", attempts=attempts, finish_reason=finish_reason)
            if not retryable or attempts > self.max_retries:
                if retryable:
                    reason = f"{reason} (gave up after {attempts} attempts)"
                self.failed_results += 1
                return ChatResult(text=None, status=f"failed: {reason}", attempts=attempts)
            delay = self._backoff_seconds(attempts - 1, retry_after)
            logger.info(f"Retrying a request to {model} in {delay:.2f}s (attempt {attempts + 1}): {reason}")
            await asyncio.sleep(delay)

    async def complete_many(
        self,
        requests: Sequence[ChatRequest | Mapping[str, Any] | str],
        desc: str = "Chat completions",
        callback: Callable[[int, ChatResult], None] | None = None,
        cache_filter: Callable[[str], bool] | None = None,
        show_progress: bool = True,
    ) -> list[ChatResult]:
        """Answers all `requests` concurrently, from the cache where possible; results are in the input order.

        Args:
            requests (`Sequence[ChatRequest | dict | str]`):
                The requests (a string is one user message).
            desc (`str`, *optional*):
                Label of the progress bar.
            callback (`Callable[[int, ChatResult], None]`, *optional*):
                Called as `callback(index, result)` as soon as each result is known (cache hits first), e.g. to
                append finished rows to a file. Called once per input index.
            cache_filter (`Callable[[str], bool]`, *optional*):
                A successful answer is cached only if `cache_filter(text)` is true (e.g. "contains a parsable
                rating"), so that a rerun asks again for answers that were useless. It is still returned.
            show_progress (`bool`, *optional*, defaults to `True`):
                Show a tqdm progress bar (also silenced by `transformers.utils.logging.disable_progress_bar()`).

        Returns:
            `list[ChatResult]`: one result per request. Failures are results with a `"failed: ..."` status; this
            method raises only for invalid requests.
        """
        parsed = [ChatRequest.from_any(request) for request in requests]
        for request in parsed:
            request.validate()
        results: list[ChatResult | None] = [None] * len(parsed)
        progress = logging.tqdm(total=len(parsed), desc=desc, disable=not show_progress or not parsed)

        def finish(index: int, result: ChatResult) -> None:
            results[index] = result
            progress.update(1)
            if callback is not None:
                callback(index, result)

        # Group identical requests: each distinct key is looked up once and sent at most once.
        pending: dict[str, list[int]] = {}
        models: dict[str, str] = {}
        try:
            for index, request in enumerate(parsed):
                model = request.model or self.model
                key = request_cache_key(request, model, self.base_url)
                cached = self.cache.get(key) if self.cache is not None else None
                if cached is not None:
                    self.cache_hits += 1
                    finish(
                        index,
                        ChatResult(
                            text=cached["text"],
                            status="ok",
                            from_cache=True,
                            finish_reason=cached.get("finish_reason"),
                        ),
                    )
                else:
                    pending.setdefault(key, []).append(index)
                    models[key] = model
            if pending:
                from_cache = len(parsed) - sum(map(len, pending.values()))
                logger.info(
                    f"{desc}: {from_cache} of {len(parsed)} answers from the cache, {len(pending)} distinct requests "
                    f"to send to {self.base_url}."
                )
                semaphore = asyncio.Semaphore(self.max_concurrency)
                async with openai.AsyncOpenAI(
                    base_url=self.base_url, api_key=self._api_key, max_retries=0, timeout=self.timeout
                ) as client:

                    async def run(key: str, indices: list[int]) -> None:
                        result = await self._send(
                            client, parsed[indices[0]], models[key], key, semaphore, cache_filter
                        )
                        for position, index in enumerate(indices):
                            finish(index, result if position == 0 else dataclasses.replace(result, attempts=0))

                    await asyncio.gather(*(run(key, indices) for key, indices in pending.items()))
        finally:
            progress.close()
        failures = sum(1 for result in results if result is not None and not result.ok)
        if failures:
            logger.warning(f"{desc}: {failures} of {len(parsed)} requests failed after retries.")
        return results  # type: ignore[return-value]

    async def complete(self, request: ChatRequest | Mapping[str, Any] | str, **kwargs) -> ChatResult:
        """Answers a single request (see [`~CachedChatClient.complete_many`])."""
        return (await self.complete_many([request], show_progress=False, **kwargs))[0]

    def complete_many_sync(
        self, requests: Sequence[ChatRequest | Mapping[str, Any] | str], **kwargs
    ) -> list[ChatResult]:
        """Synchronous [`~CachedChatClient.complete_many`]; works inside a running event loop too (e.g. Jupyter)."""
        return run_sync(self.complete_many(requests, **kwargs))


def run_sync(awaitable: Awaitable[_T]) -> _T:
    """Runs a coroutine to completion from synchronous code, even when this thread already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(awaitable)  # type: ignore[arg-type]
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as executor:
        return executor.submit(asyncio.run, awaitable).result()  # type: ignore[arg-type]


__all__ = ["CachedChatClient", "ChatRequest", "ChatResult", "ResponseCache", "request_cache_key", "run_sync"]
