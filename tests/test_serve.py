"""`hypersteer-serve`: the real server process on 127.0.0.1, driven by the official `openai` client (and raw HTTP
for exact error shapes and a client that disconnects mid-stream).

Every server completion under greedy decoding is compared token for token with `model.generate` on the same prompt,
steering prompts and factors, run in this process on the very same saved model.
"""

import copy
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from conftest import REPO_ROOT, build_tiny_base, free_port

from modeling_hypersteer import HyperSteerModel
from modeling_hypersteer.evaluation import prompt_steering_turns


LEGAL, CODE, MATH = "references to legal terminology", "C/C++ syntax", "mathematical equations"
# Generous: an idle machine starts the server in seconds, but a CPU held by higher-priority jobs can take minutes.
STARTUP_TIMEOUT_S = 600


class ServerProcess:
    """`python -m modeling_hypersteer.serve MODEL ...` as a subprocess on a free loopback port."""

    def __init__(self, model_dir, log_path, api_key=None, **flags):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "modeling_hypersteer.serve", str(model_dir), "--port", str(self.port)]
        for key, value in flags.items():
            argv += [f"--{key}", str(value)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        # The key, if any, through the environment variable (as on a real deployment), never one inherited.
        env.pop("HYPERSTEER_API_KEY", None)
        if api_key is not None:
            env["HYPERSTEER_API_KEY"] = api_key
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
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key or "unused", max_retries=0, timeout=120)
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


