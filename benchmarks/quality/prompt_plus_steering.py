r"""Steering on top of prompting: on concepts a run never trained on, does its vector, added while the prompt already
asks for the concept, make the concept show in the answers more often than the prompt alone, and more often than
another never-trained concept's vector on the same prompt?

Conditions, on `--instructions_per_concept` generic instructions per concept (greedy, as the text metric):

* `none`: the unsteered base; `prompt`: the concept asked for in the user turn (the prompting baseline);
* `prompt_hypersteer`: that prompt, plus the run's vector of the same concept at each of `--factors`;
* `prompt_wrong_vector`: that prompt, plus the vector of another concept of the set (the next one in sorted order).

Every answer is scored by the text metric (`score_samples`: the concept detector of the prompt's concept, the base's
NLL, distinct bigrams). In `prompt_wrong_vector` the metric's wrong-concept detector is the vector's concept, so its
`wrong_concept_accuracy` says how often the vector's concept shows against the prompt's.

    python benchmarks/quality/prompt_plus_steering.py --name recipe_x3 \
        --run_dirs /tmp/hq6/recipe_split42,/tmp/hq6/recipe_split7,/tmp/hq7/recipe_split13

Records per-run and pooled rows in `benchmarks/results/prompt_plus_steering.json` and prints the pooled table. A
run measured later is pooled with the runs of an earlier row without generating their answers again:

    python benchmarks/quality/prompt_plus_steering.py --name recipe_x4 --run_dirs /tmp/hq10/recipe_split2026 \
        --pool_with recipe_x3
"""

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
import transformers
from tqdm.auto import tqdm


REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import quality_ablation  # noqa: E402

from modeling_hypersteer import HyperSteerModel  # noqa: E402
from modeling_hypersteer.data import ConceptSplit, format_prompt, load_concept_data  # noqa: E402
from modeling_hypersteer.evaluation import concept_derangement, generation_run_key, prompt_steering_turns  # noqa: E402
from modeling_hypersteer.text_metric import (  # noqa: E402
    GENERIC_INSTRUCTIONS,
    ConceptDetector,
    aggregate_scores,
    check_factor_grid,
    score_samples,
)
from modeling_hypersteer.utils import (  # noqa: E402
    CONCEPT_SPLIT_FILE,
    TRAINING_SUMMARY_FILE,
    JsonlAppender,
    evaluation_mode,
    read_jsonl,
)


RESULTS_PATH = REPO_ROOT / "benchmarks" / "results" / "prompt_plus_steering.json"
CONDITIONS = ("none", "prompt", "prompt_hypersteer", "prompt_wrong_vector")


def steering_jobs(concepts: list[str], instructions: list[str], factors: list[float]) -> list[dict]:
    """One job per condition, factor, concept and instruction: `method`, `factor`, `concept` (the concept the answer
    is scored for), `instruction`, `prompted` (whether the user turn asks for the concept) and `steering_prompt` (the
    description the vector is made from, `None` without a vector)."""
    wrong_of = concept_derangement(concepts)
    jobs = []
    for method in CONDITIONS:
        for factor in factors if method.startswith("prompt_") else [0.0]:
            for concept in concepts:
                steering_prompt = {"prompt_hypersteer": concept, "prompt_wrong_vector": wrong_of[concept]}.get(method)
                jobs += [
                    {
                        "method": method,
                        "factor": factor,
                        "concept": concept,
                        "instruction": instruction,
                        "prompted": method != "none",
                        "steering_prompt": steering_prompt,
                    }
                    for instruction in instructions
                ]
    return jobs


def job_prompt(tokenizer, job: dict) -> str:
    """The chat-formatted prompt of a job: the instruction, with the concept asked for when `job["prompted"]`."""
    turns = (
        prompt_steering_turns(job["concept"], job["instruction"]) if job["prompted"] else (job["instruction"], None)
    )
    return format_prompt(tokenizer, *turns)


