"""Load test of `hypersteer-serve` on loopback: throughput and latency with 1, 4 and 8 concurrent clients.

    OMP_NUM_THREADS=1 python benchmarks/serve_load.py                 # SmolLM2-135M-Instruct, ~3-6 min on 2 cores
    python benchmarks/serve_load.py --max_tokens 16 --clients 1,8 --json /tmp/serve.json   # a quicker look

A cross-attention HyperSteer is built on the real SmolLM2-135M-Instruct (steering layer 20 of 30, 4 blocks copied
from the base) with its zero-initialised output projection replaced by a seeded random one, so steering really changes
the generations (an untrained model would steer by exactly zero). It is saved to a temporary folder and served twice
as a real `python -m modeling_hypersteer.serve` subprocess on 127.0.0.1: batched (`--max_batch_size 8`) and one
request at a time (`--max_batch_size 1`). Closed-loop clients (official `openai` client, one thread each) send
non-streaming greedy requests back to back, each with the next instruction and, when steered, the next of several
steering prompts, so concurrent requests carry different concepts.

Each (server, clients) cell runs unsteered, steered, steered, unsteered (ABBA), so a drift in machine load hits both
sides alike; tokens/s is completion tokens (from `usage`) over the wall time of a phase, latency is per request.
Everything is bounded: a fixed request count per phase, a per-request timeout and an overall deadline.
Writes `benchmarks/results/serve_load.json` (or `--json`) and prints the markdown table used in the READMEs.
"""

import argparse
import datetime
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import openai
import torch
from bench_common import machine_info
from transformers import AutoModelForCausalLM, AutoTokenizer

from modeling_hypersteer import HyperSteerModel
from modeling_hypersteer.smollm2 import smollm2_path


REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSON = REPO_ROOT / "benchmarks" / "results" / "serve_load.json"
INSTRUCTIONS = (
    "Describe your ideal weekend in two sentences.",
    "What makes someone a good friend?",
    "Give me a tip for staying focused while studying.",
    "Why do people enjoy travelling?",
    "Explain how a bicycle works.",
    "Write a short note thanking a colleague.",
    "What should I cook for dinner tonight?",
    "How do plants grow?",
)
STEERING_PROMPTS = (
    "references to oceans, tides and marine life",
    "terms related to baking bread and pastry",
    "SQL queries with SELECT, FROM and WHERE clauses",
    "references to legal terminology",
    "mentions of trains, railways and stations",
)
TARGETS = {"steered_over_unsteered_8_clients": 0.9, "batched_over_one_at_a_time_8_clients": 2.0}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="1,4,8", help="Comma-separated numbers of concurrent clients.")
    parser.add_argument("--max_tokens", type=int, default=16, help="`max_tokens` of every request.")
    parser.add_argument("--requests", type=int, default=4, help="Requests per phase (at least one per client).")
    parser.add_argument("--batch_window_ms", type=float, default=10.0, help="Batching window of the batched server.")
    parser.add_argument("--max_batch_size", type=int, default=8, help="`--max_batch_size` of the batched server.")
    parser.add_argument("--steering_factor", type=float, default=1.0, help="Factor of steered requests.")
    parser.add_argument(
        "--deadline_s",
        type=float,
        default=420,
        help="Start no new phase after this many seconds (the rest is skipped).",
    )
    parser.add_argument("--json", default=str(DEFAULT_JSON), help="Where to write the results.")
    return parser


