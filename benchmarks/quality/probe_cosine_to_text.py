r"""Probe: how close to a concept's own LM-trained vector must a vector be for the concept to show in text?

A map from descriptions to vectors fitted on N concepts with real rows (`probe_description_map.py`) predicts a left-out
concept's LM-trained vector with a centred cosine that rises by about 0.05 for each doubling of N (0.22-0.25 at 56-105
concepts), and one LM-trained vector per concept shows its concept in text far more often than prompting. Between the
two lies the question this probe answers: which cosine does a predicted vector need for its concept to show in text as
often as issue [1/4]'s text target asks (0.5x and 1x prompting's detector gain over the unsteered base)? With the map's
learning curve, that says how many concepts with real rows a map would need.

For each of `--text_concepts` AxBench concepts of the run (the description map's text check draws the same ones),
the probe sets the cosine directly:

    v(c) = centre + r * (c * own + sqrt(1 - c^2) * error)

with `own` the concept's unit vector centred on the held-in concepts' mean `centre`, `r` the held-in vectors' mean
centred norm, and `error` a fixed unit direction orthogonal to `own` in the span of the other held-in concepts'
centred vectors (a kernel ridge prediction is a combination of its training targets). Each `v(c)` is scored in text
at `--text_factors`: detector accuracy for the concept and for another one (the text metric's wrong-concept
accuracy), NLL and distinct bigrams, against prompting in the user turn and the unsteered base. `--plot` pools
recorded rows (runs of other splits draw other concepts) and draws the curve beside the description map's learning
curve, reading `benchmarks/results/` only.

    python benchmarks/quality/probe_cosine_to_text.py --run_dir /tmp/hq10/recipe_split42 \
        --output_dir /tmp/hq12/cosine_to_text --text_factors 3,4 --name recipe_split42
    python benchmarks/quality/probe_cosine_to_text.py --plot benchmarks/results/probe_cosine_to_text.png \
        --name recipe_split42,recipe_split5
"""

import argparse
import json
import math
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

from probe_vector_regression import (  # noqa: E402
    add_vector_arguments,
    positive_training_rows,
    report,
    trained_concept_vectors,
)
from prompt_plus_steering import pooled_rows as steering_pooled_rows  # noqa: E402

from modeling_hypersteer import HyperSteerModel  # noqa: E402
from modeling_hypersteer.text_metric import ConceptDetector, text_metric  # noqa: E402


RESULTS_PATH = REPO_ROOT / "benchmarks" / "results" / "probe_cosine_to_text.json"
DESCRIPTION_MAP_RESULTS = REPO_ROOT / "benchmarks" / "results" / "probe_description_map.json"
# The description map's features and ridge whose left-out predictions were scored in text (its `text` check).
MAP_CURVE_KEY = "hidden8 ridge 0.1"
# Issue [1/4]'s text target for never-trained concepts, and prompting itself, as shares of prompting's gain.
TARGET_SHARES = (0.5, 1.0)


def vectors_at_cosine(own: torch.Tensor, error: torch.Tensor, cosine: float) -> torch.Tensor:
    """Unit directions at centred cosine `cosine` with each concept's own direction.

    Args:
        own (`torch.Tensor` of shape `(num_concepts, hidden_size)`): unit centred own vectors.
        error (`torch.Tensor` of shape `(num_concepts, hidden_size)`): unit directions orthogonal to `own`.
        cosine (`float`): in [0, 1].

    Returns:
        `torch.Tensor` of shape `(num_concepts, hidden_size)`: `cosine * own + sqrt(1 - cosine^2) * error`.
    """
    if not 0.0 <= cosine <= 1.0:
        raise ValueError(f"A cosine level must lie in [0, 1]; got {cosine}.")
    return cosine * own + math.sqrt(1.0 - cosine**2) * error


