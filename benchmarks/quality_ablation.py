"""Concept-specificity ablation: train HyperSteer variants on the shared AxBench data and score each with the
offline metric, right concept against a wrong one.

Ready-to-copy commands:

    # one or more experiments (names of files in benchmarks/quality/experiments/), appended to results/quality.json
    python benchmarks/quality_ablation.py --experiments lm_only,contrast
    # the training-free and per-concept baselines (see modeling_hypersteer/baselines.py)
    python benchmarks/quality_ablation.py --experiments diffmean,vector
    # redraw the table and the plot from results/quality.json without running anything
    python benchmarks/quality_ablation.py --report

Every experiment shares `benchmarks/quality/default_training_params.json` (SmolLM2-135M-Instruct, steering layer 20,
4 cross-attention blocks, concept10 + conceptFD with 6 held-out concepts, seed 42) and overrides a few fields. The
evaluation rows are fixed by that split: every held-in concept's evaluation prompts (never trained on for that
concept) and `--heldout_rows_per_concept` rows of every held-out concept. Each row of `results/quality.json` keeps the
command, the configuration, the training minutes and both metrics, so the table can be regenerated.

Prompting, the baseline every ratio divides by, puts its steering instruction where the experiment's
`prompt_placement` says: `"user"` (the default, before the instruction in the user turn) or `"system"` (a system
turn: what every experiment written before the option existed measured, and says). An experiment with `"rescores":
NAME` trains nothing of its own: it scores experiment NAME's finished run (trained into NAME's folder if missing) with
its own evaluation settings, e.g. the other prompt placement, or `"offline_steering_factor"`: the factor of the
HyperSteer conditions of the offline metric (a number, or `"default"` for the run's saved `default_steering_factor`,
the factor the model ships with; without it, `--steering_factor`).
"""

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import transformers
import yaml


REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench_common import machine_info  # noqa: E402

from modeling_hypersteer import HyperSteerModel  # noqa: E402
from modeling_hypersteer.data import (  # noqa: E402
    build_splits,
    concept_names,
    load_concept_data,
    parse_heldout_concepts,
    split_concepts,
)
from modeling_hypersteer.evaluation import offline_steering_metric  # noqa: E402


logger = logging.getLogger("quality_ablation")

QUALITY_DIR = REPO_ROOT / "benchmarks" / "quality"
RESULTS_PATH = REPO_ROOT / "benchmarks" / "results" / "quality.json"
PLOT_PATH = REPO_ROOT / "benchmarks" / "results" / "quality_specificity_vs_steps.png"
SCALING_PLOT_PATH = REPO_ROOT / "benchmarks" / "results" / "concept_scaling.png"
# Keys of an experiment file that describe it rather than set a training flag.
META_KEYS = ("description", "method", "checkpoint_every", "match_norm_of", "extra_training_data", "rescores")
# Of those, the keys that only describe or point: runs that differ in them alone are one variant. The method, the norm
# a prior is matched to and the extra training data change the model.
DESCRIPTIVE_KEYS = ("description", "checkpoint_every", "rescores")
# Keys of an experiment file that set how it is scored, not how it is trained: they tell variants apart, but are no
# training flag.
EVALUATION_KEYS = ("prompt_placement", "offline_steering_factor")
DEFAULT_PROMPT_PLACEMENT = "user"
SPLIT_KEY = "concept_split_seed"
# Held-in concepts on unseen prompts; the split's held-out concepts; concepts of another data set (`--heldback_data`).
EVALUATION_SETS = ("heldin", "heldout", "heldback")


