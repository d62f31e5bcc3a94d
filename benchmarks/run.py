"""HyperSteer performance ratios, measured in one run on this machine.

    python benchmarks/run.py                      # full: SmolLM2-135M-Instruct + a Gemma-2-shaped random model
    python benchmarks/run.py --quick              # the Gemma-2-shaped random model only (under a minute)
    python benchmarks/run.py --json out.json --plot out.png --config my_config.json

Every number reported is a ratio of two paths timed in the same run, interleaved (the order rotates every
repetition) after a warm-up, as the median over repetitions of the per-repetition ratio, so a CPU shared with other
work shifts both sides alike. Before any timing, correctness guards check that each optimised path gives what the
straightforward scheme gives (`schemes.py`), and the run aborts if one does not.

Results go to `benchmarks/results/<timestamp>.json` and `benchmarks/results/latest.json` (`latest_quick.json`
with `--quick`), the scaling plot to `benchmarks/results/scaling.png` (`scaling_quick.png`). See README.md.
"""

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma2Config, Gemma2ForCausalLM
from transformers.utils import logging as hf_logging

from modeling_hypersteer import HyperSteerModel
from modeling_hypersteer.modeling_hypersteer import tokenize_steering_prompts
from modeling_hypersteer.smollm2 import smollm2_path


BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
from schemes import (  # noqa: E402
    call_counter,
    floor_step,
    hypersteer_step,
    naive_steering_vectors,
    positions_from_mask,
    recorded_output,
    steering_layer,
    three_pass_step,
    two_pass_generate,
)


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
# 1. Generation
# ---------------------------------------------------------------------------------------------------------------


def bench_generation(base, base_tokenizer, tokenizer, spec, config, repetitions) -> dict:
    gen = config["generation"]
    vocab_size = base.config.get_text_config().vocab_size
    prompts = generation_prompts(tokenizer, base_tokenizer, config, vocab_size, config["seed"])
    steering = steering_batch(tokenizer, config, gen["batch_size"], vocab_size)
    pad_token_id = base.config.pad_token_id if base.config.pad_token_id is not None else 0

    def greedy(new_tokens):
        return {
            "max_new_tokens": new_tokens,
            "min_new_tokens": new_tokens,
            "do_sample": False,
            "pad_token_id": pad_token_id,
        }

    models = {
        variant: build_hypersteer(
            base, spec, variant, gen["hypernet_num_layers"], config["output_projection_std"], config["seed"]
        )
        for variant in gen["variants"]
    }
    guard_kwargs = greedy(gen["guard_new_tokens"])
    body, first_layer = base.model, base.model.layers[0]
    with torch.no_grad(), call_counter(body, first_layer) as unsteered_calls:
        unsteered = base.generate(**prompts, **guard_kwargs)
    guards = {
        variant: guard_generation(model, prompts, steering, guard_kwargs, unsteered, unsteered_calls)
        for variant, model in models.items()
    }

    kwargs = greedy(gen["max_new_tokens"])
    # One rotating group: every path runs once per repetition and each ratio pairs runs of the same repetition.
    group = {"unsteered": lambda: base.generate(**prompts, **kwargs)}
    for variant, model in models.items():
        group[f"{variant}/steered"] = lambda model=model: model.generate(**prompts, **steering, **kwargs)
        group[f"{variant}/two_pass"] = lambda model=model: two_pass_generate(model, **prompts, **steering, **kwargs)
    # The guards' short generations of every path were the warm-up.
    times = interleaved([group], repetitions, warmup=False, label="generate")
    new_tokens = gen["batch_size"] * gen["max_new_tokens"]
    raw = medians(times)
    for entry in raw.values():
        entry["tokens_per_s"] = new_tokens / entry["median_s"]
    # The one piece of work steering adds per request, timed alone (short, so many repetitions): a cross-check of
    # the end-to-end ratio, whose runs last seconds and catch every burst of load from other processes.
    passes = {
        v: hypernet_pass_seconds(model, prompts, steering, gen["hypernet_pass_repetitions"])
        for v, model in models.items()
    }
    unsteered = raw["unsteered"]["median_s"]
    return {
        "generate_ratio": {v: paired_ratio(times, "unsteered", f"{v}/steered") for v in models},
        "generate_speedup_vs_two_pass": {v: paired_ratio(times, f"{v}/two_pass", f"{v}/steered") for v in models},
        "hypernet_pass_s": passes,
        "generate_ratio_predicted": {v: unsteered / (unsteered + passes[v]) for v in models},
        "guards": guards,
        "raw": raw,
        "setup": {
            "batch_size": gen["batch_size"],
            "prompt_length": prompts["input_ids"].shape[1],
            "max_new_tokens": gen["max_new_tokens"],
            "hypernet_num_layers": gen["hypernet_num_layers"],
            "steering_prompt_length": steering["steering_input_ids"].shape[1],
            "greedy": True,
        },
    }