def build_model(directory: Path) -> Path:
    """Save a SmolLM2 HyperSteer whose output projection is a seeded random matrix (so steering is visible)."""
    base_dir = smollm2_path()
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = HyperSteerModel.from_base_model(
        base,
        tokenizer=tokenizer,
        steering_layer=20,
        hypernet_type="cross_attention",
        hypernet_num_layers=4,
        base_model_name_or_path=base_dir,
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        weight = model.hypernetwork.output_projection.weight
        weight.copy_(torch.randn(weight.shape, generator=generator) * 0.02)
    model.save_pretrained(directory)
    return directory


class Server:
    """The real server as a subprocess on a free loopback port."""

    def __init__(self, model_dir: Path, log_path: Path, **flags):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        argv = [sys.executable, "-m", "modeling_hypersteer.serve", str(model_dir), "--port", str(self.port)]
        argv += ["--log_level", "warning"]
        for key, value in flags.items():
            argv += [f"--{key}", str(value)]
        self.log = open(log_path, "w")
        # The clients send no key, so a key set in this shell for a real deployment must not reach the server.
        env = {name: value for name, value in os.environ.items() if name != "HYPERSTEER_API_KEY"}
        self.process = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{self.port}/v1", api_key="unused", max_retries=0, timeout=300
        )
        deadline = time.monotonic() + 180
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"The server exited early; see {log_path}.")
            try:
                self.model_id = self.client.models.list().data[0].id
                return
            except openai.APIConnectionError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"The server did not start within 180 s; see {log_path}.") from None
                time.sleep(0.3)

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def run_phase(server: Server, num_clients: int, num_requests: int, steered: bool, args) -> dict:
    """`num_requests` requests from `num_clients` closed-loop clients; returns tokens/s and latency percentiles."""
    counter = iter(range(num_requests))
    lock = threading.Lock()
    latencies, tokens, errors = [], [], []

    def client_loop():
        while True:
            with lock:
                index = next(counter, None)
            if index is None:
                return
            steering = None
            if steered:
                steering = {"prompt": STEERING_PROMPTS[index % len(STEERING_PROMPTS)], "factor": args.steering_factor}
            start = time.perf_counter()
            try:
                completion = server.client.chat.completions.create(
                    model=server.model_id,
                    messages=[{"role": "user", "content": INSTRUCTIONS[index % len(INSTRUCTIONS)]}],
                    max_tokens=args.max_tokens,
                    temperature=0,
                    extra_body={"steering": steering} if steering else None,
                )
            except openai.OpenAIError as error:
                errors.append(repr(error))
                return
            with lock:
                latencies.append(time.perf_counter() - start)
                tokens.append(completion.usage.completion_tokens)

    threads = [threading.Thread(target=client_loop) for _ in range(num_clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    return {"requests": len(latencies), "completion_tokens": sum(tokens), "wall_s": wall, "latencies_s": latencies}


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def summarise(phases: list[dict]) -> dict:
    latencies = [value for phase in phases for value in phase["latencies_s"]]
    wall = sum(phase["wall_s"] for phase in phases)
    completion_tokens = sum(phase["completion_tokens"] for phase in phases)
    return {
        "requests": sum(phase["requests"] for phase in phases),
        "completion_tokens": completion_tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(completion_tokens / wall, 2),
        "p50_latency_s": round(percentile(latencies, 0.5), 3),
        "p95_latency_s": round(percentile(latencies, 0.95), 3),
    }


def table(results: dict, clients: list[int]) -> str:
    lines = [
        "| server | clients | unsteered tok/s | steered tok/s | steered ÷ unsteered | p50 / p95 latency unsteered (s) "
        "| p50 / p95 latency steered (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode in ("batched", "one_at_a_time"):
        for num_clients in clients:
            cell = results[mode].get(str(num_clients))
            if cell is None:
                lines.append(f"| {mode.replace('_', ' ')} | {num_clients} | skipped (deadline) | | | | |")
                continue
            unsteered, steered = cell["unsteered"], cell["steered"]
            lines.append(
                f"| {mode.replace('_', ' ')} | {num_clients} | {unsteered['tokens_per_s']:.1f} | "
                f"{steered['tokens_per_s']:.1f} | {steered['tokens_per_s'] / unsteered['tokens_per_s']:.2f} | "
                f"{unsteered['p50_latency_s']:.2f} / {unsteered['p95_latency_s']:.2f} | "
                f"{steered['p50_latency_s']:.2f} / {steered['p95_latency_s']:.2f} |"
            )
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = make_parser().parse_args(argv)
    clients = [int(value) for value in args.clients.split(",")]
    started = time.monotonic()
    results = {"batched": {}, "one_at_a_time": {}}
    skipped = []
    with tempfile.TemporaryDirectory() as workdir:
        model_dir = build_model(Path(workdir) / "hypersteer")
        servers = {}
        try:
            for mode, batch_size in (("batched", args.max_batch_size), ("one_at_a_time", 1)):
                servers[mode] = Server(
                    model_dir,
                    Path(workdir) / f"{mode}.log",
                    max_batch_size=batch_size,
                    batch_window_ms=args.batch_window_ms,
                )
                # Warm-up (not timed): one steered and one unsteered request.
                run_phase(servers[mode], 1, 1, True, args)
                run_phase(servers[mode], 1, 1, False, args)
            # The most clients first, both servers in turn: the ratios the targets are about come from them.
            for num_clients in sorted(clients, reverse=True):
                num_requests = max(args.requests, num_clients)
                for mode, server in servers.items():
                    phases = {"unsteered": [], "steered": []}
                    for steered in (False, True, True, False):
                        if time.monotonic() - started > args.deadline_s:
                            break
                        phases["steered" if steered else "unsteered"].append(
                            run_phase(server, num_clients, num_requests, steered, args)
                        )
                    if not all(len(value) == 2 for value in phases.values()):
                        skipped.append(f"{mode} x{num_clients}")
                        print(f"Deadline of {args.deadline_s} s reached: skipping {mode} x{num_clients}.", flush=True)
                        continue
                    results[mode][str(num_clients)] = {name: summarise(value) for name, value in phases.items()}
                    print(f"{mode} x{num_clients}: {results[mode][str(num_clients)]}", flush=True)
        finally:
            for server in servers.values():
                server.stop()
    top = str(max(clients))
    ratios = {}
    batched, sequential = results["batched"].get(top), results["one_at_a_time"].get(top)
    if batched:
        ratios[f"steered_over_unsteered_{top}_clients"] = round(
            batched["steered"]["tokens_per_s"] / batched["unsteered"]["tokens_per_s"], 3
        )
    if batched and sequential:
        for side, suffix in (("steered", ""), ("unsteered", "_unsteered")):
            ratios[f"batched_over_one_at_a_time_{top}_clients{suffix}"] = round(
                batched[side]["tokens_per_s"] / sequential[side]["tokens_per_s"], 3
            )
    markdown = table(results, clients)
    report = {
        "command": "OMP_NUM_THREADS=1 python benchmarks/serve_load.py " + " ".join(argv or sys.argv[1:]),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "settings": {key: value for key, value in vars(args).items() if key != "json"},
        "model": "SmolLM2-135M-Instruct, cross_attention HyperSteer, steering layer 20, 4 blocks, random head",
        "ratios": ratios,
        "skipped_after_deadline": skipped,
        "targets": TARGETS,
        "results": results,
        "table": markdown,
        "wall_time_s": round(time.monotonic() - started, 1),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(markdown)
    print(json.dumps(ratios, indent=2))
    return report


if __name__ == "__main__":
    main()
