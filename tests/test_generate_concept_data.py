"""`generate_concept_data.py`: teacher-generated concept data, against the loopback OpenAI server and a tiny LM."""

import json
import logging
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from conftest import REPO_ROOT, build_tiny_base, build_tiny_tokenizer, cli_arguments
from openai_stub_server import default_answer
from transformers import LlamaForCausalLM

import generate_concept_data as gcd
from modeling_hypersteer import concept_data as cd


CONCEPTS = ["legal terminology and court proceedings", "C/C++ pointers and headers", "ocean tides and currents"]
INSTRUCTIONS = [
    "Explain sorting algorithms.",
    "Write a haiku about mornings.",
    "What is inflation?",
    "Describe a cat.",
]


@pytest.fixture
def inputs(tmp_path):
    concepts = tmp_path / "concepts.txt"
    concepts.write_text("\n".join(CONCEPTS) + "\n\n")
    instructions = tmp_path / "instructions.txt"
    instructions.write_text("\n".join(INSTRUCTIONS) + "\n")
    return concepts, instructions


def openai_argv(server, concepts, instructions, output, **overrides):
    options = {
        "concepts_file": concepts,
        "instructions_file": instructions,
        "output_path": output,
        "examples_per_concept": 2,
        "teacher_model": "teacher-stub",
        "teacher_base_url": server.base_url,
        "api_key_env": "HYPERSTEER_TEST_UNSET_KEY",
        "initial_backoff": 0.01,
        "max_retries": 2,
        "request_timeout": 10,
        "max_concurrency": 4,
    }
    options.update(overrides)
    return [item for key, value in options.items() for item in (f"--{key}", str(value))]


def read_rows(path):
    return pq.read_table(path).to_pylist()


def expected_output(concept, instruction):
    prompt = cd.build_teacher_prompt(concept, instruction)
    return default_answer({"messages": [{"role": "user", "content": prompt}]})


def test_rows_follow_the_axbench_schema(openai_stub, tmp_path, axbench_dir):
    metadata = axbench_dir / "concept500" / "prod_2b_l20_v1" / "metadata.jsonl"
    pool = axbench_dir / "concept10" / "prod_2b_l20_v1" / "train_data.parquet"
    output = tmp_path / "out" / "data.parquet"
    argv = openai_argv(openai_stub, metadata, pool, output, max_concepts=3, examples_per_concept=3, max_new_tokens=64)
    assert gcd.main(argv) == 0

    rows = read_rows(output)
    assert pq.read_schema(output).names == list(cd.OUTPUT_COLUMNS)
    assert len(rows) == 9 == openai_stub.request_count
    meta = [json.loads(line) for line in metadata.read_text().splitlines()[:3]]
    assert [row["concept_id"] for row in rows] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    pool_inputs = set(pq.read_table(pool, columns=["input"]).column("input").to_pylist())
    for row in rows:
        record = meta[row["concept_id"]]
        assert row["output_concept"] == record["concept"]
        assert row["concept_genre"] == record["concept_genres_map"][record["concept"]][0]
        assert row["category"] == "positive" and row["source"] == "teacher-stub"
        assert row["input"] in pool_inputs
        assert row["output"] == expected_output(row["output_concept"], row["input"]).strip()
        assert row["output_concept"] in row["output"]
    assert rows[6]["concept_genre"] == "code"  # concept 2 is C/C++ syntax in Concept500
    assert len({(row["concept_id"], row["input"]) for row in rows}) == 9
    sent = openai_stub.requests[0].body
    assert sent["model"] == "teacher-stub" and sent["max_tokens"] == 64 and sent["temperature"] == 0.7

    # Rerunning the finished command sends nothing and rewrites the same parquet.
    assert gcd.main(argv) == 0
    assert openai_stub.request_count == 9 and read_rows(output) == rows


def test_retried_failures_still_produce_every_row(openai_stub, tmp_path, inputs):
    openai_stub.fail_next(2, "rate_limit")
    openai_stub.fail_next(1, "server_error")
    output = tmp_path / "data.parquet"
    assert gcd.main(openai_argv(openai_stub, *inputs, output)) == 0
    assert len(read_rows(output)) == 6
    assert openai_stub.request_count == 6 + 3