def _save_tiny_hypersteer(directory, tokenizer, hypernet_type, **config_overrides):
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
        **config_overrides,
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

    def tokens(self, text, steering=None, max_tokens=12, messages=None, **generate_kwargs):
        """Greedy completion tokens (without EOS) and the finish reason, for one request's `steering` field."""
        inputs = self.tokenizer.apply_chat_template(
            messages or _messages(text), add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        kwargs = {"max_new_tokens": max_tokens, "do_sample": False, **generate_kwargs}
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

    def expect(self, text, steering=None, max_tokens=12, **kwargs):
        tokens, finish_reason = self.tokens(text, steering, max_tokens, **kwargs)
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


def _stream(server, text, steering=None, max_tokens=12, **kwargs):
    stream = server.client.chat.completions.create(
        model=server.model_id,
        messages=_messages(text),
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"steering": steering} if steering is not None else None,
        **kwargs,
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


def test_a_concept_asked_for_in_the_prompt_too_equals_generate_on_the_prompted_turn(tiny_cross_attention):
    server, reference = tiny_cross_attention
    text = "Explain sorting."
    prompted_turn, _ = prompt_steering_turns(LEGAL, text)
    for factor in (2.0, 0.0):  # factor 0: the prompting baseline itself
        steering = {"prompt": LEGAL, "factor": factor, "in_prompt": True}
        _assert_matches(
            _create(server, text, steering), reference.expect(None, steering, messages=_messages(prompted_turn))
        )
    # Composed: only the `in_prompt` concept is asked for in the prompt, and both vectors steer.
    steering = [{"prompt": LEGAL, "factor": 1.0, "in_prompt": True}, {"prompt": CODE, "factor": -1.5}]
    _assert_matches(
        _create(server, text, steering), reference.expect(None, steering, messages=_messages(prompted_turn))
    )


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


def test_sampled_and_greedy_requests_share_a_batch_and_a_seed_reproduces_the_text(tiny_cross_attention):
    # Before issue 17, sampled and greedy requests ran in separate batches and `seed` was refused. Now every row has
    # its own sampling settings and generator, so they share one batch; the greedy row still equals `generate`.
    server, reference = tiny_cross_attention
    greedy_expected = reference.expect("Hi", {"prompt": LEGAL, "factor": 1.0})

    def sampled(seed, raw=False):
        create = (
            server.client.chat.completions.with_raw_response.create if raw else server.client.chat.completions.create
        )
        return create(
            model=server.model_id,
            messages=_messages("Hi"),
            max_tokens=12,
            temperature=1.0,
            top_p=0.95,
            seed=seed,
            extra_body={"steering": {"prompt": CODE, "factor": 1.0}},
        )

    alone = sampled(7).choices[0].message.content
    assert sampled(7).choices[0].message.content == alone
    assert sampled(8).choices[0].message.content != alone
    with ThreadPoolExecutor(2) as pool:
        sampled_future = pool.submit(sampled, 7, True)
        time.sleep(0.05)
        greedy = server.client.chat.completions.with_raw_response.create(
            model=server.model_id,
            messages=_messages("Hi"),
            max_tokens=12,
            temperature=0,
            extra_body={"steering": {"prompt": LEGAL, "factor": 1.0}},
        )
        sample = sampled_future.result()
    assert int(greedy.headers["x-hypersteer-batch-rows"]) == int(sample.headers["x-hypersteer-batch-rows"]) == 2
    _assert_matches(greedy.parse(), greedy_expected)
    assert sample.parse().choices[0].message.content == alone


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
    # This model was never calibrated for the prompted use, so such a concept must name its factor.
    ({"steering": {"prompt": LEGAL, "in_prompt": True}}, "steering.factor"),
    ({"steering": [{"prompt": LEGAL, "factor": 1.0, "in_prompt": "yes"}]}, "steering[0].in_prompt"),
    (
        {
            "messages": [{"role": "system", "content": "Be brief."}],
            "steering": {"prompt": LEGAL, "factor": 1.0, "in_prompt": True},
        },
        "messages",
    ),
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


def _stop_inside(text):
    """A 3-character stop string whose first occurrence is inside `text`, not at its start: `(start, stop)`."""
    start = next(index for index in range(2, len(text) - 3) if text.find(text[index : index + 3]) == index)
    return start, text[start : start + 3]


def test_stop_strings_cut_the_text_streamed_or_not(tiny_cross_attention):
    server, reference = tiny_cross_attention
    text = reference.expect("Explain sorting.", max_tokens=16)[0]
    start, stop = _stop_inside(text)
    for value in (stop, ["never in the text", stop]):
        completion = _create(server, "Explain sorting.", max_tokens=16, stop=value)
        assert completion.choices[0].message.content == text[:start]
        assert completion.choices[0].finish_reason == "stop"
        chunks = list(
            server.client.chat.completions.create(
                model=server.model_id,
                messages=_messages("Explain sorting."),
                max_tokens=16,
                temperature=0,
                stop=value,
                stream=True,
            )
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text[:start]
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    # A stop string that never occurs changes nothing, even one that starts like the end of the text (held back while
    # it might complete, then released when the row ends).
    unfinished_stop = text[-2:] + "\u00e9\u00e9"
    assert unfinished_stop not in text
    for value in (["zzzz"], unfinished_stop):
        _assert_matches(
            _create(server, "Explain sorting.", max_tokens=16, stop=value),
            reference.expect("Explain sorting.", max_tokens=16),
        )
        streamed = _stream(server, "Explain sorting.", max_tokens=16, stop=value)
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text


def test_n_choices_are_all_steered_and_seeded_choices_differ(tiny_cross_attention):
    server, reference = tiny_cross_attention
    steering = {"prompt": LEGAL, "factor": 2.0}
    greedy = _create(server, "Explain sorting.", steering, n=2)
    assert [choice.index for choice in greedy.choices] == [0, 1]
    text, num_tokens, finish_reason = reference.expect("Explain sorting.", steering)
    assert [(choice.message.content, choice.finish_reason) for choice in greedy.choices] == [(text, finish_reason)] * 2
    assert greedy.usage.completion_tokens == 2 * num_tokens
    sampled = server.client.chat.completions.create(
        model=server.model_id,
        messages=_messages("Hi"),
        max_tokens=12,
        temperature=1.0,
        n=3,
        seed=11,
        extra_body={"steering": steering},
    )
    texts = [choice.message.content for choice in sampled.choices]
    assert [choice.index for choice in sampled.choices] == [0, 1, 2] and len(set(texts)) == 3
    again = server.client.chat.completions.create(
        model=server.model_id,
        messages=_messages("Hi"),
        max_tokens=12,
        temperature=1.0,
        n=3,
        seed=11,
        extra_body={"steering": steering},
    )
    assert [choice.message.content for choice in again.choices] == texts
    # Streaming n > 1: every chunk names its choice, and each choice's deltas add up to its text.
    chunks = list(
        server.client.chat.completions.create(
            model=server.model_id,
            messages=_messages("Hi"),
            max_tokens=12,
            temperature=1.0,
            n=3,
            seed=11,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"steering": steering},
        )
    )
    streamed = ["", "", ""]
    for chunk in chunks:
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert streamed == texts and chunks[-1].usage.completion_tokens == sampled.usage.completion_tokens


def test_penalties_and_logit_bias_follow_openai_definitions(tiny_cross_attention):
    from transformers import LogitsProcessorList

    from modeling_hypersteer.serve import PresenceFrequencyPenaltyLogitsProcessor

    server, reference = tiny_cross_attention
    steering = {"prompt": MATH, "factor": 1.0}
    plain = reference.expect("Explain sorting.", steering, max_tokens=16)
    prompt_length = len(
        reference.tokenizer.apply_chat_template(
            _messages("Explain sorting."), add_generation_prompt=True, return_dict=True
        )["input_ids"]
    )
    penalty = PresenceFrequencyPenaltyLogitsProcessor(torch.tensor([0.5]), torch.tensor([1.5]), prompt_length)
    penalized = reference.expect(
        "Explain sorting.", steering, max_tokens=16, logits_processor=LogitsProcessorList([penalty])
    )
    assert penalized[0] != plain[0]  # the penalties matter for this prompt
    _assert_matches(
        _create(server, "Explain sorting.", steering, max_tokens=16, presence_penalty=0.5, frequency_penalty=1.5),
        penalized,
    )
    # logit_bias: +100 on one token makes greedy decoding repeat it; -100 on the first greedy token bans it.
    tokens, _ = reference.tokens("Explain sorting.", steering, max_tokens=16)
    forced = _create(server, "Explain sorting.", steering, max_tokens=5, logit_bias={str(tokens[2]): 100})
    assert forced.choices[0].message.content == reference.tokenizer.decode([tokens[2]] * 5, skip_special_tokens=True)
    banned = _create(server, "Explain sorting.", steering, max_tokens=5, logit_bias={str(tokens[0]): -100})
    assert not banned.choices[0].message.content.startswith(reference.tokenizer.decode(tokens[:1]))


def test_penalty_processor_counts_generated_tokens_only():
    from modeling_hypersteer.serve import PresenceFrequencyPenaltyLogitsProcessor

    processor = PresenceFrequencyPenaltyLogitsProcessor(torch.tensor([0.5, 0.0]), torch.tensor([1.0, -1.0]), 2)
    input_ids = torch.tensor([[4, 4, 3, 3, 1], [0, 2, 2, 0, 0]])  # prompts [4, 4] and [0, 2]
    scores = processor(input_ids, torch.zeros(2, 5))
    assert scores.tolist() == [[0.0, -1.5, 0.0, -2.5, 0.0], [2.0, 0.0, 1.0, 0.0, 0.0]]


def test_content_parts_assistant_null_and_client_defaults_are_accepted(tiny_cross_attention):
    server, reference = tiny_cross_attention
    conversation = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": None},
        {"role": "user", "content": [{"type": "text", "text": "Explain "}, {"type": "text", "text": "sorting."}]},
    ]
    expected_messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "Explain sorting."},
    ]
    completion = server.client.chat.completions.create(
        model=server.model_id,
        messages=conversation,
        max_completion_tokens=10,
        temperature=0,
        user="someone",
        stop=None,
        seed=None,
        response_format={"type": "text"},
        logprobs=False,
        parallel_tool_calls=True,
        tool_choice="none",
    )
    _assert_matches(completion, reference.expect(None, max_tokens=10, messages=expected_messages))


