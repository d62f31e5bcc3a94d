r"""Evaluate a HyperSteer checkpoint the AxBench way, against any OpenAI-compatible judge, or offline.

Ready-to-copy commands:

    # Offline (no judge): loss of target outputs under none / prompt / hypersteer, right vs wrong concept
    python evaluate_steering.py --model outputs/smollm2-hypersteer --concepts heldout --output_dir outputs/eval

    # Judged with gpt-4o-mini (key in $OPENAI_API_KEY), factor grid, 10 instructions per concept
    python evaluate_steering.py --model outputs/smollm2-hypersteer --concepts heldout \
        --steering_factors 0.5,1.0,1.5,2.0 --methods hypersteer,prompt,none --judge_model gpt-4o-mini \
        --output_dir outputs/eval

    # No judge at all: the offline losses plus the judge-free text metric (detector accuracy, NLL, repetition)
    python evaluate_steering.py --model outputs/smollm2-hypersteer --concepts heldout --text_metric \
        --steering_factors 1,2,4,8 --output_dir outputs/eval

    # Steering on top of a prompt that already asks for the concept, against that prompt alone
    python evaluate_steering.py --model outputs/smollm2-hypersteer --concepts heldout --text_metric \
        --methods prompt_hypersteer,prompt,none --steering_factors 0.25,0.5,1 --offline_steering_factor 0.5 \
        --output_dir outputs/eval

    # Any OpenAI-compatible server (vLLM, llama.cpp, ...), AlpacaEval instructions when the Hub is reachable
    python evaluate_steering.py --model outputs/smollm2-hypersteer --judge_base_url http://127.0.0.1:8000/v1 \
        --judge_model my-judge --instructions tatsu-lab/alpaca_eval --output_dir outputs/eval

    # A judged run on a GPU
    python evaluate_steering.py --model outputs/smollm2-hypersteer --dtype bfloat16 --device_map cuda ...

    # All arguments from a YAML (or JSON) file, with flags overriding it
    python evaluate_steering.py --config eval.yaml --max_concepts 5

Writes into `--output_dir`: `samples.jsonl` (one judged generation per line, with its `concept_id`),
`evaluation_summary.json`, `evaluation_summary.md`, `score_vs_factor.png`, `ratings.png`, `offline_losses.png`,
`generations.jsonl` (raw, resumable), with `--text_metric` also `text_metric_samples.jsonl`, `text_metric_vs_factor.png`
and `text_metric_generations.jsonl` (resumable), and `judge_cache.sqlite` (every judge answer, so a rerun or a resumed run pays for
nothing twice). Generations are reused only for the same model (config and weights) and decoding settings, so
evaluating another checkpoint into the same folder starts afresh. When `--model` is a local folder,
`evaluation_summary.json` is also written there, where the model card (`push_to_hub`) reads it.
"""

import argparse
import json
import logging
import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets
import torch
import transformers
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers import HfArgumentParser, set_seed

from modeling_hypersteer import HyperSteerModel
from modeling_hypersteer.baselines import baseline_concept_vectors
from modeling_hypersteer.cli import DTYPE_CHOICES, parse_arguments, resolve_dtype
from modeling_hypersteer.concept_data import load_instructions
from modeling_hypersteer.data import (
    ConceptSplit,
    build_splits,
    concept_names,
    load_concept_data,
    parse_heldout_concepts,
    split_concepts,
)
from modeling_hypersteer.evaluation import (
    BASELINE_METHODS,
    FACTOR_METHODS,
    METHODS,
    PROMPT_PLACEMENTS,
    generate_samples,
    generation_tasks,
    model_fingerprint,
    offline_steering_metric,
    plot_factor_sweep,
    plot_offline_losses,
    plot_ratings,
    summary_markdown,
)
from modeling_hypersteer.text_metric import GENERIC_INSTRUCTIONS, check_factor_grid
from modeling_hypersteer.utils import CONCEPT_SPLIT_FILE, EVALUATION_SUMMARY_FILE, TRAINING_SUMMARY_FILE, split_sources


logger = logging.getLogger(__name__)


