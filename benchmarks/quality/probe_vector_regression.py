r"""Probe: does the LM-trained vector of a concept follow from its description's words, for concepts a map never saw?

One vector per concept trained with the LM loss alone (the `vector` baseline) shows its concept in text far better
than HyperSteer (`benchmarks/results/text_vector_bound.json`). This probe asks whether such vectors can be predicted
for never-trained concepts from what HyperSteer's lexical prior reads, the description's unit direction `u(s)` (mean
output embedding of its words, centred): it trains one vector per concept for the run's held-in concepts *and* for
never-trained ones (the run's held-out concepts and held-back concept_llama concepts, as targets only), fits a kernel
ridge map `u(s) -> vector` on the held-in concepts, and reports, on the never-trained concepts,

* the cosine of each prediction with the concept's own trained vector, centred on the held-in mean vector (the part
  shared by every concept says nothing about which concept it is), against the same cosine of HyperSteer's vector,
  on never-trained and held-in concepts (`hypersteer`: centred on the trained vectors' held-in mean, which leaves
  HyperSteer's own shared part in; `hypersteer_own_centre`: on HyperSteer's held-in mean, so only what tells its
  vectors apart is compared);
* retrieval: the share of never-trained concepts whose prediction is nearer (centred cosine) their own trained
  vector than any other never-trained concept's.

    python benchmarks/quality/probe_vector_regression.py --run_dir /tmp/hq4/recipe_prior48_600 \
        --output_dir /tmp/hq4/vector_regression --name recipe_prior48_600
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers


REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import quality_ablation  # noqa: E402

from modeling_hypersteer import HyperSteerModel  # noqa: E402
from modeling_hypersteer.baselines import baseline_concept_vectors  # noqa: E402
from modeling_hypersteer.data import ConceptSplit, build_splits, load_concept_data  # noqa: E402
from modeling_hypersteer.modeling_hypersteer import HyperSteerLexicalPrior, tokenize_steering_prompts  # noqa: E402
from modeling_hypersteer.utils import CONCEPT_SPLIT_FILE, TRAINING_SUMMARY_FILE  # noqa: E402


RESULTS_PATH = REPO_ROOT / "benchmarks" / "results" / "probe_vector_regression.json"


def lexical_directions(model, concepts: list[str]) -> torch.Tensor:
    """`u(s)` of every concept, as the model's `lexical` prior reads it: `(num_concepts, hidden_size)`."""
    prior = HyperSteerLexicalPrior(model.get_output_embeddings().weight)
    tokens = tokenize_steering_prompts(model.tokenizer, concepts, model.config.max_steering_prompt_length)
    with torch.no_grad():
        return prior(tokens["steering_input_ids"], tokens["steering_attention_mask"], model.language_model).float()


def kernel_ridge(features: torch.Tensor, targets: torch.Tensor, queries: torch.Tensor, ridge: float) -> torch.Tensor:
    """Predictions at `queries` of the linear map fitted from `features` to `targets` with an L2 penalty `ridge`."""
    gram = features @ features.T
    weights = torch.linalg.solve(gram + ridge * torch.eye(len(features)), targets)
    return (queries @ features.T) @ weights


