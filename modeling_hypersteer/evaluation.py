"""Steering evaluation: generation for each method, the offline loss metric, AxBench-style reporting and plots.

Methods compared on identical rows:

* `hypersteer`: the HyperSteer model steered by the concept at each factor of a grid;
* `prompt`: the frozen base with the concept put into the prompt by `PROMPT_STEERING_TEMPLATE`, before the instruction
  in the user turn (`prompt_placement="user"`, the default) or as a system turn (`"system"`; folded into the user turn
  when the chat template has no system role, as Gemma-2's has none);
* `none`: the frozen base, unsteered.

The offline metric needs no judge. It is the mean cross-entropy of the concept data's target outputs under each method,
steered by the right concept and, as a control, by a wrong one (`concept_derangement`):

    gain ratio        = (L_none - L_hypersteer) / (L_none - L_prompt)
    specificity ratio = (L_hypersteer,wrong - L_hypersteer) / (L_prompt,wrong - L_prompt)

Training on teacher outputs also teaches a concept-free shift toward the teacher's style, which lowers the loss
whatever the concept; only the specificity ratio separates steering from that shift. A ratio whose denominator is not
positive (prompting did not lower the loss, or a wrong concept did not raise it) measures nothing: it is reported as
undefined, with the reason, never as a number.

Generations are resumable (`generations.jsonl`), but only within one run: every row records a key made of the model's
fingerprint ([`model_fingerprint`]: its config and hypernetwork weights) and the decoding settings, and only rows with
the current key are reused.
"""

import hashlib
import json
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from .data import HyperSteerDataCollator, format_prompt, tokenize_example
from .modeling_hypersteer import HyperSteerModel, per_row_causal_lm_loss, positions_from_mask
from .utils import JsonlAppender, evaluation_mode, pyplot, read_jsonl


logger = logging.get_logger(__name__)

PROMPT_STEERING_TEMPLATE = (
    "Answer the user's request helpfully, and weave the following concept clearly and naturally into your answer: "
    "{concept}."
)
METHODS = ("hypersteer", "prompt", "prompt_hypersteer", "none", "diffmean", "vector")
# Per-concept baselines (see `baselines.py`): they steer with their own vector per concept through the same hook and
# factor grid as HyperSteer, and exist only for concepts with training rows.
BASELINE_METHODS = ("diffmean", "vector")
# `prompt_hypersteer` is both: the prompting baseline's prompt plus HyperSteer's vector of the same concept. On a small
# base a never-trained description's vector alone rarely shows its concept, but on top of a prompt that asks for it,
# it does more often than the prompt alone (docs/concept_steering.md, "On top of a prompt").
HYPERSTEER_METHODS = ("hypersteer", "prompt_hypersteer")
PROMPTED_METHODS = ("prompt", "prompt_hypersteer")
# Methods generated at every factor of the grid; the others at one fixed factor.
FACTOR_METHODS = (*HYPERSTEER_METHODS, *BASELINE_METHODS)
SELECT_SPLIT, TEST_SPLIT = "select", "test"
# Where the prompting baseline writes its steering instruction. The user turn is the default: every chat template has
# one (a Gemma-2 system turn is folded into it exactly so, so both placements are the same prompt there), and small
# chat models largely ignore a system turn: SmolLM2-135M-Instruct showed the concept in 2 of 24 greedy answers with it
# (unsteered: 1) and in 7 of 24 with the user turn, so ratios against the system turn flatter HyperSteer.
PROMPT_PLACEMENTS = ("user", "system")


def prompt_steering_system_prompt(concept: str | Sequence[str]) -> str:
    """The fixed prompt-steering instruction for `concept` (see [`prompt_steering_turns`] for where it goes); several
    concepts (a list) share one instruction, joined by "; "."""
    if not isinstance(concept, str):
        concept = "; ".join(concept)
    return PROMPT_STEERING_TEMPLATE.format(concept=concept)


def check_prompt_placement(placement: str) -> str:
    if placement not in PROMPT_PLACEMENTS:
        raise ValueError(f"Unknown prompt placement {placement!r}; choose from {list(PROMPT_PLACEMENTS)}.")
    return placement