def test_failed_generations_are_skipped_reported_and_retried_on_rerun(openai_stub, tmp_path, inputs, caplog):
    plan = cd.plan_pairs(cd.load_concepts(str(inputs[0])), INSTRUCTIONS, 2, seed=42)
    null_pair, blank_pair = [(c.concept, i) for c, i in plan if c.concept == CONCEPTS[2]]
    openai_stub.fail_matching(f"Concept: {CONCEPTS[1]}", "server_error")  # persistent 500s for a whole concept
    openai_stub.fail_matching(f"Concept: {null_pair[0]}\n\nInstruction: {null_pair[1]}", "empty")  # content null
    openai_stub.fail_matching(f"Concept: {blank_pair[0]}\n\nInstruction: {blank_pair[1]}", "garbage", text=" \n ")
    output = tmp_path / "data.parquet"
    argv = openai_argv(openai_stub, *inputs, output, max_retries=1)
    with caplog.at_level(logging.WARNING, logger="generate_concept_data"):
        assert gcd.main(argv) == 1  # some rows failed: non-zero, after writing the good ones
    rows = read_rows(output)
    assert {(row["output_concept"], row["input"]) for row in rows} == {(c.concept, i) for c, i in plan[:2]}
    assert "4 of 6 generations failed" in caplog.text
    assert "InternalServerError 500" in caplog.text and "the response has no message content" in caplog.text
    assert "empty answer" in caplog.text
    assert len(output.with_suffix(".partial.jsonl").read_text().splitlines()) == 2
    # 2 attempts for each 500 (max_retries=1), 1 for the null and the blank answers (not retryable), 2 successes.
    assert openai_stub.request_count == 2 * 2 + 1 + 1 + 2

    # A rerun retries only the 4 failed pairs (nothing failed was cached); if all of them fail again the exit status
    # is 1, and the parquet still holds the rows finished before.
    assert gcd.main(argv) == 1
    assert openai_stub.request_count == 8 + 6
    assert len(read_rows(output)) == 2

    openai_stub.clear_rules()
    assert gcd.main(argv) == 0
    assert openai_stub.request_count == 14 + 4
    assert {(row["output_concept"], row["input"]) for row in read_rows(output)} == {(c.concept, i) for c, i in plan}


def test_all_failed_exits_non_zero_and_writes_nothing(openai_stub, tmp_path, inputs):
    openai_stub.fail_matching("Concept:", "server_error")
    output = tmp_path / "data.parquet"
    assert gcd.main(openai_argv(openai_stub, *inputs, output, max_retries=0)) == 1
    assert not output.exists()
    assert openai_stub.request_count == 6


_RUN_SCRIPT = "import sys, generate_concept_data as g; sys.exit(g.main(sys.argv[1:]))"