@torch.no_grad()
def hypernet_pass_seconds(model, prompts, steering, repetitions: int) -> float:
    """Median time of the hypernetwork pass a steered `generate` adds at prefill (the base residual it reads is
    recorded once beforehand, as the prefill provides it for free)."""
    kind = model.config.hypernet_type
    with recorded_output(steering_layer(model)) as store:
        model.language_model.model(
            **prompts, position_ids=positions_from_mask(prompts["attention_mask"]), use_cache=False
        )
    context = store["hidden_states"] if kind == "cross_attention" else None
    context_ids = prompts["input_ids"] if kind == "in_context" else None
    mask = prompts["attention_mask"].bool()

    def run_pass():
        model._run_hypernetwork(
            steering["steering_input_ids"], steering["steering_attention_mask"], context, mask, context_ids
        )

    run_pass()
    samples = []
    for _ in range(repetitions):
        start = time.perf_counter()
        run_pass()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


@torch.no_grad()
def guard_generation(model, prompts, steering, kwargs, unsteered, unsteered_calls) -> dict:
    """Ours == base generation + additive hook of the same `v`; `v` computed once; no extra base pass; and the
    naive scheme's `v` matches ours. `unsteered`/`unsteered_calls`: the base's own tokens and call counts."""
    variant = model.config.hypernet_type
    body, first_layer = model.language_model.model, model.language_model.model.layers[0]
    vectors = []
    handle = model.hypernetwork.register_forward_hook(lambda module, args, output: vectors.append(output))
    try:
        with call_counter(body, first_layer) as steered_calls:
            steered = model.generate(**prompts, **steering, **kwargs)
    finally:
        handle.remove()
    if len(vectors) != 1:
        raise GuardError(f"[{variant}] the hypernetwork ran {len(vectors)} times in one generate call (expected 1).")
    if steered_calls != unsteered_calls:
        raise GuardError(
            f"[{variant}] steered generate ran the base body/layer 0 {steered_calls} times, unsteered "
            f"{unsteered_calls}: steering added a base pass."
        )
    reference, _ = two_pass_generate(model, **prompts, **steering, vectors=vectors[0], **kwargs)
    if not torch.equal(steered, reference):
        raise GuardError(
            f"[{variant}] steered greedy tokens differ from base generation + additive hook of the same v."
        )
    naive_vectors = naive_steering_vectors(model, **prompts, **steering)
    error = (naive_vectors - vectors[0]).abs().max().item()
    if not torch.allclose(naive_vectors, vectors[0], rtol=1e-4, atol=1e-4 * vectors[0].abs().max().item() + 1e-6):
        raise GuardError(
            f"[{variant}] v from the prefill differs from v of the naive extra pass (max abs {error:.3g})."
        )
    return {
        "hypernetwork_calls_per_generate": len(vectors),
        "base_body_calls": {"steered": steered_calls[0], "unsteered": unsteered_calls[0]},
        "tokens_equal_to_hook_with_same_v": True,
        "v_max_abs_diff_vs_two_pass": error,
        "v_norm_mean": vectors[0].norm(dim=-1).mean().item(),
        "steering_changes_tokens": not torch.equal(steered, unsteered),
    }


