"""2. Training step and 4. scaling: ours / a frozen-base floor and / a three-pass scheme, over hypernetwork depths
(see `run.py`)."""

from pathlib import Path

import torch
from bench_common import GuardError, build_hypersteer, interleaved, medians, paired_ratio, training_batch
from schemes import (
    call_counter,
    floor_step,
    hypersteer_step,
    three_pass_step,
)

from modeling_hypersteer import HyperSteerModel


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
