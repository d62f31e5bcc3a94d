r"""Diagnostic: how many directions do a trained no-context hypernetwork's concept features span?

For every concept of a run's split, the hypernetwork's pooled feature (before centring) and its vector minus the shared
offset are collected; the script prints, per run, the participation ratio of the features' covariance across concepts
(`(sum e)^2 / sum e^2` over its eigenvalues: 1 when every concept differs along one direction only), the share of that
variance on the top singular direction and on the single largest coordinate, and the mean cosine between different
concepts' vectors. `--untrained` adds the same numbers for the freshly built hypernetwork (the base's first layers).

    python benchmarks/quality/pooled_feature_rank.py --untrained \
        --runs recipe,nocontext_contrast05_offset_center_split7,nocontext_contrast05_offset_center_split13 \
        >> benchmarks/results/quality_feature_rank.jsonl
"""

import argparse
import json
import sys
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from modeling_hypersteer import HyperSteerModel  # noqa: E402
from modeling_hypersteer.trainer import cross_concept_cosine  # noqa: E402


def spread(features: torch.Tensor) -> dict[str, float]:
    """Shape statistics of `features` (`(num_concepts, hidden_size)`) around their mean over concepts."""
    centred = features.double() - features.double().mean(dim=0)
    eigenvalues = torch.linalg.svdvals(centred).pow(2)
    coordinate_variance = centred.pow(2).sum(dim=0)
    return {
        "participation_ratio": (eigenvalues.sum().pow(2) / eigenvalues.pow(2).sum()).item(),
        "top_direction_share": (eigenvalues.max() / eigenvalues.sum()).item(),
        "top_coordinate_share": (coordinate_variance.max() / coordinate_variance.sum()).item(),
        "top_coordinate": int(coordinate_variance.argmax()),
    }


def mean_cross_cosine(vectors: torch.Tensor) -> float | None:
    """Mean cosine between different rows (each row its own concept), or `None` when all rows are zero (an untrained
    model steers by exactly zero)."""
    if not vectors.abs().sum():
        return None
    return cross_concept_cosine(vectors.double(), torch.arange(len(vectors))).item()


def describe(model: HyperSteerModel, concepts: list[str]) -> dict:
    hypernetwork = model.hypernetwork
    # The pooled feature before any centring: the input of the running centre, or of the final norm without one.
    source = hypernetwork.feature_center if hypernetwork.feature_center is not None else hypernetwork.norm
    captured = {}
    hook = source.register_forward_hook(lambda module, inputs, output: captured.update(features=inputs[0].detach()))
    with torch.no_grad():
        vectors = model.compute_steering_vectors(steering_prompt=concepts).float()
    hook.remove()
    if hypernetwork.steering_offset is not None:
        vectors = vectors - hypernetwork.steering_offset.detach().float()
    return {**spread(captured["features"]), "vector_cross_cosine": mean_cross_cosine(vectors)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", required=True, help="Comma-separated trained no_context experiments in --work_dir.")
    parser.add_argument("--untrained", action="store_true", help="Also describe the untrained hypernetwork.")
    parser.add_argument("--work_dir", default="/tmp/hypersteer-quality")
    args = parser.parse_args()
    untrained = None
    for run in args.runs.split(","):
        run_dir = Path(args.work_dir) / run
        model = HyperSteerModel.from_pretrained(run_dir).eval()
        if model.config.hypernet_type != "no_context":
            raise ValueError(f"{run!r} is not a no_context run; its features depend on the row's context.")
        split = json.loads((run_dir / "concept_split.json").read_text())
        concepts = split["heldin_concepts"] + split["heldout_concepts"]
        print(json.dumps({"run": run, "concepts": len(concepts), **describe(model, concepts)}), flush=True)
        if args.untrained and untrained is None:
            # The same architecture and settings, freshly built around the run's own (frozen, shared) base.
            untrained = HyperSteerModel.from_base_model(
                model.language_model, model.tokenizer, **model.config.to_diff_dict()
            ).eval()
            print(json.dumps({"run": "untrained", "concepts": len(concepts), **describe(untrained, concepts)}))


if __name__ == "__main__":
    main()
