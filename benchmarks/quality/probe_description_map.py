"""Probe: how well does a map fitted on many concepts predict a left-out concept's LM-trained vector from its
description, does it improve with the number of concepts, and does the prediction show the concept in text?

`probe_vector_regression.py` fitted such a map from the lexical direction `u(s)` on 57 concepts and found it weak.
This probe asks the scaling question of issue [1/4] at the level of the vectors, where a point costs seconds rather
than a training run. It trains one LM vector per concept (`trained_concept_vectors`: the run's held-in, held-out and
24 held-back concept_llama concepts; plus the other concept_llama concepts and, optionally, concepts whose rows the
base wrote about them, `--self_written_rows`), describes each description by

* `lexical`: `u(s)`, what HyperSteer's lexical prior reads;
* `hidden{L}`: the mean over the description's tokens of the frozen base's residual after its first `L` layers (what
  a hypernetwork whose blocks start from the base's layers reads at initialisation),
* `about{L}` (with `--about_layers`): the base's residual after `L` layers over the last tokens of a chat prompt that
  asks it to write about the description (the state its answer about the concept starts from),

and reports, with a kernel ridge map from features to vectors (features and vectors centred on the training
concepts' means, both unit-normalised):

* `learning_curve`: the centred cosine of the prediction with a left-out concept's own vector, and its margin over
  the cosine with the other left-out concepts' vectors, against the number of training concepts: 9-fold
  cross-validation over the 63 AxBench concepts (training on random subsets of the other 56, and on all of them
  plus the other concept_llama concepts), and on the 24 held-back concepts (training on subsets of the 63 AxBench
  concepts, and on those plus the other concept_llama concepts);
* `self_written` (with `--self_written_rows`): the same cross-validation when the map also trains on the concepts
  whose vectors were trained on text the base wrote about them (their targets), against shuffled targets;
* `text`: leave-one-out predictions for `--text_concepts` AxBench concepts (the map trained on every other
  concept), each as `centre + r * unit(prediction)` with `r` the training vectors' mean centred norm, in text at
  `--text_factors` against the concept's own vector, the centre alone, another concept's prediction (the same
  generations scored for the wrong concept), prompting and the unsteered base.

    python benchmarks/quality/probe_description_map.py --run_dir /tmp/hq4/recipe_prior48_600 \\
        --output_dir /tmp/hq5/vector_regression --self_written_rows /tmp/hq7/about_rows.parquet \\
        --name recipe_prior48_600
"""

import argparse
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers


REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
sys.path.insert(0, str(REPO_ROOT / "benchmarks" / "quality"))

import quality_ablation  # noqa: E402
from probe_training_free_directions import vector_text_rows  # noqa: E402
from probe_vector_regression import (  # noqa: E402
    add_vector_arguments,
    kernel_ridge,
    lexical_directions,
    lm_trained_vectors,
    positive_training_rows,
    report,
    trained_concept_vectors,
)

from modeling_hypersteer import HyperSteerModel  # noqa: E402
from modeling_hypersteer.concept_data import ABOUT_PROMPT_TEMPLATES  # noqa: E402
from modeling_hypersteer.data import format_prompt, load_concept_data  # noqa: E402
from modeling_hypersteer.modeling_hypersteer import tokenize_steering_prompts  # noqa: E402
from modeling_hypersteer.text_metric import ConceptDetector  # noqa: E402


RESULTS_PATH = REPO_ROOT / "benchmarks" / "results" / "probe_description_map.json"
FOLDS = 9
DRAWS = 4
# The `about{L}` features read the assistant header the answer starts from: the prompt's last tokens.
ABOUT_TAIL_TOKENS = 3