def load_experiment(name: str) -> dict:
    path = QUALITY_DIR / "experiments" / f"{name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in (QUALITY_DIR / "experiments").glob("*.json"))
        raise ValueError(f"No experiment {name!r} ({path} is missing); known experiments: {known}.")
    defaults = json.loads((QUALITY_DIR / "default_training_params.json").read_text())
    overrides = json.loads(path.read_text())
    if "rescores" in overrides:
        training_keys = sorted(set(overrides) - {"description", "rescores", *EVALUATION_KEYS})
        if training_keys:
            raise ValueError(
                f"Experiment {name!r} rescores {overrides['rescores']!r}, so it may set only evaluation keys "
                f"{list(EVALUATION_KEYS)}; it also sets {training_keys}. Write a training experiment instead."
            )
        return {**load_experiment(overrides["rescores"]), **overrides}
    overrides.setdefault("prompt_placement", DEFAULT_PROMPT_PLACEMENT)
    recipe_file = overrides.pop("recipe_file", None)
    if recipe_file:
        # The recipe experiment trains exactly what the shipped recipe file says.
        overrides = {**yaml.safe_load((REPO_ROOT / recipe_file).read_text()), **overrides}
    return {**defaults, **overrides}


def training_argv(config: dict, output_dir: Path) -> list[str]:
    argv = []
    for key, value in config.items():
        if key not in (*META_KEYS, *EVALUATION_KEYS):
            argv += [f"--{key}", str(value)]
    checkpoint_every = config.get("checkpoint_every")
    saving = (
        ["--save_strategy", "steps", "--save_steps", str(checkpoint_every)]
        if checkpoint_every
        else ["--save_strategy", "no"]
    )
    return argv + saving + ["--eval_strategy", "no", "--report_to", "none", "--output_dir", str(output_dir)]


def data_path(source: str) -> str:
    """A data source as given, or resolved against the repository root when it is relative to it (`../shared/...`)."""
    return str((REPO_ROOT / source).resolve()) if source.startswith("..") else source


def heldback_concepts(data, num_concepts: int) -> list[str]:
    """The held-back concepts of `data`: its first `num_concepts` concepts in sorted order."""
    return sorted(concept_names(data))[:num_concepts]


def heldback_rows(source: str, num_concepts: int, rows_per_concept: int) -> list[dict]:
    """Rows of concepts from another data set that no experiment trains on (by default AxBench's concept_llama
    concepts, whose long descriptions differ in style from the training concepts'): the first `num_concepts` concepts in
    sorted order, `rows_per_concept` positive rows each, in file order."""
    data = load_concept_data(data_path(source))
    chosen, counts = [], {}
    concepts = set(heldback_concepts(data, num_concepts))
    for row in data:
        concept = row["output_concept"]
        if not row["is_negative"] and concept in concepts and counts.get(concept, 0) < rows_per_concept:
            counts[concept] = counts.get(concept, 0) + 1
            chosen.append({key: row[key] for key in ("input", "output", "output_concept")})
    return chosen


def evaluation_rows(config: dict, heldout_rows_per_concept: int) -> dict[str, list[dict]]:
    """The fixed evaluation rows of the split `config` trains on (rebuilt with the training run's settings)."""
    sources = [data_path(part) for part in config["dataset_name_or_path"].split(",") if part]
    raw = load_concept_data(sources)
    split = split_concepts(
        raw, heldout=parse_heldout_concepts(str(config["heldout_concepts"])), seed=config["concept_split_seed"]
    )
    splits = build_splits(
        raw, split, eval_examples_per_concept=config["eval_examples_per_concept"], seed=config["concept_split_seed"]
    )
    heldout = build_splits(
        raw, split, eval_examples_per_concept=heldout_rows_per_concept, seed=config["concept_split_seed"]
    )["eval_heldout"]
    columns = ("input", "output", "output_concept")
    return {
        "heldin": [{key: row[key] for key in columns} for row in splits["eval_heldin"]],
        "heldout": [{key: row[key] for key in columns} for row in heldout],
        "train": splits["train"],
        "negatives": raw.filter(lambda row: row["is_negative"]),
    }


