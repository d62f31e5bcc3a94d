# Copyright 2025 The HyperSteer Authors. Licensed under the Apache License, Version 2.0.
r"""Generate concept-steering training data with a teacher LLM, in the AxBench schema.

For every concept description, a fixed random sample of instructions is answered by a teacher model asked to weave
the concept into its answer, or (`--response_style about`) paired with text the teacher writes about the concept
itself, which a small local model can write for any description. Each row is `input` (the instruction), `output` (the
teacher's answer), `output_concept` (the concept), `concept_id`, `category` ("positive"), `concept_genre` and `source`
(the teacher): the format `train_hypersteer.py` reads.

Runs are resumable and never pay twice: each finished row is appended to `<output>.partial.jsonl` as soon as it
arrives and every API answer is cached in `<output>.teacher_cache.sqlite`, so rerunning the same command after a
crash (or after failures) only generates what is missing. The final parquet is written atomically. Failed
generations, empty answers and answers cut off by `--max_new_tokens` (`finish_reason == "length"`) are never written;
they are counted and reported at the end, and the script then exits with status 1 (after writing the good rows).
The library code lives in `modeling_hypersteer.concept_data`.

Ready-to-copy commands (from the repository root):

```bash
# 50 AxBench Concept500 concepts x 8 instructions, teacher gpt-4o-mini (needs OPENAI_API_KEY):
python generate_concept_data.py \
    --concepts_file ../shared/data/axbench/concept500/prod_2b_l20_v1/metadata.jsonl --max_concepts 50 \
    --instructions_file ../shared/data/axbench/concept10/prod_2b_l20_v1/train_data.parquet \
    --examples_per_concept 8 --output_path data/concept50_gpt4omini.parquet

# Any OpenAI-compatible server (vLLM, llama.cpp, TGI...), e.g. `vllm serve Qwen/Qwen2.5-7B-Instruct`:
python generate_concept_data.py --concepts_file my_concepts.txt --instructions_file my_instructions.txt \
    --teacher_model Qwen/Qwen2.5-7B-Instruct --teacher_base_url http://127.0.0.1:8000/v1 --max_concurrency 64 \
    --output_path data/my_concepts_qwen.parquet

# A local HuggingFace chat model as teacher (batched `generate`, greedy when --temperature 0):
python generate_concept_data.py --teacher_backend hf --teacher_model /models/SmolLM2-1.7B-Instruct \
    --concepts_file my_concepts.txt --instructions_file my_instructions.txt --temperature 0 --batch_size 16 \
    --output_path data/my_concepts_smollm2.parquet

# No paid teacher: the base being steered writes text *about* each concept (rows for thousands of descriptions):
python generate_concept_data.py --teacher_backend hf --response_style about \
    --teacher_model $(python -c 'from modeling_hypersteer.smollm2 import smollm2_path; print(smollm2_path())') \
    --concepts_file ../shared/data/axbench_more/concept16k/descriptions.jsonl --max_concepts 1000 \
    --examples_per_concept 4 --temperature 0.7 --max_new_tokens 320 --output_path data/concept1000_about.parquet

# All arguments from a JSON or YAML file (command-line flags override it):
python generate_concept_data.py generation_args.json
python generate_concept_data.py --config generation_args.yaml --max_concepts 5
```

`--concepts_file` accepts a text file (one description per line), a JSONL file with a `concept` field (optional
`concept_id`, `concept_genre`), an AxBench `metadata.jsonl` (`concept_id`, `concept`, `concept_genres_map`), or
AxBench data rows (JSONL/parquet with `output_concept`, `concept_id`), whose distinct positive concepts are used.
`--instructions_file` accepts a text file (one instruction per line), a JSONL file with an `input` (or
`instruction`) field, or a parquet file with an `input` column (e.g. an AxBench `train_data.parquet`).
"""

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import transformers
from transformers import HfArgumentParser

from modeling_hypersteer.cli import parse_arguments
from modeling_hypersteer.concept_data import (
    ConceptDataArguments,
    RowWriter,
    generate_with_hf,
    generate_with_openai,
    load_concepts,
    load_instructions,
    plan_pairs,
    read_finished_rows,
    teacher_prompts,
    write_parquet_atomically,
)


logger = logging.getLogger(__name__)


def make_parser() -> HfArgumentParser:
    return HfArgumentParser(ConceptDataArguments)


def parse_args(argv: Sequence[str] | None = None) -> ConceptDataArguments:
    """Parses flags, a lone `.json` / `.yaml` file of arguments, or `--config FILE` plus overriding flags."""
    (args,) = parse_arguments(make_parser(), argv)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the generation; returns the exit status: 1 if any generation failed (the good rows are still written)."""
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S", level=logging.INFO
    )
    transformers.utils.logging.set_verbosity_warning()
    args = parse_args(argv)
    transformers.set_seed(args.seed)

    concepts = load_concepts(args.concepts_file, args.max_concepts)
    instructions = load_instructions(args.instructions_file)
    pairs = plan_pairs(concepts, instructions, args.examples_per_concept, args.seed)
    finished = read_finished_rows(args.partial_path, args.row_source)
    pending = [pair for pair in pairs if (pair[0].concept, pair[1]) not in finished]
    logger.info(
        f"{len(concepts)} concepts x {len(pairs) // len(concepts)} instructions = {len(pairs)} rows; "
        f"{len(pairs) - len(pending)} already done in {args.partial_path}, {len(pending)} to generate with "
        f"{args.teacher_model!r} ({args.teacher_backend})."
    )

    writer = RowWriter(args.partial_path, args.row_source)
    try:
        if pending:
            generate = generate_with_openai if args.teacher_backend == "openai" else generate_with_hf
            generate(args, pending, teacher_prompts(pairs, pending, args.response_style), writer)
    finally:
        writer.close()

    finished = read_finished_rows(args.partial_path, args.row_source)
    # Ids and genres come from the current concepts file (a row is keyed by its concept text and instruction).
    rows = [
        {**finished[(concept.concept, instruction)], "concept_id": concept.concept_id, "concept_genre": concept.genre}
        for concept, instruction in pairs
        if (concept.concept, instruction) in finished
    ]
    failures = writer.failures
    if failures:
        shown = "\n  ".join(failures[:5])
        logger.warning(
            f"{len(failures)} of {len(pending)} generations failed and were not written; rerun the same command to "
            f"retry only those. First failures:\n  {shown}"
        )
    if writer.truncated:
        logger.warning(
            f"{writer.truncated} of those answers were cut off at --max_new_tokens {args.max_new_tokens} "
            "(finish_reason 'length') and were not written as complete rows; raise --max_new_tokens to regenerate them "
            "(with the same setting a rerun replays them from the cache)."
        )
    if not rows:
        logger.error(f"No row could be generated; nothing written to {args.output_path}.")
        return 1
    write_parquet_atomically(rows, Path(args.output_path))
    logger.info(
        f"Wrote {len(rows)} rows for {len({row['concept_id'] for row in rows})} concepts to {args.output_path} "
        f"({len(failures)} failed generations)."
    )
    if failures:
        logger.error(f"{len(failures)} of {len(pending)} generations attempted in this run failed; exit status 1.")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
