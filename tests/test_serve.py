"""`hypersteer-serve`: the real server process on 127.0.0.1, driven by the official `openai` client (and raw HTTP
for exact error shapes and a client that disconnects mid-stream).

Every server completion under greedy decoding is compared token for token with `model.generate` on the same prompt,
steering prompts and factors, run in this process on the very same saved model.
"""

import http.client
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from conftest import REPO_ROOT, build_tiny_base

from modeling_hypersteer import HyperSteerModel


LEGAL, CODE, MATH = "references to legal terminology", "C/C++ syntax", "mathematical equations"
# Generous: an idle machine starts the server in seconds, but a CPU held by higher-priority jobs can take minutes.
STARTUP_TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`python -m modeling_hypersteer.serve MODEL ...` as a subprocess on a free loopback port."""

    def __init__(self, model_dir, log_path, **flags):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "modeling_hypersteer.serve", str(model_dir), "--port", str(self.port)]
        for key, value in flags.items():
            argv += [f"--{key}", str(value)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.log = open(log_path, "w")
        self.process = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"The server exited with {self.process.returncode}:\n{open(log_path).read()}")
            try:
                self.get("/health")
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"The server did not start in {STARTUP_TIMEOUT_S} s:\n{open(log_path).read()}"
                    ) from None
                time.sleep(0.2)
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=120)
        self.model_id = self.client.models.list().data[0].id

    def get(self, path):
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            return json.loads(response.read())

    def post(self, body, raw=None):
        """POST to /v1/chat/completions; returns `(status, parsed JSON body)` whatever the status."""
        data = raw if raw is not None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + "/v1/chat/completions", data=data, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def _save_tiny_hypersteer(directory, tokenizer, hypernet_type):
    """A tiny random Llama base and a HyperSteer over it (output projection perturbed so steering shows), on disk."""
    base_dir, model_dir = directory / "base", directory / "hypersteer"
    torch.manual_seed(0)
    build_tiny_base("llama", len(tokenizer)).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = HyperSteerModel.from_base_model(
        base,
        tokenizer=tokenizer,
        hypernet_type=hypernet_type,
        steering_layer=2,
        hypernet_num_layers=2,
        base_model_name_or_path=str(base_dir),
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        weight = model.hypernetwork.output_projection.weight
        weight.copy_(torch.randn(weight.shape, generator=generator) * 0.5)
    model.save_pretrained(model_dir)
    return model_dir


def _messages(text):
    return [{"role": "user", "content": text}]


class Reference:
    """`model.generate` in this process on the saved model: the expected server output."""

    def __init__(self, model_dir):
        self.model = HyperSteerModel.from_pretrained(model_dir)
        self.tokenizer = self.model.tokenizer
        eos = self.model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos])

    def tokens(self, text, steering=None, max_tokens=12):
        """Greedy completion tokens (without EOS) and the finish reason, for one request's `steering` field."""
        inputs = self.tokenizer.apply_chat_template(
            _messages(text), add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        kwargs = {"max_new_tokens": max_tokens, "do_sample": False}
        if steering is None:
            output = self.model.language_model.generate(**inputs, **kwargs)
        elif isinstance(steering, dict):
            output = self.model.generate(
                **inputs, steering_prompt=steering["prompt"], steering_factor=steering["factor"], **kwargs
            )
        else:
            output = self.model.generate(
                **inputs,
                steering_prompt=[[item["prompt"] for item in steering]],
                steering_factor=[[item["factor"] for item in steering]],
                **kwargs,
            )
        tokens = output[0, inputs["input_ids"].shape[1] :].tolist()
        for index, token in enumerate(tokens):
            if token in self.eos:
                return tokens[:index], "stop"
        return tokens, "length"

    def expect(self, text, steering=None, max_tokens=12):
        tokens, finish_reason = self.tokens(text, steering, max_tokens)
        return self.tokenizer.decode(tokens, skip_special_tokens=True), len(tokens), finish_reason


def _create(server, text, steering=None, max_tokens=12, **kwargs):
    extra_body = {"steering": steering} if steering is not None else None
    return server.client.chat.completions.create(
        model=server.model_id,
        messages=_messages(text),
        max_tokens=max_tokens,
        temperature=0,
        extra_body=extra_body,
        **kwargs,
    )


def _assert_matches(completion, expected):
    text, num_tokens, finish_reason = expected
    choice = completion.choices[0]
    assert (choice.message.content, completion.usage.completion_tokens, choice.finish_reason) == (
        text,
        num_tokens,
        finish_reason,
    )


def _stream(server, text, steering=None, max_tokens=12):
    stream = server.client.chat.completions.create(
        model=server.model_id,
        messages=_messages(text),
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"steering": steering} if steering is not None else None,
    )
    return list(stream)