# ---------------------------------------------------------------------------------------------------------------
# 2. Training step, 4. scaling
# ---------------------------------------------------------------------------------------------------------------


class TrainingPaths:
    """HyperSteer models (one per hypernetwork depth), the floor's single vector, and an AdamW per trainable set,
    all around one shared frozen base."""

    def __init__(self, base, tokenizer, spec, config):
        self.base, self.tokenizer, self.spec, self.config = base, tokenizer, spec, config
        self.vocab_size = base.config.get_text_config().vocab_size
        self.models, self.optimizers, self.batches = {}, {}, {}
        learning_rate = config["training"]["learning_rate"]
        self.vector = torch.nn.Parameter(torch.zeros(base.config.get_text_config().hidden_size))
        self.vector_optimizer = torch.optim.AdamW([self.vector], lr=learning_rate)

    def model(self, num_layers: int) -> HyperSteerModel:
        if num_layers not in self.models:
            model = build_hypersteer(
                self.base,
                self.spec,
                self.config["training"]["hypernet_type"],
                num_layers,
                self.config["output_projection_std"],
                self.config["seed"],
            ).train()
            self.models[num_layers] = model
            self.optimizers[num_layers] = torch.optim.AdamW(
                model.hypernetwork.parameters(), lr=self.config["training"]["learning_rate"]
            )
        return self.models[num_layers]

    def batch(self, sequence_length: int) -> dict:
        if sequence_length not in self.batches:
            self.batches[sequence_length] = training_batch(
                self.tokenizer, self.config, sequence_length, self.vocab_size, self.config["seed"]
            )
        return self.batches[sequence_length]

    def ours(self, num_layers: int, sequence_length: int):
        model, batch = self.model(num_layers), self.batch(sequence_length)
        return lambda: hypersteer_step(model, batch, self.optimizers[num_layers])

    def floor(self, sequence_length: int):
        # Any of the wrappers gives the shared base and the steering layer.
        model = self.model(self.config["training"]["hypernet_num_layers"][0])
        batch = self.batch(sequence_length)
        return lambda: floor_step(model, self.vector, batch, self.vector_optimizer)

    def three_pass(self, num_layers: int, sequence_length: int):
        model, batch = self.model(num_layers), self.batch(sequence_length)
        return lambda: three_pass_step(model, batch, self.optimizers[num_layers])


def guard_training(model, batch) -> dict:
    """One base pass per step (layer 0 and the body run once, the hypernetwork once), and loss and gradients equal
    to the three-pass scheme's steered pass."""
    body, first_layer = model.language_model.model, model.language_model.model.layers[0]
    with call_counter(body, first_layer, model.hypernetwork) as calls:
        loss = hypersteer_step(model, batch)
    if calls != [1, 1, 1]:
        raise GuardError(
            f"A HyperSteer training step ran the base body, layer 0 and the hypernetwork {calls} times "
            "(expected once each)."
        )
    grads = {name: parameter.grad.clone() for name, parameter in model.hypernetwork.named_parameters()}
    model.zero_grad(set_to_none=True)
    three_pass_loss, reference_loss = three_pass_step(model, batch)
    if not torch.allclose(loss, three_pass_loss, rtol=1e-5, atol=1e-6):
        raise GuardError(f"HyperSteer loss {loss.item():.6f} != three-pass steered loss {three_pass_loss.item():.6f}.")
    worst = 0.0
    for name, parameter in model.hypernetwork.named_parameters():
        scale = grads[name].abs().max().item() + 1e-12
        worst = max(worst, (parameter.grad - grads[name]).abs().max().item() / scale)
    model.zero_grad(set_to_none=True)
    if worst > 1e-3:
        raise GuardError(
            f"HyperSteer gradients differ from the three-pass scheme's (worst relative error {worst:.3g})."
        )
    return {
        "base_body_calls_per_step": calls[0],
        "hypernetwork_calls_per_step": calls[2],
        "loss": loss.item(),
        "three_pass_loss": three_pass_loss.item(),
        "unsteered_loss": reference_loss.item(),
        "grad_max_relative_error_vs_three_pass": worst,
    }