def test_killed_run_resumes_from_the_partial_file(openai_stub, tmp_path, inputs):
    output = tmp_path / "data.parquet"
    argv = openai_argv(openai_stub, *inputs, output, max_concurrency=1)
    answered = 4
    openai_stub.fail_next(answered, "ok")
    openai_stub.fail_next(1, "slow", delay=30)
    process = subprocess.Popen(
        [sys.executable, "-c", _RUN_SCRIPT, *argv],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        openai_stub.wait_for_requests(answered + 1, timeout=60)
    finally:
        process.kill()
        _, stderr = process.communicate(timeout=10)
    assert process.returncode != 0, stderr.decode()
    partial = output.with_suffix(".partial.jsonl")
    kept = [json.loads(line) for line in partial.read_text().splitlines()]
    assert len(kept) == answered and not output.exists()
    # Resume from the partial file alone (no API cache), with a line cut in half by a crash at the end.
    output.with_suffix(".teacher_cache.sqlite").unlink()
    with partial.open("a") as handle:
        handle.write('{"input": "half a ro')
    first_prompts = openai_stub.prompts()[:answered]
    openai_stub.reset()

    assert gcd.main(openai_argv(openai_stub, *inputs, output)) == 0
    assert openai_stub.request_count == 6 - answered
    assert not set(openai_stub.prompts()) & set(first_prompts)
    rows = read_rows(output)
    assert len(rows) == 6 and rows == sorted(rows, key=lambda row: row["concept_id"])
    assert all(row["output"] == expected_output(row["output_concept"], row["input"]) for row in rows)


def test_bad_inputs_give_clear_errors(tmp_path, inputs, monkeypatch):
    concepts, instructions = inputs
    base = ["--output_path", str(tmp_path / "o.parquet"), "--teacher_base_url", "http://127.0.0.1:9/v1"]
    with pytest.raises(FileNotFoundError, match="--concepts_file .*missing.txt"):
        gcd.main(["--concepts_file", str(tmp_path / "missing.txt"), "--instructions_file", str(instructions), *base])
    with pytest.raises(FileNotFoundError, match="--instructions_file"):
        gcd.main(["--concepts_file", str(concepts), "--instructions_file", str(tmp_path / "nope.txt"), *base])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="contains no concepts"):
        gcd.main(["--concepts_file", str(empty), "--instructions_file", str(instructions), *base])
    no_field = tmp_path / "concepts.jsonl"
    no_field.write_text('{"name": "x"}\n')
    with pytest.raises(ValueError, match="no non-empty string `concept`"):
        cd.load_concepts(str(no_field))
    clash = tmp_path / "clash.jsonl"
    clash.write_text('{"concept": "a", "concept_id": 3}\n{"concept": "b", "concept_id": 3}\n')
    with pytest.raises(ValueError, match="concept_id 3 names two concepts"):
        cd.load_concepts(str(clash))
    no_input = tmp_path / "no_input.parquet"
    cd.write_parquet_atomically([], tmp_path / "x.parquet")  # an empty but valid file in the output schema
    pq.write_table(pq.read_table(tmp_path / "x.parquet").drop(["input"]), no_input)
    with pytest.raises(ValueError, match="no `input` or `instruction` column"):
        cd.load_instructions(str(no_input))
    with pytest.raises(ValueError, match="must end in .parquet"):
        gcd.parse_args(["--concepts_file", str(concepts), "--output_path", str(tmp_path / "o.csv")])
    with pytest.raises(ValueError, match="--max_concepts must be >= 1"):
        gcd.parse_args(["--concepts_file", str(concepts), "--max_concepts", "0", *base])

    monkeypatch.setattr(cd, "BUNDLED_INSTRUCTIONS", tmp_path / "absent.jsonl")
    with pytest.raises(ValueError, match="pass --instructions_file"):
        cd.load_instructions(None)
    bundled = tmp_path / "bundled.jsonl"
    bundled.write_text('{"input": "First?", "output": "a"}\n{"input": "Second?"}\n{"input": "First?"}\n')
    monkeypatch.setattr(cd, "BUNDLED_INSTRUCTIONS", bundled)
    assert cd.load_instructions(None) == ["First?", "Second?"]

    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("HYPERSTEER_TEST_UNSET_KEY", raising=False)
    with pytest.raises(ValueError, match="HYPERSTEER_TEST_UNSET_KEY"):
        gcd.main(
            [
                "--concepts_file",
                str(concepts),
                "--instructions_file",
                str(instructions),
                "--output_path",
                str(tmp_path / "k.parquet"),
                "--api_key_env",
                "HYPERSTEER_TEST_UNSET_KEY",
            ]
        )


def test_partial_file_of_another_teacher_is_refused(openai_stub, tmp_path, inputs):
    output = tmp_path / "data.parquet"
    assert gcd.main(openai_argv(openai_stub, *inputs, output)) == 0
    with pytest.raises(ValueError, match="holds rows generated by 'teacher-stub'"):
        gcd.main(openai_argv(openai_stub, *inputs, output, teacher_model="another-teacher"))


def test_concepts_from_axbench_data_rows(axbench_dir, tmp_path):
    train = axbench_dir / "concept10" / "prod_2b_l20_v1" / "train_data.parquet"
    table = pq.read_table(train).to_pylist()
    expected = {row["concept_id"]: row["output_concept"] for row in table if row["category"] == "positive"}
    concepts = cd.load_concepts(str(train))
    assert {c.concept_id: c.concept for c in concepts} == expected and len(concepts) == 10
    assert cd.load_concepts(str(train), max_concepts=2) == concepts[:2]
    text = tmp_path / "c.txt"
    text.write_text("alpha\n\nbeta\nalpha\n")
    assert cd.load_concepts(str(text)) == [cd.Concept(0, "alpha"), cd.Concept(1, "beta")]


def test_pair_plan_is_stable_and_seeded():
    concepts = [cd.Concept(i, f"concept {i}") for i in range(4)]
    pool = [f"instruction {i}" for i in range(20)]
    plan = cd.plan_pairs(concepts, pool, 5, seed=1)
    assert cd.plan_pairs(concepts[:2], pool, 5, seed=1) == plan[:10]  # fewer concepts: same pairs for the rest
    assert cd.plan_pairs(concepts, pool, 5, seed=2) != plan
    assert all(len({i for c, i in plan if c == concept}) == 5 for concept in concepts)
    assert len(cd.plan_pairs(concepts[:1], pool[:3], 5, seed=1)) == 3  # capped at the pool size


