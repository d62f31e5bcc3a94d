"""What `train_hypersteer.py --calibrate_prompted_steering_factor` chooses on finished runs, without changing them.

Runs the prompted calibration (`text_metric.calibrate_steering_factors` for `prompt_hypersteer`: the vector on top
of prompting's prompt for the same concept, on the run's held-in concepts and the calibration's own instructions,
with the recipe's settings) on each run and records the per-factor table, so the factor a recipe run would ship can be
compared with what the vector on top of a prompt does on never-trained concepts (`prompt_plus_steering.py`). With
`--default_factors`, the default factor is calibrated in the same pass, as the recipe command does (its records go
under `default_factor`; `seconds` is the whole pass).

    python benchmarks/quality/prompted_calibration.py --name recipe_splits_42_7_2026 --factors 0.25,0.5,0.75,1,1.5 \\
        --run_dirs /tmp/hq10/recipe_split42,/tmp/hq10/recipe_split7,/tmp/hq10/recipe_split2026
    python benchmarks/quality/prompted_calibration.py --name recipe_split42_both --default_factors 1,1.5,2,4,8 \\
        --run_dirs /tmp/hq10/recipe_split42

Rows in `benchmarks/results/prompted_calibration.json`; prints each run's table.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import transformers


REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import quality_ablation  # noqa: E402

import train_hypersteer  # noqa: E402
from modeling_hypersteer import HyperSteerModel  # noqa: E402
from modeling_hypersteer.data import ConceptSplit, load_concept_data  # noqa: E402
from modeling_hypersteer.model_card import calibration_table_markdown  # noqa: E402
from modeling_hypersteer.text_metric import calibrate_steering_factors, check_factor_grid  # noqa: E402
from modeling_hypersteer.utils import CONCEPT_SPLIT_FILE, TRAINING_SUMMARY_FILE  # noqa: E402


RESULTS_PATH = REPO_ROOT / "benchmarks" / "results" / "prompted_calibration.json"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dirs", required=True, help="Comma-separated finished training runs.")
    parser.add_argument("--name", required=True, help="Row name in results/prompted_calibration.json.")
    parser.add_argument("--factors", default="0.25,0.5,0.75,1", help="The calibration's factor grid.")
    parser.add_argument(
        "--default_factors", default=None, help="Also calibrate the default factor over this grid, in the same pass."
    )
    parser.add_argument("--calibration_concepts", type=int, default=8)
    parser.add_argument("--calibration_instructions", type=int, default=6)
    parser.add_argument("--calibration_max_new_tokens", type=int, default=48)
    parser.add_argument("--calibration_batch_size", type=int, default=24)
    args = parser.parse_args(argv)
    grids = {}
    for method, flag, value in (
        ("prompt_hypersteer", "--factors", args.factors),
        ("hypersteer", "--default_factors", args.default_factors),
    ):
        if value is None:
            continue
        try:
            grids[method] = check_factor_grid([float(part) for part in value.split(",") if part.strip()], flag)
        except ValueError as error:
            parser.error(f"{flag} {value!r}: {error}")
    run_dirs = [Path(value) for value in args.run_dirs.split(",") if value.strip()]
    missing = [str(run_dir) for run_dir in run_dirs if not (run_dir / TRAINING_SUMMARY_FILE).is_file()]
    if missing:
        parser.error(f"--run_dirs {missing} hold no {TRAINING_SUMMARY_FILE}: pass finished training runs.")
    transformers.utils.logging.set_verbosity_warning()

    result = {"command": "python benchmarks/quality/prompted_calibration.py " + " ".join(argv or sys.argv[1:])}
    for run_dir in run_dirs:
        model = HyperSteerModel.from_pretrained(run_dir).eval()
        summary = json.loads((run_dir / TRAINING_SUMMARY_FILE).read_text())
        split = ConceptSplit.from_json(run_dir / CONCEPT_SPLIT_FILE)
        sources = [quality_ablation.data_path(source) for source in summary["sources"]]
        rows = train_hypersteer.calibration_rows(load_concept_data(sources), split)
        start = time.perf_counter()
        calibrated = calibrate_steering_factors(
            model,
            model.tokenizer,
            rows,
            grids,
            num_concepts=args.calibration_concepts,
            num_instructions=args.calibration_instructions,
            max_new_tokens=args.calibration_max_new_tokens,
            batch_size=args.calibration_batch_size,
            seed=split.seed,
        )
        seconds = round(time.perf_counter() - start, 1)
        for method, (factor, record) in calibrated.items():
            record["seconds"] = seconds
            if method == "prompt_hypersteer":
                result[str(run_dir)] = record
            else:
                result.setdefault("default_factor", {})[str(run_dir)] = record
            print(f"\n{run_dir}: {record['field']} = {factor} ({record['chosen_by']}; the pass took {seconds} s)")
            print(calibration_table_markdown(record))
    quality_ablation.record_run(RESULTS_PATH, args.name, result)
    return result


if __name__ == "__main__":
    main()
