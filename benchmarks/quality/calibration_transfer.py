"""Does the calibrated factor keep the fluency bound on the evaluation's instructions? A table from text_metric.json.

`text_check.py` records, per run, the calibration (on its own instructions) and the held-in text metric at the chosen
factor on the evaluation's instructions. This script pairs each run calibrated the old way (12 held-in concepts x the
first 2 of the evaluation's generic instructions) with its row calibrated on `text_metric.CALIBRATION_INSTRUCTIONS`
(`NAME_cal8x6`: 8 concepts x 6 instructions no evaluation uses; `RETRAINED` names the exceptions) and prints, for each, the chosen factor, prompting's NLL
on the calibration's instructions, and on the evaluation's: the factor's NLL against prompting's + 0.5, its
distinct-bigram share against 0.75 x prompting's, and the held-in answers that show the concept.

    python benchmarks/quality/calibration_transfer.py

With `--run_dir RUN` it measures instead where the spread comes from: prompting's detector hits and NLL (and the
unsteered NLL) per instruction, for the text metric's instructions, the calibration's and six more written alike, on 12
held-in concepts of RUN (prompting and the base only: the run's hypernetwork is not used), recorded in
`benchmarks/results/calibration_instructions.json`.

    python benchmarks/quality/calibration_transfer.py --run_dir /tmp/hq4/recipe_prior48_600
"""

import argparse
import json
import random
import sys
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

from modeling_hypersteer.text_metric import (  # noqa: E402
    CALIBRATION_INSTRUCTIONS,
    DEFAULT_DISTINCT_FRACTION,
    DEFAULT_NLL_MARGIN,
    GENERIC_INSTRUCTIONS,
)


RESULTS_PATH = REPO_ROOT / "benchmarks" / "results" / "text_metric.json"
SPREAD_PATH = REPO_ROOT / "benchmarks" / "results" / "calibration_instructions.json"
SUFFIX = "_cal8x6"
# Runs no longer on disk, paired with the run of the same config and seed that the recipe command trained again.
RETRAINED = {
    "recipe_prior48": "recipe_split42_cal8x6",
    "recipe_prior48_split7_grid15": "recipe_split7_cal8x6",
    "recipe_prior48_split13_grid15": "recipe_split13_cal8x6",
}
# Written like the others, used by nothing but this measurement: a third sample of the same kind of request.
OTHER_INSTRUCTIONS = (
    "Tell me about a hobby you would like to try.",
    "How can a small town attract more visitors?",
    "Describe what makes a good teacher.",
    "What would you do with a free afternoon?",
    "Explain how to make a cup of tea.",
    "Why do people keep photographs?",
)


def evaluation_outcome(run: dict) -> dict:
    """The held-in evaluation at the run's factor: whether it keeps the bound, and the concept counts."""
    rows = {row["method"]: row for row in run["heldin"]["rows"]}
    steered, prompted, plain = rows["hypersteer"], rows["prompt"], rows["none"]
    within = (
        steered["nll"] <= prompted["nll"] + DEFAULT_NLL_MARGIN
        and steered["distinct_bigrams"] >= DEFAULT_DISTINCT_FRACTION * prompted["distinct_bigrams"]
    )
    return {
        "factor": run["factor"],
        "calibration_prompt_nll": run["calibration"]["reference"]["prompt"]["nll"],
        "nll": steered["nll"],
        "bound": prompted["nll"] + DEFAULT_NLL_MARGIN,
        "within_bound": within,
        "accuracy": steered["detector_accuracy"],
        "prompt_accuracy": prompted["detector_accuracy"],
        "none_accuracy": plain["detector_accuracy"],
        "answers": steered["num_samples"],
        "detected": round(steered["detector_accuracy"] * steered["num_samples"]),
    }


def transfer_table(runs: dict) -> list[dict]:
    """One row per run that has both calibrations."""
    table = []
    for name, run in runs.items():
        recalibrated = RETRAINED.get(name, name + SUFFIX)
        if name.endswith(SUFFIX) or recalibrated not in runs or "heldin" not in run:
            continue
        table.append({"run": name, "old": evaluation_outcome(run), "new": evaluation_outcome(runs[recalibrated])})
    return table