@torch.no_grad()
def generate_jobs(model, jobs: list[dict], max_new_tokens: int, batch_size: int, cache_path: Path | None = None):
    """Greedy answers to `jobs` (see [`steering_jobs`]), each a copy with `generation`. Jobs with the same prompt,
    vector and factor (the unsteered answers of every concept) are generated once; answers already in the JSONL
    `cache_path` for the same model and settings are reused, new ones appended."""
    tokenizer = model.tokenizer
    run_key = generation_run_key(model, max_new_tokens=max_new_tokens, do_sample=False, probe="prompt_plus_steering")
    keys = [(job_prompt(tokenizer, job), job["steering_prompt"], job["factor"]) for job in jobs]
    answers = {}
    if cache_path is not None and cache_path.is_file():
        for cached in read_jsonl(cache_path, allow_truncated_last_line=True):
            if cached.get("run_key") == run_key:
                answers[(cached["prompt"], cached["steering_prompt"], cached["factor"])] = cached["generation"]
    groups = defaultdict(list)
    for key in dict.fromkeys(key for key in keys if key not in answers):
        groups[(key[1] is None, key[2])].append(key)
    device = model.get_input_embeddings().weight.device
    settings = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    handle = JsonlAppender(cache_path) if cache_path is not None else None
    try:
        with (
            evaluation_mode(model),
            tqdm(total=sum(map(len, groups.values())), desc="Generating", unit="generation") as progress,
        ):
            for (unsteered, factor), group in groups.items():
                for start in range(0, len(group), batch_size):
                    batch = group[start : start + batch_size]
                    encoding = tokenizer(
                        [key[0] for key in batch],
                        add_special_tokens=False,
                        padding=True,
                        padding_side="left",
                        return_tensors="pt",
                    ).to(device)
                    if unsteered:
                        output_ids = model.language_model.generate(**encoding, **settings)
                    else:
                        steering = [key[1] for key in batch]
                        output_ids = model.generate(
                            **encoding, steering_prompt=steering, steering_factor=factor, **settings
                        )
                    texts = tokenizer.batch_decode(
                        output_ids[:, encoding["input_ids"].shape[1] :], skip_special_tokens=True
                    )
                    for key, text in zip(batch, texts):
                        answers[key] = text.strip()
                        if handle is not None:
                            record = {"prompt": key[0], "steering_prompt": key[1], "factor": key[2]}
                            handle.write({**record, "generation": answers[key], "run_key": run_key})
                    progress.update(len(batch))
    finally:
        if handle is not None:
            handle.close()
    return [{**job, "generation": answers[key]} for job, key in zip(jobs, keys)]


def pooled_rows(rows_per_run: list[list[dict]], keys: tuple[str, ...] = ("method", "factor")) -> list[dict]:
    """Rows of several runs' `aggregate_scores` pooled per condition (the values of `keys`; a row without one of them
    has `None` there), each mean weighted by `num_samples`, with `detected` (answers showing the concept) and
    `gain_ratio`: the gain over the `none` row as a share of the `prompt` row's."""
    groups = defaultdict(list)
    for rows in rows_per_run:
        for row in rows:
            groups[tuple(row.get(key) for key in keys)].append(row)
    pooled = []
    for condition, rows in sorted(groups.items(), key=lambda item: [(v is not None, v) for v in item[0]]):
        total = sum(row["num_samples"] for row in rows)
        entry = {**dict(zip(keys, condition)), "num_samples": total}
        for name in ("detector_accuracy", "detector_probability", "wrong_concept_accuracy", "nll", "distinct_bigrams"):
            values = [(row[name], row["num_samples"]) for row in rows if row.get(name) is not None]
            entry[name] = sum(value * count for value, count in values) / sum(c for _, c in values) if values else None
        entry["detected"] = round(entry["detector_accuracy"] * total)
        pooled.append(entry)
    none = next((entry for entry in pooled if entry["method"] == "none"), None)
    prompt = next((entry for entry in pooled if entry["method"] == "prompt"), None)
    for entry in pooled:
        lift = None if none is None or prompt is None else prompt["detector_accuracy"] - none["detector_accuracy"]
        entry["gain_ratio"] = (entry["detector_accuracy"] - none["detector_accuracy"]) / lift if lift else None
    return pooled


def recorded_run_rows(results: dict, names: list[str], sets: list[str], conditions: set) -> dict[str, list[dict]]:
    """`{run_dir: {set: rows}}` of the runs behind rows recorded earlier (`results["runs"][name]`), to be pooled with
    new runs without generating their answers again (their folders may be gone).

    Raises:
        `ValueError` naming a recorded row that does not exist, or a run whose rows lack a concept set or a
        `(method, factor)` condition of this call: pooling it would weigh the conditions over different runs.
    """
    recorded = {}
    for name in names:
        if name not in results.get("runs", {}):
            raise ValueError(
                f"--pool_with {name!r} is not a recorded row of {RESULTS_PATH.name}; recorded: "
                f"{sorted(results.get('runs', {}))}."
            )
        for run_dir, run_sets in results["runs"][name].items():
            if run_dir in ("command", "pooled", "pooled_runs"):
                continue
            for concept_set in sets:
                have = {(row["method"], row["factor"]) for row in run_sets.get(concept_set, [])}
                if not conditions <= have:
                    raise ValueError(
                        f"--pool_with {name!r}: run {run_dir} has no {concept_set} rows for "
                        f"{sorted(conditions - have)}; pool rows measured with the same --factors and --concept_sets."
                    )
            recorded[run_dir] = {concept_set: run_sets[concept_set] for concept_set in sets}
    return recorded