@torch.no_grad()
def hidden_means(model, concepts: list[str], num_layers: int, batch_size: int = 16) -> torch.Tensor:
    """Mean over each description's tokens of the base's residual after its first `num_layers` layers:
    `(num_concepts, hidden_size)` in float32."""
    means = []
    for start in range(0, len(concepts), batch_size):
        tokens = tokenize_steering_prompts(
            model.tokenizer, concepts[start : start + batch_size], model.config.max_steering_prompt_length
        )
        mask = tokens["steering_attention_mask"]
        hidden = model.language_model(
            input_ids=tokens["steering_input_ids"], attention_mask=mask, output_hidden_states=True
        ).hidden_states[num_layers]
        weights = mask[..., None].to(hidden.dtype)
        means.append(((hidden * weights).sum(1) / weights.sum(1)).float())
    return torch.cat(means)


@torch.no_grad()
def about_prompt_states(
    model, concepts: list[str], layers: list[int], batch_size: int = 16
) -> dict[int, torch.Tensor]:
    """`{layer: (num_concepts, hidden_size)}` float32: the base's residual after `layer` layers, averaged over the last
    `ABOUT_TAIL_TOKENS` tokens of the chat prompt asking it to write about each description."""
    if not layers:
        return {}
    tokenizer = model.tokenizer
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    states = {layer: [] for layer in layers}
    try:
        for start in range(0, len(concepts), batch_size):
            prompts = [
                format_prompt(tokenizer, ABOUT_PROMPT_TEMPLATES[0].format(concept=concept))
                for concept in concepts[start : start + batch_size]
            ]
            batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            hidden_states = model.language_model(**batch, output_hidden_states=True).hidden_states
            for layer in layers:
                states[layer].append(hidden_states[layer][:, -ABOUT_TAIL_TOKENS:].mean(1).float())
    finally:
        tokenizer.padding_side = padding_side
    return {layer: torch.cat(values) for layer, values in states.items()}


def unit_features(values: torch.Tensor, num_heldin: int, args) -> torch.Tensor:
    """`values` centred on the held-in concepts' mean (with `--standardize_features`, each coordinate also divided
    by its standard deviation over them, as `--standardize_pooled_features` does in the hypernetwork), unit-normalised."""
    heldin = values[:num_heldin]
    centred = values - heldin.mean(0)
    if args.standardize_features:
        centred = centred / (heldin.std(0) + 1e-6)
    return F.normalize(centred, dim=-1)


def centred_units(vectors: dict, concepts: list[str], centre: torch.Tensor) -> torch.Tensor:
    return F.normalize(torch.stack([vectors[c].float() for c in concepts]) - centre, dim=-1)


def map_score(features, vectors, train, test, ridge, extra=None) -> tuple[float, float]:
    """Mean centred cosine of each `test` concept's prediction with its own vector, and its margin over the other
    `test` concepts' vectors, for a map fitted on `train` (plus `extra`: `(concepts, unit centred targets)`)."""
    centre = torch.stack([vectors[c].float() for c in train]).mean(0)
    inputs = torch.stack([features[c] for c in train])
    targets = centred_units(vectors, train, centre)
    if extra is not None:
        inputs = torch.cat([inputs, torch.stack([features[c] for c in extra[0]])])
        targets = torch.cat([targets, extra[1]])
    predictions = F.normalize(kernel_ridge(inputs, targets, torch.stack([features[c] for c in test]), ridge), dim=-1)
    cosines = predictions @ centred_units(vectors, test, centre).T
    own = cosines.diagonal()
    others = (cosines.sum(1) - own) / (len(test) - 1)
    return own.mean().item(), (own - others).mean().item()


def averaged(runs: list[tuple[float, float]]) -> list[float]:
    return [round(sum(run[k] for run in runs) / len(runs), 4) for k in (0, 1)]


def cross_validated(features, vectors, concepts, ridge, sizes, pool_extra, extra=None) -> dict:
    """`{training concepts: [own, margin]}` over `FOLDS` folds of `concepts` and `DRAWS` shuffles; a size of `None`
    trains on all the other folds plus `pool_extra` (key `"56+43"`)."""
    scores = {}
    for size in sizes:
        runs = []
        for draw in range(DRAWS):
            generator = random.Random(draw)
            order = concepts[:]
            generator.shuffle(order)
            for fold in (order[index::FOLDS] for index in range(FOLDS)):
                rest = [c for c in concepts if c not in fold]
                train = generator.sample(rest, size) if size is not None else rest + pool_extra
                runs.append(map_score(features, vectors, train, fold, ridge, extra))
        key = str(size) if size is not None else f"{len(concepts) - len(concepts) // FOLDS}+{len(pool_extra)}"
        scores[key] = averaged(runs)
    return scores


