"""The offline metric of steering on top of prompting: per finished run, the gain and specificity ratios of the vector
alone (`hypersteer`) and of the prompt plus the vector of the same concept (`prompt_hypersteer`), both against the
prompt alone, on the rows `quality_ablation.py` scores every experiment on (held-in concepts on unseen prompts, the
split's held-out concepts, the held-back concept_llama set), at each of `--factors`; pooled over runs as the ablation
pools its splits (every loss gap weighted by its rows before the ratio), with the worst run.

    python benchmarks/quality/prompt_hypersteer_offline.py --name recipe_splits_42_7_13_2026 \\
        --run_dirs /tmp/hq10/recipe_split42,/tmp/hq10/recipe_split7,/tmp/hq10/recipe_split13,/tmp/hq10/recipe_split2026

The runs are any `train_hypersteer.py` output folders (e.g. the recipe command's); their split is rebuilt from their
`training_summary.json` and must equal their `concept_split.json`. Records per-run and pooled numbers in
`benchmarks/results/prompt_hypersteer_offline.json` and prints the pooled table.
"""

import argparse
import json
import sys
from pathlib import Path

import transformers


REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import quality_ablation  # noqa: E402

from modeling_hypersteer import HyperSteerModel  # noqa: E402
from modeling_hypersteer.data import ConceptSplit  # noqa: E402
from modeling_hypersteer.evaluation import method_losses, offline_steering_metric  # noqa: E402
from modeling_hypersteer.text_metric import check_factor_grid  # noqa: E402
from modeling_hypersteer.utils import CONCEPT_SPLIT_FILE, TRAINING_SUMMARY_FILE  # noqa: E402


RESULTS_PATH = REPO_ROOT / "benchmarks" / "results" / "prompt_hypersteer_offline.json"
METHODS = ("hypersteer", "prompt_hypersteer")
SETS = ("heldin", "heldout", "heldback")


def run_rows(run_dir: Path, args) -> dict[str, list[dict]]:
    """The ablation's evaluation rows of the run's split, rebuilt from its training summary.

    Raises:
        `ValueError` when the rebuilt held-out concepts are not the run's own (its split was not a seeded count).
    """
    summary = json.loads((run_dir / TRAINING_SUMMARY_FILE).read_text())
    saved = ConceptSplit.from_json(run_dir / CONCEPT_SPLIT_FILE)
    config = {
        "dataset_name_or_path": ",".join(summary["sources"]),
        "heldout_concepts": str(len(saved.heldout_concepts)),
        "concept_split_seed": summary["split_settings"]["seed"],
        "eval_examples_per_concept": summary["split_settings"]["eval_examples_per_concept"],
    }
    rows = quality_ablation.evaluation_rows(config, args.heldout_rows_per_concept)
    rebuilt = {row["output_concept"] for row in rows["heldout"]}
    if rebuilt != set(saved.heldout_concepts):
        raise ValueError(
            f"{run_dir}: the split rebuilt from {TRAINING_SUMMARY_FILE} holds out {sorted(rebuilt)[:3]}..., not the "
            f"run's {CONCEPT_SPLIT_FILE}; this script scores runs split by a seeded concept count."
        )
    sets = {"heldin": rows["heldin"], "heldout": rows["heldout"]}
    if args.heldback_data:
        sets["heldback"] = quality_ablation.heldback_rows(
            args.heldback_data, args.heldback_concepts, args.heldback_rows_per_concept
        )
    return {name: sets[name] for name in args.sets.split(",") if name in sets}


def method_view(result: dict, method: str) -> dict:
    """An offline result whose `hypersteer` losses are `method`'s, for `quality_ablation.pooled_ratios`."""
    return {"losses": method_losses(result["losses"], method), "num_rows": result["num_rows"]}


def pooled_with_worst(results: list[dict]) -> dict:
    """Specificity and gain pooled over the runs' results (`quality_ablation.pooled_ratios`), and the worst run's
    specificity."""
    per_run = [quality_ablation.pooled_ratios([result])["specificity_ratio"] for result in results]
    return {
        **quality_ablation.pooled_ratios(results),
        "worst_specificity_ratio": min((value for value in per_run if value is not None), default=None),
    }