def add_extra_training_data(name: str, config: dict, rows: dict, work_dir: str) -> dict:
    """The training configuration of an experiment with `extra_training_data` (a list of AxBench-schema sources whose
    concepts are trained on and never scored): their positive rows, minus every concept scored by this benchmark (the
    split's held-out concepts, the held-back set) and every concept of the split's own data, are written to one
    parquet file in `work_dir` and added to `dataset_name_or_path`; the split's held-out concepts are named
    explicitly, so the extra concepts do not change which concepts are held out, and the held-in evaluation rows stay
    those of the split (their prompts are chosen per concept, independently of the other concepts)."""
    sources = config.get("extra_training_data")
    if not sources:
        return config
    sources = [data_path(source.format(work_dir=work_dir)) for source in sources]
    scored = {row["output_concept"] for split in ("heldout", "heldback") for row in rows.get(split, [])}
    own = {row["output_concept"] for row in rows["train"]} | scored
    extra = load_concept_data(sources).filter(lambda row: not row["is_negative"] and row["output_concept"] not in own)
    if len(extra) == 0:
        raise ValueError(
            f"{name}: `extra_training_data` {sources} adds no concept that is not scored or already trained."
        )
    path = Path(work_dir) / f"{name}_extra_training_data.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    extra.remove_columns([column for column in ("is_negative", "source") if column in extra.column_names]).to_parquet(
        path
    )
    heldout = sorted({row["output_concept"] for row in rows["heldout"]})
    logger.info(
        f"{name}: {len(set(extra['output_concept']))} extra training concepts ({len(extra)} rows) from {sources}."
    )
    return {
        **config,
        "dataset_name_or_path": f"{config['dataset_name_or_path']},{path}",
        "heldout_concepts": "|".join(heldout),
    }


def reference_losses_path(args, name: str, rows: list[dict], prompt_placement: str) -> Path:
    # Keyed by the rows themselves: another split or dataset must never reuse these losses.
    rows_key = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:12]
    return (
        Path(args.work_dir) / f"reference_row_losses_{name}_{prompt_placement}_{args.eval_max_length}_{rows_key}.json"
    )


def score(
    model,
    tokenizer,
    rows: dict[str, list[dict]],
    args,
    prompt_placement: str,
    splits=("heldin", "heldout"),
    concept_vectors=None,
    steering_factor: float | None = None,
) -> dict:
    """Offline metric per split, at `steering_factor` (default `--steering_factor`). The `none`/`prompt` losses do not
    depend on the model being compared, so they are computed once per split and placement and reused from
    `--work_dir`."""
    results = {}
    for name in splits:
        cache = reference_losses_path(args, name, rows[name], prompt_placement)
        reference = json.loads(cache.read_text()) if cache.is_file() else None
        metric = offline_steering_metric(
            model,
            tokenizer,
            rows[name],
            steering_factor=args.steering_factor if steering_factor is None else steering_factor,
            batch_size=args.eval_batch_size,
            max_length=args.eval_max_length,
            desc=f"offline metric ({name})",
            concept_vectors=concept_vectors,
            reference_row_losses=reference,
            prompt_placement=prompt_placement,
        )
        if reference is None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(
                json.dumps({k: v for k, v in metric["row_losses"].items() if not k.startswith("hypersteer")})
            )
        metric.pop("per_concept")
        metric.pop("row_losses")
        results[name] = metric
    return results


def _flag_pairs(argv: list[str]) -> list[tuple[str, str]]:
    """`--flag value` pairs, order-insensitive."""
    return sorted(zip(argv[::2], argv[1::2]))


def offline_steering_factor(config: dict, model, args) -> float:
    """The factor the experiment's offline metric steers with: its `offline_steering_factor` (`"default"`: the run's
    saved `default_steering_factor`), else `--steering_factor`."""
    value = config.get("offline_steering_factor", args.steering_factor)
    if value == "default":
        return float(model.config.default_steering_factor)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"offline_steering_factor must be a number or 'default' (the run's saved default_steering_factor), got "
            f"{value!r}."
        ) from None