def held_back(features, vectors, pool, pool_extra, test, ridge, sizes) -> dict:
    """`{training concepts: [own, margin]}` on `test` for maps fitted on random subsets of `pool` (`None`: all of it
    plus `pool_extra`)."""
    scores = {}
    for size in sizes:
        runs = []
        for draw in range(DRAWS):
            generator = random.Random(100 + draw)
            train = generator.sample(pool, size) if size is not None else pool + pool_extra
            runs.append(map_score(features, vectors, train, test, ridge))
        scores[str(size) if size is not None else f"{len(pool)}+{len(pool_extra)}"] = averaged(runs)
    return scores


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_vector_arguments(parser)
    parser.add_argument(
        "--extra_steps", type=int, default=200, help="Steps (batch 4) of the other concept_llama vectors."
    )
    parser.add_argument("--self_written_rows", default=None, help="Rows the base wrote about concepts (optional).")
    parser.add_argument("--self_written_steps", type=int, default=600, help="Steps (batch 4) of their vectors.")
    parser.add_argument("--layers", default="4,8", help="Base layers whose mean residual is a feature.")
    parser.add_argument(
        "--about_layers", default="", help="Base layers read at the end of a request to write about the description."
    )
    parser.add_argument(
        "--standardize_features",
        action="store_true",
        help="Divide each feature coordinate by its spread over the held-in concepts before normalising.",
    )
    parser.add_argument("--ridges", default="0.1,1", help="Ridge penalties of the curves.")
    parser.add_argument("--text_layer", type=int, default=8, help="Feature layer of the text check's map.")
    parser.add_argument("--text_ridge", type=float, default=0.1)
    parser.add_argument("--text_concepts", type=int, default=24, help="AxBench concepts of the text check (0 skips).")
    parser.add_argument("--text_factors", default="2,4")
    parser.add_argument("--name", default=None, help="Row name in results/probe_description_map.json.")
    args = parser.parse_args(argv)
    layers = [int(value) for value in args.layers.split(",")]
    about_layers = [int(value) for value in args.about_layers.split(",") if value.strip()]
    ridges = [float(value) for value in args.ridges.split(",")]
    if args.text_concepts and args.text_layer not in layers:
        parser.error(f"--text_layer {args.text_layer} must be one of --layers {args.layers}.")
    transformers.utils.logging.set_verbosity_warning()

    run_dir, output_dir = Path(args.run_dir), Path(args.output_dir)
    model = HyperSteerModel.from_pretrained(run_dir).eval()
    vectors, heldin, never = trained_concept_vectors(model, run_dir, output_dir, args)
    axbench, heldback = heldin + never["heldout"], never["heldback"]
    llama = load_concept_data(quality_ablation.data_path(args.heldback_data))
    llama_rows = [row for row in llama if not row["is_negative"] and row["output_concept"] not in set(heldback)]
    other_llama = lm_trained_vectors(
        model, llama_rows, output_dir / "vectors_other_llama", args.extra_steps, args.learning_rate
    )
    vectors = {**vectors, **other_llama}
    extra_concepts = sorted(other_llama)
    self_written = {}
    if args.self_written_rows:
        rows = [dict(row) for row in load_concept_data(args.self_written_rows) if not row["is_negative"]]
        self_written = lm_trained_vectors(
            model, rows, output_dir / "vectors_self_written_rows", args.self_written_steps, args.learning_rate
        )
    everything = axbench + heldback + extra_concepts + sorted(self_written)
    raw = {"lexical": lexical_directions(model, everything)}
    raw.update({f"hidden{layer}": hidden_means(model, everything, layer) for layer in layers})
    raw.update(
        {f"about{layer}": states for layer, states in about_prompt_states(model, everything, about_layers).items()}
    )
    features = {name: dict(zip(everything, unit_features(values, len(heldin), args))) for name, values in raw.items()}

    result = {
        "run_dir": str(run_dir),
        "command": "python benchmarks/quality/probe_description_map.py " + " ".join(argv or sys.argv[1:]),
        "concepts": {"axbench": len(axbench), "heldback": len(heldback), "other_llama": len(extra_concepts)},
        "learning_curve": {},
    }
    for name, feature in features.items():
        for ridge in ridges:
            key = f"{name} ridge {ridge}"
            result["learning_curve"][key] = {
                "axbench_cross_validated": cross_validated(
                    feature, vectors, axbench, ridge, [14, 28, 56, None], extra_concepts
                ),
                "heldback": held_back(feature, vectors, axbench, extra_concepts, heldback, ridge, [14, 28, 63, None]),
            }
            print(key, result["learning_curve"][key], flush=True)
    if self_written:
        result["self_written"] = {"concepts": len(self_written)}
        written = sorted(self_written)
        targets = centred_units(self_written, written, torch.stack([self_written[c].float() for c in written]).mean(0))
        shuffled = targets[torch.randperm(len(written), generator=torch.Generator().manual_seed(0))]
        for name, feature in features.items():
            for ridge in ridges:
                result["self_written"][f"{name} ridge {ridge}"] = {
                    label: cross_validated(feature, vectors, axbench, ridge, [56], [], extra)
                    for label, extra in (
                        ("without", None),
                        ("with", (written, targets)),
                        ("with_shuffled_targets", (written, shuffled)),
                    )
                }

    if args.text_concepts:
        result["text"] = text_check(model, run_dir, output_dir, vectors, features, axbench, extra_concepts, args)
    return report(result, RESULTS_PATH, args.name)