def pooled(results: list[dict]) -> dict:
    """Per method: pooled specificity and gain over the runs' results, and the worst run's specificity."""
    return {method: pooled_with_worst([method_view(result, method) for result in results]) for method in METHODS}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dirs", required=True, help="Comma-separated finished training runs, pooled.")
    parser.add_argument("--name", required=True, help="Row name in results/prompt_hypersteer_offline.json.")
    parser.add_argument("--factors", default="0.5,1", help="Steering factors of the vector, alone and on the prompt.")
    parser.add_argument("--sets", default="heldin,heldout,heldback", help=f"Of {','.join(SETS)}.")
    parser.add_argument("--heldout_rows_per_concept", type=int, default=8)
    parser.add_argument("--heldback_data", default="../shared/data/axbench_more/concept_llama")
    parser.add_argument("--heldback_concepts", type=int, default=24)
    parser.add_argument("--heldback_rows_per_concept", type=int, default=2)
    parser.add_argument("--eval_batch_size", type=int, default=8)
    parser.add_argument("--eval_max_length", type=int, default=320)
    args = parser.parse_args(argv)
    try:
        factors = check_factor_grid([float(value) for value in args.factors.split(",") if value.strip()], "--factors")
    except ValueError as error:
        parser.error(f"--factors {args.factors!r}: {error}")
    sets = [value for value in args.sets.split(",") if value.strip()]
    if not sets or set(sets) - set(SETS):
        parser.error(f"--sets takes some of {','.join(SETS)}, got {args.sets!r}.")
    run_dirs = [Path(value) for value in args.run_dirs.split(",") if value.strip()]
    missing = [str(run_dir) for run_dir in run_dirs if not (run_dir / TRAINING_SUMMARY_FILE).is_file()]
    if missing:
        parser.error(f"--run_dirs {missing} hold no {TRAINING_SUMMARY_FILE}: pass finished training runs.")
    transformers.utils.logging.set_verbosity_warning()

    result = {"command": "python benchmarks/quality/prompt_hypersteer_offline.py " + " ".join(argv or sys.argv[1:])}
    for run_dir in run_dirs:
        model = HyperSteerModel.from_pretrained(run_dir)
        result[str(run_dir)] = {}
        for name, rows in run_rows(run_dir, args).items():
            reference = None
            for factor in factors:
                metric = offline_steering_metric(
                    model,
                    model.tokenizer,
                    rows,
                    steering_factor=factor,
                    batch_size=args.eval_batch_size,
                    max_length=args.eval_max_length,
                    desc=f"{run_dir.name} {name} x{factor:g}",
                    reference_row_losses=reference,
                    prompt_hypersteer=True,
                )
                # The unsteered and prompted losses do not depend on the factor.
                reference = metric.pop("row_losses")
                metric.pop("per_concept")
                result[str(run_dir)].setdefault(name, {})[f"{factor:g}"] = metric
    result["pooled"] = {
        name: {
            f"{factor:g}": pooled([result[str(run_dir)][name][f"{factor:g}"] for run_dir in run_dirs])
            for factor in factors
        }
        for name in result[str(run_dirs[0])]
    }
    print(
        f"\nPooled over {len(run_dirs)} run(s): specificity / gain against the prompt alone (worst run's specificity)"
    )
    print("| set | factor | vector alone | prompt + vector |")
    print("|---|---|---|---|")
    for name, by_factor in result["pooled"].items():
        for factor, entry in by_factor.items():
            cells = [
                f"{fmt_ratio(entry[method]['specificity_ratio'])} / {fmt_ratio(entry[method]['gain_ratio'])} "
                f"({fmt_ratio(entry[method]['worst_specificity_ratio'])})"
                for method in METHODS
            ]
            print(f"| {name} | {factor} | {cells[0]} | {cells[1]} |")
    quality_ablation.record_run(RESULTS_PATH, args.name, result)
    return result


def fmt_ratio(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    main()