def prompt_steering_turns(
    concept: str | Sequence[str], instruction: str, placement: str = "user"
) -> tuple[str, str | None]:
    """The prompting baseline's `(user turn, system turn)` for `instruction` steered toward `concept`.

    `"user"`: the steering instruction, a blank line, then `instruction`, and no system turn; `"system"`: `instruction`
    alone with the steering instruction as the system turn. Pass both to [`format_prompt`]. Several concepts (a list)
    share one instruction ([`prompt_steering_system_prompt`]).
    """
    steering = prompt_steering_system_prompt(concept)
    if check_prompt_placement(placement) == "user":
        return f"{steering}\n\n{instruction}", None
    return instruction, steering


def concept_derangement(concepts: Iterable[str]) -> dict[str, str]:
    """A fixed derangement: each concept maps to the next one in sorted order (the last to the first).

    Raises:
        `ValueError` with fewer than two distinct concepts, where no wrong concept exists.
    """
    ordered = sorted(set(concepts))
    if len(ordered) < 2:
        raise ValueError(
            f"The wrong-concept control needs at least 2 distinct concepts, got {ordered}; evaluate more concepts."
        )
    return {concept: ordered[(index + 1) % len(ordered)] for index, concept in enumerate(ordered)}


# A denominator this small is a difference of losses within numerical noise: the ratio would be noise too.
_MIN_RATIO_DENOMINATOR = 1e-6


def _ratio(numerator: float, denominator: float, description: str) -> tuple[float | None, str | None]:
    """`(numerator / denominator, None)`, or `(None, reason)` when the denominator is not positive."""
    if not (math.isfinite(numerator) and math.isfinite(denominator)):
        return None, f"a loss is not finite ({description} = {denominator}, numerator {numerator})"
    if denominator <= _MIN_RATIO_DENOMINATOR:
        return None, f"{description} = {denominator:.4g}, not positive"
    return numerator / denominator, None


def steering_ratios(losses: dict[str, float]) -> dict[str, Any]:
    """The gain and specificity ratios of offline losses, each `None` with a reason when it is undefined.

    Args:
        losses (`dict`): mean losses `none`, `prompt`, `hypersteer`, `prompt_wrong` and `hypersteer_wrong`.

    Returns:
        `dict` with `gain_ratio` and `specificity_ratio` (`float` or `None`) and `undefined_ratios`, mapping the name of
        each undefined ratio to why, e.g. `{"gain_ratio": "prompting did not lower the loss (L_none - L_prompt = -0.02,
        not positive)"}`.
    """
    gain, gain_reason = _ratio(
        losses["none"] - losses["hypersteer"], losses["none"] - losses["prompt"], "L_none - L_prompt"
    )
    specificity, specificity_reason = _ratio(
        losses["hypersteer_wrong"] - losses["hypersteer"],
        losses["prompt_wrong"] - losses["prompt"],
        "L_prompt,wrong - L_prompt",
    )
    undefined = {}
    if gain_reason:
        undefined["gain_ratio"] = f"prompting did not lower the loss ({gain_reason})"
    if specificity_reason:
        undefined["specificity_ratio"] = (
            f"prompting with the right concept did not give a lower loss than with a wrong one ({specificity_reason})"
        )
    return {"gain_ratio": gain, "specificity_ratio": specificity, "undefined_ratios": undefined}


def method_losses(losses: dict[str, float], method: str) -> dict[str, float]:
    """`losses` with `method`'s own (`method` and `method_wrong`, e.g. `prompt_hypersteer`) in the `hypersteer` and
    `hypersteer_wrong` places, where [`steering_ratios`] reads the steered method: its ratios against prompting."""
    return {**losses, "hypersteer": losses[method], "hypersteer_wrong": losses[f"{method}_wrong"]}


@torch.no_grad()
def _row_losses(
    model: HyperSteerModel,
    features: list[dict],
    collator: HyperSteerDataCollator,
    steered: bool,
    batch_size: int,
    progress: tqdm,
    vectors: list[torch.Tensor] | None = None,
) -> list[float]:
    losses = []
    device = model.get_input_embeddings().weight.device
    for start in range(0, len(features), batch_size):
        batch = {key: value.to(device) for key, value in collator(features[start : start + batch_size]).items()}
        if vectors is not None:
            # A baseline's own vector per row replaces the hypernetwork's.
            batch.pop("steering_input_ids", None)
            batch.pop("steering_attention_mask", None)
            batch["steering_vectors"] = torch.stack(vectors[start : start + batch_size]).to(device)
        if steered:
            logits = model(**batch).logits
        else:
            logits = model.language_model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                position_ids=positions_from_mask(batch["attention_mask"]),
            ).logits
        losses.extend(per_row_causal_lm_loss(logits, batch["labels"]).tolist())
        progress.update(len(features[start : start + batch_size]))
    return losses