def test_parser_flags_have_help_and_json_config(tmp_path):
    parser = gcd.make_parser()
    options = {action.dest: action for action in parser._actions if action.dest != "help"}
    for name in (
        "concepts_file",
        "max_concepts",
        "instructions_file",
        "examples_per_concept",
        "seed",
        "output_path",
        "teacher_backend",
        "teacher_model",
        "teacher_base_url",
        "api_key_env",
        "max_concurrency",
    ):
        assert options[name].help, name
    config = tmp_path / "args.json"
    config.write_text(
        json.dumps(
            {
                "concepts_file": "c.txt",
                "output_path": "o.parquet",
                "teacher_backend": "hf",
                "teacher_model": "/models/x",
            }
        )
    )
    args = gcd.parse_args([str(config)])
    assert args.teacher_backend == "hf" and args.partial_path.name == "o.partial.jsonl"
    yaml_config = tmp_path / "args.yaml"
    yaml_config.write_text("concepts_file: c.txt\noutput_path: o.parquet\ntemperature: 0\nmax_concepts: 5\n")
    args = gcd.parse_args(["--config", str(yaml_config), "--max_concepts", "2"])
    assert args.temperature == 0.0 and isinstance(args.temperature, float) and args.max_concepts == 2
    yaml_config.write_text("concepts_file: c.txt\noutput_path: o.parquet\nteacher_backend: vllm\n")
    with pytest.raises(ValueError, match=r"`teacher_backend` must be one of \['openai', 'hf'\], got 'vllm'"):
        gcd.parse_args(["--config", str(yaml_config)])
    assert "python generate_concept_data.py" in gcd.__doc__


