"""1. Generation: steered / unsteered `generate`, and ours / a naive two-pass implementation (see `run.py`)."""

import statistics
import time

import torch
from bench_common import (
    GuardError,
    build_hypersteer,
    generation_prompts,
    interleaved,
    medians,
    paired_ratio,
    steering_batch,
)
from schemes import (
    call_counter,
    naive_steering_vectors,
    positions_from_mask,
    recorded_output,
    steering_layer,
    two_pass_generate,
)


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