def offline_steering_metric(
    model: HyperSteerModel,
    tokenizer,
    rows: Sequence[dict[str, Any]],
    steering_factor: float = 1.0,
    batch_size: int = 8,
    max_length: int = 512,
    desc: str = "Offline metric",
    concept_vectors: dict[str, torch.Tensor] | None = None,
    reference_row_losses: dict[str, list[float]] | None = None,
    prompt_placement: str = "user",
    prompt_hypersteer: bool = False,
) -> dict[str, Any]:
    """Loss of target outputs under each method, with the right concept and a wrong one.

    Args:
        model ([`HyperSteerModel`]): the trained model; its frozen `language_model` gives `none` and `prompt`.
        tokenizer: the base's tokenizer (with a chat template).
        rows (`Sequence[dict]`): AxBench-schema rows with `input`, `output` and `output_concept`.
        steering_factor (`float`, *optional*, defaults to 1.0): factor of the HyperSteer conditions.
        concept_vectors (`dict[str, torch.Tensor]`, *optional*): one `(hidden_size,)` vector per concept (a
            baseline such as DiffMean); the `hypersteer` conditions are then steered by these vectors instead of the
            hypernetwork's. Every concept of `rows` needs one.
        reference_row_losses (`dict[str, list[float]]`, *optional*): per-row losses of the `none`, `prompt` and
            `prompt_wrong` conditions from an earlier call on the same rows and base (its `row_losses`); they do not
            depend on the hypernetwork, so comparing several models on the same rows pays for them once.
        prompt_placement (`str`, *optional*, defaults to `"user"`): where the `prompt` conditions put the steering
            instruction (see [`prompt_steering_turns`]).
        prompt_hypersteer (`bool`, *optional*, defaults to `False`): also score the `prompt_hypersteer` method, the
            `prompt` conditions plus the hypernetwork's vector of the same concept, and its ratios against
            prompting. Not with `concept_vectors`.

    Returns:
        `dict` with `losses` (`none`, `prompt`, `hypersteer`, `prompt_wrong`, `hypersteer_wrong`, and with
        `prompt_hypersteer` also `prompt_hypersteer` and `prompt_hypersteer_wrong`: means over concepts of per-concept
        mean row losses), `gain_ratio`, `specificity_ratio` (`None` when undefined), `undefined_ratios` (why each
        undefined ratio is undefined, see [`steering_ratios`]), with `prompt_hypersteer` also `prompt_hypersteer` (the
        same three keys for that method), `steering_factor`, `prompt_placement`, `num_rows`, `num_concepts` and
        `per_concept` losses.

    Steering prompts are cut to the model's `config.max_steering_prompt_length` tokens, as `generate` cuts them.
    """
    check_prompt_placement(prompt_placement)
    if prompt_hypersteer and concept_vectors is not None:
        raise ValueError(
            "`prompt_hypersteer` scores the hypernetwork's vectors on top of the prompt; it cannot be combined with a "
            "baseline's `concept_vectors`."
        )
    rows = [dict(row) for row in rows]
    if not rows:
        raise ValueError("The offline metric needs at least one row with `input`, `output` and `output_concept`.")
    wrong = concept_derangement(row["output_concept"] for row in rows)
    steering_length = model.config.max_steering_prompt_length
    if concept_vectors is not None:
        missing = sorted({row["output_concept"] for row in rows} - set(concept_vectors))
        if missing:
            raise ValueError(
                f"`concept_vectors` has no vector for {len(missing)} concept(s) of the rows, e.g. {missing[:3]}; "
                "score a baseline only on the concepts it was built for."
            )
    features = defaultdict(list)
    for row in rows:
        for suffix, concept in (("", row["output_concept"]), ("_wrong", wrong[row["output_concept"]])):
            example = {**row, "output_concept": concept, "steering_factor": steering_factor}
            features[f"hypersteer{suffix}"].append(
                tokenize_example(example, tokenizer, max_length=max_length, max_steering_prompt_length=steering_length)
            )
            user_turn, system_turn = prompt_steering_turns(concept, row["input"], prompt_placement)
            features[f"prompt{suffix}"].append(
                tokenize_example(
                    {**example, "input": user_turn},
                    tokenizer,
                    max_length=max_length,
                    max_steering_prompt_length=steering_length,
                    system_prompt=system_turn,
                )
            )
    features["none"] = features["hypersteer"]
    # Every method is scored on the same rows: a row that does not fit one condition leaves all of them.
    keep = [index for index in range(len(rows)) if all(values[index] is not None for values in features.values())]
    if len(keep) < len(rows):
        logger.warning(
            f"Offline metric: dropped {len(rows) - len(keep)} of {len(rows)} rows whose prompt fills "
            f"max_length={max_length} tokens in some condition; raise `max_length` to keep them."
        )
    if not keep:
        raise ValueError(f"Every row's prompt fills max_length={max_length} tokens; raise `max_length`.")
    rows = [rows[index] for index in keep]
    collator = HyperSteerDataCollator(tokenizer=tokenizer)
    conditions = {
        name: ([values[index] for index in keep], name.startswith("hypersteer")) for name, values in features.items()
    }
    if prompt_hypersteer:
        # The prompt features carry the concept as their steering prompt too: steered, they are prompt + vector.
        for suffix in ("", "_wrong"):
            conditions[f"prompt_hypersteer{suffix}"] = (conditions[f"prompt{suffix}"][0], True)
    row_losses = {}
    for condition, losses in (reference_row_losses or {}).items():
        if condition not in conditions or conditions[condition][1]:
            continue
        if len(losses) != len(rows):
            raise ValueError(
                f"`reference_row_losses[{condition!r}]` has {len(losses)} rows but {len(rows)} rows are scored; pass "
                "the `row_losses` of a call on the same rows."
            )
        row_losses[condition] = list(losses)
    pending = {name: value for name, value in conditions.items() if name not in row_losses}
    # In eval mode whatever mode the caller left the model in: a measurement never moves the running statistics.
    with evaluation_mode(model), tqdm(total=len(rows) * len(pending), desc=desc, unit="row") as progress:
        for condition, (features, steered) in pending.items():
            vectors = None
            if concept_vectors is not None and condition.startswith("hypersteer"):
                concepts = [row["output_concept"] for row in rows]
                if condition.endswith("_wrong"):
                    concepts = [wrong[concept] for concept in concepts]
                vectors = [concept_vectors[concept] for concept in concepts]
            row_losses[condition] = _row_losses(model, features, collator, steered, batch_size, progress, vectors)

    per_concept = defaultdict(lambda: defaultdict(list))
    for index, row in enumerate(rows):
        for condition, losses in row_losses.items():
            per_concept[row["output_concept"]][condition].append(losses[index])
    per_concept = {
        concept: {condition: sum(values) / len(values) for condition, values in conditions_.items()}
        for concept, conditions_ in sorted(per_concept.items())
    }
    losses = {
        condition: sum(concept_losses[condition] for concept_losses in per_concept.values()) / len(per_concept)
        for condition in conditions
    }
    result = {"losses": losses, **steering_ratios(losses)}
    if prompt_hypersteer:
        result["prompt_hypersteer"] = steering_ratios(method_losses(losses, "prompt_hypersteer"))
    return {
        **result,
        "steering_factor": steering_factor,
        "prompt_placement": prompt_placement,
        "num_rows": len(rows),
        "num_concepts": len(per_concept),
        "per_concept": per_concept,
        "row_losses": row_losses,
    }