def test_get_model_by_id(tiny_cross_attention):
    server, _ = tiny_cross_attention
    model = server.client.models.retrieve(server.model_id)
    assert model.id == server.model_id
    # What a client needs to steer: the model's factors (never calibrated for the prompted use) and the limits.
    assert model.steering == {
        "hypernet_type": "cross_attention",
        "steering_layer": 2,
        "default_steering_factor": 1.0,
        "prompted_steering_factor": None,
        "max_steering_factor": 8.0,
        "max_concepts": 3,
    }
    assert server.client.models.list().data[0].steering == model.steering
    with pytest.raises(openai.NotFoundError) as error:
        server.client.models.retrieve("gpt-4o")
    assert error.value.body["code"] == "model_not_found"


def test_async_client_streams_concurrently_with_usage(tiny_cross_attention):
    import asyncio

    server, reference = tiny_cross_attention
    requests = [("Hi", {"prompt": CODE, "factor": 2.0}), ("Explain sorting.", None), ("What is 2 + 2?", None)]

    async def run():
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)

        async def one(text, steering):
            stream = await client.chat.completions.create(
                model=server.model_id,
                messages=_messages(text),
                max_tokens=10,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"steering": steering},
            )
            return [chunk async for chunk in stream]

        plain = await client.chat.completions.create(
            model=server.model_id, messages=_messages("Hi"), max_tokens=10, temperature=0
        )
        results = await asyncio.gather(*(one(text, steering) for text, steering in requests))
        await client.close()
        return plain, results

    plain, results = asyncio.run(run())
    _assert_matches(plain, reference.expect("Hi", max_tokens=10))
    for (text, steering), chunks in zip(requests, results):
        expected_text, num_tokens, finish_reason = reference.expect(text, steering, max_tokens=10)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected_text
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == num_tokens