def bench_training(paths: TrainingPaths, config, repetitions) -> dict:
    train = config["training"]
    length = train["sequence_length"]
    guards = {f"N={n}": guard_training(paths.model(n), paths.batch(length)) for n in train["hypernet_num_layers"]}
    group = {"floor": paths.floor(length)}
    for n in train["hypernet_num_layers"]:
        group[f"hypersteer/N={n}"] = paths.ours(n, length)
        group[f"three_pass/N={n}"] = paths.three_pass(n, length)
    # The guards already ran HyperSteer and the three-pass scheme once; `warmup` runs every path once more.
    times = interleaved([group], repetitions, warmup=train["warmup"], label="train")
    return {
        "train_ratio_vs_floor": {
            f"N={n}": paired_ratio(times, f"hypersteer/N={n}", "floor") for n in train["hypernet_num_layers"]
        },
        "train_speedup_vs_three_pass": {
            f"N={n}": paired_ratio(times, f"three_pass/N={n}", f"hypersteer/N={n}")
            for n in train["hypernet_num_layers"]
        },
        "guards": guards,
        "raw": medians(times),
        "setup": {
            "batch_size": train["batch_size"],
            "sequence_length": length,
            "labels": "second half",
            "hypernet_type": train["hypernet_type"],
            "optimizer": "AdamW (torch default foreach)",
        },
    }


def bench_scaling(paths: TrainingPaths, config, repetitions) -> dict:
    scaling, train = config["scaling"], config["training"]
    default_layers = 2
    group = {}
    for length in scaling["sequence_lengths"]:
        group[f"floor/T={length}"] = paths.floor(length)
        group[f"hypersteer/N={default_layers}/T={length}"] = paths.ours(default_layers, length)
    for n in scaling["hypernet_num_layers"]:
        key = f"hypersteer/N={n}/T={train['sequence_length']}"
        group.setdefault(key, paths.ours(n, train["sequence_length"]))
    times = interleaved([group], repetitions, warmup=scaling["warmup"], label="scaling")
    raw = medians(times)
    return {
        "raw": raw,
        "vs_sequence_length": {
            "sequence_lengths": scaling["sequence_lengths"],
            "hypersteer_s": [
                raw[f"hypersteer/N={default_layers}/T={t}"]["median_s"] for t in scaling["sequence_lengths"]
            ],
            "floor_s": [raw[f"floor/T={t}"]["median_s"] for t in scaling["sequence_lengths"]],
            "ratio_vs_floor": [
                paired_ratio(times, f"hypersteer/N={default_layers}/T={t}", f"floor/T={t}")
                for t in scaling["sequence_lengths"]
            ],
            "hypernet_num_layers": default_layers,
        },
        "vs_hypernet_num_layers": {
            "hypernet_num_layers": scaling["hypernet_num_layers"],
            "hypersteer_s": [
                raw[f"hypersteer/N={n}/T={train['sequence_length']}"]["median_s"]
                for n in scaling["hypernet_num_layers"]
            ],
            "floor_s": raw[f"floor/T={train['sequence_length']}"]["median_s"]
            if f"floor/T={train['sequence_length']}" in raw
            else None,
            "ratio_vs_floor": [
                paired_ratio(
                    times, f"hypersteer/N={n}/T={train['sequence_length']}", f"floor/T={train['sequence_length']}"
                )
                if f"floor/T={train['sequence_length']}" in raw
                else None
                for n in scaling["hypernet_num_layers"]
            ],
            "sequence_length": train["sequence_length"],
        },
    }


