"""A loopback HTTP server speaking the OpenAI chat-completions protocol, for tests of the judge and the teacher.

It is a real server (`http.server.ThreadingHTTPServer` on 127.0.0.1, port chosen by the OS) driven through the real
`openai` client. Answers are a deterministic function of the request:

- a judge prompt (recognised by the first line of one of `modeling_hypersteer.judge.JUDGE_TEMPLATES`) gets
  `"... Rating: [[x]]"`, where x comes from a marker `concept=2` / `instruction=1` / `fluency=0` written in the
  prompt (tests put them in the generation), else from a hash of the prompt ([`stub_rating`]);
- any other prompt (e.g. a teacher prompt) gets `"Stub answer <hash>: <the last user message>"`, which therefore
  contains the concept and the instruction.

Failures are scripted with rules, checked in the order they were added: [`OpenAIStubServer.fail_next`] applies a
behaviour to the next N requests, [`OpenAIStubServer.fail_matching`] to requests whose messages contain a substring
(N times or always). Behaviours: `"rate_limit"` (429 + `Retry-After`), `"server_error"` (500 or `status`),
`"bad_request"` (400), `"garbage"` (200 without a rating), `"slow"` (answers after `delay` seconds, beyond a
client's timeout), `"empty"` (200 with `content: null`), `"truncated"` (the first half of the usual answer with
`finish_reason: "length"`, as when `max_tokens` cuts it).

Every wait inside the server is bounded (and cut short when the server stops); `wait_for_requests` polls with a
deadline.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from modeling_hypersteer.judge import JUDGE_ASPECTS, JUDGE_TEMPLATES


class _LoopbackServer(ThreadingHTTPServer):
    # The default listen backlog (5) drops connections when a client opens 16 at once on a busy machine; the
    # dropped ones would be retried and counted as extra paid requests.
    request_queue_size = 128
    daemon_threads = True


BEHAVIOURS = ("ok", "rate_limit", "server_error", "bad_request", "garbage", "slow", "empty", "truncated")
GARBAGE_TEXT = "Hmm, hard to say. I would lean towards a decent answer overall."
_MARKER_PATTERN = re.compile(r"\b(concept|instruction|fluency)=([0-2](?:\.\d+)?)\b")
_JUDGE_HEADERS = {aspect: JUDGE_TEMPLATES[aspect].split("\n", 1)[0] for aspect in JUDGE_ASPECTS}


def prompt_hash(text: str) -> int:
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest(), 16)


def judge_aspect(prompt: str) -> str | None:
    """The judge aspect a prompt asks about, or `None` for a non-judge prompt."""
    for aspect, header in _JUDGE_HEADERS.items():
        if prompt.startswith(header):
            return aspect
    return None


def stub_rating(prompt: str) -> int | float:
    """The rating the stub gives a judge prompt: its `<aspect>=<x>` marker if present, else sha256(prompt) mod 3."""
    aspect = judge_aspect(prompt)
    if aspect is None:
        raise ValueError("Not a judge prompt.")
    for marker_aspect, value in _MARKER_PATTERN.findall(prompt):
        if marker_aspect == aspect:
            return float(value) if "." in value else int(value)
    return prompt_hash(prompt) % 3


def default_answer(body: dict[str, Any]) -> str:
    """The deterministic answer to a chat-completions request body."""
    prompt = last_user_message(body)
    aspect = judge_aspect(prompt)
    if aspect is not None:
        return f"The {aspect} criterion was checked carefully.\nRating: [[{stub_rating(prompt)}]]"
    return f"Stub answer {prompt_hash(prompt) % 10**8:08d}: {prompt}"


def last_user_message(body: dict[str, Any]) -> str:
    messages = body.get("messages") or []
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):  # content parts
                return "".join(part.get("text", "") for part in content if isinstance(part, dict))
            return str(content)
    return ""


@dataclass
class Behaviour:
    """What the server does with one request."""

    kind: str = "ok"
    retry_after: str | None = "0"
    status: int = 500
    delay: float = 0.0
    text: str = GARBAGE_TEXT

    def __post_init__(self):
        if self.kind not in BEHAVIOURS:
            raise ValueError(f"Unknown stub behaviour {self.kind!r}; choose one of {BEHAVIOURS}.")


@dataclass
class _Rule:
    behaviour: Behaviour
    match: str | None
    remaining: int | None  # None: forever


@dataclass
class ReceivedRequest:
    prompt: str
    model: str
    behaviour: str
    body: dict[str, Any] = field(repr=False)


class OpenAIStubServer:
    """A scriptable OpenAI chat-completions server on 127.0.0.1 (see the module docstring).

    Example:

    ```python
    with OpenAIStubServer() as server:
        server.fail_next(2, "rate_limit")
        client = CachedChatClient(base_url=server.base_url, initial_backoff=0.01)
    ```
    """

    def __init__(self, responder: Callable[[dict[str, Any]], str] = default_answer, max_delay: float = 30.0):
        self.responder = responder
        self.max_delay = max_delay
        self._rules: list[_Rule] = []
        self._received: list[ReceivedRequest] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd: _LoopbackServer | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> OpenAIStubServer:
        handler = type("_BoundHandler", (_Handler,), {"stub": self})
        self._httpd = _LoopbackServer(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> OpenAIStubServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("The stub server is not started.")
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # ---- scripting -------------------------------------------------------------------------------------------
    def fail_next(self, n: int, kind: str, **behaviour_kwargs) -> None:
        """Applies behaviour `kind` to the next `n` requests (whatever they ask)."""
        with self._lock:
            self._rules.append(_Rule(Behaviour(kind, **behaviour_kwargs), match=None, remaining=n))

    def fail_matching(self, substring: str, kind: str, times: int | None = None, **behaviour_kwargs) -> None:
        """Applies behaviour `kind` to requests whose messages contain `substring`: `times` times, or always."""
        with self._lock:
            self._rules.append(_Rule(Behaviour(kind, **behaviour_kwargs), match=substring, remaining=times))

    def clear_rules(self) -> None:
        with self._lock:
            self._rules.clear()

    def reset(self) -> None:
        """Clears the rules and the record of received requests."""
        with self._lock:
            self._rules.clear()
            self._received.clear()

    # ---- observation -----------------------------------------------------------------------------------------
    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self._received)

    @property
    def requests(self) -> list[ReceivedRequest]:
        with self._lock:
            return list(self._received)

    def prompts(self) -> list[str]:
        return [request.prompt for request in self.requests]

    def wait_for_requests(self, count: int, timeout: float = 20.0) -> None:
        """Blocks until `count` requests were received; raises `TimeoutError` after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while self.request_count < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"The stub server received {self.request_count} requests, expected {count}.")
            time.sleep(0.01)

    # ---- internals -------------------------------------------------------------------------------------------
    def _choose(self, body: dict[str, Any]) -> tuple[Behaviour, str]:
        prompt = last_user_message(body)
        haystack = "\n".join(str(message.get("content")) for message in body.get("messages") or [])
        with self._lock:
            behaviour = Behaviour("ok")
            for rule in self._rules:
                if rule.remaining == 0:
                    continue
                if rule.match is not None and rule.match not in haystack:
                    continue
                if rule.remaining is not None:
                    rule.remaining -= 1
                behaviour = rule.behaviour
                break
            self._received.append(ReceivedRequest(prompt, str(body.get("model")), behaviour.kind, body))
        return behaviour, prompt

    def _wait(self, seconds: float) -> None:
        self._stopping.wait(min(seconds, self.max_delay))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30  # idle keep-alive connections are closed after this many seconds
    stub: OpenAIStubServer

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - silence the default stderr access log
        return

    def _send_json(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode("utf-8")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (e.g. timed out); nothing to do
            self.close_connection = True

    def _error(self, status: int, message: str, error_type: str, headers: dict[str, str] | None = None) -> None:
        error = {"message": message, "type": error_type, "param": None, "code": None}
        self._send_json(status, {"error": error}, headers)

    def do_GET(self) -> None:  # noqa: N802
        if self.path.rstrip("/").endswith("/models"):
            model = {"id": "stub-model", "object": "model", "owned_by": "stub"}
            self._send_json(200, {"object": "list", "data": [model]})
        else:
            self._error(404, f"Unknown path {self.path}", "invalid_request_error")

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not self.path.rstrip("/").endswith("/chat/completions"):
            self._error(404, f"Unknown path {self.path}", "invalid_request_error")
            return
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError:
            self._error(400, "The body is not valid JSON.", "invalid_request_error")
            return
        behaviour, prompt = self.stub._choose(body)
        if behaviour.kind == "rate_limit":
            headers = {} if behaviour.retry_after is None else {"Retry-After": behaviour.retry_after}
            self._error(429, "Rate limit reached (stub).", "rate_limit_exceeded", headers)
            return
        if behaviour.kind == "server_error":
            self._error(behaviour.status, "The server had an error (stub).", "server_error")
            return
        if behaviour.kind == "bad_request":
            self._error(400, "Invalid request (stub).", "invalid_request_error")
            return
        if behaviour.kind == "slow":
            self.stub._wait(behaviour.delay)
        if behaviour.kind == "garbage":
            text: str | None = behaviour.text
        elif behaviour.kind == "empty":
            text = None
        else:
            text = self.stub.responder(body)
        finish_reason = "stop"
        if behaviour.kind == "truncated":
            # The answer as an endpoint returns it when `max_tokens` stops it: cut, with finish_reason "length".
            text, finish_reason = text[: len(text) // 2], "length"
        completion_tokens = len((text or "").split())
        prompt_tokens = len(prompt.split())
        self._send_json(
            200,
            {
                "id": f"chatcmpl-stub-{prompt_hash(prompt) % 10**12}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": str(body.get("model", "stub-model")),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": finish_reason,
                        "logprobs": None,
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            },
        )


@pytest.fixture
def openai_stub():
    """A started [`OpenAIStubServer`]; stopped after the test."""
    server = OpenAIStubServer().start()
    try:
        yield server
    finally:
        server.stop()