def centred_cosines(predictions: torch.Tensor, targets: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """`(num_predictions, num_targets)` cosines of every prediction with every target, both centred on `centre`."""
    return F.normalize(predictions - centre, dim=-1) @ F.normalize(targets - centre, dim=-1).T


def leave_one_out_cosine(features: torch.Tensor, targets: torch.Tensor, ridge: float) -> float:
    """Mean centred cosine of each held-in concept's prediction from a map fitted on the others."""
    cosines = []
    for index in range(len(features)):
        keep = torch.arange(len(features)) != index
        centre = targets[keep].mean(0)
        prediction = centre + kernel_ridge(features[keep], targets[keep] - centre, features[index : index + 1], ridge)
        cosines.append(centred_cosines(prediction, targets[index : index + 1], centre).item())
    return sum(cosines) / len(cosines)


def summary(cosines: torch.Tensor) -> dict:
    """Own-concept centred cosine (the diagonal) and retrieval accuracy of a `(n, n)` cosine table."""
    own = cosines.diagonal()
    return {
        "own_cosine": round(own.mean().item(), 4),
        "other_cosine": round(((cosines.sum() - own.sum()) / (cosines.numel() - len(own))).item(), 4),
        "retrieval_accuracy": round((cosines.argmax(dim=-1) == torch.arange(len(own))).float().mean().item(), 4),
    }


def add_vector_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """The flags of [`trained_concept_vectors`] (`--run_dir` and `--output_dir` optional when not `required`)."""
    parser.add_argument(
        "--run_dir", required=required, help="A finished training run (its split and HyperSteer vectors)."
    )
    parser.add_argument("--output_dir", required=required, help="Where the trained vectors and generations are kept.")
    parser.add_argument("--heldback_data", default="../shared/data/axbench_more/concept_llama")
    parser.add_argument("--heldback_concepts", type=int, default=24)
    parser.add_argument("--steps", type=int, default=400, help="Training steps (batch 4) of the per-concept vectors.")
    parser.add_argument("--learning_rate", type=float, default=0.05)


def report(result: dict, results_path: Path, name: str | None) -> dict:
    """Print a probe's `result` and, when `name` is given, record it as that run of `results_path`."""
    print(json.dumps(result, indent=2), flush=True)
    if name:
        quality_ablation.record_run(results_path, name, result)
    return result


def positive_training_rows(run_dir: Path) -> tuple:
    """`(data, split, rows)`: a finished run's data (its `sources`), concept split and positive training rows."""
    training = json.loads((run_dir / TRAINING_SUMMARY_FILE).read_text())
    data = load_concept_data([quality_ablation.data_path(source) for source in training["sources"]])
    split = ConceptSplit.from_json(run_dir / CONCEPT_SPLIT_FILE)
    train_rows = [dict(row) for row in build_splits(data, split, **training["split_settings"])["train"]]
    return data, split, [row for row in train_rows if not row["is_negative"]]


def lm_trained_vectors(model, rows, folder: Path, steps: int, learning_rate: float) -> dict:
    """One LM-trained vector (the `vector` baseline, kept in `folder` and reused from there) per concept of `rows`
    (positive rows with `input`, `output`, `output_concept`)."""
    keys = ("input", "output", "output_concept")
    rows = [{key: row[key] for key in keys} for row in rows]
    return baseline_concept_vectors(
        "vector", model, model.tokenizer, rows, [], [], folder, steps=steps, learning_rate=learning_rate
    )


def trained_concept_vectors(model, run_dir: Path, output_dir: Path, args) -> tuple[dict, list[str], dict]:
    """One LM-trained vector per concept (the `vector` baseline, kept in `output_dir/vectors` and reused from there)
    for the run's held-in concepts and, as targets only, its held-out and the held-back concepts.

    Returns:
        `(vectors, heldin_concepts, never_concepts)`: `{concept: (hidden_size,) tensor}`, the sorted held-in concepts
        and `{"heldout": [...], "heldback": [...]}`.
    """
    data, split, train_rows = positive_training_rows(run_dir)
    heldout = set(split.heldout_concepts)
    heldout_rows = [dict(row) for row in data if row["output_concept"] in heldout and not row["is_negative"]]
    heldback_data = load_concept_data(quality_ablation.data_path(args.heldback_data))
    heldback = set(quality_ablation.heldback_concepts(heldback_data, args.heldback_concepts))
    heldback_rows = [
        dict(row) for row in heldback_data if row["output_concept"] in heldback and not row["is_negative"]
    ]
    rows = train_rows + heldout_rows + heldback_rows
    vectors = lm_trained_vectors(model, rows, output_dir / "vectors", args.steps, args.learning_rate)
    heldin_concepts = sorted({row["output_concept"] for row in train_rows})
    return vectors, heldin_concepts, {"heldout": sorted(heldout), "heldback": sorted(heldback)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_vector_arguments(parser)
    parser.add_argument("--ridges", default="0.01,0.1,1,10", help="Penalties tried by leave-one-out on held-in.")
    parser.add_argument("--name", default=None, help="Row name in results/probe_vector_regression.json.")
    args = parser.parse_args(argv)
    transformers.utils.logging.set_verbosity_warning()

    run_dir = Path(args.run_dir)
    model = HyperSteerModel.from_pretrained(run_dir).eval()
    vectors, heldin_concepts, never_concepts = trained_concept_vectors(model, run_dir, Path(args.output_dir), args)
    heldin_targets = torch.stack([vectors[c] for c in heldin_concepts])
    centre = heldin_targets.mean(0)
    heldin_features = lexical_directions(model, heldin_concepts)

    ridges = [float(value) for value in args.ridges.split(",")]
    loo = {ridge: leave_one_out_cosine(heldin_features, heldin_targets, ridge) for ridge in ridges}
    ridge = max(loo, key=loo.get)
    result = {
        "run_dir": str(run_dir),
        "command": "python benchmarks/quality/probe_vector_regression.py " + " ".join(argv or sys.argv[1:]),
        "num_heldin": len(heldin_concepts),
        "vector_norm_heldin": round(heldin_targets.norm(dim=-1).mean().item(), 2),
        "heldin_pairwise_cosine": round(
            (F.normalize(heldin_targets, dim=-1) @ F.normalize(heldin_targets, dim=-1).T)
            .fill_diagonal_(float("nan"))
            .nanmean()
            .item(),
            4,
        ),
        "leave_one_out_cosine": {str(key): round(value, 4) for key, value in loo.items()},
        "ridge": ridge,
        "splits": {},
    }
    with torch.no_grad():
        heldin_hypersteer = model.compute_steering_vectors(steering_prompt=heldin_concepts).float()
    hypersteer_centre = heldin_hypersteer.mean(0)

    def hypersteer_cosines(hypersteer: torch.Tensor, targets: torch.Tensor) -> dict:
        return {
            # Both centred on the LM vectors' held-in mean, which leaves HyperSteer's own shared part in its vectors.
            "hypersteer": summary(centred_cosines(hypersteer, targets, centre)),
            # Each centred on its own held-in mean: only the parts that tell one concept's vector from another's.
            "hypersteer_own_centre": summary(
                F.normalize(hypersteer - hypersteer_centre, dim=-1) @ F.normalize(targets - centre, dim=-1).T
            ),
        }

    result["splits"]["heldin"] = {
        "num_concepts": len(heldin_concepts),
        **hypersteer_cosines(heldin_hypersteer, heldin_targets.float()),
    }
    for name, concepts in never_concepts.items():
        targets = torch.stack([vectors[c] for c in concepts]).float()
        features = lexical_directions(model, concepts)
        predicted = centre + kernel_ridge(heldin_features, heldin_targets - centre, features, ridge)
        with torch.no_grad():
            hypersteer = model.compute_steering_vectors(steering_prompt=concepts).float()
        result["splits"][name] = {
            "num_concepts": len(concepts),
            "ridge_from_lexical": summary(centred_cosines(predicted, targets, centre)),
            "lexical_direction_itself": summary(centred_cosines(centre + features, targets, centre)),
            **hypersteer_cosines(hypersteer, targets),
            "vector_norm": round(targets.norm(dim=-1).mean().item(), 2),
        }
    return report(result, RESULTS_PATH, args.name)


if __name__ == "__main__":
    main()