def test_langchain_chat_openai_invoke_stream_and_stop(tiny_cross_attention):
    from langchain_openai import ChatOpenAI

    server, reference = tiny_cross_attention
    chat = ChatOpenAI(
        model=server.model_id,
        base_url=f"{server.url}/v1",
        api_key="unused",
        temperature=0,
        max_tokens=12,
        max_retries=0,
        extra_body={"steering": {"prompt": CODE, "factor": 1.0}},
    )
    expected_text, num_tokens, _ = reference.expect("Explain sorting.", {"prompt": CODE, "factor": 1.0})
    assert len(set(expected_text)) > 3  # varied enough to hold a stop string inside
    message = chat.invoke("Explain sorting.")
    assert message.content == expected_text and message.usage_metadata["output_tokens"] == num_tokens
    assert "".join(chunk.content for chunk in chat.stream("Explain sorting.")) == expected_text
    start, stop = _stop_inside(expected_text)
    assert chat.invoke("Explain sorting.", stop=[stop]).content == expected_text[:start]


def test_a_short_request_is_answered_when_its_own_row_ends(tiny_cross_attention):
    server, reference = tiny_cross_attention
    eos = reference.tokenizer.eos_token_id

    def send(max_tokens):
        started = time.monotonic()
        raw = server.client.chat.completions.with_raw_response.create(
            model=server.model_id,
            messages=_messages("Hi"),
            max_tokens=max_tokens,
            temperature=0,
            logit_bias={str(eos): -100},  # no early EOS: each row runs to its own budget
            extra_body={"steering": {"prompt": LEGAL, "factor": 1.0}},
        )
        return time.monotonic() - started, int(raw.headers["x-hypersteer-batch-rows"]), raw.parse()

    with ThreadPoolExecutor(2) as pool:
        long_future = pool.submit(send, 490)
        time.sleep(0.05)
        short_latency, short_rows, short = send(16)
        long_latency, long_rows, long = long_future.result()
    assert short_rows == long_rows == 2  # they shared one batch
    assert (short.usage.completion_tokens, long.usage.completion_tokens) == (16, 490)
    assert short_latency < 0.5 * long_latency, (short_latency, long_latency)


def test_concurrent_long_prompts_are_tokenized_while_batches_run(tiny_cross_attention):
    # The model thread tokenizes steering prompts (with truncation) at every batch's prefill while requests are being
    # tokenized (without). On one shared fast tokenizer, switching truncation while the other thread is inside a long
    # encode can fail with "Already borrowed" (a 500 for a whole batch). tokenizers 0.23 did not reproduce it here even
    # with one shared tokenizer, so `test_requests_are_tokenized_off_the_event_loop_with_their_own_tokenizer` checks
    # the fix's structure; this one checks the outcome under that load.
    server, reference = tiny_cross_attention
    huge = "Explain sorting algorithms in simple words, with pointers and semicolons. " * 1000  # over the context
    steered = [("Hi", {"prompt": [LEGAL, CODE, MATH][index % 3] + f" {index}", "factor": 1.0}) for index in range(10)]
    expected = [reference.expect(text, steering, max_tokens=2) for text, steering in steered]
    stop = threading.Event()

    def flood():
        statuses = []
        while not stop.is_set():
            status, body = server.post({"model": server.model_id, "messages": _messages(huge), "temperature": 0})
            statuses.append((status, body["error"]["param"]))
        return statuses

    with ThreadPoolExecutor(4) as pool:
        floods = [pool.submit(flood) for _ in range(2)]
        try:
            results = list(pool.map(lambda request: _create(server, *request, max_tokens=2), steered))
        finally:
            stop.set()
        flooded = [status for future in floods for status in future.result()]
    for completion, want in zip(results, expected):
        _assert_matches(completion, want)
    assert flooded and set(flooded) == {(400, "messages")}