# ---------------------------------------------------------------------------------------------------------------
# Tiny cross-attention model
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_cross_attention(tmp_path_factory, tiny_tokenizer):
    directory = tmp_path_factory.mktemp("serve_cross_attention")
    model_dir = _save_tiny_hypersteer(directory, tiny_tokenizer, "cross_attention")
    # A long batch window makes concurrent test requests share a batch deterministically.
    server = ServerProcess(
        model_dir,
        directory / "server.log",
        max_batch_size=8,
        batch_window_ms=400,
        max_concepts=3,
        max_steering_factor=8,
    )
    yield server, Reference(model_dir)
    server.stop()


def test_models_health_and_unknown_routes(tiny_cross_attention):
    server, _ = tiny_cross_attention
    assert [model.id for model in server.client.models.list().data] == [server.model_id]
    assert server.model_id.endswith("hypersteer")
    health = server.get("/health")
    assert health["status"] == "ok" and health["model"] == server.model_id
    with pytest.raises(urllib.error.HTTPError) as error:
        server.get("/v1/nothing")
    assert error.value.code == 404 and set(json.loads(error.value.read())["error"]) == {
        "message",
        "type",
        "param",
        "code",
    }


def test_steered_and_unsteered_completions_equal_generate(tiny_cross_attention):
    server, reference = tiny_cross_attention
    text = "Explain sorting."
    steering = {"prompt": LEGAL, "factor": 2.0}
    steered = _create(server, text, steering)
    _assert_matches(steered, reference.expect(text, steering))
    unsteered = _create(server, text)
    _assert_matches(unsteered, reference.expect(text))
    assert steered.choices[0].message.content != unsteered.choices[0].message.content
    assert steered.object == "chat.completion" and steered.model == server.model_id
    assert steered.usage.prompt_tokens == len(
        reference.tokenizer.apply_chat_template(_messages(text), add_generation_prompt=True, return_dict=True)[
            "input_ids"
        ]
    )
    assert steered.usage.total_tokens == steered.usage.prompt_tokens + steered.usage.completion_tokens
    # Factor 0 reproduces the base exactly.
    _assert_matches(_create(server, text, {"prompt": LEGAL, "factor": 0.0}), reference.expect(text))


def test_composition_equals_composed_generate(tiny_cross_attention):
    server, reference = tiny_cross_attention
    steering = [{"prompt": LEGAL, "factor": 1.0}, {"prompt": CODE, "factor": -1.5}]
    composed = _create(server, "Write a poem.", steering)
    _assert_matches(composed, reference.expect("Write a poem.", steering))
    single = _create(server, "Write a poem.", steering[:1])
    assert composed.choices[0].message.content != single.choices[0].message.content


