"""3. Memory: peak RSS of one training step over the base's weights, one fresh subprocess per configuration (see
`run.py`)."""

import gc
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from bench_common import build_base, build_hypersteer, smollm2_tokenizer, training_batch, weight_bytes
from schemes import (
    floor_step,
    hypersteer_step,
)
from transformers.utils import logging as hf_logging


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
            [sys.executable, str(Path(__file__).resolve().parent / "run.py"), "--memory-worker", json.dumps(job)],
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