def test_requests_are_tokenized_off_the_event_loop_with_their_own_tokenizer(tiny_tokenizer, monkeypatch):
    engine, client = _in_process_app(tiny_tokenizer)
    assert engine.request_tokenizer.backend_tokenizer is not engine.tokenizer.backend_tokenizer
    threads = []
    render = engine.request_tokenizer.apply_chat_template

    def recording_render(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return render(*args, **kwargs)

    monkeypatch.setattr(engine.request_tokenizer, "apply_chat_template", recording_render)
    # The model thread's tokenizer must not render requests.
    monkeypatch.setattr(engine.tokenizer, "apply_chat_template", None)
    # Over the context, so it is refused right after tokenization (the engine is not started).
    response = client.post("/v1/chat/completions", json={"messages": _messages("Hi " * 400)})
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"
    assert len(threads) == 1 and threads[0].startswith("hypersteer-tokenizer")


def test_incremental_detokenizer_never_drops_split_characters():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from modeling_hypersteer.serve import IncrementalDetokenizer

    # Byte-level BPE trained on ASCII only: accented letters and emoji are split into single-byte tokens.
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 10, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    text = "the café 🌊 waves — naïve 日本 fox"
    tokens = tokenizer(text, add_special_tokens=False).input_ids
    assert len(tokens) > len(text.split())  # multi-byte characters really are split
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = [detokenizer.add(token) for token in tokens]
    assert not any("\ufffd" in delta for delta in deltas)
    assert "".join(deltas) + detokenizer.flush() == tokenizer.decode(tokens) == text

    # Each step decodes a few tokens, not the whole text so far.
    class CountingTokenizer:
        longest = 0

        def decode(self, token_ids, **kwargs):
            CountingTokenizer.longest = max(CountingTokenizer.longest, len(token_ids))
            return tokenizer.decode(token_ids, **kwargs)

    long_tokens = tokenizer("the quick brown fox jumps over the lazy dog " * 20, add_special_tokens=False).input_ids
    detokenizer = IncrementalDetokenizer(CountingTokenizer())
    assert "".join(detokenizer.add(token) for token in long_tokens) + detokenizer.flush() == tokenizer.decode(
        long_tokens
    )
    assert len(long_tokens) > 100 and CountingTokenizer.longest <= 3


def _in_process_app(tiny_tokenizer, **settings):
    from fastapi.testclient import TestClient

    from modeling_hypersteer.serve import BatchingEngine, ServeSettings, build_app

    torch.manual_seed(0)
    model = HyperSteerModel.from_base_model(
        build_tiny_base("llama", len(tiny_tokenizer)),
        tokenizer=copy.deepcopy(tiny_tokenizer),  # the session's tokenizer stays untouched by these tests
        hypernet_type="no_context",
        steering_layer=2,
        hypernet_num_layers=1,
    )
    engine = BatchingEngine(model, ServeSettings(model_id="tiny", **settings))
    return engine, TestClient(build_app(engine), raise_server_exceptions=False)


def _assert_openai_error(response, status, param=None):
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["param"] == param, body
    return body["error"]


def test_limits_api_key_and_unexpected_errors_answer_in_openai_shape(tiny_tokenizer):
    engine, client = _in_process_app(
        tiny_tokenizer, api_key="s3cret", max_request_bytes=2000, max_tokens_limit=64, max_queued_requests=1
    )
    good = {"model": "tiny", "messages": _messages("Hi"), "max_tokens": 4}
    auth = {"Authorization": "Bearer s3cret"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        error = _assert_openai_error(client.post("/v1/chat/completions", json=good, headers=headers), 401)
        assert error["code"] == "invalid_api_key"
    _assert_openai_error(client.get("/v1/models"), 401)
    assert client.get("/v1/models", headers=auth).json()["data"][0]["id"] == "tiny"
    assert client.get("/health").status_code == 200  # for load balancers, without the key
    # Body size, before reading it all.
    big = {**good, "messages": _messages("x" * 3000)}
    assert _assert_openai_error(client.post("/v1/chat/completions", json=big, headers=auth), 413)["code"] == (
        "request_too_large"
    )
    # The `max_tokens` ceiling, under either name.
    error = _assert_openai_error(
        client.post("/v1/chat/completions", json={**good, "max_tokens": 65}, headers=auth), 400, "max_tokens"
    )
    assert "--max_tokens_limit" in error["message"]
    _assert_openai_error(
        client.post(
            "/v1/chat/completions", json={**good, "max_tokens": None, "max_completion_tokens": 100}, headers=auth
        ),
        400,
        "max_completion_tokens",
    )
    # A full queue (the engine is not started, so an admitted request stays queued): 429 with Retry-After.
    engine.admit()
    response = client.post("/v1/chat/completions", json=good, headers=auth)
    assert _assert_openai_error(response, 429)["code"] == "rate_limit_exceeded" and response.headers["retry-after"]
    assert client.get("/health").json()["queued"] == 1
    engine.release()
    # Wrong method and unknown route.
    _assert_openai_error(client.get("/v1/chat/completions", headers=auth), 405)
    _assert_openai_error(client.get("/v1/nothing", headers=auth), 404)

    # An unexpected exception reaches the client as OpenAI JSON, never as plain text.
    def broken_submit(job):
        raise RuntimeError("a bug")

    engine.submit = broken_submit
    error = _assert_openai_error(client.post("/v1/chat/completions", json=good, headers=auth), 500)
    assert error["type"] == "server_error" and "a bug" in error["message"]
    assert engine.queued == 0


def test_the_saved_factors_are_the_defaults_and_in_prompt_concepts_go_into_the_last_user_turn(
    tmp_path, tiny_tokenizer
):
    from modeling_hypersteer.serve import load_engine, make_parser, parse_chat_request

    model_dir = _save_tiny_hypersteer(
        tmp_path, tiny_tokenizer, "no_context", default_steering_factor=1.5, prompted_steering_factor=0.25
    )
    engine = load_engine(make_parser().parse_args([str(model_dir)]))
    settings, tokenizer = engine.settings, engine.model.tokenizer
    conversation = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Explain sorting."},
    ]

    def parse(steering):
        return parse_chat_request(
            {"messages": conversation, "steering": steering, "max_tokens": 4}, tokenizer, settings, 64, None
        )

    def template(messages):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]

    plain = parse({"prompt": LEGAL})
    assert plain.concepts == [(LEGAL, 1.5)] and plain.prompt_ids == list(template(conversation))
    prompted = parse([{"prompt": LEGAL, "in_prompt": True}, {"prompt": CODE}, {"prompt": MATH, "in_prompt": True}])
    assert prompted.concepts == [(LEGAL, 0.25), (CODE, 1.5), (MATH, 0.25)]
    # Both asked-for concepts share one instruction in the LAST user turn; the earlier turns stay as they were.
    expected = [
        *conversation[:2],
        {"role": "user", "content": prompt_steering_turns([LEGAL, MATH], "Explain sorting.")[0]},
    ]
    assert (
        expected[2]["content"].startswith("Answer the user's request") and f"{LEGAL}; {MATH}" in expected[2]["content"]
    )
    assert prompted.prompt_ids == list(template(expected))
    assert parse({"prompt": LEGAL, "factor": 3.0, "in_prompt": True}).concepts == [(LEGAL, 3.0)]
    # Clients can read both factors from the model list.
    from fastapi.testclient import TestClient

    from modeling_hypersteer.serve import build_app

    (listed,) = TestClient(build_app(engine)).get("/v1/models").json()["data"]
    assert (listed["steering"]["default_steering_factor"], listed["steering"]["prompted_steering_factor"]) == (
        1.5,
        0.25,
    )


