"""Probe: do never-trained concepts separate better when the part their vectors share is removed or the rest scaled up?

A recipe vector of a never-trained description is mostly the direction every vector shares (cosine 0.80-0.90 with the
mean vector of the run's held-in concepts). This probe changes the vectors at inference only, and scores them with
the offline metric on the rows `quality_ablation.py` scores (held-out concepts of the run's split, the held-back
concept_llama set), against prompting, pooled over runs with the worst run:

* `kK`: `m + K (v - m)`, the concept-specific part `v - m` scaled by `K` (`m`: the held-in mean vector), like
  guidance on the vector; `k1` is the model's own vector;
* `cA`: `v - A m`;  `rA`: `v - A m` rescaled to the norm of `v`.

    python benchmarks/quality/probe_concept_part_scale.py --name recipe_splits_42_7_2026 --variants k1,k2,k3 \\
        --run_dirs /tmp/hq10/recipe_split42,/tmp/hq10/recipe_split7,/tmp/hq10/recipe_split2026

Rows in `benchmarks/results/probe_concept_part_scale.json`.
"""

import argparse
import sys
from pathlib import Path

import torch
import transformers


REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import prompt_hypersteer_offline  # noqa: E402
import quality_ablation  # noqa: E402

from modeling_hypersteer import HyperSteerModel  # noqa: E402
from modeling_hypersteer.data import ConceptSplit  # noqa: E402
from modeling_hypersteer.evaluation import offline_steering_metric  # noqa: E402
from modeling_hypersteer.utils import CONCEPT_SPLIT_FILE, TRAINING_SUMMARY_FILE  # noqa: E402


RESULTS_PATH = REPO_ROOT / "benchmarks" / "results" / "probe_concept_part_scale.json"


def parse_variant(text: str) -> tuple[str, float]:
    """`"k2"` -> `("k", 2.0)`; raises `ValueError` naming the bad variant."""
    kind, value = text[:1], text[1:]
    try:
        number = float(value)
    except ValueError:
        number = None
    if kind not in ("k", "c", "r") or number is None or not number == number or abs(number) == float("inf"):
        raise ValueError(f"A variant is k<scale>, c<share> or r<share> with a finite number, got {text!r}.")
    return kind, number


def transform(vectors: torch.Tensor, mean: torch.Tensor, variant: str) -> torch.Tensor:
    """The vectors of `variant` (see the module docstring); `vectors` `(num_concepts, hidden_size)`, `mean`
    `(hidden_size,)`."""
    kind, number = parse_variant(variant)
    if kind == "k":
        return mean + number * (vectors - mean)
    changed = vectors - number * mean
    if kind == "r":
        changed = changed * (vectors.norm(dim=-1, keepdim=True) / changed.norm(dim=-1, keepdim=True))
    return changed


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dirs", required=True, help="Comma-separated finished training runs, pooled.")
    parser.add_argument("--name", required=True, help="Row name in results/probe_concept_part_scale.json.")
    parser.add_argument("--variants", default="k1,k2,k3", help="Comma-separated kK / cA / rA variants.")
    parser.add_argument("--factor", type=float, default=1.0, help="Steering factor of every variant.")
    parser.add_argument("--sets", default="heldout,heldback")
    parser.add_argument("--heldout_rows_per_concept", type=int, default=8)
    parser.add_argument("--heldback_data", default="../shared/data/axbench_more/concept_llama")
    parser.add_argument("--heldback_concepts", type=int, default=24)
    parser.add_argument("--heldback_rows_per_concept", type=int, default=2)
    args = parser.parse_args(argv)
    variants = [value for value in args.variants.split(",") if value.strip()]
    try:
        for variant in variants:
            parse_variant(variant)
    except ValueError as error:
        parser.error(str(error))
    run_dirs = [Path(value) for value in args.run_dirs.split(",") if value.strip()]
    missing = [str(run_dir) for run_dir in run_dirs if not (run_dir / TRAINING_SUMMARY_FILE).is_file()]
    if missing:
        parser.error(f"--run_dirs {missing} hold no {TRAINING_SUMMARY_FILE}: pass finished training runs.")
    transformers.utils.logging.set_verbosity_warning()

    result = {"command": "python benchmarks/quality/probe_concept_part_scale.py " + " ".join(argv or sys.argv[1:])}
    for run_dir in run_dirs:
        model = HyperSteerModel.from_pretrained(run_dir).eval()
        split = ConceptSplit.from_json(run_dir / CONCEPT_SPLIT_FILE)
        with torch.no_grad():
            mean = model.compute_steering_vectors(steering_prompt=list(split.heldin_concepts)).float().mean(0)
        run = result[str(run_dir)] = {}
        for name, rows in prompt_hypersteer_offline.run_rows(run_dir, args).items():
            concepts = sorted({row["output_concept"] for row in rows})
            with torch.no_grad():
                vectors = model.compute_steering_vectors(steering_prompt=concepts).float()
            run[name] = {"cosine_with_mean": torch.cosine_similarity(vectors, mean[None], dim=-1).mean().item()}
            reference = None
            for variant in variants:
                changed = transform(vectors, mean, variant)
                metric = offline_steering_metric(
                    model,
                    model.tokenizer,
                    rows,
                    steering_factor=args.factor,
                    max_length=320,
                    desc=f"{run_dir.name} {name} {variant}",
                    concept_vectors=dict(zip(concepts, changed)),
                    reference_row_losses=reference,
                )
                reference = metric.pop("row_losses")
                metric.pop("per_concept")
                run[name][variant] = metric
    result["pooled"] = {}
    fmt = prompt_hypersteer_offline.fmt_ratio
    print("| set | variant | pooled specificity / gain | worst run's specificity |\n|---|---|---|---|")
    for name in result[str(run_dirs[0])]:
        for variant in variants:
            members = [result[str(run_dir)][name][variant] for run_dir in run_dirs]
            entry = prompt_hypersteer_offline.pooled_with_worst(members)
            result["pooled"].setdefault(name, {})[variant] = entry
            print(
                f"| {name} | {variant} | {fmt(entry['specificity_ratio'])} / {fmt(entry['gain_ratio'])} | "
                f"{fmt(entry['worst_specificity_ratio'])} |"
            )
    quality_ablation.record_run(RESULTS_PATH, args.name, result)
    return result


if __name__ == "__main__":
    main()