def generation_tasks(
    instructions_by_concept: dict[str, Sequence[str]],
    num_instructions: int,
    concept_ids: dict[str, int] | None = None,
) -> list[dict[str, Any]]:
    """Pair each concept with up to `num_instructions` instructions, the first half for factor selection and the
    second half for the report (AxBench's protocol).

    Args:
        concept_ids (`dict[str, int]`, *optional*): the data's `concept_id` of each concept, copied into the tasks.

    Returns:
        `list[dict]` with `concept`, `concept_id` (`None` without `concept_ids`), `instruction` and `split`
        (`"select"` or `"test"`).
    """
    concept_ids = concept_ids or {}
    missing = sorted(set(instructions_by_concept) - set(concept_ids)) if concept_ids else []
    if missing:
        raise ValueError(f"`concept_ids` has no id for the concept(s) {missing}.")
    tasks = []
    for concept in sorted(instructions_by_concept):
        chosen = list(dict.fromkeys(instructions_by_concept[concept]))[:num_instructions]
        if len(chosen) < 2:
            raise ValueError(
                f"Concept {concept!r} has {len(chosen)} distinct instruction(s); factor selection and reporting need "
                "at least 2 (one per half)."
            )
        half = len(chosen) // 2
        for index, instruction in enumerate(chosen):
            tasks.append(
                {
                    "concept": concept,
                    "concept_id": concept_ids.get(concept),
                    "instruction": instruction,
                    "split": SELECT_SPLIT if index < half else TEST_SPLIT,
                }
            )
    return tasks


