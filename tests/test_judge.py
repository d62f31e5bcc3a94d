"""The AxBench judge protocol and the cached OpenAI client, through the real `openai` client and a loopback server."""

import json
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest
from openai_stub_server import OpenAIStubServer, stub_rating

from modeling_hypersteer.judge import (
    JUDGE_ASPECTS,
    build_judge_prompt,
    harmonic_score,
    judge_generations,
    parse_rating,
    select_and_report,
)
from modeling_hypersteer.openai_client import CachedChatClient, ChatRequest


REPO_ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def make_client(server: OpenAIStubServer, cache_path, **kwargs) -> CachedChatClient:
    defaults = dict(
        model="judge-stub",
        base_url=server.base_url,
        cache_path=cache_path,
        initial_backoff=0.01,
        max_backoff=0.5,
        max_retries=3,
        timeout=10.0,
        max_concurrency=8,
        seed=0,
    )
    defaults.update(kwargs)
    return CachedChatClient(**defaults)


def row(method, concept, factor, split, ratings, tag):
    """A generation whose stub ratings are (concept, instruction, fluency) = `ratings`; `tag` makes it unique."""
    c, i, f = ratings
    return {
        "method": method,
        "concept": concept,
        "factor": factor,
        "split": split,
        "instruction": f"Instruction {tag}: describe your day.",
        "generation": f"Text {tag}. concept={c} instruction={i} fluency={f}",
    }


