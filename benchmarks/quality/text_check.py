"""Steering in text, at the factor a trained model ships with: calibrate a finished run's `default_steering_factor`
(as `train_hypersteer.py --calibrate_steering_factor` does at the end of training) and score the judge-free text
metric at that factor on held-in and never-trained concepts.

Ready-to-copy command (a run folder of `benchmarks/quality_ablation.py`, trained on the shared AxBench folders):

    python benchmarks/quality/text_check.py --run_dir /tmp/hypersteer-quality/recipe_final --name recipe_final

Appends one row per run to `benchmarks/results/text_metric.json`: the calibration record and, for `heldin`,
`heldout` and `heldback` (concepts of another data set, `--heldback_data`), the text-metric summary of `evaluate_steering.py --text_metric` at the calibrated factor.
"""

import argparse
import json
import logging
import sys
from pathlib import Path

import transformers


REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import quality_ablation  # noqa: E402

import evaluate_steering  # noqa: E402
import train_hypersteer  # noqa: E402
from modeling_hypersteer import HyperSteerModel  # noqa: E402
from modeling_hypersteer.data import ConceptSplit, load_concept_data  # noqa: E402
from modeling_hypersteer.evaluation import PROMPT_PLACEMENTS  # noqa: E402
from modeling_hypersteer.utils import CONCEPT_SPLIT_FILE, TRAINING_SUMMARY_FILE  # noqa: E402
from quickstart import recipe_settings  # noqa: E402


RESULTS_PATH = REPO_ROOT / "benchmarks" / "results" / "text_metric.json"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", required=True, help="A finished training run (model, split and summary).")
    parser.add_argument("--name", required=True, help="Row name in results/text_metric.json.")
    parser.add_argument(
        "--calibration_factors",
        default=recipe_settings()["calibration_factors"],
        help="Candidate factors (default: the recipe file's grid, what the recipe command calibrates over).",
    )
    parser.add_argument(
        "--calibration_concepts",
        type=int,
        default=train_hypersteer.ModelArguments.calibration_concepts,
        help="Held-in concepts of the calibration (default: train_hypersteer.py's).",
    )
    parser.add_argument(
        "--calibration_instructions",
        type=int,
        default=train_hypersteer.ModelArguments.calibration_instructions,
        help="Instructions per concept of the calibration (default: train_hypersteer.py's).",
    )
    parser.add_argument(
        "--concept_sets",
        default="heldin,heldout,heldback",
        help="Comma-separated concept sets scored at the calibrated factor (of heldin, heldout, heldback).",
    )
    parser.add_argument("--heldin_concepts", type=int, default=12, help="Held-in concepts scored in text.")
    parser.add_argument("--instructions_per_concept", type=int, default=4)
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument(
        "--heldback_data",
        default="../shared/data/axbench_more/concept_llama",
        help="Concept data no run trains on, scored as 'heldback' (its first --heldback_concepts concepts in sorted "
        "order, which are among quality_ablation.py's held-back set); '' to skip.",
    )
    parser.add_argument("--heldback_concepts", type=int, default=12)
    parser.add_argument(
        "--heldback_without_concepts_of",
        default="",
        help="A run folder whose training concepts (its concept_split.json) are left out of --heldback_data, so the "
        "detector tells apart the same concepts as for that run (which trained on part of that data, e.g. with "
        "extra concept_llama concepts) and the two runs' held-back rows compare.",
    )
    parser.add_argument(
        "--prompt_placement",
        default="user",
        choices=PROMPT_PLACEMENTS,
        help="Where prompting (the reference of the calibration and the metric) puts its steering instruction.",
    )
    args = parser.parse_args(argv)
    concept_sets = [name.strip() for name in args.concept_sets.split(",") if name.strip()]
    unknown = sorted(set(concept_sets) - {"heldin", "heldout", "heldback"})
    if unknown or not concept_sets:
        parser.error(f"--concept_sets takes heldin, heldout and/or heldback, got {args.concept_sets!r}.")
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()

    run_dir = Path(args.run_dir)
    summary = json.loads((run_dir / TRAINING_SUMMARY_FILE).read_text())
    sources = [quality_ablation.data_path(source) for source in summary["sources"]]
    model = HyperSteerModel.from_pretrained(run_dir)
    model_args = train_hypersteer.ModelArguments(
        base_model_name_or_path=train_hypersteer.SMOLLM2_ALIAS,
        calibrate_steering_factor=True,
        calibration_factors=args.calibration_factors,
        calibration_concepts=args.calibration_concepts,
        calibration_instructions=args.calibration_instructions,
    )
    calibration = train_hypersteer.calibrate_saved_steering_factors(
        model,
        model.tokenizer,
        load_concept_data(sources),
        ConceptSplit.from_json(run_dir / CONCEPT_SPLIT_FILE),
        model_args,
        str(run_dir),
        prompt_placement=args.prompt_placement,
    )["hypersteer"]
    factor = model.config.default_steering_factor
    result = {"run_dir": str(run_dir), "calibration": calibration, "factor": factor}
    selections = {
        "heldin": ["--concepts", "heldin", "--max_concepts", str(args.heldin_concepts)],
        "heldout": ["--concepts", "heldout"],
    }
    if args.heldback_data and "heldback" in concept_sets:
        heldback_data = quality_ablation.data_path(args.heldback_data)
        heldback_rows = load_concept_data(heldback_data)
        if args.heldback_without_concepts_of:
            other_split = ConceptSplit.from_json(Path(args.heldback_without_concepts_of) / CONCEPT_SPLIT_FILE)
            trained = set(other_split.heldin_concepts)
            heldback_rows = heldback_rows.filter(lambda row: row["output_concept"] not in trained)
            heldback_data = str(run_dir / "text_check_heldback_data.parquet")
            heldback_rows.to_parquet(heldback_data)
        # Named, since the run's own split knows nothing of these concepts.
        heldback = quality_ablation.heldback_concepts(heldback_rows, args.heldback_concepts)
        selections["heldback"] = ["--dataset_name_or_path", heldback_data, "--concepts", "|".join(heldback)]
    for concepts, selection in selections.items():
        if concepts not in concept_sets:
            continue
        evaluation = evaluate_steering.main(
            [
                "--model",
                str(run_dir),
                "--output_dir",
                str(run_dir / f"text_check_{concepts}"),
                *selection,
                "--methods",
                "hypersteer,prompt,none",
                "--steering_factors",
                str(factor),
                "--offline_examples_per_concept",
                "0",
                "--num_instructions_per_concept",
                "0",
                "--text_metric",
                "--text_metric_instructions_per_concept",
                str(args.instructions_per_concept),
                "--text_metric_max_new_tokens",
                str(args.max_new_tokens),
                "--no_save_summary_to_model",
                "--prompt_placement",
                args.prompt_placement,
            ]
        )
        result[concepts] = evaluation["text_metric"]
    quality_ablation.record_run(RESULTS_PATH, args.name, result)
    return result


if __name__ == "__main__":
    main()