def test_streaming_has_openai_chunk_shapes_and_equals_generate(tiny_cross_attention):
    server, reference = tiny_cross_attention
    steering = {"prompt": CODE, "factor": 3.0}
    text, num_tokens, finish_reason = reference.expect("Hi", steering, max_tokens=10)
    chunks = _stream(server, "Hi", steering, max_tokens=10)
    assert {chunk.object for chunk in chunks} == {"chat.completion.chunk"}
    assert len({chunk.id for chunk in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert chunks[0].choices[0].delta.role == "assistant"
    content_chunks = [chunk for chunk in chunks if chunk.choices and chunk.choices[0].delta.content]
    assert "".join(chunk.choices[0].delta.content for chunk in content_chunks) == text
    assert len(content_chunks) > 1  # streamed token by token, not in one piece
    finals = [chunk for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert [chunk.choices[0].finish_reason for chunk in finals] == [finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == num_tokens
    # The streamed and the non-streamed completion agree.
    assert _create(server, "Hi", steering, max_tokens=10).choices[0].message.content == text


def test_concurrent_requests_share_one_batch_and_each_equals_generate_alone(tiny_cross_attention):
    server, reference = tiny_cross_attention
    requests = [
        ("Explain sorting.", {"prompt": LEGAL, "factor": 2.0}, 12),
        ("Write a short poem about the sea.", {"prompt": CODE, "factor": 1.0}, 7),
        ("Hi", None, 12),
        ("Explain sorting.", [{"prompt": MATH, "factor": 1.5}, {"prompt": LEGAL, "factor": 0.5}], 9),
        ("What is 2 + 2?", {"prompt": MATH, "factor": -2.0}, 12),
    ]
    expected = [reference.expect(text, steering, max_tokens) for text, steering, max_tokens in requests]

    def send(request):
        text, steering, max_tokens = request
        raw = server.client.chat.completions.with_raw_response.create(
            model=server.model_id,
            messages=_messages(text),
            max_tokens=max_tokens,
            temperature=0,
            extra_body={"steering": steering} if steering is not None else None,
        )
        return int(raw.headers["x-hypersteer-batch-rows"]), raw.parse()

    with ThreadPoolExecutor(len(requests)) as pool:
        results = list(pool.map(send, requests))
    assert max(rows for rows, _ in results) >= 3  # they really ran together
    for (_, completion), want in zip(results, expected):
        _assert_matches(completion, want)


def test_sampling_and_greedy_requests_go_to_separate_batches(tiny_cross_attention):
    server, reference = tiny_cross_attention
    greedy_expected = reference.expect("Hi", {"prompt": LEGAL, "factor": 1.0})

    def sampled():
        return server.client.chat.completions.create(
            model=server.model_id,
            messages=_messages("Hi"),
            max_tokens=8,
            temperature=0.9,
            top_p=0.8,
            extra_body={"steering": {"prompt": CODE, "factor": 1.0}},
        )

    with ThreadPoolExecutor(2) as pool:
        sampled_future = pool.submit(sampled)
        greedy = _create(server, "Hi", {"prompt": LEGAL, "factor": 1.0})
        sample = sampled_future.result()
    _assert_matches(greedy, greedy_expected)
    assert 1 <= sample.usage.completion_tokens <= 8


BAD_REQUESTS = [
    ({"steering": {"prompt": "", "factor": 1.0}}, "steering.prompt"),
    ({"steering": {"prompt": "   "}}, "steering.prompt"),
    ({"steering": {"prompt": 5, "factor": 1.0}}, "steering.prompt"),
    ({"steering": {"factor": 1.0}}, "steering.prompt"),
    ({"steering": {"prompt": LEGAL, "factor": float("nan")}}, "steering.factor"),
    ({"steering": {"prompt": LEGAL, "factor": float("inf")}}, "steering.factor"),
    ({"steering": {"prompt": LEGAL, "factor": 9.0}}, "steering.factor"),
    ({"steering": {"prompt": LEGAL, "factor": "1"}}, "steering.factor"),
    ({"steering": {"prompt": LEGAL, "strength": 1.0}}, "steering.strength"),
    ({"steering": [{"prompt": LEGAL}, {"prompt": CODE, "factor": True}]}, "steering[1].factor"),
    ({"steering": [{"prompt": LEGAL}] * 4}, "steering"),
    ({"steering": "legal"}, "steering"),
    ({"steering": {"prompt": "legal " * 80}}, "steering.prompt"),
    ({"max_tokens": 600}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
    ({"temperature": -1}, "temperature"),
    # `n` and `seed` were refused before issue 17; now only values that cannot be honoured are.
    ({"n": 0}, "n"),
    ({"n": 9}, "n"),
    ({"seed": 1.5}, "seed"),
    ({"stop": ""}, "stop"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": "1"}, "frequency_penalty"),
    ({"logit_bias": {"hello": 1}}, "logit_bias"),
    ({"logit_bias": {"100000": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"logprobs": True}, "logprobs"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "messages[0].content[0]",
    ),
    ({"messages": [{"role": "tool", "content": "42", "tool_call_id": "a"}]}, "messages[0].role"),
    ({"frobnicate": 1}, "frobnicate"),
]


def test_bad_requests_get_openai_error_shape_and_the_server_stays_up(tiny_cross_attention):
    server, reference = tiny_cross_attention
    good = {"model": server.model_id, "messages": _messages("Hi"), "max_tokens": 5, "temperature": 0}
    expected_text = reference.expect("Hi", {"prompt": LEGAL, "factor": 1.0}, max_tokens=5)[0]
    for change, param in BAD_REQUESTS:
        status, body = server.post({**good, **change})
        assert status == 400, (change, body)
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
        assert body["error"]["param"] == param and body["error"]["type"] == "invalid_request_error", (change, body)
        assert param.split(".")[0].split("[")[0] in body["error"]["message"]
        # ... and a good request right after is answered.
        status, body = server.post({**good, "steering": {"prompt": LEGAL, "factor": 1.0}})
        assert status == 200 and body["choices"][0]["message"]["content"] == expected_text
    status, body = server.post(None, raw=b"{not json")
    assert status == 400 and "JSON" in body["error"]["message"]
    status, body = server.post({**good, "model": "gpt-4o"})
    assert status == 404 and body["error"]["code"] == "model_not_found"
    # The official client surfaces the same error (it refuses to send NaN itself, so an out-of-range factor here).
    with pytest.raises(openai.BadRequestError) as error:
        _create(server, "Hi", {"prompt": LEGAL, "factor": 100.0})
    assert error.value.status_code == 400 and "steering.factor" in str(error.value)
    assert server.process.poll() is None


def test_a_client_that_disconnects_mid_stream_frees_its_slot(tiny_cross_attention):
    server, reference = tiny_cross_attention
    before = server.get("/health")
    body = {
        "model": server.model_id,
        "messages": _messages("Write a short poem about the sea."),
        "max_tokens": 400,
        "temperature": 0,
        "stream": True,
        "steering": {"prompt": LEGAL, "factor": 1.0},
    }
    tokens, _ = reference.tokens("Write a short poem about the sea.", body["steering"], max_tokens=400)
    assert len(tokens) > 50  # the request would run long if nobody stopped it
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.getheader("content-type").startswith("text/event-stream")
    received = b""
    while received.count(b"data: {") < 2:  # the role chunk, then a token: generation is under way
        received += response.read1(65536)
    assert received.startswith(b"data: {")
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    deadline = time.monotonic() + 30
    while True:
        health = server.get("/health")
        if health["cancelled"] > before["cancelled"] and health["running"] == 0:
            break
        assert time.monotonic() < deadline, health
        time.sleep(0.05)
    # A following request is answered.
    _assert_matches(
        _create(server, "Hi", {"prompt": CODE, "factor": 1.0}), reference.expect("Hi", {"prompt": CODE, "factor": 1.0})
    )


# ---------------------------------------------------------------------------------------------------------------
# Tiny no-context model: cached vectors
# ---------------------------------------------------------------------------------------------------------------


def test_no_context_server_caches_vectors_and_equals_generate(tmp_path, tiny_tokenizer):
    model_dir = _save_tiny_hypersteer(tmp_path, tiny_tokenizer, "no_context")
    reference = Reference(model_dir)
    server = ServerProcess(model_dir, tmp_path / "server.log", batch_window_ms=400, vector_cache_size=2)
    try:
        requests = [
            ("Explain sorting.", {"prompt": LEGAL, "factor": 2.0}),
            ("Hi", [{"prompt": LEGAL, "factor": 1.0}, {"prompt": CODE, "factor": -1.0}]),
            ("Hi", None),
            ("What is 2 + 2?", {"prompt": MATH, "factor": 1.5}),
        ]
        with ThreadPoolExecutor(len(requests)) as pool:
            results = list(pool.map(lambda request: _create(server, *request), requests))
        for (text, steering), completion in zip(requests, results):
            _assert_matches(completion, reference.expect(text, steering))
        # How the concurrent requests above were batched depends on the machine's load; the LRU's own behaviour is
        # checked one request at a time, with prompts the cache has not seen: with room for 2, first, second (two
        # misses), first again (a hit), third (a miss that evicts the second), second again (a miss).
        first, second, third = "pirate speech", "weather forecasts", "references to the ocean"
        before = server.get("/health")["vector_cache"]
        for prompt in (first, second, first, third, second):
            _assert_matches(
                _create(server, "Hi", {"prompt": prompt, "factor": 1.0}),
                reference.expect("Hi", {"prompt": prompt, "factor": 1.0}),
            )
        after = server.get("/health")["vector_cache"]
        assert after["size"] == 2
        assert (after["misses"] - before["misses"], after["hits"] - before["hits"]) == (4, 1)
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_server_equals_generate_alone_and_batched(tmp_path, smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = HyperSteerModel.from_base_model(
        base, tokenizer=tokenizer, steering_layer=20, hypernet_num_layers=2, base_model_name_or_path=smollm2_dir
    )
    # Untrained, the output projection is zero and steering does nothing: perturb it (seeded) so it shows.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        weight = model.hypernetwork.output_projection.weight
        weight.copy_(torch.randn(weight.shape, generator=generator) * 0.02)
    model.save_pretrained(tmp_path / "hypersteer")
    del base, model
    reference = Reference(tmp_path / "hypersteer")
    server = ServerProcess(tmp_path / "hypersteer", tmp_path / "server.log", batch_window_ms=300)
    try:
        text = "Give me a tip for staying focused while studying."
        steering = {"prompt": "references to oceans, tides and marine life", "factor": 4.0}
        expected = reference.expect(text, steering, max_tokens=16)
        _assert_matches(_create(server, text, steering, max_tokens=16), expected)
        unsteered = reference.expect(text, None, max_tokens=16)
        assert unsteered[0] != expected[0]
        chunks = _stream(server, text, steering, max_tokens=16)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected[0]
        others = [
            (text, steering),
            ("Why do people enjoy travelling?", {"prompt": "SQL queries with SELECT, FROM and WHERE", "factor": 4.0}),
            (
                text,
                [{"prompt": "terms related to baking bread", "factor": 3.0}, {"prompt": "legal terms", "factor": 2.0}],
            ),
            ("Why do people enjoy travelling?", None),
        ]
        with ThreadPoolExecutor(len(others)) as pool:
            results = list(pool.map(lambda request: _create(server, *request, max_tokens=16), others))
        for (prompt, request_steering), completion in zip(others, results):
            _assert_matches(completion, reference.expect(prompt, request_steering, max_tokens=16))
        assert server.get("/health")["largest_batch"] >= 3
    finally:
        server.stop()
