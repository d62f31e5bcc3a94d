r"""Probe: does text the base writes *about* a concept train a vector that shows the concept, as real rows do?

One vector per concept trained with the LM loss on AxBench rows shows its concept in text far better than HyperSteer
(`text_vector_bound.json`), and directions *read* from the base do not show it at all
(`probe_training_free_directions.py`, DiffMean over real rows included). Real rows exist for a few hundred concepts;
text about a description, written by the frozen base itself, exists for any. This probe trains the same per-concept
vectors twice on the run's first 12 held-in concepts, with the same number of rows per concept, the same
instructions and the same steps: once on the concepts' real training rows, once with each real response replaced by
the base's own sampled answer to a request to write about the description (`ABOUT_PROMPT_TEMPLATES`, the requests of
`generate_concept_data.py --response_style about`). Both are scored by the text metric (a detector trained on the
concepts' real responses) against prompting and the unsteered base.

    python benchmarks/quality/probe_self_written_vectors.py --run_dir /tmp/hq4/recipe_prior48_600 \
        --output_dir /tmp/hq7/sw --name recipe_prior48_600
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import transformers


REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
sys.path.insert(0, str(REPO_ROOT / "benchmarks" / "quality"))

from probe_training_free_directions import vector_text_rows  # noqa: E402
from probe_vector_regression import positive_training_rows, report  # noqa: E402

from modeling_hypersteer import HyperSteerModel  # noqa: E402
from modeling_hypersteer.baselines import baseline_concept_vectors  # noqa: E402
from modeling_hypersteer.concept_data import ABOUT_PROMPT_TEMPLATES  # noqa: E402
from modeling_hypersteer.data import format_prompt  # noqa: E402
from modeling_hypersteer.text_metric import ConceptDetector  # noqa: E402


RESULTS_PATH = REPO_ROOT / "benchmarks" / "results" / "probe_self_written_vectors.json"


@torch.no_grad()
def self_written_samples(model, concepts: list[str], args) -> dict[str, list[str]]:
    """`{concept: texts}`: `args.rows_per_concept` sampled answers of the frozen base to the first
    `args.templates` requests to write about the concept, cycling over the requests."""
    tokenizer, language_model = model.tokenizer, model.language_model
    templates = ABOUT_PROMPT_TEMPLATES[: args.templates]
    per_template = -(-args.rows_per_concept // len(templates))
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    torch.manual_seed(args.seed)
    samples = {}
    try:
        for concept in concepts:
            prompts = [format_prompt(tokenizer, template.format(concept=concept)) for template in templates]
            encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            generated = language_model.generate(
                **encoded,
                max_new_tokens=args.max_new_tokens,
                do_sample=True,
                temperature=args.temperature,
                num_return_sequences=per_template,
            )
            texts = tokenizer.batch_decode(generated[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
            samples[concept] = texts[: args.rows_per_concept]
    finally:
        tokenizer.padding_side = padding_side
    return samples


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", required=True, help="A finished training run (its base, split and data).")
    parser.add_argument("--output_dir", required=True, help="Where the samples, vectors and generations are kept.")
    parser.add_argument("--concepts", type=int, default=12, help="Held-in concepts (the first, sorted).")
    parser.add_argument("--rows_per_concept", type=int, default=12, help="Training rows per concept, both kinds.")
    parser.add_argument("--templates", type=int, default=3, help="How many of ABOUT_PROMPT_TEMPLATES to use.")
    parser.add_argument("--max_new_tokens", type=int, default=96, help="Tokens of each self-written text.")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vector_steps", type=int, default=100, help="Training steps (batch 4) of the vectors.")
    parser.add_argument("--learning_rate", type=float, default=0.05)
    parser.add_argument("--factors", default="1,2,4,8", help="Factors of the text check.")
    parser.add_argument("--name", default=None, help="Row name in results/probe_self_written_vectors.json.")
    args = parser.parse_args(argv)
    if not 1 <= args.templates <= len(ABOUT_PROMPT_TEMPLATES):
        parser.error(f"--templates must be between 1 and {len(ABOUT_PROMPT_TEMPLATES)}, got {args.templates}.")
    transformers.utils.logging.set_verbosity_warning()

    run_dir, output_dir = Path(args.run_dir), Path(args.output_dir)
    model = HyperSteerModel.from_pretrained(run_dir).eval()
    data, _, train_rows = positive_training_rows(run_dir)
    concepts = sorted({row["output_concept"] for row in train_rows})[: args.concepts]
    samples_path = output_dir / "samples.json"
    if samples_path.is_file():
        samples = json.loads(samples_path.read_text())
    else:
        samples = self_written_samples(model, concepts, args)
        output_dir.mkdir(parents=True, exist_ok=True)
        samples_path.write_text(json.dumps(samples, indent=1))

    rows = {"real_rows": [], "self_written": []}
    for concept in concepts:
        real = [row for row in train_rows if row["output_concept"] == concept][: args.rows_per_concept]
        if len(real) < args.rows_per_concept or len(samples[concept]) < args.rows_per_concept:
            raise ValueError(f"{concept!r} has fewer than --rows_per_concept {args.rows_per_concept} rows or texts.")
        rows["real_rows"] += [{"input": r["input"], "output": r["output"], "output_concept": concept} for r in real]
        rows["self_written"] += [
            {"input": r["input"], "output": text, "output_concept": concept} for r, text in zip(real, samples[concept])
        ]

    detector = ConceptDetector.from_rows(data, concepts=concepts)
    factors = [float(value) for value in args.factors.split(",")]
    result = {
        "run_dir": str(run_dir),
        "command": "python benchmarks/quality/probe_self_written_vectors.py " + " ".join(argv or sys.argv[1:]),
        "concepts": concepts,
        "vectors": {},
    }
    for kind in ("self_written", "real_rows"):
        vectors = baseline_concept_vectors(
            "vector",
            model,
            model.tokenizer,
            rows[kind],
            [],
            [],
            output_dir / f"vectors_{kind}",
            steps=args.vector_steps,
            learning_rate=args.learning_rate,
        )
        result["vectors"][kind] = {
            "norm": round(torch.stack([vectors[c] for c in concepts]).norm(dim=-1).mean().item(), 2),
            "text": vector_text_rows(model, detector, concepts, vectors, factors, output_dir / f"text_{kind}.jsonl"),
        }
    return report(result, RESULTS_PATH, args.name)


if __name__ == "__main__":
    main()