def plot_scaling(scaling_by_model: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name, scaling = next(iter(scaling_by_model.items()))
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    by_length = scaling["vs_sequence_length"]
    left.plot(
        by_length["sequence_lengths"],
        by_length["hypersteer_s"],
        "o-",
        label=f"HyperSteer step, N={by_length['hypernet_num_layers']} (labels: ratio to the floor)",
    )
    left.plot(by_length["sequence_lengths"], by_length["floor_s"], "s--", label="floor (frozen fwd+bwd to one vector)")
    for x, y, ratio in zip(by_length["sequence_lengths"], by_length["hypersteer_s"], by_length["ratio_vs_floor"]):
        left.annotate(f"{ratio:.2f}x", (x, y), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
    left.set(
        xlabel="sequence length (tokens)",
        ylabel="step time (s, median)",
        ylim=(0, 1.15 * max(by_length["hypersteer_s"] + by_length["floor_s"])),
        title=f"{name}: step time vs sequence length",
    )
    left.set_xticks(by_length["sequence_lengths"])
    left.legend(fontsize=8, loc="lower right")
    by_layers = scaling["vs_hypernet_num_layers"]
    right.plot(
        by_layers["hypernet_num_layers"],
        by_layers["hypersteer_s"],
        "o-",
        label="HyperSteer step (labels: ratio to the floor)",
    )
    if by_layers["floor_s"] is not None:
        right.axhline(by_layers["floor_s"], linestyle="--", color="C1", label="floor")
        for x, y, ratio in zip(
            by_layers["hypernet_num_layers"], by_layers["hypersteer_s"], by_layers["ratio_vs_floor"]
        ):
            right.annotate(f"{ratio:.2f}x", (x, y), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
    right.set(
        xlabel="hypernet_num_layers",
        ylabel="step time (s, median)",
        ylim=(0, 1.15 * max(by_layers["hypersteer_s"])),
        title=f"{name}: step time vs hypernetwork depth (T={by_layers['sequence_length']})",
    )
    right.set_xticks(by_layers["hypernet_num_layers"])
    right.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


# ---------------------------------------------------------------------------------------------------------------
# 3. Memory (one fresh subprocess per configuration)
# ---------------------------------------------------------------------------------------------------------------


def _proc_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}; the memory benchmark needs Linux.")


class PeakRSS:
    """Peak resident set size over a block: resets the kernel's high-water mark (`/proc/self/clear_refs`), or, where
    that is not allowed, samples `/proc/self/statm` every millisecond in a thread."""

    def __enter__(self):
        self.sampled = None
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.sampled, self._stop = 0, threading.Event()
            page_kb = os.sysconf("SC_PAGE_SIZE") // 1024

            def sample():
                while not self._stop.is_set():
                    resident = int(Path("/proc/self/statm").read_text().split()[1]) * page_kb
                    self.sampled = max(self.sampled, resident)
                    time.sleep(0.001)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.sampled is None:
            self.peak_kb = _proc_status_kb("VmHWM")
        else:
            self._stop.set()
            self._thread.join()
            self.peak_kb = self.sampled
        return False


def memory_worker(job: dict) -> dict:
    """Runs in a fresh process: build, one warm-up step (allocates AdamW state), then the peak RSS of one step."""
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    baseline_kb = _proc_status_kb("VmRSS")
    config, spec = job["config"], job["spec"]
    torch.set_num_threads(config["torch_threads"])
    base, _ = build_base(spec, config["seed"])
    tokenizer = smollm2_tokenizer()
    model = build_hypersteer(
        base,
        spec,
        config["training"]["hypernet_type"],
        job["hypernet_num_layers"],
        config["output_projection_std"],
        config["seed"],
    )
    if job["scheme"] == "hypersteer+checkpointing":
        model.activation_checkpointing_enable()
    model.train()
    batch = training_batch(
        tokenizer,
        config,
        config["training"]["sequence_length"],
        base.config.get_text_config().vocab_size,
        config["seed"],
    )
    if job["scheme"] == "floor":
        vector = torch.nn.Parameter(torch.zeros(base.config.get_text_config().hidden_size))
        optimizer = torch.optim.AdamW([vector], lr=config["training"]["learning_rate"])
        step = lambda: floor_step(model, vector, batch, optimizer)  # noqa: E731
    else:
        optimizer = torch.optim.AdamW(model.hypernetwork.parameters(), lr=config["training"]["learning_rate"])
        step = lambda: hypersteer_step(model, batch, optimizer)  # noqa: E731
    step()
    gc.collect()
    before_kb = _proc_status_kb("VmRSS")
    with PeakRSS() as peak:
        step()
    weights = weight_bytes(base)
    return {
        "scheme": job["scheme"],
        "weight_bytes": weights,
        "hypernetwork_bytes": weight_bytes(model.hypernetwork),
        "rss_after_imports_mb": baseline_kb / 1024,
        "rss_before_step_mb": before_kb / 1024,
        "peak_rss_step_mb": peak.peak_kb / 1024,
        # Everything the model and training hold at the peak (weights, hypernet, AdamW state, activations),
        # excluding the interpreter and libraries, over the base's weights.
        "peak_rss_ratio": (peak.peak_kb - baseline_kb) * 1024 / weights,
        # What one step adds on top of the steady state (activations, gradients, temporaries).
        "step_increment_ratio": (peak.peak_kb - before_kb) * 1024 / weights,
    }


def bench_memory(spec, config) -> dict:
    jobs = [
        {
            "spec": spec,
            "config": config,
            "scheme": scheme,
            "hypernet_num_layers": config["memory"]["hypernet_num_layers"],
        }
        for scheme in config["memory"]["schemes"]
    ]
    # RSS is per process, so the fresh workers can run side by side; nothing is being timed meanwhile.
    processes = [
        subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--memory-worker", json.dumps(job)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for job in jobs
    ]
    results = {}
    for job, process in zip(jobs, processes):
        stdout, stderr = process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"Memory worker for {job['scheme']} failed:\n{stderr[-3000:]}")
        results[job["scheme"]] = json.loads(stdout.strip().splitlines()[-1])
    names = {"hypersteer": "no_checkpointing", "hypersteer+checkpointing": "checkpointing", "floor": "floor"}
    return {
        "peak_rss_ratio": {names[scheme]: result["peak_rss_ratio"] for scheme, result in results.items()},
        "raw": results,
        "setup": {
            "hypernet_num_layers": config["memory"]["hypernet_num_layers"],
            "batch_size": config["training"]["batch_size"],
            "sequence_length": config["training"]["sequence_length"],
        },
    }


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------


def _verdict(key: str, value: float) -> str:
    op, target = TARGETS[key]
    met = value >= target if op == ">=" else value <= target
    return f"{op} {target:<5}", "yes" if met else "NO"


def render_table(results: dict) -> str:
    machine = results["machine"]
    lines = [
        f"HyperSteer benchmarks ({results['mode']} run, {results['timestamp']})",
        f"machine: {machine['cpu_count']} CPUs ({machine['cpu_affinity']} usable, {machine['cpu_model']}), "
        f"torch {machine['torch']} with {machine['torch_threads']} threads, transformers {machine['transformers']}, "
        f"Python {machine['python']}; load average at start {machine['load_average_at_start']}, "
        f"at end {machine['load_average_at_end']}",
    ]
    for name, model in results["models"].items():
        shape = model["model"]
        lines.append(
            f"{name}: {shape['architecture']} hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, "
            f"{shape['num_attention_heads']} heads x {shape['head_dim']} (kv {shape['num_key_value_heads']}), "
            f"intermediate {shape['intermediate_size']}, vocab {shape['vocab_size']}, "
            f"{shape['parameters'] / 1e6:.1f}M params, attention {shape['attn_implementation']}, "
            f"steering layer {shape['steering_layer']}"
        )
    header = f"{'model':<14} {'measurement':<52} {'value':>8}  {'target':<9} {'met':<4}"
    lines += ["", header, "-" * len(header)]

    def row(name, measurement, value, key=None, unit=""):
        target, met = _verdict(key, value) if key else ("", "")
        lines.append(f"{name:<14} {measurement:<52} {value:>7.3f}{unit or ' '} {target:<9} {met:<4}")

    for name, model in results["models"].items():
        gen = model.get("generation")
        if gen:
            setup = gen["setup"]
            tag = f"(b{setup['batch_size']}, {setup['prompt_length']}+{setup['max_new_tokens']} tok, N={setup['hypernet_num_layers']})"
            for variant, value in gen["generate_ratio"].items():
                row(name, f"generate tok/s steered/unsteered {variant}", value, "generate_ratio")
            for variant, value in gen["generate_ratio_predicted"].items():
                row(name, f"  predicted from hypernet pass alone {variant}", value)
            for variant, value in gen["generate_speedup_vs_two_pass"].items():
                row(name, f"generate speedup vs two-pass {variant}", value, unit="x")
            lines.append(f"{'':<14} {'  ' + tag}")
        train = model.get("training")
        if train:
            for key, value in train["train_ratio_vs_floor"].items():
                row(name, f"train step / floor {key}", value, "train_ratio_vs_floor" if key == "N=2" else None)
            for key, value in train["train_speedup_vs_three_pass"].items():
                row(name, f"train speedup vs three-pass {key}", value, "train_speedup_vs_three_pass", unit="x")
            setup = train["setup"]
            lines.append(
                f"{'':<14}   (batch {setup['batch_size']} x {setup['sequence_length']} tok, labels on the "
                f"second half, {setup['hypernet_type']}, AdamW)"
            )
        memory = model.get("memory")
        if memory:
            for key, value in memory["peak_rss_ratio"].items():
                row(name, f"peak RSS of a step / base weights, {key}", value)
        scaling = model.get("scaling")
        if scaling:
            by_length = scaling["vs_sequence_length"]
            for length, ratio in zip(by_length["sequence_lengths"], by_length["ratio_vs_floor"]):
                row(name, f"scaling: train / floor N=2, T={length}", ratio)
            by_layers = scaling["vs_hypernet_num_layers"]
            for n, ratio in zip(by_layers["hypernet_num_layers"], by_layers["ratio_vs_floor"]):
                shown = (
                    n == by_length["hypernet_num_layers"]
                    and by_layers["sequence_length"] in by_length["sequence_lengths"]
                )
                if ratio is not None and not shown:
                    row(name, f"scaling: train / floor N={n}, T={by_layers['sequence_length']}", ratio)
    lines += ["", "raw medians (s):"]
    for name, model in results["models"].items():
        for section in ("generation", "training", "scaling"):
            if section in model:
                cells = [f"{key} {value['median_s']:.3f}" for key, value in model[section]["raw"].items()]
                lines.append(f"  {name} {section}: " + ", ".join(cells))
        if "memory" in model:
            cells = [
                f"{key} {value['peak_rss_step_mb']:.0f} MB (weights {value['weight_bytes'] / 2**20:.0f} MB)"
                for key, value in model["memory"]["raw"].items()
            ]
            lines.append(f"  {name} memory peak RSS: " + ", ".join(cells))
    return "\n".join(lines)


def bench_model(name: str, spec: dict, config: dict, tokenizer, primary: bool) -> dict:
    """Every measurement on one model; scaling and memory on the primary model only."""
    base, base_tokenizer = build_base(spec, config["seed"])
    model_results = {"model": describe(base, spec)}
    print(f"== {name}: {model_results['model']}", flush=True)
    paths = TrainingPaths(base, tokenizer, spec, config)
    sections = {
        "generation": lambda: bench_generation(
            base, base_tokenizer, tokenizer, spec, config, config["generation"]["repetitions"]
        ),
        "training": lambda: bench_training(paths, config, config["training"]["repetitions"]),
    }
    if primary:
        sections["scaling"] = lambda: bench_scaling(paths, config, config["scaling"]["repetitions"])
        sections["memory"] = lambda: bench_memory(spec, config)
    for section, function in sections.items():
        section_start = time.perf_counter()
        model_results[section] = function()
        model_results[section]["wall_time_s"] = time.perf_counter() - section_start
        print(f"  {section} done in {model_results[section]['wall_time_s']:.0f} s", flush=True)
    return model_results


def headline(results: dict, primary: str) -> dict:
    """Top-level keys for the primary model (SmolLM2 in a full run); every model's values sit under `models`."""
    model = results["models"][primary]
    return {
        "primary_model": primary,
        "generate_ratio": model["generation"]["generate_ratio"],
        "generate_speedup_vs_two_pass": model["generation"]["generate_speedup_vs_two_pass"],
        "train_ratio_vs_floor": model["training"]["train_ratio_vs_floor"],
        "train_speedup_vs_three_pass": model["training"]["train_speedup_vs_three_pass"],
        "peak_rss_ratio": model["memory"]["peak_rss_ratio"],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny Gemma-2-shaped model only (under a minute)")
    parser.add_argument("--json", type=Path, help="results file (default: results/<timestamp>.json + latest.json)")
    parser.add_argument("--plot", type=Path, help="scaling plot (default: results/scaling.png)")
    parser.add_argument("--config", type=Path, default=BENCH_DIR / "default_config.json")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads (default: `torch_threads` of the config, 1; 0 = torch's choice)",
    )
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_worker:
        print(json.dumps(memory_worker(json.loads(args.memory_worker))))
        return 0

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    config = load_config(args.config, args.quick)
    threads = args.threads if args.threads is not None else config.get("torch_threads") or 0
    if threads:
        torch.set_num_threads(threads)
    config["torch_threads"] = torch.get_num_threads()
    mode = "quick" if args.quick else "full"
    started = time.perf_counter()
    timestamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    results = {"mode": mode, "timestamp": timestamp, "machine": machine_info(), "config": config, "models": {}}
    print(f"machine: {results['machine']}", flush=True)
    tokenizer = smollm2_tokenizer()
    names = config["quick_models" if args.quick else "full_models"]
    try:
        for index, name in enumerate(names):
            results["models"][name] = bench_model(name, config["models"][name], config, tokenizer, primary=index == 0)
            gc.collect()
    except GuardError as error:
        print(f"\nABORTED: correctness guard failed, nothing was timed for this path.\n{error}", file=sys.stderr)
        return 1
    results["machine"]["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    results["wall_time_s"] = time.perf_counter() - started
    results = {**headline(results, names[0]), **results}
    results["table"] = render_table(results)
    print("\n" + results["table"])
    print(f"\nwall time {results['wall_time_s']:.0f} s")

    results_dir = BENCH_DIR / "results"
    suffix = "_quick" if args.quick else ""
    plot_path = args.plot or results_dir / f"scaling{suffix}.png"
    plot_scaling({names[0]: results["models"][names[0]]["scaling"]}, plot_path)
    results["plot"] = str(plot_path)
    text = json.dumps(results, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
        print(f"wrote {args.json} and {plot_path}")
    else:
        results_dir.mkdir(parents=True, exist_ok=True)
        (results_dir / f"{timestamp}{suffix}.json").write_text(text)
        (results_dir / f"latest{suffix}.json").write_text(text)
        print(
            f"wrote {results_dir / f'{timestamp}{suffix}.json'}, {results_dir / f'latest{suffix}.json'} and {plot_path}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