@dataclass
class EvaluationArguments:
    model: str = field(metadata={"help": "HyperSteer checkpoint folder or Hub id (its config names the base model)."})
    output_dir: str = field(metadata={"help": "Where samples, summary, plots and the judge cache are written."})
    dtype: str = field(
        default="auto",
        metadata={
            "help": "dtype of the frozen base: 'auto' (as saved), 'float32', 'bfloat16' or 'float16'. The "
            "hypernetwork keeps its saved dtype.",
            "choices": list(DTYPE_CHOICES),
        },
    )
    device_map: str | None = field(
        default=None,
        metadata={
            "help": "Where the base is placed, as in `from_pretrained(device_map=...)`: e.g. 'cuda', 'cuda:1', 'cpu' "
            "or 'auto' (needs accelerate). Default: CPU."
        },
    )
    save_summary_to_model: bool = field(
        default=True,
        metadata={
            "help": f"Also write {EVALUATION_SUMMARY_FILE} into a local --model folder, where the model card reads it."
        },
    )
    dataset_name_or_path: list[str] | None = field(
        default=None,
        metadata={
            "help": "Concept data (same loader as training). Defaults to the training run's sources, read from "
            "training_summary.json next to the model. Concepts of other data that the run's concept_split.json does "
            "not list are never-trained and scored as held-out; the run's trained concepts in such data are left out."
        },
    )
    concepts: str = field(
        default="heldout",
        metadata={
            "help": "'heldin', 'heldout', 'all', or '|'-separated concept descriptions. The split is the "
            "training run's concept_split.json when present, else --heldout_concepts/--concept_split_seed."
        },
    )
    heldout_concepts: str = field(
        default="0.1", metadata={"help": "Split rule when the model has no concept_split.json."}
    )
    concept_split_seed: int = field(default=42, metadata={"help": "Seed of that split rule."})
    max_concepts: int | None = field(default=None, metadata={"help": "Evaluate at most this many concepts."})
    num_instructions_per_concept: int = field(
        default=10, metadata={"help": "Instructions per concept; the first half selects the factor, the rest reports."}
    )
    instructions: str = field(
        default="concept_data",
        metadata={
            "help": "'concept_data' (held-out `input`s of the concept data), a local file (txt/jsonl/parquet "
            "with `instruction` or `input`), or a Hub dataset id such as tatsu-lab/alpaca_eval."
        },
    )
    steering_factors: str = field(default="0.5,1.0,1.5,2.0", metadata={"help": "Comma-separated HyperSteer factors."})
    methods: str = field(
        default="hypersteer,prompt,none",
        metadata={
            "help": f"Comma-separated, from {list(METHODS)}. `prompt_hypersteer` is the `prompt` method's prompt plus "
            "HyperSteer's vector of the same concept (at every --steering_factors in generation, at "
            "--offline_steering_factor in the offline metric, where it gets its own ratios against prompting)."
        },
    )
    prompt_placement: str = field(
        default="user",
        metadata={
            "help": f"Where the `prompt` method puts its steering instruction, from {list(PROMPT_PLACEMENTS)}: before "
            "the instruction in the user turn (every chat template has one; small chat models largely ignore a "
            "system turn) or as a system turn (folded into the user turn when the template has no system role)."
        },
    )
    max_new_tokens: int = field(default=128, metadata={"help": "Tokens generated per sample."})
    do_sample: bool = field(default=True, metadata={"help": "Sample (AxBench) instead of greedy decoding."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (AxBench: 1.0)."})
    batch_size: int = field(default=8, metadata={"help": "Generation and loss batch size."})
    seed: int = field(default=42, metadata={"help": "Seed of sampling."})
    offline_examples_per_concept: int = field(
        default=4, metadata={"help": "Target outputs per concept for the offline loss metric (0 skips it)."}
    )
    offline_steering_factor: float = field(default=1.0, metadata={"help": "HyperSteer factor of the offline metric."})
    max_length: int = field(default=512, metadata={"help": "Maximum prompt + response tokens in the offline metric."})
    baseline_vector_norm: float | None = field(
        default=None,
        metadata={
            "help": "Norm of the diffmean vectors; by default HyperSteer's mean vector norm on the evaluation rows, "
            "so the comparison is about direction."
        },
    )
    vector_baseline_steps: int = field(
        default=250, metadata={"help": "Training steps (batch 4) of the per-concept vector baseline ('vector')."}
    )
    vector_baseline_learning_rate: float = field(
        default=0.05, metadata={"help": "AdamW learning rate of the per-concept vector baseline."}
    )
    text_metric: bool = field(
        default=False,
        metadata={
            "help": "Also run the judge-free text metric (modeling_hypersteer/text_metric.py): greedy generations for "
            "generic instructions, scored by a concept detector trained on the concept data's responses, the base's "
            "NLL and a repetition measure, per method and --steering_factors. Opt-in because it generates "
            "(methods x factors x concepts x instructions), while the offline metric only scores losses."
        },
    )
    text_metric_instructions_per_concept: int = field(
        default=4,
        metadata={
            "help": "Generic instructions per concept in the text metric (at least 2: the first half selects the "
            "headline factor, the rest reports it)."
        },
    )
    text_metric_max_new_tokens: int = field(default=64, metadata={"help": "Greedy tokens per text-metric generation."})
    text_metric_references_per_concept: int = field(
        default=64, metadata={"help": "Reference responses per concept that train the text metric's concept detector."}
    )
    judge_model: str = field(default="gpt-4o-mini", metadata={"help": "Judge model name."})
    judge_base_url: str | None = field(
        default=None,
        metadata={
            "help": "OpenAI-compatible endpoint of the judge. Without it (and without $OPENAI_API_KEY) no "
            "generations are judged and only the offline metric runs."
        },
    )
    judge_api_key_env: str = field(default="OPENAI_API_KEY", metadata={"help": "Environment variable of the API key."})
    judge_concurrency: int = field(default=16, metadata={"help": "Judge requests in flight."})
    judge_max_retries: int = field(default=5, metadata={"help": "Retries per judge request (429/5xx/timeouts)."})
    judge_timeout: float = field(default=60.0, metadata={"help": "Seconds per judge request."})
    judge_initial_backoff: float = field(default=1.0, metadata={"help": "Seconds before the first retry."})

    def __post_init__(self):
        self.factor_grid = [float(value) for value in self.steering_factors.split(",") if value.strip()]
        self.method_list = [value.strip() for value in self.methods.split(",") if value.strip()]
        unknown = sorted(set(self.method_list) - set(METHODS))
        if unknown:
            raise ValueError(f"--methods has unknown entries {unknown}; choose from {list(METHODS)}.")
        if not self.factor_grid and set(self.method_list) & set(FACTOR_METHODS):
            raise ValueError("--steering_factors is empty; give e.g. 0.5,1.0,1.5,2.0.")
        if self.prompt_placement not in PROMPT_PLACEMENTS:
            raise ValueError(
                f"--prompt_placement {self.prompt_placement!r} is not one of {list(PROMPT_PLACEMENTS)}; give user or "
                "system."
            )
        if self.baseline_vector_norm is not None and not 0 < self.baseline_vector_norm < float("inf"):
            raise ValueError(f"--baseline_vector_norm must be a positive number, got {self.baseline_vector_norm}.")
        if self.vector_baseline_steps < 1 or not self.vector_baseline_learning_rate > 0:
            raise ValueError(
                "--vector_baseline_steps must be >= 1 and --vector_baseline_learning_rate > 0, got "
                f"{self.vector_baseline_steps} and {self.vector_baseline_learning_rate}."
            )
        if self.num_instructions_per_concept < 0 or self.offline_examples_per_concept < 0:
            raise ValueError("--num_instructions_per_concept and --offline_examples_per_concept must be >= 0.")
        if self.dataset_name_or_path:
            self.dataset_name_or_path = split_sources(self.dataset_name_or_path)
        if self.text_metric:
            if not 2 <= self.text_metric_instructions_per_concept <= len(GENERIC_INSTRUCTIONS):
                raise ValueError(
                    "--text_metric_instructions_per_concept must be between 2 and "
                    f"{len(GENERIC_INSTRUCTIONS)} (the generic instructions), got "
                    f"{self.text_metric_instructions_per_concept}."
                )
            if self.text_metric_max_new_tokens < 1 or self.text_metric_references_per_concept < 1:
                raise ValueError(
                    "--text_metric_max_new_tokens and --text_metric_references_per_concept must be >= 1, got "
                    f"{self.text_metric_max_new_tokens} and {self.text_metric_references_per_concept}."
                )
            if set(self.method_list) & set(FACTOR_METHODS):
                check_factor_grid(self.factor_grid, "--steering_factors")

    def judge_available(self) -> bool:
        return bool(self.judge_base_url) or bool(os.environ.get(self.judge_api_key_env))


def make_parser() -> HfArgumentParser:
    return HfArgumentParser(
        EvaluationArguments, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def _training_file(model_dir: str, name: str) -> dict | None:
    path = Path(model_dir) / name
    return json.loads(path.read_text()) if path.is_file() else None


def _selected_concepts(
    args: EvaluationArguments, data: datasets.Dataset
) -> tuple[list[str], ConceptSplit, str, datasets.Dataset]:
    """The concepts to evaluate, the concept split their rows are built with, where that split comes from, and the
    data restricted to the split's concepts."""
    data_concepts = concept_names(data)
    named = (
        []
        if args.concepts in ("heldin", "heldout", "all")
        else [part.strip() for part in args.concepts.split("|") if part.strip()]
    )
    saved = _training_file(args.model, CONCEPT_SPLIT_FILE)
    if saved is not None:
        split = ConceptSplit.from_json(Path(args.model) / CONCEPT_SPLIT_FILE)
        origin = f"the training run's {CONCEPT_SPLIT_FILE}"
        unlisted = set(data_concepts) - {*split.heldin_concepts, *split.heldout_concepts}
        if unlisted:
            # Concept data of another source (e.g. a held-back set, or a data set the run trained on part of): the run
            # never saw a concept its split does not list, so those and the split's held-out concepts are scored as
            # held-out. Which rows of the run's trained concepts such data shares with training is unknown, so they are
            # left out, and refused when named.
            trained = set(data_concepts) & set(split.heldin_concepts)
            named_trained = sorted(trained & set(named))
            if named_trained:
                raise ValueError(
                    f"--concepts names concept(s) the run trained on, {named_trained[:3]}, in data that is not the "
                    f"run's own ({len(unlisted)} of its concepts are not in {CONCEPT_SPLIT_FILE}), so which of their "
                    "rows were trained on is unknown. Evaluate them with the run's own data (no "
                    "--dataset_name_or_path)."
                )
            split = ConceptSplit([], sorted(set(data_concepts) - trained), sources=split.sources, seed=split.seed)
            origin = (
                f"{len(unlisted)} concept(s) of this data are not in the training run's {CONCEPT_SPLIT_FILE}: "
                "never-trained, scored with its held-out concepts"
                + (f"; its {len(trained)} trained concept(s) are left out" if trained else "")
            )
            if trained:
                data = data.filter(lambda row: row["output_concept"] not in trained)
    else:
        split = split_concepts(
            data, heldout=parse_heldout_concepts(args.heldout_concepts), seed=args.concept_split_seed
        )
        origin = f"--heldout_concepts {args.heldout_concepts} with seed {args.concept_split_seed}"
    if args.concepts == "heldin":
        concepts = list(split.heldin_concepts)
    elif args.concepts == "heldout":
        concepts = list(split.heldout_concepts)
    elif args.concepts == "all":
        concepts = list(split.heldin_concepts) + list(split.heldout_concepts)
    else:
        concepts = named
        unknown = sorted(set(concepts) - set(data_concepts))
        if unknown:
            raise ValueError(f"--concepts names concepts absent from the data: {unknown}.")
    available = set(data_concepts)
    concepts = sorted(concept for concept in concepts if concept in available)
    if args.max_concepts is not None:
        concepts = concepts[: args.max_concepts]
    if not concepts:
        raise ValueError(f"No concepts selected by --concepts {args.concepts!r} (split from {origin}).")
    return concepts, split, origin, data


def _instructions(args: EvaluationArguments, eval_rows: list[dict], concepts: list[str]) -> dict[str, list[str]]:
    if args.instructions == "concept_data":
        pools = {concept: [] for concept in concepts}
        for row in eval_rows:
            if row["output_concept"] in pools:
                pools[row["output_concept"]].append(row["input"])
        return pools
    if Path(args.instructions).exists():
        texts = load_instructions(args.instructions, flag="--instructions")
    else:
        try:
            table = datasets.load_dataset(args.instructions, split="eval")
        except (ConnectionError, FileNotFoundError, ValueError) as error:
            raise ValueError(
                f"Could not load instructions {args.instructions!r} ({error}). Offline, use --instructions "
                "concept_data or a local file."
            ) from error
        texts = list(table["instruction"])
    texts = list(dict.fromkeys(texts))
    # Every concept gets the same instructions, so concepts are compared on identical prompts.
    return {concept: texts for concept in concepts}


def _make_judge(args: EvaluationArguments):
    from modeling_hypersteer.openai_client import CachedChatClient

    return CachedChatClient(
        model=args.judge_model,
        base_url=args.judge_base_url,
        api_key_env=args.judge_api_key_env,
        cache_path=Path(args.output_dir) / "judge_cache.sqlite",
        max_concurrency=args.judge_concurrency,
        max_retries=args.judge_max_retries,
        timeout=args.judge_timeout,
        initial_backoff=args.judge_initial_backoff,
        seed=args.seed,
    )


def _check_model(model: str) -> None:
    """Fails early, naming the model, when `--model` is neither a checkpoint folder nor a possible Hub id."""
    path = Path(model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"--model {model!r} is a folder without config.json, so not a saved HyperSteer checkpoint; pass the "
                "folder `save_pretrained` (or train_hypersteer.py's --output_dir) wrote."
            )
        return
    try:
        looks_like_hub_id = not path.is_absolute() and not model.startswith((".", "~"))
        if looks_like_hub_id:
            validate_repo_id(model)
    except HFValidationError:
        looks_like_hub_id = False
    if not looks_like_hub_id:
        raise FileNotFoundError(
            f"--model {model!r}: the model is missing (no such folder). Pass a HyperSteer checkpoint folder or a Hub id."
        )


def _concept_ids(data: datasets.Dataset) -> dict[str, int]:
    """Each concept's `concept_id` in the data (of its first positive row; ids are unique within one source only)."""
    ids: dict[str, int] = {}
    for concept, concept_id, negative in zip(data["output_concept"], data["concept_id"], data["is_negative"]):
        if not negative:
            ids.setdefault(concept, int(concept_id))
    return ids


def _write_summary(summary: dict, folder: Path) -> Path:
    path = folder / EVALUATION_SUMMARY_FILE
    path.write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    return path


def _text_metric(args, model, tokenizer, data, concepts, concept_vectors) -> dict:
    """The judge-free text metric of `concepts` (see `modeling_hypersteer/text_metric.py`); writes every scored
    generation to `text_metric_samples.jsonl` and the plot to `text_metric_vs_factor.png`, and returns the summary
    without the samples.

    The detector learns each concept from the concept data's responses (positive rows of the concept against other
    concepts' and the negative rows); the prompts are generic instructions that are not in the data, so no detector
    text is a response to an evaluation prompt."""
    from modeling_hypersteer.text_metric import ConceptDetector, plot_text_metric, text_metric

    rows = [
        {"output": output, "output_concept": concept, "is_negative": negative}
        for output, concept, negative in zip(data["output"], data["output_concept"], data["is_negative"])
    ]
    detector = ConceptDetector.from_rows(
        rows, concepts=concepts, max_responses_per_concept=args.text_metric_references_per_concept, seed=args.seed
    )
    result = text_metric(
        model,
        tokenizer,
        detector,
        concepts,
        args.method_list,
        args.factor_grid,
        num_instructions=args.text_metric_instructions_per_concept,
        max_new_tokens=args.text_metric_max_new_tokens,
        batch_size=args.batch_size,
        generations_path=Path(args.output_dir) / "text_metric_generations.jsonl",
        concept_vectors=concept_vectors,
        prompt_placement=args.prompt_placement,
    )
    with open(Path(args.output_dir) / "text_metric_samples.jsonl", "w", encoding="utf-8") as handle:
        for sample in result.pop("samples"):
            handle.write(json.dumps(sample) + "\n")
    plot_text_metric(result, Path(args.output_dir) / "text_metric_vs_factor.png")
    return result


def main(argv: list[str] | None = None) -> dict:
    (args,) = parse_arguments(make_parser(), argv)
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        level=logging.INFO,
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    transformers.utils.logging.set_verbosity_warning()
    set_seed(args.seed)
    _check_model(args.model)

    training_summary = _training_file(args.model, TRAINING_SUMMARY_FILE) or {}
    sources = args.dataset_name_or_path or training_summary.get("sources")
    if not sources:
        raise ValueError(
            f"No concept data given and {args.model} has no {TRAINING_SUMMARY_FILE} naming its sources; "
            "pass --dataset_name_or_path."
        )
    data = load_concept_data(sources)
    concepts, split, origin, data = _selected_concepts(args, data)
    logger.info(f"Evaluating {len(concepts)} concept(s) from {sources}; split from {origin}.")
    split_settings = training_summary.get("split_settings")
    heldin_selected = sorted(set(concepts) & set(split.heldin_concepts))
    if split_settings is None and heldin_selected:
        # Without them the held-out prompts of held-in concepts cannot be rebuilt, and rows the model was trained on
        # would be scored as unseen.
        raise ValueError(
            f"Held-in evaluation needs the training run's split settings (`split_settings` in "
            f"{Path(args.model) / TRAINING_SUMMARY_FILE}), which are missing, so the rows kept out of training cannot "
            f"be rebuilt; held-in concepts selected: {heldin_selected[:5]}. Evaluate held-out concepts only "
            "(--concepts heldout), or restore the training run's training_summary.json."
        )
    heldin_rows = build_splits(data, split, **split_settings)["eval_heldin"] if split_settings else []
    # Held-out concepts never reach training, so any number of their rows may be used.
    heldout_rows = build_splits(
        data,
        split,
        eval_examples_per_concept=max(args.num_instructions_per_concept, args.offline_examples_per_concept, 2),
        seed=split.seed,
    )["eval_heldout"]
    eval_rows = list(heldin_rows) + list(heldout_rows)
    eval_rows = [row for row in eval_rows if row["output_concept"] in set(concepts) and not row["is_negative"]]

    os.makedirs(args.output_dir, exist_ok=True)
    load_kwargs = {"dtype": resolve_dtype(args.dtype)}
    if args.device_map is not None:
        load_kwargs["device_map"] = args.device_map
    model = HyperSteerModel.from_pretrained(args.model, **load_kwargs)
    tokenizer = model.tokenizer
    summary: dict = {
        "model": args.model,
        "model_fingerprint": model_fingerprint(model.config, model.hypernetwork.state_dict()),
        "methods": {},
        "offline": {},
        "judge": None,
    }

    baseline_methods = [method for method in args.method_list if method in BASELINE_METHODS]
    concept_vectors = {}
    if baseline_methods:
        if split_settings is None:
            raise ValueError(
                f"--methods {','.join(baseline_methods)} builds per-concept vectors from the training run's training "
                f"rows, which needs its split settings in {Path(args.model) / TRAINING_SUMMARY_FILE}; they are missing."
            )
        reference_rows = [row for row in heldin_rows if not row["is_negative"]][:32]
        # The training run's own training rows, never its evaluation rows.
        train_rows = [
            dict(row) for row in build_splits(data, split, **split_settings)["train"] if not row["is_negative"]
        ]
        negative_rows = [dict(row) for row in data if row["is_negative"]]
        for method in baseline_methods:
            concept_vectors[method] = baseline_concept_vectors(
                method,
                model,
                tokenizer,
                train_rows,
                negative_rows,
                reference_rows,
                Path(args.output_dir) / "baselines" / method,
                vector_norm=args.baseline_vector_norm,
                steps=args.vector_baseline_steps,
                learning_rate=args.vector_baseline_learning_rate,
                seed=args.seed,
                max_length=args.max_length,
            )

    if args.offline_examples_per_concept > 0:
        by_set = {"heldin": set(split.heldin_concepts), "heldout": set(split.heldout_concepts)}
        for name, members in by_set.items():
            chosen, counts = [], {}
            for row in eval_rows:
                concept = row["output_concept"]
                if concept in members and counts.get(concept, 0) < args.offline_examples_per_concept:
                    counts[concept] = counts.get(concept, 0) + 1
                    chosen.append(row)
            summary.setdefault("offline_rows", {})[name] = [[row["output_concept"], row["input"]] for row in chosen]
            if len(counts) >= 2:
                summary["offline"][name] = offline_steering_metric(
                    model,
                    tokenizer,
                    chosen,
                    steering_factor=args.offline_steering_factor,
                    batch_size=args.batch_size,
                    max_length=args.max_length,
                    desc=f"Offline metric ({name})",
                    prompt_placement=args.prompt_placement,
                    prompt_hypersteer="prompt_hypersteer" in args.method_list,
                )
                for method in baseline_methods:
                    baselines = summary.setdefault("offline_baselines", {}).setdefault(method, {})
                    if name == "heldout":
                        baselines[name] = {
                            "note": "undefined: a held-out concept has no training rows to build a vector from"
                        }
                        continue
                    baselines[name] = offline_steering_metric(
                        model,
                        tokenizer,
                        chosen,
                        steering_factor=args.offline_steering_factor,
                        batch_size=args.batch_size,
                        max_length=args.max_length,
                        desc=f"Offline metric ({name}, {method})",
                        concept_vectors=concept_vectors[method],
                        reference_row_losses=summary["offline"][name]["row_losses"],
                        prompt_placement=args.prompt_placement,
                    )
            elif counts:
                logger.warning(f"Only one {name} concept selected: the wrong-concept control needs two; skipped.")
        # Per-row losses served the baselines' shared conditions; the summary keeps the aggregates.
        for metric in list(summary["offline"].values()) + [
            entry for method in summary.get("offline_baselines", {}).values() for entry in method.values()
        ]:
            metric.pop("row_losses", None)
        if summary["offline"]:
            plot_offline_losses(summary["offline"], Path(args.output_dir) / "offline_losses.png")

    if args.text_metric:
        summary["text_metric"] = _text_metric(args, model, tokenizer, data, concepts, concept_vectors)

    if not args.judge_available():
        logger.warning(
            "No judge endpoint (--judge_base_url or $%s): ran the offline metric%s only.",
            args.judge_api_key_env,
            " and the text metric" if args.text_metric else " (add --text_metric for a judge-free generation metric)",
        )
    elif args.num_instructions_per_concept > 0:
        from modeling_hypersteer.judge import judge_generations, select_and_report

        tasks = generation_tasks(
            _instructions(args, eval_rows, concepts), args.num_instructions_per_concept, _concept_ids(data)
        )
        samples = generate_samples(
            model,
            tokenizer,
            tasks,
            args.method_list,
            args.factor_grid,
            generations_path=Path(args.output_dir) / "generations.jsonl",
            max_new_tokens=args.max_new_tokens,
            do_sample=args.do_sample,
            temperature=args.temperature,
            batch_size=args.batch_size,
            seed=args.seed,
            concept_vectors=concept_vectors,
            prompt_placement=args.prompt_placement,
        )
        client = _make_judge(args)
        try:
            judged = judge_generations(client, samples, judge_model=args.judge_model)
        finally:
            client.close()
        with open(Path(args.output_dir) / "samples.jsonl", "w", encoding="utf-8") as handle:
            for sample in judged:
                handle.write(json.dumps(sample) + "\n")
        report = select_and_report(judged)
        summary["methods"] = report["methods"]
        summary["excluded_concepts"] = report["excluded_concepts"]
        summary["judge"] = {
            "model": args.judge_model,
            "base_url": client.base_url,
            "requests_sent": client.requests_sent,
            "cache_hits": client.cache_hits,
        }
        plot_factor_sweep(judged, Path(args.output_dir) / "score_vs_factor.png")
        plot_ratings(summary, Path(args.output_dir) / "ratings.png")

    summary["config"] = {key: value for key, value in asdict(args).items()}
    summary["model_config"] = model.config.to_diff_dict()
    summary["concepts"] = concepts
    summary["meta_info"] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "device": str(model.get_input_embeddings().weight.device),
        "base_dtype": str(model.language_model.dtype),
    }
    _write_summary(summary, Path(args.output_dir))
    markdown = summary_markdown(summary)
    (Path(args.output_dir) / "evaluation_summary.md").write_text(markdown, encoding="utf-8")
    if args.save_summary_to_model and Path(args.model).is_dir():
        written = _write_summary(summary, Path(args.model))
        logger.info(f"Wrote {written}; the model card of {args.model} now reports this evaluation.")
    logger.info("\n" + markdown)
    return summary


if __name__ == "__main__":
    main()