def concept_sets(run_dir: Path, args) -> dict[str, tuple[list[str], object]]:
    """`{set: (concepts, detector data)}`: the run's held-out concepts with its own data, and the held-back ones."""
    summary = json.loads((run_dir / TRAINING_SUMMARY_FILE).read_text())
    sets = {}
    if "heldout" in args.concept_sets:
        data = load_concept_data([quality_ablation.data_path(source) for source in summary["sources"]])
        sets["heldout"] = (sorted(ConceptSplit.from_json(run_dir / CONCEPT_SPLIT_FILE).heldout_concepts), data)
    if "heldback" in args.concept_sets:
        data = load_concept_data(quality_ablation.data_path(args.heldback_data))
        sets["heldback"] = (quality_ablation.heldback_concepts(data, args.heldback_concepts), data)
    return sets


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--run_dirs",
        required=True,
        help="Comma-separated finished training runs, pooled ('' with --pool_with: only pool recorded rows).",
    )
    parser.add_argument("--name", required=True, help="Row name in results/prompt_plus_steering.json.")
    parser.add_argument("--factors", default="0.5", help="Steering factors of the vector added to the prompt.")
    parser.add_argument("--concept_sets", default="heldout,heldback", help="Of heldout, heldback.")
    parser.add_argument("--instructions_per_concept", type=int, default=10)
    parser.add_argument("--heldback_data", default="../shared/data/axbench_more/concept_llama")
    parser.add_argument("--heldback_concepts", type=int, default=12)
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--batch_size", type=int, default=10)
    parser.add_argument(
        "--pool_with",
        default="",
        help="Comma-separated rows recorded earlier whose runs are pooled with --run_dirs (their answers are not "
        "generated again); they must have been measured with the same settings.",
    )
    args = parser.parse_args(argv)
    try:
        factors = check_factor_grid([float(value) for value in args.factors.split(",") if value.strip()], "--factors")
    except ValueError as error:
        parser.error(f"--factors {args.factors!r}: {error}")
    unknown = set(args.concept_sets.split(",")) - {"heldout", "heldback"}
    if unknown:
        parser.error(f"--concept_sets takes heldout and/or heldback, got {args.concept_sets!r}.")
    if not 1 <= args.instructions_per_concept <= len(GENERIC_INSTRUCTIONS):
        parser.error(f"--instructions_per_concept must be in 1..{len(GENERIC_INSTRUCTIONS)}.")
    run_dirs = [value.strip() for value in args.run_dirs.split(",") if value.strip()]
    if not run_dirs and not args.pool_with:
        parser.error("--run_dirs is empty and --pool_with names no recorded row: there is nothing to pool.")
    transformers.utils.logging.set_verbosity_warning()
    instructions = list(GENERIC_INSTRUCTIONS)[: args.instructions_per_concept]

    result = {"command": "python benchmarks/quality/prompt_plus_steering.py " + " ".join(argv or sys.argv[1:])}
    per_set = defaultdict(list)
    concept_set_names = args.concept_sets.split(",")
    if args.pool_with:
        conditions = {(job["method"], job["factor"]) for job in steering_jobs(["a", "b"], instructions[:1], factors)}
        results = json.loads(RESULTS_PATH.read_text()) if RESULTS_PATH.is_file() else {}
        try:
            recorded = recorded_run_rows(results, args.pool_with.split(","), concept_set_names, conditions)
        except ValueError as error:
            parser.error(str(error))
        twice = sorted(set(recorded) & set(run_dirs))
        if twice:
            parser.error(f"--pool_with already holds the run(s) {twice}; drop them from --run_dirs.")
        for run_dir, run_sets in recorded.items():
            # Kept in this row too, so a later row can pool with it alone.
            result[run_dir] = run_sets
            for name, rows in run_sets.items():
                per_set[name].append(rows)
        result["pooled_runs"] = sorted(recorded)
    for run_dir in map(Path, run_dirs):
        model = HyperSteerModel.from_pretrained(run_dir).eval()
        result[str(run_dir)] = {}
        for name, (concepts, data) in concept_sets(run_dir, args).items():
            jobs = steering_jobs(concepts, instructions, factors)
            samples = generate_jobs(
                model, jobs, args.max_new_tokens, args.batch_size, run_dir / f"prompt_plus_steering_{name}.jsonl"
            )
            detector = ConceptDetector.from_rows(data, concepts=concepts)
            scored = score_samples(samples, detector, model.language_model, model.tokenizer)
            rows = aggregate_scores(scored)
            result[str(run_dir)][name] = rows
            per_set[name].append(rows)
    result["pooled_runs"] = result.get("pooled_runs", []) + run_dirs
    result["pooled"] = {name: pooled_rows(rows) for name, rows in per_set.items()}
    for name, rows in result["pooled"].items():
        print(f"\n{name} (pooled over {len(per_set[name])} runs)")
        print(
            "| condition | factor | detected | accuracy | wrong concept | gain vs prompting | NLL | distinct bigrams |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for row in rows:
            wrong = "—" if row["wrong_concept_accuracy"] is None else f"{row['wrong_concept_accuracy']:.3f}"
            ratio = "—" if row["gain_ratio"] is None else f"{row['gain_ratio']:.2f}×"
            print(
                f"| {row['method']} | {row['factor']:g} | {row['detected']} / {row['num_samples']} | "
                f"{row['detector_accuracy']:.3f} | {wrong} | {ratio} | {row['nll']:.2f} | {row['distinct_bigrams']:.2f} |"
            )
    quality_ablation.record_run(RESULTS_PATH, args.name, result)
    return result


if __name__ == "__main__":
    main()
