"""What every benchmark family of `run.py` shares: targets, machine information, config, models, inputs and
interleaved timing."""

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma2Config, Gemma2ForCausalLM

from modeling_hypersteer import HyperSteerModel
from modeling_hypersteer.modeling_hypersteer import tokenize_steering_prompts
from modeling_hypersteer.smollm2 import smollm2_path


TARGETS = {
    "generate_ratio": (">=", 0.97),
    "train_ratio_vs_floor": ("<=", 1.15),  # with hypernet_num_layers=2
    "train_speedup_vs_three_pass": (">=", 2.5),
}


class GuardError(RuntimeError):
    """An optimised path disagrees with the straightforward scheme: timing it would be meaningless."""


# ---------------------------------------------------------------------------------------------------------------
# Machine, config, models and inputs
# ---------------------------------------------------------------------------------------------------------------


def machine_info() -> dict:
    cpu_model = None
    if Path("/proc/cpuinfo").is_file():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def load_config(path: Path, quick: bool) -> dict:
    """The JSON config, with its `quick` section merged over the sections it names when `quick`."""
    config = json.loads(Path(path).read_text())
    overrides = config.pop("quick", {})
    if quick:
        for section, values in overrides.items():
            if not section.startswith("_"):
                config[section] = {**config[section], **values}
    return config


def build_base(spec: dict, seed: int):
    """Return `(base, tokenizer_or_None)` in float32 eval mode."""
    if spec["kind"] == "smollm2":
        path = smollm2_path()
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(
            path
        )
    if spec["kind"] == "gemma2_random":
        torch.manual_seed(seed)
        return Gemma2ForCausalLM(Gemma2Config(**spec["config"])).eval(), None
    raise ValueError(f"Unknown model kind {spec['kind']!r}; choose 'smollm2' or 'gemma2_random'.")


def describe(base, spec: dict) -> dict:
    config = base.config.get_text_config()
    return {
        "architecture": type(base).__name__,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": getattr(config, "head_dim", None),
        "intermediate_size": config.intermediate_size,
        "vocab_size": config.vocab_size,
        "attn_implementation": config._attn_implementation,
        "parameters": sum(parameter.numel() for parameter in base.parameters()),
        "weight_bytes": weight_bytes(base),
        "steering_layer": spec["steering_layer"],
    }


def weight_bytes(module: torch.nn.Module) -> int:
    return sum(parameter.numel() * parameter.element_size() for parameter in module.parameters())


def build_hypersteer(base, spec: dict, hypernet_type: str, num_layers: int, std: float, seed: int) -> HyperSteerModel:
    """An untrained HyperSteer with a small random output projection (the zero head would steer by exactly 0)."""
    depth = base.config.get_text_config().num_hidden_layers
    model = HyperSteerModel.from_base_model(
        base,
        steering_layer=spec["steering_layer"],
        hypernet_type=hypernet_type,
        hypernet_num_layers=num_layers,
        hypernet_init="base" if num_layers <= depth else "random",
    )
    torch.manual_seed(seed)
    with torch.no_grad():
        model.hypernetwork.output_projection.weight.normal_(0.0, std)
    return model.eval()


def smollm2_tokenizer():
    return AutoTokenizer.from_pretrained(smollm2_path())


def steering_batch(tokenizer, config: dict, batch_size: int, vocab_size: int) -> dict:
    """Steering prompts tokenised by the SmolLM2 tokenizer; ids are capped to the model's vocabulary."""
    prompts = [config["steering_prompts"][index % len(config["steering_prompts"])] for index in range(batch_size)]
    encoding = tokenize_steering_prompts(tokenizer, prompts, 64)
    encoding["steering_input_ids"] = encoding["steering_input_ids"] % vocab_size
    return encoding


def generation_prompts(tokenizer, base_tokenizer, config: dict, vocab_size: int, seed: int) -> dict:
    """Chat-templated instructions (left-padded, ~64 tokens) for a real model; random ids with the same left-padding
    pattern for a random model."""
    gen = config["generation"]
    batch_size, length = gen["batch_size"], gen["prompt_length"]
    if base_tokenizer is not None:
        messages = [
            [{"role": "user", "content": config["instructions"][index % len(config["instructions"])]}]
            for index in range(batch_size)
        ]
        encoding = base_tokenizer.apply_chat_template(
            messages,
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
            padding=True,
            padding_side="left",
        )
        return {"input_ids": encoding["input_ids"], "attention_mask": encoding["attention_mask"]}
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab_size, (batch_size, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    for row in range(batch_size):
        attention_mask[row, : (row * 3) % 10] = 0  # up to 9 left-padding tokens, as in the chat prompts
    return {"input_ids": input_ids.masked_fill(attention_mask == 0, 0), "attention_mask": attention_mask}


def training_batch(tokenizer, config: dict, sequence_length: int, vocab_size: int, seed: int) -> dict:
    """`batch_size x sequence_length` random tokens, labels on the second half, plus steering prompts."""
    batch_size = config["training"]["batch_size"]
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab_size, (batch_size, sequence_length), generator=generator)
    labels = input_ids.clone()
    labels[:, : sequence_length // 2] = -100
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        **steering_batch(tokenizer, config, batch_size, vocab_size),
    }


# ---------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------


def interleaved(groups: list[dict], repetitions: int, warmup: bool, label: str) -> dict[str, list[float]]:
    """Time every callable of every group once per repetition; inside a group the order rotates each repetition,
    so the paths compared with each other run back to back and none is always first."""
    times = {name: [] for group in groups for name in group}
    if warmup:
        for group in groups:
            for function in group.values():
                function()
    for repetition in range(repetitions):
        for group in groups:
            names = list(group)
            shift = repetition % len(names)
            for name in names[shift:] + names[:shift]:
                start = time.perf_counter()
                group[name]()
                times[name].append(time.perf_counter() - start)
        print(f"  [{label}] repetition {repetition + 1}/{repetitions} done", flush=True)
    return times


def paired_ratio(times: dict, numerator: str, denominator: str) -> float:
    return statistics.median(a / b for a, b in zip(times[numerator], times[denominator]))


def medians(times: dict) -> dict:
    return {
        name: {"median_s": statistics.median(values), "all_s": [round(value, 4) for value in values]}
        for name, values in times.items()
    }


# ---------------------------------------------------------------------------------------------------------------