# ---------------------------------------------------------------------------------------------------------------
# Tiny no-context model: cached vectors
# ---------------------------------------------------------------------------------------------------------------


def test_no_context_server_caches_vectors_and_equals_generate(tmp_path, tiny_tokenizer):
    model_dir = _save_tiny_hypersteer(tmp_path, tiny_tokenizer, "no_context")
    reference = Reference(model_dir)
    # This server also requires an API key (from HYPERSTEER_API_KEY); its client sends it.
    server = ServerProcess(
        model_dir, tmp_path / "server.log", api_key="s3cret", batch_window_ms=400, vector_cache_size=2
    )
    try:
        wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as error:
            wrong.chat.completions.create(model=server.model_id, messages=_messages("Hi"), max_tokens=2)
        assert error.value.status_code == 401 and error.value.body["code"] == "invalid_api_key"
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
            # Asked for in the prompt too, batched with the plain requests.
            ("Why do people enjoy travelling?", {"prompt": "mentions of trains", "factor": 2.0, "in_prompt": True}),
        ]
        with ThreadPoolExecutor(len(others)) as pool:
            results = list(pool.map(lambda request: _create(server, *request, max_tokens=16), others))
        for (prompt, request_steering), completion in zip(others, results):
            in_prompt = isinstance(request_steering, dict) and request_steering.get("in_prompt")
            messages = _messages(prompt_steering_turns(request_steering["prompt"], prompt)[0]) if in_prompt else None
            _assert_matches(completion, reference.expect(prompt, request_steering, max_tokens=16, messages=messages))
        assert server.get("/health")["largest_batch"] >= 3
    finally:
        server.stop()
