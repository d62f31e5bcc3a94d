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
import sys
import time
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging


BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
from bench_common import TARGETS, GuardError, build_base, describe, load_config, machine_info, smollm2_tokenizer  # noqa: E402
from bench_generation import bench_generation  # noqa: E402
from bench_memory import bench_memory, memory_worker  # noqa: E402
from bench_training import TrainingPaths, bench_scaling, bench_training, plot_scaling  # noqa: E402


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