def markdown(table: list[dict]) -> str:
    def cell(outcome: dict) -> str:
        verdict = "within" if outcome["within_bound"] else "**outside**"
        return (
            f"{outcome['factor']:g} | {outcome['calibration_prompt_nll']:.2f} | {outcome['nll']:.2f} / "
            f"{outcome['bound']:.2f} {verdict} | {outcome['detected']} of {outcome['answers']}"
        )

    lines = [
        "| run | old: factor | prompting NLL (cal.) | eval. NLL / bound | concept shows | new: factor | prompting NLL (cal.) "
        "| eval. NLL / bound | concept shows |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {row['run']} | {cell(row['old'])} | {cell(row['new'])} |" for row in table]
    kept = {key: sum(row[key]["within_bound"] for row in table) for key in ("old", "new")}
    lines.append(
        f"\nWithin the bound on the evaluation's instructions: old {kept['old']} of {len(table)}, new {kept['new']} of "
        f"{len(table)}; mean held-in accuracy old {sum(r['old']['accuracy'] for r in table) / len(table):.3f}, new "
        f"{sum(r['new']['accuracy'] for r in table) / len(table):.3f} (prompting "
        f"{sum(r['new']['prompt_accuracy'] for r in table) / len(table):.3f}, unsteered "
        f"{sum(r['new']['none_accuracy'] for r in table) / len(table):.3f})."
    )
    return "\n".join(lines)


def instruction_spread(run_dir: Path, num_concepts: int = 12) -> dict:
    """Prompting's hits and NLL, and the unsteered NLL, per instruction of each pool (see the module docstring)."""
    import quality_ablation

    from modeling_hypersteer import HyperSteerModel
    from modeling_hypersteer.data import ConceptSplit, load_concept_data
    from modeling_hypersteer.evaluation import generation_tasks
    from modeling_hypersteer.text_metric import ConceptDetector, _generate, score_samples
    from modeling_hypersteer.utils import CONCEPT_SPLIT_FILE, TRAINING_SUMMARY_FILE

    model = HyperSteerModel.from_pretrained(run_dir).eval()
    split = ConceptSplit.from_json(run_dir / CONCEPT_SPLIT_FILE)
    sources = json.loads((run_dir / TRAINING_SUMMARY_FILE).read_text())["sources"]
    data = load_concept_data([quality_ablation.data_path(source) for source in sources])
    concepts = sorted(random.Random(0).sample(sorted(split.heldin_concepts), num_concepts))
    detector = ConceptDetector.from_rows(data, concepts=concepts)
    pools = {"evaluation": GENERIC_INSTRUCTIONS, "calibration": CALIBRATION_INSTRUCTIONS, "other": OTHER_INSTRUCTIONS}
    instructions = [instruction for pool in pools.values() for instruction in pool]
    tasks = generation_tasks({concept: instructions for concept in concepts}, len(instructions))
    samples = _generate(
        model, model.tokenizer, tasks, ["prompt", "none"], [1.0], max_new_tokens=48, do_sample=False, batch_size=24
    )
    scored = score_samples(samples, detector, model.language_model, model.tokenizer, batch_size=24)

    def mean(values):
        values = [value for value in values if value is not None]
        return round(sum(values) / len(values), 4) if values else None

    per_instruction = {}
    for instruction in instructions:
        cell = {
            m: [s for s in scored if s["instruction"] == instruction and s["method"] == m] for m in ("prompt", "none")
        }
        per_instruction[instruction] = {
            "prompt_hits": sum(s["concept_detected"] for s in cell["prompt"]),
            "prompt_nll": mean([s["nll"] for s in cell["prompt"]]),
            "none_nll": mean([s["nll"] for s in cell["none"]]),
        }
    result = {
        "run_dir": str(run_dir),
        "command": f"python benchmarks/quality/calibration_transfer.py --run_dir {run_dir}",
        "concepts": concepts,
        "per_instruction": per_instruction,
        "pools": {
            name: {
                "prompt_nll": mean([per_instruction[i]["prompt_nll"] for i in pool]),
                "prompt_hits": sum(per_instruction[i]["prompt_hits"] for i in pool),
                "answers": len(pool) * len(concepts),
            }
            for name, pool in {
                **pools,
                "evaluation_first_4": GENERIC_INSTRUCTIONS[:4],
                "evaluation_first_2": GENERIC_INSTRUCTIONS[:2],
            }.items()
        },
    }
    for instruction, row in per_instruction.items():
        print(
            f"{instruction[:55]:55s} prompting {row['prompt_hits']:2d} of {len(concepts)}, NLL {row['prompt_nll']:.2f}"
            f" (unsteered {row['none_nll']:.2f})"
        )
    print(json.dumps(result["pools"], indent=1))
    SPREAD_PATH.write_text(json.dumps(result, indent=1) + "\n")
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", default=None, help="Measure the per-instruction spread on this run's concepts.")
    args = parser.parse_args(argv)
    if args.run_dir:
        return instruction_spread(Path(args.run_dir))
    table = transfer_table(json.loads(RESULTS_PATH.read_text())["runs"])
    if not table:
        raise SystemExit(f"No run in {RESULTS_PATH} has both calibrations (NAME and NAME{SUFFIX}).")
    text = markdown(table)
    print(text)
    return text


if __name__ == "__main__":
    main()