def _sample_key(sample: dict) -> tuple:
    return sample.get("run_key"), sample["method"], sample["concept"], float(sample["factor"]), sample["instruction"]


# Config entries that describe where and how a checkpoint was saved or loaded, not the model itself.
_VOLATILE_CONFIG_KEYS = frozenset(
    {"_name_or_path", "transformers_version", "architectures", "auto_map", "dtype", "torch_dtype", "_commit_hash"}
)


def model_fingerprint(config, hypernetwork_state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a HyperSteer checkpoint: its config (base model name and revision included) and hypernetwork weights.

    Two checkpoints share a fingerprint only if they steer identically; where or how they were saved does not enter.
    Computable from a loaded model (`model.config`, `model.hypernetwork.state_dict()`, keys with or without the
    `hypernetwork.` prefix) and from a saved folder (`config.json`, `model.safetensors`) alike.
    """
    config_dict = config if isinstance(config, dict) else config.to_dict()
    described = {key: value for key, value in config_dict.items() if key not in _VOLATILE_CONFIG_KEYS}
    digest = hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode("utf-8"))
    for name in sorted(hypernetwork_state_dict, key=lambda key: key.removeprefix("hypernetwork.")):
        tensor = hypernetwork_state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name.removeprefix('hypernetwork.')}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def generation_run_key(model: HyperSteerModel, **decoding_settings) -> str:
    """The resume key of generations: the model's fingerprint, its base's dtype and the decoding settings."""
    payload = {
        "model": model_fingerprint(model.config, model.hypernetwork.state_dict()),
        "base_dtype": str(model.language_model.dtype),
        **decoding_settings,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:16]


def vectors_run_key(run_key: str, vectors: dict[str, torch.Tensor]) -> str:
    """`run_key` extended by a hash of a baseline's per-concept vectors."""
    digest = hashlib.sha256(run_key.encode("utf-8"))
    for concept in sorted(vectors):
        digest.update(concept.encode("utf-8"))
        digest.update(vectors[concept].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def generate_samples(
    model: HyperSteerModel,
    tokenizer,
    tasks: Sequence[dict[str, Any]],
    methods: Sequence[str],
    steering_factors: Sequence[float] | Mapping[str, Sequence[float]],
    generations_path: str | os.PathLike | None = None,
    max_new_tokens: int = 128,
    do_sample: bool = True,
    temperature: float = 1.0,
    batch_size: int = 8,
    seed: int = 42,
    concept_vectors: dict[str, dict[str, torch.Tensor]] | None = None,
    prompt_placement: str = "user",
) -> list[dict[str, Any]]:
    """Generate for every task, method and (for the methods of `FACTOR_METHODS`) factor, in batches, with a progress
    bar. `steering_factors` is one grid for every such method, or a grid per method (`{method: factors}`).
    `concept_vectors` maps each baseline method in `methods` to its `{concept: vector}`; `prompt_placement` is where
    `prompt` and `prompt_hypersteer` put the steering instruction ([`prompt_steering_turns`]).

    Each finished generation is appended to `generations_path` at once, so a crashed run loses nothing done and a
    rerun skips what is already there. Rows are reused only when they carry the same `run_key`
    ([`generation_run_key`]: model fingerprint and decoding settings), so evaluating another checkpoint, or the same
    one with other settings, into the same folder never reuses old generations.

    Returns:
        `list[dict]` with `method`, `concept`, `factor`, `instruction`, `split`, `generation`, `run_key` and any other
        key of the tasks (e.g. `concept_id`).
    """
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"Unknown methods {unknown}; choose from {list(METHODS)}.")
    check_prompt_placement(prompt_placement)
    if isinstance(steering_factors, Mapping):
        missing = sorted(set(methods) & set(FACTOR_METHODS) - set(steering_factors))
        if missing:
            raise ValueError(f"`steering_factors` has no grid for {missing}; give one per steered method.")
    concept_vectors = concept_vectors or {}
    for method in set(methods) & set(BASELINE_METHODS):
        missing = sorted({task["concept"] for task in tasks} - set(concept_vectors.get(method, {})))
        if missing:
            raise ValueError(
                f"Method {method!r} has no vector for {len(missing)} concept(s), e.g. {missing[:3]}: baselines exist "
                "only for concepts with training rows (evaluate them with --concepts heldin)."
            )
    done = {}
    run_key = None
    run_keys = {}
    if generations_path:
        run_key = generation_run_key(
            model,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature if do_sample else None,
            seed=seed if do_sample else None,
            batch_size=batch_size if do_sample else None,
            prompt_placement=prompt_placement,
        )
        # A baseline's generations also depend on its vectors.
        run_keys = {
            method: vectors_run_key(run_key, concept_vectors[method]) if method in BASELINE_METHODS else run_key
            for method in methods
        }
        previous = []
        if Path(generations_path).is_file():
            previous = read_jsonl(generations_path, allow_truncated_last_line=True)
        done = {
            _sample_key(sample): sample
            for sample in previous
            if sample.get("run_key") is not None and sample.get("run_key") == run_keys.get(sample.get("method"))
        }
        if len(done) < len(previous):
            logger.warning(
                f"{len(previous) - len(done)} generation(s) in {generations_path} come from another model or other "
                "decoding settings; they are not reused."
            )

    def factors_of(method: str) -> Sequence[float]:
        if method not in FACTOR_METHODS:
            return [1.0 if method == "prompt" else 0.0]
        return steering_factors[method] if isinstance(steering_factors, Mapping) else steering_factors

    all_jobs = [
        {"method": method, "factor": float(factor), "run_key": run_keys.get(method), **task}
        for method in methods
        for factor in factors_of(method)
        for task in tasks
    ]
    jobs = [job for job in all_jobs if _sample_key(job) not in done]
    device = model.get_input_embeddings().weight.device
    handle = JsonlAppender(generations_path) if generations_path else None
    try:
        with evaluation_mode(model), tqdm(total=len(jobs), desc="Generating", unit="generation") as progress:
            groups = defaultdict(list)
            for job in jobs:
                groups[(job["method"], job["factor"])].append(job)
            for (method, factor), group in groups.items():
                for start in range(0, len(group), batch_size):
                    batch = group[start : start + batch_size]
                    prompts = [
                        format_prompt(
                            tokenizer,
                            *(
                                prompt_steering_turns(job["concept"], job["instruction"], prompt_placement)
                                if method in PROMPTED_METHODS
                                else (job["instruction"], None)
                            ),
                        )
                        for job in batch
                    ]
                    encoding = tokenizer(
                        prompts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt"
                    ).to(device)
                    generation_kwargs = {
                        "max_new_tokens": max_new_tokens,
                        "do_sample": do_sample,
                        "pad_token_id": tokenizer.pad_token_id,
                    }
                    if do_sample:
                        generation_kwargs["temperature"] = temperature
                        torch.manual_seed(seed + start)
                    if method in HYPERSTEER_METHODS:
                        output_ids = model.generate(
                            **encoding,
                            steering_prompt=[job["concept"] for job in batch],
                            steering_factor=factor,
                            **generation_kwargs,
                        )
                    elif method in BASELINE_METHODS:
                        vectors = torch.stack([concept_vectors[method][job["concept"]] for job in batch])
                        output_ids = model.generate(
                            **encoding,
                            steering_vectors=vectors.to(device),
                            steering_factor=factor,
                            **generation_kwargs,
                        )
                    else:
                        output_ids = model.language_model.generate(**encoding, **generation_kwargs)
                    texts = tokenizer.batch_decode(
                        output_ids[:, encoding["input_ids"].shape[1] :], skip_special_tokens=True
                    )
                    for job, text in zip(batch, texts):
                        sample = {**job, "generation": text.strip()}
                        done[_sample_key(sample)] = sample
                        if handle is not None:
                            handle.write(sample)
                    progress.update(len(batch))
    finally:
        if handle is not None:
            handle.close()
    return [done[_sample_key(job)] for job in all_jobs]


def plot_factor_sweep(samples: Sequence[dict], path: str | os.PathLike) -> Path:
    """Mean judged score against steering factor per method (methods without a factor grid as flat lines)."""
    plt = pyplot()
    scores = defaultdict(lambda: defaultdict(list))
    for sample in samples:
        if sample.get("judge_status") == "ok" and sample.get("score") is not None:
            scores[sample["method"]][float(sample["factor"])].append(sample["score"])
    figure, axis = plt.subplots(figsize=(6.5, 4))
    all_factors = sorted({factor for by_factor in scores.values() for factor in by_factor})
    for method, by_factor in sorted(scores.items()):
        factors = sorted(by_factor)
        means = [sum(by_factor[f]) / len(by_factor[f]) for f in factors]
        if len(factors) == 1 and len(all_factors) > 1:
            axis.hlines(means[0], all_factors[0], all_factors[-1], linestyles="--", label=method)
        else:
            axis.plot(factors, means, marker="o", label=method)
    axis.set_xlabel("steering factor")
    axis.set_ylabel("judge score (harmonic mean, 0-2)")
    axis.set_title("Score vs steering factor")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)


