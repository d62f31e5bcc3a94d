r"""Probe: where the concept shows in text against what it costs in fluency, for a trained run and two inference-time
variants of its steering, next to prompting and the unsteered base.

The factor calibration (`train_hypersteer.py --calibrate_steering_factor`) picks the factor with the highest concept
detector accuracy whose fluency NLL stays within 0.5 nats of prompting's. When no factor passes, the question is
whether *any* way of adding the run's vectors reaches prompting's detector level inside that bound. This script scores
the calibration's text metric (held-in concepts, generic instructions, greedy) over a factor grid for:

- `as_trained`: the run's vectors, as `generate(steering_prompt=...)` adds them;
- `centred`: each vector minus the mean vector of the run's training concepts, so only what tells one concept from
  another is added (the shared part moves every concept's text alike);
- `generated`: the run's vectors added at generated positions only (`steering_positions="generated"`), so the
  instruction is read unsteered.

    python benchmarks/quality/text_frontier.py --run_dir /tmp/hq2/recipe_lexical_scalar_tokdrop03_400_start05 \
        --name recipe_split42

Appends one row per `--name` to `benchmarks/results/text_frontier.json` and draws
`benchmarks/results/text_frontier_<name>.png` (detector probability against fluency NLL, one line per variant over the
factors, prompting and unsteered as points, the calibration's NLL bound dashed).
"""

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
import transformers


REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import quality_ablation  # noqa: E402

import train_hypersteer  # noqa: E402
from modeling_hypersteer import HyperSteerModel  # noqa: E402
from modeling_hypersteer.data import ConceptSplit, load_concept_data  # noqa: E402
from modeling_hypersteer.evaluation import PROMPT_PLACEMENTS  # noqa: E402
from modeling_hypersteer.text_metric import DEFAULT_NLL_MARGIN, calibrate_steering_factor  # noqa: E402
from modeling_hypersteer.utils import CONCEPT_SPLIT_FILE, TRAINING_SUMMARY_FILE, pyplot  # noqa: E402


RESULTS_PATH = REPO_ROOT / "benchmarks" / "results" / "text_frontier.json"
VARIANTS = ("as_trained", "centred", "generated")


def apply_variant(model: HyperSteerModel, variant: str, training_concepts: list[str]) -> None:
    """Change how `model` steers, in memory only (the run folder is never written)."""
    if variant == "generated":
        model.config.steering_positions = "generated"
    elif variant == "centred":
        with torch.no_grad():
            mean_vector = model.compute_steering_vectors(steering_prompt=training_concepts).mean(0)
        run_hypernetwork = model._run_hypernetwork

        # The model has no public hook between the hypernetwork and the residual stream, so the probe wraps the one
        # method every steering path goes through, on this instance only.
        def centred(*args, **kwargs):
            vectors = run_hypernetwork(*args, **kwargs)
            return vectors - mean_vector.to(vectors)

        model._run_hypernetwork = centred


def plot_frontier(row: dict, path: Path) -> None:
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    for variant, record in row["variants"].items():
        points = sorted((entry["nll"], entry["detector_probability"], entry["factor"]) for entry in record["table"])
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=variant)
        for nll, probability, factor in points:
            axis.annotate(f"{factor:g}", (nll, probability), textcoords="offset points", xytext=(4, 3), fontsize=7)
    references = next(iter(row["variants"].values()))["reference"]
    for method, color in (("prompt", "tab:red"), ("none", "tab:gray")):
        axis.scatter(references[method]["nll"], references[method]["detector_probability"], color=color, marker="s")
        axis.annotate(method, (references[method]["nll"], references[method]["detector_probability"]), fontsize=8)
    axis.axvline(references["prompt"]["nll"] + DEFAULT_NLL_MARGIN, linestyle="--", color="tab:red", alpha=0.6)
    axis.set_xlabel("fluency NLL of the generation (nats/token, unsteered base)")
    axis.set_ylabel("mean concept-detector probability")
    axis.set_title(
        f"Concept in text vs fluency: {row['name']} (labels: factor; prompting in the {row['prompt_placement']} turn)",
        fontsize=9,
    )
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", required=True, help="A finished training run (model, split and summary).")
    parser.add_argument("--name", required=True, help="Row name in results/text_frontier.json and the plot's name.")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"Comma-separated, from {list(VARIANTS)}.")
    parser.add_argument("--factors", default="1,1.5,2,3,4")
    parser.add_argument("--concepts", type=int, default=12, help="Held-in concepts steered.")
    parser.add_argument("--instructions_per_concept", type=int, default=4)
    parser.add_argument(
        "--prompt_placement",
        default="user",
        choices=PROMPT_PLACEMENTS,
        help="Where prompting (the reference point) puts its steering instruction.",
    )
    args = parser.parse_args(argv)
    variants = [variant.strip() for variant in args.variants.split(",") if variant.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        parser.error(f"--variants has unknown entries {unknown or variants}; choose from {list(VARIANTS)}.")
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()

    run_dir = Path(args.run_dir)
    summary = json.loads((run_dir / TRAINING_SUMMARY_FILE).read_text())
    raw = load_concept_data([quality_ablation.data_path(source) for source in summary["sources"]])
    split = ConceptSplit.from_json(run_dir / CONCEPT_SPLIT_FILE)
    heldin = set(split.heldin_concepts)
    # The detector learns from the rows the training run's calibration uses.
    rows = train_hypersteer.calibration_rows(raw, split)
    row = {"name": args.name, "run_dir": str(run_dir), "prompt_placement": args.prompt_placement, "variants": {}}
    for variant in variants:
        model = HyperSteerModel.from_pretrained(run_dir).eval()
        apply_variant(model, variant, sorted(heldin))
        _, record = calibrate_steering_factor(
            model,
            model.tokenizer,
            rows,
            [float(factor) for factor in args.factors.split(",")],
            num_concepts=args.concepts,
            num_instructions=args.instructions_per_concept,
            seed=split.seed,
            prompt_placement=args.prompt_placement,
        )
        row["variants"][variant] = record
        for entry in record["table"]:
            print(
                f"{variant} factor {entry['factor']:g}: detector accuracy {entry['detector_accuracy']:.3f}, "
                f"probability {entry['detector_probability']:.3f}, NLL {entry['nll']:.2f}, "
                f"distinct bigrams {entry['distinct_bigrams']:.2f}"
            )
    for method, reference in record["reference"].items():
        print(
            f"{method}: detector accuracy {reference['detector_accuracy']:.3f}, probability "
            f"{reference['detector_probability']:.3f}, NLL {reference['nll']:.2f}"
        )
    quality_ablation.record_run(RESULTS_PATH, args.name, row)
    plot_frontier(row, RESULTS_PATH.parent / f"text_frontier_{args.name}.png")
    return row


if __name__ == "__main__":
    main()