def run_hypersteer(name: str, config: dict, rows: dict, args) -> dict:
    import train_hypersteer

    output_dir = Path(args.work_dir) / config.get("rescores", name)
    argv = training_argv(config, output_dir)
    # Relative data paths in the defaults are relative to the repository root.
    os.chdir(REPO_ROOT)
    timing_file = output_dir / "ablation_training.json"
    if (args.reuse_trained or "rescores" in config) and timing_file.is_file():
        # Scoring a finished run again (e.g. after a crash in evaluation, or with other evaluation settings) costs no
        # training.
        timing = json.loads(timing_file.read_text())
        if _flag_pairs(timing["argv"]) != _flag_pairs(argv):
            raise ValueError(f"{output_dir} was trained with other arguments; remove it or drop --reuse_trained.")
    else:
        # Checkpoints of an earlier run in the same directory would be scored as this run's curve.
        for stale in output_dir.glob("checkpoint-*"):
            shutil.rmtree(stale)
        start = time.perf_counter()
        train_metrics = train_hypersteer.main(argv)
        timing = {
            "argv": argv,
            "minutes": (time.perf_counter() - start) / 60,
            "train_loss": train_metrics.get("train_loss"),
        }
        timing_file.write_text(json.dumps(timing))
    model = HyperSteerModel.from_pretrained(output_dir)
    steering_factor = offline_steering_factor(config, model, args)
    result = {
        "training_concepts": training_concepts(output_dir),
        "train_minutes": round(timing["minutes"], 2),
        "train_loss": timing["train_loss"],
        "command": "python train_hypersteer.py " + " ".join(argv),
        **score(
            model,
            model.tokenizer,
            rows,
            args,
            config["prompt_placement"],
            splits=tuple(name for name in EVALUATION_SETS if rows.get(name)),
            steering_factor=steering_factor,
        ),
    }
    checkpoints = sorted(output_dir.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    if checkpoints:
        curve = []
        final_step = int(config["max_steps"])
        for checkpoint in checkpoints:
            if int(checkpoint.name.split("-")[1]) == final_step:
                # The last checkpoint is the final model, already scored above.
                curve.append(
                    {
                        "step": final_step,
                        **{
                            f"{split}_{key}": result[split][key]
                            for split in ("heldin", "heldout")
                            for key in ("specificity_ratio", "gain_ratio")
                        },
                    }
                )
                continue
            checkpoint_model = HyperSteerModel.from_pretrained(
                checkpoint, base_model=model.language_model, tokenizer=model.tokenizer
            )
            scores = score(
                checkpoint_model,
                model.tokenizer,
                rows,
                args,
                config["prompt_placement"],
                steering_factor=steering_factor,
            )
            curve.append(
                {
                    "step": int(checkpoint.name.split("-")[1]),
                    **{
                        f"{split}_{key}": scores[split][key]
                        for split in scores
                        for key in ("specificity_ratio", "gain_ratio")
                    },
                }
            )
        result["curve"] = curve
    return result


def training_concepts(run_dir: Path) -> dict:
    """How many concepts a finished run trained on: the labelled (held-in) concepts, the descriptions its
    distillation rows name, and an estimate of those it saw, `min(named, 2 * rows * epochs)` (each row names two)."""
    summary = json.loads((run_dir / "training_summary.json").read_text())
    labelled = len(json.loads((run_dir / "concept_split.json").read_text())["heldin_concepts"])
    distillation = summary.get("distillation") or {"rows": 0, "concepts": 0}
    epochs = summary["metrics"].get("epoch", 0.0)
    seen = min(distillation["concepts"], round(2 * distillation["rows"] * epochs))
    return {
        "labelled": labelled,
        "descriptions": distillation["concepts"],
        "descriptions_seen": seen,
        "total_seen": labelled + seen,
    }


def scaling_report(work_dir: str) -> str:
    """Never-trained specificity and gain against the number of training concepts, for the runs scored on the
    held-back set: a markdown table and `results/concept_scaling.png`. A run recorded without its concept counts
    gets them from its folder in `work_dir`, written back into the results."""
    results = json.loads(RESULTS_PATH.read_text())
    for name, run in results["runs"].items():
        if "heldback" in run and "training_concepts" not in run and (Path(work_dir) / name).is_dir():
            run["training_concepts"] = training_concepts(Path(work_dir) / name)
            RESULTS_PATH.write_text(json.dumps(results, indent=2) + "\n")
    runs = {name: run for name, run in results["runs"].items() if "heldback" in run and "training_concepts" in run}
    if not runs:
        return "No run scored on the held-back set yet."
    ordered = sorted(runs.items(), key=lambda item: item[1]["training_concepts"]["total_seen"])
    lines = [
        "| run | split | training concepts seen (labelled + descriptions) | held-out spec. | held-out gain "
        "| held-back spec. | held-back gain | held-in spec. | held-in gain |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, run in ordered:
        concepts = run["training_concepts"]
        lines.append(
            f"| {name} | {run['config'].get(SPLIT_KEY, '—')} | {concepts['total_seen']} ({concepts['labelled']} + "
            f"{concepts['descriptions_seen']}) | "
            + " | ".join(
                _ratio(run[split][key])
                for split in ("heldout", "heldback", "heldin")
                for key in ("specificity_ratio", "gain_ratio")
            )
            + " |"
        )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for axis, key, title in zip(axes, ("specificity_ratio", "gain_ratio"), ("specificity", "gain")):
        # One series per prior: runs with and without the lexical prior are different curves, not one.
        for prior in sorted({run["config"].get("steering_prior", "none") for _, run in ordered}):
            for split, label in (("heldout", "held-out AxBench concepts"), ("heldback", "held-back concept_llama")):
                points = [
                    (run["training_concepts"]["total_seen"], run[split][key])
                    for _, run in ordered
                    if run["config"].get("steering_prior", "none") == prior
                ]
                points = [(x, y) for x, y in points if y is not None]
                if points:
                    axis.plot(
                        *zip(*points),
                        marker="o" if prior == "none" else "s",
                        linestyle="-" if prior == "none" else ":",
                        label=f"{label}, prior {prior}",
                    )
        axis.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="prompting")
        axis.set_xscale("log")
        axis.set_xlabel("training concepts seen (log scale)")
        axis.set_title(f"never-trained concepts: {title} ratio")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(SCALING_PLOT_PATH, dpi=120)
    plt.close(figure)
    return "\n".join(lines)


def reference_vector_norm(run_dir: Path) -> float:
    """HyperSteer's mean steering-vector norm over the last logged training steps of a finished run."""
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    norms = [entry["steering_vector_norm"] for entry in history if "steering_vector_norm" in entry]
    if not norms:
        raise ValueError(f"{run_dir} logged no steering_vector_norm; train it with logging_steps > 0 first.")
    return sum(norms[-5:]) / len(norms[-5:])


def run_prior(name: str, config: dict, rows: dict, args) -> dict:
    """A training-free vector for any description: an untrained HyperSteer whose only term is the prior `A u(s)` with
    `A = norm * I` (the output projection starts at zero), the norm matched to a trained run's vectors. It needs no
    concept rows, so it is scored on every set, never-trained concepts included: what a trained hypernetwork must beat
    there."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from modeling_hypersteer.smollm2 import smollm2_path

    path = smollm2_path()
    norm = reference_vector_norm(Path(args.work_dir) / config["match_norm_of"])
    model = HyperSteerModel.from_base_model(
        AutoModelForCausalLM.from_pretrained(path),
        tokenizer=AutoTokenizer.from_pretrained(path),
        steering_layer=config["steering_layer"],
        hypernet_type="no_context",
        hypernet_num_layers=1,
        steering_prior=config["steering_prior"],
        steering_prior_init_norm=norm,
    )
    return {
        "train_minutes": 0.0,
        "command": (
            f"untrained, {config['steering_prior']} prior only at layer {config['steering_layer']}, norm {norm:.2f} "
            f"(HyperSteer run {config['match_norm_of']})"
        ),
        **score(
            model,
            model.tokenizer,
            rows,
            args,
            config["prompt_placement"],
            splits=tuple(name for name in EVALUATION_SETS if rows.get(name)),
            steering_factor=offline_steering_factor(config, model, args),
        ),
    }


def run_baseline(name: str, config: dict, rows: dict, args) -> dict:
    """DiffMean or per-concept vectors, on held-in concepts only (they need the concept's training rows)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from modeling_hypersteer.baselines import diffmean_vectors, save_concept_vectors, train_concept_vectors
    from modeling_hypersteer.smollm2 import smollm2_path

    path = smollm2_path()
    base = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = HyperSteerModel.from_base_model(
        base,
        tokenizer=tokenizer,
        steering_layer=config["steering_layer"],
        hypernet_type="no_context",
        hypernet_num_layers=1,
    )
    train_rows = [dict(row) for row in rows["train"] if not row["is_negative"]]
    start = time.perf_counter()
    if config["method"] == "diffmean":
        norm = reference_vector_norm(Path(args.work_dir) / config["match_norm_of"])
        negatives = [dict(row) for row in rows["negatives"]]
        vectors = diffmean_vectors(model, tokenizer, train_rows, negatives, norm=norm)
        command = (
            f"DiffMean at layer {config['steering_layer']}, norm {norm:.2f} (HyperSteer run {config['match_norm_of']})"
        )
    else:
        training_args = TrainingArguments(
            output_dir=str(Path(args.work_dir) / name),
            max_steps=config["max_steps"],
            per_device_train_batch_size=config["per_device_train_batch_size"],
            learning_rate=config["learning_rate"],
            warmup_steps=config.get("warmup_steps", 0),
            logging_steps=config.get("logging_steps", 10),
            save_strategy="no",
            report_to="none",
            seed=config["seed"],
        )
        vectors = train_concept_vectors(model, tokenizer, train_rows, training_args, max_length=config["max_length"])
        command = f"one vector per concept, {config['max_steps']} steps x {config['per_device_train_batch_size']}, lr {config['learning_rate']}"
    train_minutes = (time.perf_counter() - start) / 60
    save_concept_vectors(vectors, Path(args.work_dir) / name, method=config["method"])
    heldin = score(
        model,
        tokenizer,
        rows,
        args,
        config["prompt_placement"],
        splits=("heldin",),
        concept_vectors=vectors,
        steering_factor=offline_steering_factor(config, model, args),
    )["heldin"]
    norms = torch.stack(list(vectors.values())).norm(dim=-1)
    return {
        "train_minutes": round(train_minutes, 2),
        "command": command,
        "mean_vector_norm": round(norms.mean().item(), 3),
        "heldin": heldin,
        "heldout": {"specificity_ratio": None, "gain_ratio": None, "note": "needs the concept's training rows"},
    }


def record_run(path: Path, name: str, row: dict, **fields) -> None:
    """Store `row` as run `name` of the results file at `path` (`{"runs": {...}}`, created when missing), keeping the
    other runs; `fields` set top-level keys beside `runs`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(path.read_text()) if path.is_file() else {"runs": {}}
    results["runs"][name] = row
    results.update(fields)
    path.write_text(json.dumps(results, indent=2) + "\n")


def save_result(name: str, config: dict, result: dict) -> None:
    record_run(RESULTS_PATH, name, {"config": config, **result}, machine=machine_info())


def _ratio(value) -> str:
    return "undefined" if value is None else f"{value:.3f}"


def _variants(runs: dict) -> list[dict]:
    """The runs grouped by variant (every setting but the split and the descriptive keys), each as `{split: (name,
    run)}`; a rerun of the same settings on a split already counted is not another split."""
    variants = {}
    for name, run in runs.items():
        # The factor calibration runs after training and the offline metric is taken at a fixed factor, so runs that
        # differ only in calibration settings are the same variant.
        settings = {
            key: value
            for key, value in run["config"].items()
            if key not in (*DESCRIPTIVE_KEYS, SPLIT_KEY) and "calibrat" not in key
        }
        variants.setdefault(json.dumps(settings, sort_keys=True), {}).setdefault(
            run["config"].get(SPLIT_KEY), (name, run)
        )
    return list(variants.values())


def pooled_ratios(results: list[dict]) -> dict:
    """Specificity and gain ratios of several offline-metric results pooled over their rows: every loss gap is
    weighted by its result's number of rows before the ratio is taken, so a split where prompting barely separates the
    concepts cannot swing the pooled number as it swings a mean of per-split ratios."""

    def gap(high: str, low: str) -> float:
        return sum(result["num_rows"] * (result["losses"][high] - result["losses"][low]) for result in results)

    prompting_gap, prompting_gain = gap("prompt_wrong", "prompt"), gap("none", "prompt")
    return {
        "specificity_ratio": gap("hypersteer_wrong", "hypersteer") / prompting_gap if prompting_gap > 0 else None,
        "gain_ratio": gap("none", "hypersteer") / prompting_gain if prompting_gain > 0 else None,
    }


def pooled_summary(runs: dict) -> list[str]:
    """For every variant trained on more than one split and scored on all three sets: the pooled specificity / gain
    on held-in, held-out and held-back concepts, and each set's worst split."""
    lines = [
        "| runs | splits | held-in pooled spec. / gain (worst spec.) | held-out pooled spec. / gain (worst spec.) "
        "| held-back pooled spec. / gain (worst spec.) |",
        "|---|---|---|---|---|",
    ]
    for per_split in _variants(runs):
        members = [per_split[seed] for seed in sorted(per_split)]
        if len(members) < 2 or not all(all(split in run for split in EVALUATION_SETS) for _, run in members):
            continue
        cells = []
        for split in EVALUATION_SETS:
            pooled = pooled_ratios([run[split] for _, run in members])
            worst = min(
                (run[split]["specificity_ratio"] for _, run in members), key=lambda v: float("inf") if v is None else v
            )
            cells.append(f"{_ratio(pooled['specificity_ratio'])} / {_ratio(pooled['gain_ratio'])} ({_ratio(worst)})")
        lines.append(
            f"| {', '.join(name for name, _ in members)} | {' / '.join(str(seed) for seed in sorted(per_split))} "
            f"| {' | '.join(cells)} |"
        )
    return lines if len(lines) > 2 else []


def split_summary(runs: dict) -> list[str]:
    """A table of the variants trained on more than one concept split: every split's held-in and held-out
    specificity, their mean and the worst split, and the lowest held-in gain. One number per split never tells
    whether a variant works or merely suits that split's concepts."""
    lines = [
        "| runs | splits | held-in specificity per split | mean | worst | held-out specificity per split | mean "
        "| worst | lowest held-in gain |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for per_split in _variants(runs):
        if len(per_split) < 2:
            continue
        members = [per_split[seed] for seed in sorted(per_split)]
        columns = []
        for split in ("heldin", "heldout"):
            values = [run[split]["specificity_ratio"] for _, run in members]
            columns += [" / ".join(_ratio(value) for value in values)]
            defined = [value for value in values if value is not None]
            columns += [
                _ratio(sum(defined) / len(defined)) if defined else "undefined",
                _ratio(min(defined, default=None)),
            ]
        gains = [run["heldin"]["gain_ratio"] for _, run in members if run["heldin"]["gain_ratio"] is not None]
        lines.append(
            f"| {', '.join(name for name, _ in members)} | {' / '.join(str(seed) for seed in sorted(per_split))} "
            f"| {' | '.join(columns)} | {_ratio(min(gains, default=None))} |"
        )
    return lines if len(lines) > 2 else []


def report() -> str:
    """The markdown table of every run in results/quality.json, and the specificity-vs-steps plot."""
    results = json.loads(RESULTS_PATH.read_text())
    lines = [
        "| run | split | steps | held-in specificity | held-in gain | held-out specificity | held-out gain | train min |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, run in results["runs"].items():
        steps = run["config"].get("max_steps", "—") if run["config"].get("method", "hypersteer") != "diffmean" else 0
        lines.append(
            f"| {name} | {run['config'].get(SPLIT_KEY, '—')} | {steps} | {_ratio(run['heldin']['specificity_ratio'])} "
            f"| {_ratio(run['heldin']['gain_ratio'])} | {_ratio(run['heldout']['specificity_ratio'])} "
            f"| {_ratio(run['heldout']['gain_ratio'])} | {run.get('train_minutes', '—')} |"
        )
    lines += ["", *split_summary(results["runs"])]
    pooled = pooled_summary(results["runs"])
    if pooled:
        lines += ["", *pooled]
    curves = {name: run["curve"] for name, run in results["runs"].items() if run.get("curve")}
    if curves:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
        for axis, split in zip(axes, ("heldin", "heldout")):
            for name, curve in curves.items():
                axis.plot(
                    [p["step"] for p in curve],
                    [p[f"{split}_specificity_ratio"] for p in curve],
                    marker="o",
                    label=name,
                )
            axis.axhline(1.0 if split == "heldin" else 0.3, color="grey", linestyle="--", linewidth=1, label="target")
            axis.set_title(f"{'held-in concepts, unseen prompts' if split == 'heldin' else 'never-trained concepts'}")
            axis.set_xlabel("training step")
            axis.grid(alpha=0.3)
        axes[0].set_ylabel("concept-specificity ratio (vs prompting)")
        axes[1].legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(PLOT_PATH, dpi=120)
        plt.close(figure)
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiments", default="", help="Comma-separated experiment names.")
    parser.add_argument("--report", action="store_true", help="Only print the table and redraw the plot.")
    parser.add_argument(
        "--scaling_report",
        action="store_true",
        help="Only print the never-trained scores against the number of training concepts and draw concept_scaling.png.",
    )
    parser.add_argument("--work_dir", default="/tmp/hypersteer-quality", help="Where trained models go.")
    parser.add_argument("--heldout_rows_per_concept", type=int, default=8)
    parser.add_argument(
        "--reuse_trained", action="store_true", help="Score an already trained run of the same arguments again."
    )
    parser.add_argument(
        "--heldback_data",
        default="../shared/data/axbench_more/concept_llama",
        help="Concept data no experiment trains on, scored as the 'heldback' set ('' to skip).",
    )
    parser.add_argument("--heldback_concepts", type=int, default=24)
    parser.add_argument("--heldback_rows_per_concept", type=int, default=2)
    parser.add_argument("--steering_factor", type=float, default=1.0)
    parser.add_argument("--eval_batch_size", type=int, default=8)
    parser.add_argument("--eval_max_length", type=int, default=320)
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    if args.scaling_report:
        print(scaling_report(args.work_dir))
        return
    for name in [part for part in args.experiments.split(",") if part]:
        config = load_experiment(name)
        rows = evaluation_rows(config, args.heldout_rows_per_concept)
        if args.heldback_data:
            rows["heldback"] = heldback_rows(
                args.heldback_data, args.heldback_concepts, args.heldback_rows_per_concept
            )
        runners = {"diffmean": run_baseline, "vector": run_baseline, "prior": run_prior}
        runner = runners.get(config.get("method"), run_hypersteer)
        result = runner(
            name, add_extra_training_data(config.get("rescores", name), config, rows, args.work_dir), rows, args
        )
        save_result(name, config, result)
        logger.info(
            f"{name}: held-in specificity {_ratio(result['heldin']['specificity_ratio'])} gain "
            f"{_ratio(result['heldin']['gain_ratio'])}; held-out specificity "
            f"{_ratio(result['heldout']['specificity_ratio'])} gain {_ratio(result['heldout']['gain_ratio'])}"
            + (
                f"; held-back specificity {_ratio(result['heldback']['specificity_ratio'])} gain "
                f"{_ratio(result['heldback']['gain_ratio'])}"
                if "heldback" in result
                else ""
            )
        )
    if RESULTS_PATH.is_file():
        print(report())


if __name__ == "__main__":
    main()