def _greedy_new_tokens(model, tokenizer, concept, instruction, max_new_tokens):
    prompt = cd.build_teacher_prompt(concept, instruction)
    encoded = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output = model.generate(
        **encoded, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    return output[0, encoded["input_ids"].shape[1] :].tolist()


def test_hf_teacher_backend_writes_finished_answers_and_counts_cut_off_ones(tmp_path, inputs, monkeypatch, caplog):
    tokenizer = build_tiny_tokenizer()
    model_dir = tmp_path / "tiny-teacher"
    model = build_tiny_base("llama", vocab_size=len(tokenizer), num_hidden_layers=2)
    plan = cd.plan_pairs(cd.load_concepts(str(inputs[0])), INSTRUCTIONS, 2, seed=42)
    # A random tiny model never emits its EOS: make a token that ends some greedy answers (and not others) the EOS,
    # so that the run has both finished answers and answers cut off at --max_new_tokens.
    model.generation_config.eos_token_id = None
    answers = [_greedy_new_tokens(model, tokenizer, c.concept, i, 6) for c, i in plan]
    stop = next(
        token for answer in answers for token in answer if 0 < sum(token in other for other in answers) < len(answers)
    )
    model.generation_config.eos_token_id = stop
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    finished = {
        (c.concept, i): tokenizer.decode(answer[: answer.index(stop) + 1], skip_special_tokens=True).strip()
        for (c, i), answer in zip(plan, answers)
        if stop in answer
    }
    calls = []
    original_generate = LlamaForCausalLM.generate

    def counting_generate(self, *args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return original_generate(self, *args, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "generate", counting_generate)
    output = tmp_path / "hf.parquet"
    argv = cli_arguments(
        teacher_backend="hf",
        teacher_model=model_dir,
        concepts_file=inputs[0],
        instructions_file=inputs[1],
        examples_per_concept=2,
        max_new_tokens=6,
        temperature=0,
        batch_size=4,
        output_path=output,
        device="cpu",
    )
    with caplog.at_level(logging.WARNING, logger="generate_concept_data"):
        assert gcd.main(argv) == 1  # answers were cut off: the run is not complete
    assert calls == [4, 2]  # 6 pairs in batches of 4
    rows = read_rows(output)
    # Left-padded batches decode only the new tokens: each written row equals greedy decoding of its prompt alone,
    # up to its end token; the cut-off answers are not rows.
    assert {(row["output_concept"], row["input"]): row["output"] for row in rows} == finished
    assert all(row["source"] == str(model_dir) for row in rows)
    cut_off = len(plan) - len(finished)
    assert f"{cut_off} of those answers were cut off at --max_new_tokens 6" in caplog.text

    # Rerun: only the cut-off pairs are generated again (and are cut off again).
    assert gcd.main(argv) == 1
    assert sum(calls[2:]) == cut_off and read_rows(output) == rows


def test_answers_cut_off_by_the_token_limit_are_not_rows(openai_stub, tmp_path, inputs, caplog):
    plan = cd.plan_pairs(cd.load_concepts(str(inputs[0])), INSTRUCTIONS, 2, seed=42)
    concept, instruction = plan[0][0].concept, plan[0][1]
    openai_stub.fail_matching(f"Concept: {concept}\n\nInstruction: {instruction}", "truncated")
    output = tmp_path / "data.parquet"
    with caplog.at_level(logging.WARNING, logger="generate_concept_data"):
        assert gcd.main(openai_argv(openai_stub, *inputs, output)) == 1
    rows = read_rows(output)
    assert len(rows) == 5 and (concept, instruction) not in {(row["output_concept"], row["input"]) for row in rows}
    assert "1 of 6 generations failed" in caplog.text and "finish_reason='length'" in caplog.text
    assert "1 of those answers were cut off at --max_new_tokens 256" in caplog.text
    assert len(output.with_suffix(".partial.jsonl").read_text().splitlines()) == 5


def test_a_corrupt_progress_line_raises_with_file_and_line(openai_stub, tmp_path, inputs):
    output = tmp_path / "data.parquet"
    assert gcd.main(openai_argv(openai_stub, *inputs, output)) == 0
    partial = output.with_suffix(".partial.jsonl")
    lines = partial.read_text().splitlines()
    partial.write_text("\n".join([lines[0], '{"input": "broken', *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=rf"{partial.name}, line 2: not valid JSON"):
        gcd.main(openai_argv(openai_stub, *inputs, output))
    # A half-written *last* line is what a killed run leaves: ignored, then cut off before new rows are appended.
    partial.write_text("\n".join(lines[:3]) + '\n{"input": "half a ro')
    assert gcd.main(openai_argv(openai_stub, *inputs, output)) == 0
    assert [json.loads(line) for line in partial.read_text().splitlines()][:3] == [json.loads(x) for x in lines[:3]]
    assert len(read_rows(output)) == 6


def test_about_rows_pair_each_instruction_with_a_different_kind_of_text_about_the_concept(
    openai_stub, tmp_path, inputs
):
    output = tmp_path / "about.parquet"
    argv = openai_argv(openai_stub, *inputs, output, examples_per_concept=3, response_style="about")
    assert gcd.main(argv) == 0
    rows = read_rows(output)
    plan = cd.plan_pairs(cd.load_concepts(str(inputs[0])), INSTRUCTIONS, 3, seed=42)
    assert [(row["output_concept"], row["input"]) for row in rows] == [(c.concept, i) for c, i in plan]
    for concept in CONCEPTS:
        prompts = [
            request.body["messages"][0]["content"]
            for request in openai_stub.requests
            if concept in request.body["messages"][0]["content"]
        ]
        # One request per kind of text (sent concurrently, so in any order), none showing the row's instruction.
        assert sorted(prompts) == sorted(
            template.format(concept=concept) for template in cd.ABOUT_PROMPT_TEMPLATES[:3]
        )
        assert not any(instruction in prompt for prompt in prompts for instruction in INSTRUCTIONS)
    for row in rows:
        assert row["source"] == "teacher-stub (about)"
        assert row["output"] != expected_output(row["output_concept"], row["input"]).strip()

    # The k-th row of a concept has the k-th kind of text; a resumed run asks each missing row what the first run
    # would have asked (its place in the whole plan, not among the missing rows).
    prompts = cd.teacher_prompts(plan, plan, "about")
    assert prompts[:3] == [template.format(concept=plan[0][0].concept) for template in cd.ABOUT_PROMPT_TEMPLATES[:3]]
    assert cd.teacher_prompts(plan, plan[4:], "about") == prompts[4:]
    # Rows of the other style never mix into the same progress file.
    with pytest.raises(ValueError, match=r"holds rows generated by 'teacher-stub \(about\)', not by 'teacher-stub'"):
        gcd.main(openai_argv(openai_stub, *inputs, output, examples_per_concept=3))


def test_about_style_rejects_more_rows_than_kinds_of_text_and_reads_concept16k(tmp_path, inputs):
    limit = len(cd.ABOUT_PROMPT_TEMPLATES)
    with pytest.raises(ValueError, match=f"at most {limit} rows per concept.*--examples_per_concept {limit + 1}"):
        gcd.parse_args(
            ["--concepts_file", "c.txt", "--output_path", "o.parquet", "--response_style", "about"]
            + ["--examples_per_concept", str(limit + 1)]
        )
    with pytest.raises(ValueError, match="--response_style must be one of"):
        cd.ConceptDataArguments(concepts_file="c.txt", output_path="o.parquet", response_style="story")
    with pytest.raises(ValueError, match="`response_style` must be one of"):
        cd.teacher_prompts([], [], "story")
    concept16k = tmp_path / "descriptions.jsonl"
    concept16k.write_text('{"feature_index": 7, "description": "time intervals."}\n')
    assert cd.load_concepts(str(concept16k)) == [cd.Concept(7, "time intervals.")]