def error_directions(own: torch.Tensor, others: list[torch.Tensor], seed: int = 0) -> torch.Tensor:
    """One unit direction per concept, a random combination of `others[i]` (`(num_others, hidden_size)` unit centred
    vectors of the other concepts) with its component along `own[i]` removed: `(num_concepts, hidden_size)`."""
    generator = torch.Generator().manual_seed(seed)
    directions = []
    for own_direction, basis in zip(own, others):
        mix = torch.randn(len(basis), generator=generator) @ basis
        mix = mix - (mix @ own_direction) * own_direction
        directions.append(F.normalize(mix, dim=0))
    return torch.stack(directions)


def cosine_for_share(levels: list[dict], prompt_gain: float, share: float) -> float | None:
    """The smallest cosine at which the detector gain over unsteered reaches `share` of prompting's, interpolated
    linearly between the measured levels (`[{"cosine", "gain"}]`); `None` if no level reaches it."""
    ordered = sorted(levels, key=lambda level: level["cosine"])
    goal = share * prompt_gain
    for below, above in zip([None, *ordered], ordered):
        if above["gain"] >= goal:
            if below is None or above["gain"] == below["gain"]:
                return above["cosine"]
            fraction = (goal - below["gain"]) / (above["gain"] - below["gain"])
            return round(below["cosine"] + fraction * (above["cosine"] - below["cosine"]), 4)
    return None


def cosines_for_target_shares(levels: list[dict], prompt_gain: float) -> dict[float, dict[float, float | None]]:
    """`{factor: {share: cosine}}`: [`cosine_for_share`] at every factor of `levels` and every share of
    `TARGET_SHARES`."""
    factors = sorted({level["factor"] for level in levels})
    return {
        factor: {
            share: cosine_for_share([level for level in levels if level["factor"] == factor], prompt_gain, share)
            for share in TARGET_SHARES
        }
        for factor in factors
    }