def plot_ratings(summary: dict, path: str | os.PathLike) -> Path:
    """The three judge ratings per method at each concept's selected factor (test half)."""
    plt = pyplot()
    methods = sorted(summary.get("methods", {}))
    ratings = ("concept_score", "instruction_score", "fluency_score")
    figure, axis = plt.subplots(figsize=(6.5, 4))
    width = 0.8 / len(ratings)
    for offset, rating in enumerate(ratings):
        values = [summary["methods"][m].get(rating) or 0.0 for m in methods]
        axis.bar(
            [i + offset * width for i in range(len(methods))], values, width=width, label=rating.replace("_", " ")
        )
    axis.set_xticks([i + width for i in range(len(methods))], methods)
    axis.set_ylim(0, 2)
    axis.set_ylabel("mean rating (0-2), test half")
    axis.set_title("Judge ratings per method")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)


def plot_offline_losses(offline: dict[str, dict], path: str | os.PathLike) -> Path:
    """Grouped bars of the offline losses per evaluated concept set (e.g. held-in and held-out)."""
    plt = pyplot()
    conditions = ("none", "prompt", "hypersteer", "prompt_wrong", "hypersteer_wrong")
    names = sorted(offline)
    figure, axis = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(conditions)
    for offset, condition in enumerate(conditions):
        values = [offline[name]["losses"][condition] for name in names]
        axis.bar([i + offset * width for i in range(len(names))], values, width=width, label=condition)
    axis.set_xticks([i + 2 * width for i in range(len(names))], names)
    axis.set_ylabel("mean target-output loss")
    axis.set_title("Offline metric: lower is better; wrong-concept bars are the control")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)