def text_check(model, run_dir, output_dir, vectors, features, axbench, extra_concepts, args) -> dict:
    """Leave-one-out predicted vectors in text against the own vector, the centre, a wrong concept's prediction."""
    feature = features[f"hidden{args.text_layer}"]
    tested = sorted(random.Random(0).sample(axbench, args.text_concepts))
    predicted, centres, cosines = {}, {}, []
    for concept in tested:
        train = [c for c in axbench + extra_concepts if c != concept]
        stacked = torch.stack([vectors[c].float() for c in train])
        centre = stacked.mean(0)
        radius = (stacked - centre).norm(dim=-1).mean()
        prediction = kernel_ridge(
            torch.stack([feature[c] for c in train]),
            F.normalize(stacked - centre, dim=-1),
            feature[concept][None],
            args.text_ridge,
        )[0]
        predicted[concept] = centre + radius * F.normalize(prediction, dim=0)
        centres[concept] = centre
        cosines.append(F.cosine_similarity(prediction, vectors[concept].float() - centre, dim=0).item())
    # Each concept gets the next one's prediction: the same generations, scored for the wrong concept.
    wrong = {concept: predicted[tested[(index + 1) % len(tested)]] for index, concept in enumerate(tested)}
    data, _, _ = positive_training_rows(run_dir)
    detector = ConceptDetector.from_rows(data, concepts=tested)
    factors = [float(value) for value in args.text_factors.split(",")]
    folder = output_dir / "description_map_text"
    folder.mkdir(parents=True, exist_ok=True)
    text = {"concepts": len(tested), "own_cosine": round(sum(cosines) / len(cosines), 4)}
    for name, chosen, chosen_factors in (
        ("predicted", predicted, factors),
        ("wrong_concept_prediction", wrong, factors[-1:]),
        ("own_vector", {c: vectors[c].float() for c in tested}, factors[-1:]),
        ("centre", centres, factors[-1:]),
    ):
        text[name] = vector_text_rows(model, detector, tested, chosen, chosen_factors, folder / f"{name}.jsonl")
        print(name, text[name], flush=True)
    return text


if __name__ == "__main__":
    main()