def concepts_for_cosine(curve: dict[str, list[float]], cosine: float) -> dict:
    """A straight line through the map's learning curve (`{training concepts: [own cosine, margin]}`, numeric keys
    only) in cosine against log2 of the number of concepts, and the number of concepts at which it reaches `cosine`."""
    points = sorted((int(size), values[0]) for size, values in curve.items() if size.isdigit())
    if len(points) < 2:
        raise ValueError(f"A learning curve needs two or more sizes; got {points}.")
    xs = [math.log2(size) for size, _ in points]
    ys = [value for _, value in points]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    intercept = mean_y - slope * mean_x
    needed = 2 ** ((cosine - intercept) / slope) if slope > 0 else None
    return {
        "points": points,
        "cosine_per_doubling": round(slope, 4),
        "concepts_needed": None if needed is None else int(round(needed)),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_vector_arguments(parser, required=False)
    parser.add_argument("--cosines", default="0,0.25,0.5,0.75,1", help="Centred cosine levels with the own vector.")
    parser.add_argument("--text_concepts", type=int, default=24, help="AxBench concepts scored in text.")
    parser.add_argument("--text_factors", default="4", help="Factors of the text check.")
    parser.add_argument("--instructions_per_concept", type=int, default=10)
    parser.add_argument("--name", default=None, help="Row name in results/probe_cosine_to_text.json.")
    parser.add_argument(
        "--plot", default=None, help="Pool the recorded rows `--name A[,B]`, draw them to this PNG and exit."
    )
    args = parser.parse_args(argv)
    if args.plot:
        if not args.name:
            parser.error("--plot draws a recorded row: give its --name.")
        return plot([name.strip() for name in args.name.split(",") if name.strip()], Path(args.plot))
    if not args.run_dir or not args.output_dir:
        parser.error("--run_dir and --output_dir are required unless --plot is given.")
    cosines = [float(value) for value in args.cosines.split(",")]
    for cosine in cosines:
        if not 0.0 <= cosine <= 1.0:
            parser.error(f"--cosines: {cosine} is not in [0, 1].")
    factors = [float(value) for value in args.text_factors.split(",")]
    transformers.utils.logging.set_verbosity_warning()

    run_dir, output_dir = Path(args.run_dir), Path(args.output_dir)
    model = HyperSteerModel.from_pretrained(run_dir).eval()
    vectors, heldin, never = trained_concept_vectors(model, run_dir, output_dir, args)
    axbench = heldin + never["heldout"]
    if not 2 <= args.text_concepts <= len(axbench):
        raise SystemExit(
            f"--text_concepts {args.text_concepts}: the run has {len(axbench)} AxBench concepts; choose 2 to "
            f"{len(axbench)} (a wrong concept needs a second one)."
        )
    tested = sorted(random.Random(0).sample(axbench, args.text_concepts))
    stacked = torch.stack([vectors[c].float() for c in heldin])
    centre = stacked.mean(0)
    radius = (stacked - centre).norm(dim=-1).mean()
    unit = {c: F.normalize(vectors[c].float() - centre, dim=0) for c in axbench}
    own = torch.stack([unit[c] for c in tested])
    others = [torch.stack([unit[c] for c in heldin if c != concept]) for concept in tested]
    error = error_directions(own, others)

    data, _, _ = positive_training_rows(run_dir)
    detector = ConceptDetector.from_rows(data, concepts=tested)
    folder = output_dir / "cosine_to_text"
    folder.mkdir(parents=True, exist_ok=True)
    keys = ("factor", "detector_accuracy", "wrong_concept_accuracy", "nll", "distinct_bigrams", "num_samples")

    def scored(methods, concept_vectors, generations_path) -> list[dict]:
        metric = text_metric(
            model,
            model.tokenizer,
            detector,
            tested,
            methods,
            factors,
            num_instructions=args.instructions_per_concept,
            max_new_tokens=48,
            generations_path=generations_path,
            concept_vectors=concept_vectors,
        )
        return [{"method": row["method"], **{key: row.get(key) for key in keys}} for row in metric["rows"]]

    baselines = {row["method"]: row for row in scored(["prompt", "none"], None, folder / "prompt_none.jsonl")}
    none_accuracy = baselines["none"]["detector_accuracy"]
    prompt_gain = baselines["prompt"]["detector_accuracy"] - none_accuracy
    levels = []
    for cosine in cosines:
        directions = vectors_at_cosine(own, error, cosine)
        level_vectors = {c: (centre + radius * direction).to(model.dtype) for c, direction in zip(tested, directions)}
        for row in scored(["vector"], {"vector": level_vectors}, folder / f"cosine_{cosine:g}.jsonl"):
            row.update(cosine=cosine, gain=round(row["detector_accuracy"] - none_accuracy, 4))
            levels.append(row)
            print(row, flush=True)
    result = {
        "run_dir": str(run_dir),
        "command": "python benchmarks/quality/probe_cosine_to_text.py " + " ".join(argv or sys.argv[1:]),
        "concepts": tested,
        "answers_per_condition": len(tested) * args.instructions_per_concept,
        "radius": round(radius.item(), 3),
        "prompt": baselines["prompt"],
        "none": baselines["none"],
        "levels": levels,
        "cosine_for_share_of_prompting": cosines_for_target_shares(levels, prompt_gain),
    }
    return report(result, RESULTS_PATH, args.name)


def pooled_rows(runs: list[dict]) -> dict:
    """Recorded rows of several runs pooled by answer count (`prompt_plus_steering.pooled_rows`): `{"prompt", "none",
    "levels", "answers_per_condition"}`, each level's `gain` over the pooled unsteered accuracy.

    Raises:
        `ValueError` when a (cosine, factor) level was not measured in every run: its pool would weigh other runs.
    """
    conditions = [{(level["cosine"], level["factor"]) for level in run["levels"]} for run in runs]
    missing = sorted(set().union(*conditions) - set.intersection(*conditions))
    if missing:
        raise ValueError(f"The (cosine, factor) levels {missing} were not measured in every run pooled.")
    pooled = steering_pooled_rows(
        [[run["none"], run["prompt"], *run["levels"]] for run in runs], keys=("method", "factor", "cosine")
    )
    by_method = {entry["method"]: entry for entry in pooled if entry["method"] in ("none", "prompt")}
    levels = [entry for entry in pooled if entry["method"] not in by_method]
    for level in levels:
        level["gain"] = level["detector_accuracy"] - by_method["none"]["detector_accuracy"]
    return {
        **by_method,
        "levels": levels,
        "answers_per_condition": sum(run["answers_per_condition"] for run in runs),
    }


def plot(names: list[str], path: Path) -> dict:
    """Detector accuracy against the cosine (rows `names` of `probe_cosine_to_text.json`, pooled) beside the
    description map's learning curve, with the number of concepts its straight line needs for the cosines at which
    the pooled gain reaches the text target's shares of prompting's. Returns (and prints) those numbers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recorded = json.loads(RESULTS_PATH.read_text())["runs"]
    missing = [name for name in names if name not in recorded]
    if missing:
        raise SystemExit(f"{RESULTS_PATH} has no row {missing}; rows: {sorted(recorded)}.")
    run = pooled_rows([recorded[name] for name in names])
    none, prompt = run["none"]["detector_accuracy"], run["prompt"]["detector_accuracy"]
    thresholds = cosines_for_target_shares(run["levels"], prompt - none)
    factors = list(thresholds)
    map_curve = json.loads(DESCRIPTION_MAP_RESULTS.read_text())["runs"]["recipe_prior48_600"]["learning_curve"]
    curves = {
        "AxBench, cross-validated": map_curve[MAP_CURVE_KEY]["axbench_cross_validated"],
        "held-back concept_llama": map_curve[MAP_CURVE_KEY]["heldback"],
    }
    summary = {"runs": names, **run, "cosine_for_share_of_prompting": thresholds, "concepts_needed": {}}

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for factor in factors:
        rows = [lv for lv in run["levels"] if lv["factor"] == factor]
        cosines = [lv["cosine"] for lv in rows]
        left.plot(cosines, [lv["detector_accuracy"] for lv in rows], "o-", label=f"right concept, factor {factor:g}")
        left.plot(
            cosines, [lv["wrong_concept_accuracy"] for lv in rows], "x--", label=f"wrong concept, factor {factor:g}"
        )
    left.axhline(prompt, color="gray", linestyle="-", label="prompting")
    left.axhline(none + 0.5 * (prompt - none), color="gray", linestyle=":", label="0.5x prompting's gain")
    left.axhline(none, color="black", linestyle=":", label="unsteered")
    left.set_xlabel("centred cosine with the concept's own LM-trained vector")
    left.set_ylabel(f"detector accuracy ({run['answers_per_condition']} answers each)")
    left.set_title("A vector in text, by its cosine with the concept's own")
    left.legend(fontsize=8)

    for label, curve in curves.items():
        points = sorted((int(size), values[0]) for size, values in curve.items() if size.isdigit())
        line = right.plot([p[0] for p in points], [p[1] for p in points], "o-", label=label)[0]
        for size, values in curve.items():
            if not size.isdigit():
                right.plot([sum(int(part) for part in size.split("+"))], [values[0]], "s", color=line.get_color())
        needed = []
        for factor in factors:
            for share, cosine in thresholds[factor].items():
                if cosine is None:
                    continue
                fit = concepts_for_cosine(curve, cosine)
                summary["concepts_needed"][f"{label}; factor {factor:g}; {share:g}x prompting"] = fit
                if fit["concepts_needed"]:
                    needed.append(fit)
        if needed:
            slope = needed[0]["cosine_per_doubling"]
            sizes = [points[-1][0], max(fit["concepts_needed"] for fit in needed)]
            last = math.log2(points[-1][0])
            ends = [points[-1][1] + slope * (math.log2(size) - last) for size in sizes]
            right.plot(sizes, ends, ":", color=line.get_color())
    for factor, style in zip(factors, ("--", "-", "-.", ":")):
        for share, cosine in thresholds[factor].items():
            if cosine is not None:
                right.axhline(cosine, color="gray", linewidth=0.8, linestyle=style)
                right.annotate(f"{share:g}x prompting, factor {factor:g}", (14, cosine), fontsize=8, va="bottom")
    right.set_xscale("log", base=2)
    right.set_xlabel("training concepts with real rows (log scale; squares: + 43 concept_llama)")
    right.set_ylabel("left-out concept: centred cosine of the prediction")
    right.set_title("The description map's learning curve, continued as a line")
    right.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