def _format(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def _ratio_cell(result: dict, name: str) -> str:
    reason = (result.get("undefined_ratios") or {}).get(name)
    return f"undefined: {reason}" if reason else _format(result.get(name))


def summary_markdown(summary: dict) -> str:
    """A Markdown report of an evaluation summary (`evaluation_summary.json`)."""
    lines = ["# Steering evaluation", ""]
    methods = summary.get("methods") or {}
    if methods:
        lines += [
            "Judged (AxBench protocol: factor chosen per concept on the select half, reported on the test half; every "
            "method over the same concepts).",
            "",
            "| method | score | concept | instruction | fluency | concepts | failed judgements |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, result in sorted(methods.items()):
            lines.append(
                f"| {name} | {_format(result.get('score'))} | {_format(result.get('concept_score'))} | "
                f"{_format(result.get('instruction_score'))} | {_format(result.get('fluency_score'))} | "
                f"{result.get('num_concepts', 0)} | {result.get('failed_judgements', 0)} |"
            )
        lines.append("")
        excluded = summary.get("excluded_concepts") or {}
        if excluded:
            lines += [f"Excluded from every method ({len(excluded)} concept(s)):", ""]
            lines += [f"- {concept}: {'; '.join(reasons)}" for concept, reasons in sorted(excluded.items())]
            lines.append("")
    elif summary.get("judge") is None:
        if summary.get("text_metric"):
            lines += [
                "No judge endpoint was configured: the offline metric and the judge-free text metric were run.",
                "",
            ]
        else:
            lines += ["No judge endpoint was configured: only the offline metric was run.", ""]
    offline = summary.get("offline") or {}
    if offline:
        lines += [
            "Offline metric (mean loss of target outputs; `_wrong` = steered by a wrong concept).",
            "",
            "| concepts | rows | none | prompt | hypersteer | prompt_wrong | hypersteer_wrong | gain ratio | specificity ratio |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, result in sorted(offline.items()):
            losses = result["losses"]
            lines.append(
                f"| {name} | {result['num_rows']} | {_format(losses['none'])} | {_format(losses['prompt'])} | "
                f"{_format(losses['hypersteer'])} | {_format(losses['prompt_wrong'])} | "
                f"{_format(losses['hypersteer_wrong'])} | {_ratio_cell(result, 'gain_ratio')} | "
                f"{_ratio_cell(result, 'specificity_ratio')} |"
            )
        lines.append("")
        prompted = {name: result for name, result in offline.items() if "prompt_hypersteer" in result}
        if prompted:
            lines += [
                "On top of the prompt (`prompt_hypersteer`: the prompt conditions plus the vector of the same concept; "
                "ratios against prompting).",
                "",
                "| concepts | prompt_hypersteer | prompt_hypersteer_wrong | gain ratio | specificity ratio |",
                "|---|---|---|---|---|",
            ]
            for name, result in sorted(prompted.items()):
                losses, ratios = result["losses"], result["prompt_hypersteer"]
                lines.append(
                    f"| {name} | {_format(losses['prompt_hypersteer'])} | "
                    f"{_format(losses['prompt_hypersteer_wrong'])} | {_ratio_cell(ratios, 'gain_ratio')} | "
                    f"{_ratio_cell(ratios, 'specificity_ratio')} |"
                )
            lines.append("")
    if summary.get("text_metric"):
        # Imported here: text_metric builds on this module.
        from .text_metric import text_metric_markdown

        lines.append(text_metric_markdown(summary["text_metric"]))
    return "\n".join(lines)


def side_by_side(
    model: HyperSteerModel,
    tokenizer,
    pairs: Sequence[tuple[str, str]],
    steering_factor: float = 1.0,
    max_new_tokens: int = 64,
    prompted_steering_factor: float | None = None,
) -> list[dict[str, str]]:
    """Greedy unsteered, prompt-steered and HyperSteer generations for `(concept, instruction)` pairs, and with
    `prompted_steering_factor` also the prompt-steered prompt plus HyperSteer's vector at that factor.

    Returns:
        `list[dict]` with `concept`, `instruction`, `none`, `prompt`, `hypersteer` and, with
        `prompted_steering_factor`, `prompt_hypersteer`.
    """
    tasks = [{"concept": concept, "instruction": instruction, "split": TEST_SPLIT} for concept, instruction in pairs]
    settings = {"max_new_tokens": max_new_tokens, "do_sample": False, "batch_size": len(tasks)}
    samples = generate_samples(
        model, tokenizer, tasks, ("none", "prompt", "hypersteer"), [steering_factor], **settings
    )
    if prompted_steering_factor is not None:
        samples += generate_samples(
            model, tokenizer, tasks, ("prompt_hypersteer",), [prompted_steering_factor], **settings
        )
    rows = {(task["concept"], task["instruction"]): dict(task) for task in tasks}
    for sample in samples:
        rows[(sample["concept"], sample["instruction"])][sample["method"]] = sample["generation"]
    return [rows[(concept, instruction)] for concept, instruction in pairs]


__all__ = [
    "PROMPT_STEERING_TEMPLATE",
    "METHODS",
    "FACTOR_METHODS",
    "PROMPT_PLACEMENTS",
    "prompt_steering_turns",
    "concept_derangement",
    "offline_steering_metric",
    "generation_tasks",
    "generate_samples",
    "plot_factor_sweep",
    "plot_ratings",
    "plot_offline_losses",
    "summary_markdown",
    "side_by_side",
    "steering_ratios",
    "method_losses",
    "model_fingerprint",
    "generation_run_key",
]