# ---------------------------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        ("Reasoning.\nRating: [[1]]", 1.0),
        ("Rating: [[2.0]]", 2.0),
        ("[[0]]", 0.0),
        ("rating:[[ 1.5 ]]", 1.5),
        ("RATING :  [[2]]  ", 2.0),
        ("First [[0]], on reflection Rating: [[2]]", 2.0),
        ("Rating: [[3]]", None),
        ("Rating: [[-1]]", None),
        ("Rating: 2", None),
        ("I cannot rate this.", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_rating(text, expected):
    assert parse_rating(text) == expected


def test_harmonic_score():
    assert harmonic_score(2, 2, 2) == pytest.approx(2.0)
    assert harmonic_score(2, 1, 2) == pytest.approx(1.5)
    assert harmonic_score(1, 2, 0.5) == pytest.approx(3 / (1 + 0.5 + 2))
    assert harmonic_score(0, 2, 2) == 0.0
    assert harmonic_score(2, None, 2) is None
    assert harmonic_score(None, 0, 2) is None


def test_judge_templates_ask_for_the_rating_format():
    for aspect in JUDGE_ASPECTS:
        prompt = build_judge_prompt(aspect, "CONCEPT-X", "INSTRUCTION-Y", "GENERATION-Z")
        assert "Rating: [[x]]" in prompt and "GENERATION-Z" in prompt
    assert "CONCEPT-X" in build_judge_prompt("concept", "CONCEPT-X", "I", "G")
    assert "INSTRUCTION-Y" in build_judge_prompt("instruction", "C", "INSTRUCTION-Y", "G")
    with pytest.raises(ValueError, match="Unknown judge aspect 'style'"):
        build_judge_prompt("style", "c", "i", "g")


def test_missing_api_key_for_openai_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("HYPERSTEER_TEST_KEY", raising=False)
    with pytest.raises(ValueError, match="HYPERSTEER_TEST_KEY"):
        CachedChatClient(api_key_env="HYPERSTEER_TEST_KEY")
    # A local endpoint needs no key.
    client = CachedChatClient(base_url="http://127.0.0.1:9/v1", api_key_env="HYPERSTEER_TEST_KEY")
    assert client.base_url == "http://127.0.0.1:9/v1"


# ---------------------------------------------------------------------------------------------------------------
# Through the loopback server
# ---------------------------------------------------------------------------------------------------------------
def selection_rows():
    """Rows where the best factor on "select" is not the best on "test", plus single-factor baselines."""
    return [
        # hypersteer, concept "law": select prefers 0.5 (2.0 vs 1.5); test alone would prefer 1.0 (2.0 vs 1.0),
        # and so would both splits pooled (1.75 vs 1.5).
        row("hypersteer", "law", 0.5, "select", (2, 2, 2), "a1"),  # 2.0
        row("hypersteer", "law", 0.5, "select", (2, 2, 2), "a2"),  # 2.0
        row("hypersteer", "law", 1.0, "select", (2, 1, 2), "a3"),  # 1.5
        row("hypersteer", "law", 1.0, "select", (2, 1, 2), "a4"),  # 1.5
        row("hypersteer", "law", 0.5, "test", (1, 1, 1), "a5"),  # 1.0
        row("hypersteer", "law", 0.5, "test", (1, 2, 1), "a6"),  # 1.2
        row("hypersteer", "law", 1.0, "test", (2, 2, 2), "a7"),  # 2.0 (not chosen)
        row("hypersteer", "law", 1.0, "test", (2, 2, 2), "a8"),
        # hypersteer, concept "code": select prefers 1.0 (mean 1.5 vs 0.0); test at 1.0: 2.0 and 0.0.
        row("hypersteer", "code", 0.5, "select", (0, 2, 2), "b1"),  # 0.0
        row("hypersteer", "code", 1.0, "select", (2, 1, 2), "b2"),  # 1.5
        row("hypersteer", "code", 0.5, "test", (2, 2, 2), "b3"),  # 2.0 (not chosen)
        row("hypersteer", "code", 1.0, "test", (2, 2, 2), "b4"),  # 2.0
        row("hypersteer", "code", 1.0, "test", (0, 1, 2), "b5"),  # 0.0
        # prompt baseline: a single factor.
        row("prompt", "law", 1.0, "select", (2, 2, 1), "c1"),
        row("prompt", "law", 1.0, "test", (2, 2, 1), "c2"),  # 1.5
        row("prompt", "code", 1.0, "select", (1, 1, 1), "c3"),
        row("prompt", "code", 1.0, "test", (1, 2, 2), "c4"),  # 1.5
        row("prompt", "code", 1.0, "test", (1, 1, 1), "c5"),  # 1.0
    ]


def test_summary_matches_hand_computed_harmonic_means(openai_stub, tmp_path):
    rows = selection_rows()
    client = make_client(openai_stub, tmp_path / "cache.sqlite")
    judged = judge_generations(client, rows)

    assert client.requests_sent == openai_stub.request_count == 3 * len(rows)
    assert all(r["judge_status"] == "ok" for r in judged)
    assert [r["method"] for r in judged] == [r["method"] for r in rows]  # input order and fields are kept
    assert judged[0]["score"] == pytest.approx(2.0)
    assert (judged[2]["concept_score"], judged[2]["instruction_score"], judged[2]["fluency_score"]) == (2, 1, 2)
    assert judged[2]["score"] == pytest.approx(1.5)
    assert judged[5]["score"] == pytest.approx(3 / (1 + 1 / 2 + 1))
    assert judged[8]["score"] == 0.0
    # The judge model is the one asked for.
    assert {r.model for r in openai_stub.requests} == {"judge-stub"}

    summary = select_and_report(judged)["methods"]
    hs = summary["hypersteer"]
    assert hs["best_factors"] == {"law": 0.5, "code": 1.0}
    # law @ 0.5 on test: scores 1.0, 1.2; ratings (1,1,1), (1,2,1). code @ 1.0 on test: 2.0, 0.0; (2,2,2), (0,1,2).
    assert hs["score"] == pytest.approx(((1.0 + 1.2) / 2 + (2.0 + 0.0) / 2) / 2)
    assert hs["concept_score"] == pytest.approx(((1 + 1) / 2 + (2 + 0) / 2) / 2)
    assert hs["instruction_score"] == pytest.approx(((1 + 2) / 2 + (2 + 1) / 2) / 2)
    assert hs["fluency_score"] == pytest.approx(((1 + 1) / 2 + (2 + 2) / 2) / 2)
    assert hs["per_concept"]["law"]["num_test_samples"] == 2
    assert hs["failed_judgements"] == 0

    prompt = summary["prompt"]
    assert prompt["best_factors"] == {"law": 1.0, "code": 1.0}
    assert prompt["score"] == pytest.approx((1.5 + (1.5 + 1.0) / 2) / 2)
    assert prompt["concept_score"] == pytest.approx((2 + (1 + 1) / 2) / 2)
    assert prompt["fluency_score"] == pytest.approx((1 + (2 + 1) / 2) / 2)


def test_hash_derived_ratings_match_the_stub(openai_stub, tmp_path):
    rows = [
        {"concept": "legal terms", "instruction": f"Question {k}?", "generation": f"Answer {k}."} for k in range(4)
    ]
    judged = judge_generations(make_client(openai_stub, tmp_path / "cache.sqlite"), rows, judge_model="other-judge")
    for r in judged:
        prompts = [build_judge_prompt(a, r["concept"], r["instruction"], r["generation"]) for a in JUDGE_ASPECTS]
        expected = [stub_rating(prompt) for prompt in prompts]
        assert [r["concept_score"], r["instruction_score"], r["fluency_score"]] == expected
        assert r["score"] == pytest.approx(harmonic_score(*expected))
    assert {r.model for r in openai_stub.requests} == {"other-judge"}


def test_rate_limits_and_server_errors_are_retried(openai_stub, tmp_path):
    rows = selection_rows()[:4]
    openai_stub.fail_next(2, "rate_limit")
    openai_stub.fail_next(1, "server_error", status=503)
    openai_stub.fail_next(1, "server_error")
    client = make_client(openai_stub, tmp_path / "cache.sqlite")
    judged = judge_generations(client, rows)

    assert all(r["judge_status"] == "ok" for r in judged)
    assert [r["score"] for r in judged] == pytest.approx([2.0, 2.0, 1.5, 1.5])
    assert client.requests_sent == openai_stub.request_count == 3 * len(rows) + 4
    assert sum(r.behaviour != "ok" for r in openai_stub.requests) == 4


def test_retry_after_header_is_honoured(openai_stub, tmp_path):
    openai_stub.fail_next(1, "rate_limit", retry_after="0.4")
    client = make_client(openai_stub, None, initial_backoff=0.001)
    start = time.monotonic()
    result = client.complete_many_sync(["hello"])[0]
    assert result.ok and result.attempts == 2
    assert time.monotonic() - start >= 0.4


def test_timeouts_are_retried_then_reported(openai_stub, tmp_path):
    client = make_client(openai_stub, tmp_path / "cache.sqlite", timeout=0.8, max_retries=1)
    openai_stub.fail_matching("slow once", "slow", times=1, delay=3)
    openai_stub.fail_matching("always slow", "slow", delay=3)
    once, always = client.complete_many_sync(["slow once", "always slow"])
    assert once.ok and once.attempts == 2
    assert always.status.startswith("failed: APITimeoutError") and "gave up after 2 attempts" in always.status
    assert always.text is None and always.attempts == 2


def test_client_errors_are_not_retried(openai_stub, tmp_path):
    openai_stub.fail_matching("bad", "bad_request")
    client = make_client(openai_stub, tmp_path / "cache.sqlite")
    (result,) = client.complete_many_sync(["a bad request"])
    assert result.status.startswith("failed: BadRequestError 400") and result.attempts == 1
    assert client.failed_results == 1 and openai_stub.request_count == 1


def test_persistent_failures_and_garbage_are_failed_not_zero(openai_stub, tmp_path):
    rows = selection_rows()
    # Row a1's instruction appears only in its instruction prompt; row a3's concept text only in its concept prompt.
    openai_stub.fail_matching("Instruction a1:", "server_error")
    rows[2] = {**rows[2], "concept": "law (garbage)"}
    openai_stub.fail_matching("law (garbage)", "garbage")
    client = make_client(openai_stub, tmp_path / "cache.sqlite", max_retries=2)
    judged = judge_generations(client, rows)

    a1, a3 = judged[0], judged[2]
    assert a1["judge_status"].startswith("api_failed: instruction: InternalServerError 500")
    assert a1["instruction_score"] is None and a1["score"] is None
    assert a1["concept_score"] == 2 and a1["fluency_score"] == 2
    assert a3["judge_status"] == "parse_failed: concept"
    assert a3["concept_score"] is None and a3["score"] is None
    assert sum(r["judge_status"] != "ok" for r in judged) == 2
    # 3 attempts for the failing call (max_retries=2), one for every other call.
    assert client.requests_sent == openai_stub.request_count == 3 * len(rows) + 2

    # a3 moved to its own concept ("law (garbage)" has only failed samples and is left out) and a1 is excluded:
    # "law" @ 0.5 still wins on select with a2 alone (2.0 vs 1.5); the test-split means are unchanged.
    hs = select_and_report(judged)["methods"]["hypersteer"]
    assert hs["failed_judgements"] == 2
    assert hs["best_factors"] == {"law": 0.5, "code": 1.0}
    assert hs["score"] == pytest.approx(((1.0 + 1.2) / 2 + (2.0 + 0.0) / 2) / 2)

    # Failed calls were not cached: a rerun asks again for exactly those two, and now they succeed.
    openai_stub.clear_rules()
    rerun_client = make_client(openai_stub, tmp_path / "cache.sqlite")
    rejudged = judge_generations(rerun_client, rows)
    assert rerun_client.requests_sent == 2 and rerun_client.cache_hits == 3 * len(rows) - 2
    assert all(r["judge_status"] == "ok" for r in rejudged)


def test_failed_judgement_excluded_from_selection(openai_stub, tmp_path):
    # If the failed sample counted as 0, factor 1.0 (mean 1.0) would beat factor 0.5 (mean (2 + 0) / 2).
    rows = [
        row("hs", "law", 0.5, "select", (2, 2, 2), "s1"),
        row("hs", "law", 0.5, "select", (2, 2, 2), "s2"),
        row("hs", "law", 1.0, "select", (1, 1, 1), "s3"),
        row("hs", "law", 0.5, "test", (1, 1, 1), "t1"),
        row("hs", "law", 1.0, "test", (2, 2, 2), "t2"),
    ]
    rows[1]["generation"] += " fluency-garbage"
    openai_stub.fail_matching("fluency-garbage", "garbage")
    judged = judge_generations(make_client(openai_stub, tmp_path / "c.sqlite"), rows)
    assert judged[1]["judge_status"] == "parse_failed: concept; parse_failed: instruction; parse_failed: fluency"
    report = select_and_report(judged)["methods"]["hs"]
    assert report["best_factors"] == {"law": 0.5}
    assert report["score"] == pytest.approx(1.0)
    assert report["failed_judgements"] == 1


def test_second_run_sends_zero_requests(openai_stub, tmp_path):
    rows = selection_rows()
    first = judge_generations(make_client(openai_stub, tmp_path / "cache.sqlite"), rows)
    sent = openai_stub.request_count
    assert sent == 3 * len(rows)

    client = make_client(openai_stub, tmp_path / "cache.sqlite")
    second = judge_generations(client, rows)
    assert client.requests_sent == 0 and openai_stub.request_count == sent
    assert client.cache_hits == 3 * len(rows)
    assert second == first


def test_identical_requests_are_sent_once_and_sampling_settings_are_in_the_key(openai_stub, tmp_path):
    client = make_client(openai_stub, tmp_path / "cache.sqlite")
    results = client.complete_many_sync(["same", "same", {"messages": [{"role": "user", "content": "same"}]}])
    assert [r.text for r in results] == [results[0].text] * 3
    assert client.requests_sent == 1 == openai_stub.request_count
    client.complete_many_sync([ChatRequest(messages=[{"role": "user", "content": "same"}], temperature=0.7)])
    client.complete_many_sync([ChatRequest(messages=[{"role": "user", "content": "same"}], max_tokens=5)])
    client.complete_many_sync(
        [ChatRequest(messages=[{"role": "user", "content": "same"}], sampling_kwargs={"top_p": 0.5})]
    )
    assert openai_stub.request_count == 4
    client.complete_many_sync([ChatRequest(messages=[{"role": "user", "content": "same"}], model="another")])
    assert openai_stub.request_count == 5
    assert client.complete_many_sync(["same"])[0].from_cache


def test_cache_key_includes_the_endpoint_and_the_model(openai_stub, tmp_path):
    cache = tmp_path / "cache.sqlite"
    first = make_client(openai_stub, cache)
    first.complete_many_sync(["same"])
    assert first.requests_sent == 1
    first.close()
    # Another endpoint (the same loopback server under another host name stands for a second server serving the
    # same model name) must not be answered from the first one's cache.
    other_endpoint = make_client(openai_stub, cache, base_url=openai_stub.base_url.replace("127.0.0.1", "localhost"))
    assert not other_endpoint.complete_many_sync(["same"])[0].from_cache
    assert other_endpoint.requests_sent == 1
    other_endpoint.close()
    other_model = make_client(openai_stub, cache, model="another-judge")
    assert not other_model.complete_many_sync(["same"])[0].from_cache
    other_model.close()
    # A trailing slash names the same endpoint.
    same = make_client(openai_stub, cache, base_url=openai_stub.base_url + "/")
    assert same.complete_many_sync(["same"])[0].from_cache and same.requests_sent == 0
    assert openai_stub.request_count == 3


def test_methods_are_reported_over_one_common_concept_set():
    def sample(method, concept, split, score, status="ok", factor=1.0):
        return {
            "method": method,
            "concept": concept,
            "factor": factor,
            "split": split,
            "score": score,
            "judge_status": status,
        }

    samples = []
    for method, scores in (("hypersteer", {"law": 2.0, "code": 0.5, "tides": 1.0}), ("prompt", {"law": 1.0})):
        for concept, score in scores.items():
            samples += [sample(method, concept, "select", score), sample(method, concept, "test", score)]
    # Prompting lost every valid judgement of "code" (failed calls), and has no samples of "tides" at all.
    samples += [sample("prompt", "code", split, None, "api_failed: concept: 500") for split in ("select", "test")]
    report = select_and_report(samples)
    assert report["concepts"] == ["law"]
    assert report["excluded_concepts"] == {
        "code": ["prompt: no valid judgement on the 'select' split, so no factor can be chosen"],
        "tides": ["prompt: no samples"],
    }
    hypersteer, prompt = report["methods"]["hypersteer"], report["methods"]["prompt"]
    # Averaged over "law" only, like prompting (not (2.0 + 0.5 + 1.0) / 3).
    assert hypersteer["score"] == pytest.approx(2.0) and prompt["score"] == pytest.approx(1.0)
    assert hypersteer["num_concepts"] == prompt["num_concepts"] == 1
    assert set(hypersteer["per_concept"]) == set(prompt["per_concept"]) == {"law"}
    assert prompt["failed_judgements"] == 2


_KILLED_RUN_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from modeling_hypersteer.judge import judge_generations
    from modeling_hypersteer.openai_client import CachedChatClient

    base_url, cache_path, rows_path = sys.argv[1:4]
    rows = json.load(open(rows_path))
    client = CachedChatClient(model="judge-stub", base_url=base_url, cache_path=cache_path, max_concurrency=1,
                              timeout=60.0)
    judge_generations(client, rows)
    """
)


def test_killed_run_resumes_without_repeating_paid_requests(openai_stub, tmp_path):
    rows = selection_rows()[:6]
    total, answered_before_kill = 3 * len(rows), 7
    rows_path, script_path, cache_path = tmp_path / "rows.json", tmp_path / "run.py", tmp_path / "cache.sqlite"
    rows_path.write_text(json.dumps(rows))
    script_path.write_text(_KILLED_RUN_SCRIPT)
    # The first K requests are answered; the next one hangs until the process is killed.
    openai_stub.fail_next(answered_before_kill, "ok")
    openai_stub.fail_next(1, "slow", delay=30)
    process = subprocess.Popen(
        [sys.executable, str(script_path), openai_stub.base_url, str(cache_path), str(rows_path)],
        cwd=REPO_ROOT,
        env={**__import__("os").environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        openai_stub.wait_for_requests(answered_before_kill + 1, timeout=60)
    finally:
        process.kill()  # SIGKILL: no cleanup, no flush
        _, stderr = process.communicate(timeout=10)
    assert process.returncode != 0, stderr.decode()
    with sqlite3.connect(cache_path) as connection:
        assert connection.execute("SELECT COUNT(*) FROM completions").fetchone()[0] == answered_before_kill

    client = make_client(openai_stub, cache_path)
    judged = judge_generations(client, rows)
    assert all(r["judge_status"] == "ok" for r in judged)
    assert client.cache_hits == answered_before_kill
    assert client.requests_sent == total - answered_before_kill
    prompts = openai_stub.prompts()
    assert len(set(prompts)) == total
    # Only the request in flight at the kill was sent twice.
    assert len(prompts) == total + 1
    assert prompts.count(prompts[answered_before_kill]) == 2


def test_select_and_report_validates_samples():
    sample = {"method": "hs", "concept": "c", "factor": 1.0, "split": "select", "score": 1.0, "judge_status": "ok"}
    with pytest.raises(ValueError, match="lacks the key"):
        select_and_report([{k: v for k, v in sample.items() if k != "split"}])
    with pytest.raises(ValueError, match="split 'validation'"):
        select_and_report([{**sample, "split": "validation"}])
    # A concept without any test sample is left out instead of scoring 0.
    report = select_and_report([sample])["methods"]["hs"]
    assert report["score"] is None and report["best_factors"] == {"c": 1.0} and report["num_concepts"] == 0
