"""Model cards and Hub uploads for HyperSteer checkpoints.

The card is rendered from the `string.Template` file `modeling_hypersteer/model_cards/hypersteer.md`, which ships
inside the package. It reports only numbers that were recorded: the training summary and concept split written by
`train_hypersteer.py`, and an evaluation summary when one exists. Anything missing is shown as "not measured".

>>> from modeling_hypersteer.model_card import push_to_hub, render_model_card, write_model_card
>>> print(render_model_card(model, repo_id="me/hypersteer-gemma2-2b-l20"))     # the card as a string
>>> write_model_card("outputs/run", model)                                    # README.md next to the weights
>>> push_to_hub(model, "me/hypersteer-gemma2-2b-l20", output_dir="outputs/run")  # save + card + upload

This module is library code. It is not remote code, so `modeling_hypersteer.py` never imports it.
"""

import contextlib
import json
import math
import numbers
import os
import string
import tempfile
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo, HfApi, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers.utils import logging

from . import __version__
from .evaluation import prompt_steering_system_prompt
from .utils import CONCEPT_SPLIT_FILE, EVALUATION_SUMMARY_FILE, TRAINING_SUMMARY_FILE


logger = logging.get_logger(__name__)

TEMPLATE_PACKAGE = "modeling_hypersteer"
TEMPLATE_RESOURCE = ("model_cards", "hypersteer.md")
MODEL_CARD_NAME = "README.md"
TAGS = ("hypersteer", "steering", "activation-steering")
DEFAULT_LICENSE = "apache-2.0"
# Upload filter shared with `Trainer.push_to_hub`: private files and intermediate checkpoints stay local.
UPLOAD_IGNORE_PATTERNS = ("_*", "checkpoint-*")
MAX_LISTED_CONCEPTS = 10
MAX_LISTED_METRICS = 40

_VARIANTS = {
    "cross_attention": (
        "the steering prompt cross-attends to the base's residual stream at the steering layer over the user's "
        "prompt (the paper's best variant)"
    ),
    "in_context": "the hypernetwork reads the steering prompt followed by the user's prompt as one text",
    "no_context": "the hypernetwork reads only the steering prompt, so `v` does not depend on the user's prompt",
}
_INITS = {
    "base": "copied from the base model's first {n} decoder layers",
    "random": "random (blocks with the base architecture, trained from scratch)",
}
_POSITIONS = {
    "all": "every position (prompt and generated tokens)",
    "prompt": "prompt positions only",
    "generated": "generated tokens only",
}
_JUDGE_COLUMNS = (
    ("score", "score"),
    ("concept_score", "concept"),
    ("instruction_score", "instruction"),
    ("fluency_score", "fluency"),
    ("num_concepts", "concepts"),
    ("failed_judgements", "failed judgements"),
)
_LICENSE_NAMES = {"apache-2.0": "Apache-2.0", "mit": "MIT"}
# Per-concept detail is kept in the summary file; the card lists aggregates only.
_SKIPPED_METRIC_KEYS = {"per_concept", "best_factors", "rank_fingerprints"}
# Parts of `evaluation_summary.json` (from `evaluate_steering.py`) that get their own section or are not results.
_STRUCTURED_EVALUATION_KEYS = {
    "methods",
    "judge",
    "judge_model",
    "offline",
    "excluded_concepts",
    "config",
    "model_config",
    "meta_info",
    "concepts",
    "offline_rows",
    "model",
    "model_fingerprint",
    "text_metric",
}


# ---------------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------------


def render_model_card(
    model_or_config,
    *,
    repo_id: str | None = None,
    training_summary: Mapping[str, Any] | None = None,
    concept_split: Mapping[str, Any] | None = None,
    evaluation_summary: Mapping[str, Any] | None = None,
    dataset_names: Sequence[str] | None = None,
    num_parameters: int | None = None,
    model_name: str | None = None,
    base_model: str | None = None,
    license: str = DEFAULT_LICENSE,
    language: str | list[str] | None = None,
    tags: str | Sequence[str] | None = None,
) -> str:
    """Renders the model card (YAML front matter + Markdown) of a HyperSteer checkpoint.

    Args:
        model_or_config: a [`HyperSteerModel`] (the hypernetwork's parameters are counted from it) or its
            [`HyperSteerConfig`] (pass `num_parameters`, or use [`write_model_card`], which counts the saved weights).
        repo_id (`str`, *optional*): the Hub repository, used in the title and the usage snippet.
        training_summary (`dict`, *optional*): `training_summary.json` from `train_hypersteer.py`, i.e.
            `{"metrics": {"train_loss", "eval_heldin_loss", "eval_heldout_loss", ...}, "sources": [...], ...}`.
        concept_split (`dict`, *optional*): `concept_split.json`, i.e. `{"heldin_concepts", "heldout_concepts",
            "sources", "seed"}`.
        evaluation_summary (`dict`, *optional*): `evaluation_summary.json` from `evaluate_steering.py`. Its
            `"methods"` (the format of [`~modeling_hypersteer.judge.select_and_report`]) are shown as a judge table,
            with `"judge"` → `"model"` (or `"judge_model"`) naming the judge and `"excluded_concepts"` listed under
            it; its `"offline"` results as a table of gain and specificity ratios per concept set (an undefined ratio
            with its reason). Any other top-level numeric entry is listed under its dotted key. Without judge
            results the card says the model was evaluated offline only.
        dataset_names (`list[str]`, *optional*): training data sources; defaults to the sources recorded in the
            training summary or concept split. Those that are Hub dataset ids also go into the `datasets:` metadata.
        num_parameters (`int`, *optional*): parameter count of the hypernetwork, when not given a model.
        model_name (`str`, *optional*): the card title; defaults to the repository name.
        base_model (`str`, *optional*): Hub id of the base model for the metadata and links; defaults to
            `config.base_model_name_or_path`. Give it when the config names a local copy of a Hub model.
        license (`str`, *optional*, defaults to `"apache-2.0"`): licence of the hypernetwork weights and code.
        language, tags (*optional*): extra metadata; `tags` are added to the HyperSteer tags.

    Returns:
        `str`: the card, ready to be written as `README.md`.
    """
    config = _hypersteer_config(model_or_config)
    if num_parameters is None and hasattr(model_or_config, "hypernetwork"):
        num_parameters = sum(parameter.numel() for parameter in model_or_config.hypernetwork.parameters())
    training_summary = dict(training_summary or {})
    concept_split = dict(concept_split or {})
    evaluation_summary = dict(evaluation_summary or {})

    base_name = base_model or config.base_model_name_or_path
    base_is_hub_id = _is_hub_id(base_name)
    sources = list(dataset_names or training_summary.get("sources") or concept_split.get("sources") or [])
    hub_datasets = [source for source in sources if _is_hub_id(source)]

    extra_tags = [tags] if isinstance(tags, str) else list(tags or [])
    card_data = ModelCardData(
        language=language,
        license=license,
        library_name="transformers",
        tags=list(dict.fromkeys([*TAGS, *extra_tags])),
        base_model=base_name if base_is_hub_id else None,
        base_model_relation="adapter" if base_is_hub_id else None,
        datasets=hub_datasets or None,
        pipeline_tag="text-generation",
    )
    title = model_name or (repo_id.split("/")[-1] if repo_id else None) or _default_title(base_name)
    values = {
        "front_matter": card_data.to_yaml(),
        "title": title,
        "base_model_md": _base_model_markdown(base_name, base_is_hub_id),
        "base_model_warning": _base_model_warning(
            config.base_model_name_or_path, base_name if base_is_hub_id else None
        ),
        "steering_layer": str(config.steering_layer),
        "num_parameters_md": _parameter_count_markdown(num_parameters),
        "model_details_table": _model_details_table(config, base_name, base_is_hub_id, num_parameters),
        "training_data_md": _training_data_markdown(sources, concept_split, training_summary),
        "evaluation_md": _evaluation_markdown(training_summary, evaluation_summary),
        "repo_id": repo_id or "path/to/this/checkpoint",
        "default_steering_factor": _format_factor(config.default_steering_factor),
        "default_factor_origin": _default_factor_origin(config, training_summary),
        "prompted_use_md": _prompted_use_markdown(config),
        "extra_limitations": _extra_limitations(evaluation_summary),
        "license_name": _LICENSE_NAMES.get(license, license),
    }
    return string.Template(_read_template()).substitute(values)


def write_model_card(
    output_dir: str | os.PathLike,
    model_or_config,
    *,
    repo_id: str | None = None,
    training_summary: Mapping[str, Any] | None = None,
    concept_split: Mapping[str, Any] | None = None,
    evaluation_summary: Mapping[str, Any] | None = None,
    **render_kwargs,
) -> Path:
    """Renders the card and writes it to `output_dir/README.md`, replacing any card there.

    Summaries not passed are read from `output_dir` when present: `training_summary.json`, the concept split it
    names (default `concept_split.json`) and `evaluation_summary.json` (which `evaluate_steering.py` writes into the
    evaluated checkpoint's folder). An evaluation summary whose `model_fingerprint` belongs to other weights (e.g. a
    folder retrained after it was evaluated) is left out with a warning. Given a config instead of a model, the
    hypernetwork's parameters are counted from `output_dir/model.safetensors`.

    Returns:
        `Path` of the written card.
    """
    output_dir = Path(output_dir)
    if training_summary is None:
        training_summary = _read_json(output_dir / TRAINING_SUMMARY_FILE)
    if concept_split is None:
        split_file = (training_summary or {}).get("concept_split")
        concept_split = _read_json(output_dir / (split_file if isinstance(split_file, str) else CONCEPT_SPLIT_FILE))
    if evaluation_summary is None:
        evaluation_summary = _read_json(output_dir / EVALUATION_SUMMARY_FILE)
        if evaluation_summary is not None and not _evaluated_this_model(
            evaluation_summary, model_or_config, output_dir
        ):
            evaluation_summary = None
    if render_kwargs.get("num_parameters") is None and not hasattr(model_or_config, "hypernetwork"):
        render_kwargs["num_parameters"] = _count_saved_parameters(output_dir / "model.safetensors")
    card = render_model_card(
        model_or_config,
        repo_id=repo_id,
        training_summary=training_summary,
        concept_split=concept_split,
        evaluation_summary=evaluation_summary,
        **render_kwargs,
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / MODEL_CARD_NAME
    path.write_text(card, encoding="utf-8")
    return path


def push_to_hub(
    model,
    repo_id: str,
    *,
    output_dir: str | os.PathLike | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload HyperSteer hypernetwork",
    **card_kwargs,
) -> CommitInfo:
    """Saves a [`HyperSteerModel`] with its model card and uploads the folder to the Hub.

    The uploaded folder holds what `model.save_pretrained` writes (`config.json` with `auto_map`, `model.safetensors`
    with the hypernetwork weights only, the generation config, the tokenizer and the two remote-code files) and
    `README.md`, plus any training records already in `output_dir` (e.g. `training_summary.json`,
    `concept_split.json`). Files starting with `_` and `checkpoint-*` folders are not uploaded.

    Args:
        model ([`HyperSteerModel`]): the model to upload.
        repo_id (`str`): the target repository, e.g. `"me/hypersteer-gemma2-2b-l20"`. It is created if needed.
        output_dir (`str`, *optional*): folder to save into and upload (e.g. the training `output_dir`, whose
            summaries then go into the card). Defaults to a temporary folder.
        private (`bool`, *optional*): visibility of a newly created repository.
        token (`str`, *optional*): Hub token; defaults to the locally saved one.
        revision (`str`, *optional*): branch to commit to.
        commit_message (`str`, *optional*): the commit message.
        card_kwargs: passed to [`render_model_card`] (e.g. `evaluation_summary=`, `dataset_names=`, `base_model=`).

    Returns:
        [`huggingface_hub.CommitInfo`]: the commit; `str(info)` and `info.commit_url` are its URL.
    """
    if not hasattr(model, "hypernetwork") or not hasattr(model, "save_pretrained"):
        raise TypeError(f"push_to_hub uploads a HyperSteerModel, got {type(model).__name__}.")
    base_name = model.config.base_model_name_or_path
    if not _is_hub_id(base_name):
        logger.warning(
            f"The config names the base model {base_name!r}, which is not a Hub id: loading {repo_id!r} elsewhere "
            "will need `HyperSteerModel.from_pretrained(repo, base_model=...)`. Set "
            "`model.config.base_model_name_or_path` to the base's Hub id before pushing to avoid this."
        )
    api = HfApi(token=token, library_name="modeling-hypersteer", library_version=__version__)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
    with contextlib.ExitStack() as stack:
        folder = output_dir if output_dir is not None else stack.enter_context(tempfile.TemporaryDirectory())
        model.save_pretrained(folder)
        write_model_card(folder, model, repo_id=repo_url.repo_id, **card_kwargs)
        return api.upload_folder(
            repo_id=repo_url.repo_id,
            folder_path=folder,
            commit_message=commit_message,
            revision=revision,
            ignore_patterns=list(UPLOAD_IGNORE_PATTERNS),
        )


# ---------------------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------------------


def _model_details_table(config, base_name: str | None, base_is_hub_id: bool, num_parameters: int | None) -> str:
    num_layers = config.base_num_hidden_layers
    layer = f"{config.steering_layer}" + (f" (of {num_layers} decoder layers, 0-based)" if num_layers else "")
    init = _INITS.get(config.hypernet_init, config.hypernet_init).format(n=config.hypernet_num_layers)
    gate = (
        "on: `g_t = sigmoid(w^T (norm(h_t) * v / rms(v)) + b)`, a learned coefficient in [0, 1] for each token"
        if config.token_gate
        else "off (`g_t = 1`)"
    )
    rows = [
        ("Base model", _base_model_markdown(base_name, base_is_hub_id)),
        (
            "Base model revision",
            f"`{config.base_model_revision}`"
            if config.base_model_revision
            else "not pinned (the default branch when loaded)",
        ),
        ("Steering layer", layer),
        ("Variant (`hypernet_type`)", f"`{config.hypernet_type}`: {_VARIANTS.get(config.hypernet_type, '')}"),
        ("Hypernetwork blocks (`hypernet_num_layers`)", str(config.hypernet_num_layers)),
        ("Hypernetwork initialisation (`hypernet_init`)", f"`{config.hypernet_init}`: {init}"),
        ("Token gate (`token_gate`)", gate),
        (
            "Steering positions (`steering_positions`)",
            f"`{config.steering_positions}`: {_POSITIONS.get(config.steering_positions, '')}",
        ),
        ("Default steering factor", _format_factor(config.default_steering_factor)),
        (
            "Factor on top of a prompt (`prompted_steering_factor`)",
            "not calibrated"
            if config.prompted_steering_factor is None
            else _format_factor(config.prompted_steering_factor),
        ),
        ("Max steering prompt length", f"{config.max_steering_prompt_length} tokens"),
        ("Hidden size (length of `v`)", str(config.hidden_size) if config.hidden_size else "not recorded"),
        ("Hypernetwork parameters", _parameter_count_markdown(num_parameters)),
    ]
    return _table(("Property", "Value"), rows)


def _training_data_markdown(sources: list[str], concept_split: dict, training_summary: dict) -> str:
    lines = []
    if sources:
        lines.append("Sources: " + ", ".join(_source_markdown(source) for source in sources) + ".")
    else:
        lines.append("Sources: not recorded.")
    heldin = concept_split.get("heldin_concepts")
    heldout = concept_split.get("heldout_concepts")
    if heldin is None or heldout is None:
        lines.append("")
        lines.append("The held-in / held-out concept split was not recorded.")
        return "\n".join(lines)
    seed = concept_split.get("seed")
    lines += [
        "",
        "The split is by concept, so held-out concepts are never seen in training"
        + (f" (split seed {seed})" if seed is not None else "")
        + ":",
        "",
        _table(
            ("Concepts", "Count"),
            [("Held-in (training) concepts", str(len(heldin))), ("Held-out concepts", str(len(heldout)))],
        ),
    ]
    metrics = training_summary.get("metrics") or {}
    if isinstance(metrics.get("train_samples"), numbers.Number):
        lines += ["", f"Training rows: {int(metrics['train_samples']):,d}."]
    if heldout:
        shown = heldout[:MAX_LISTED_CONCEPTS]
        lines += ["", f"Held-out concepts{_first_of(len(shown), len(heldout))}:", ""]
        lines += [f"- {_inline(concept)}" for concept in shown]
    return "\n".join(lines)


def _evaluation_markdown(training_summary: dict, evaluation_summary: dict) -> str:
    metrics = training_summary.get("metrics") or {}
    loss_rows = [
        ("Held-in concepts, held-out prompts (`eval_heldin_loss`)", _format_metric(metrics.get("eval_heldin_loss"))),
        ("Held-out concepts (`eval_heldout_loss`)", _format_metric(metrics.get("eval_heldout_loss"))),
        ("Training loss, mean over the run (`train_loss`)", _format_metric(metrics.get("train_loss"))),
    ]
    for key, label in (
        ("eval_heldin_steering_vector_norm", "Mean steering-vector norm, held-in"),
        ("eval_heldout_steering_vector_norm", "Mean steering-vector norm, held-out"),
    ):
        if key in metrics:
            loss_rows.append((f"{label} (`{key}`)", _format_metric(metrics[key])))
    lines = [
        (
            "Cross-entropy of the AxBench target responses under steering with the right concept, measured at the "
            "end of training:"
        ),
        "",
        _table(("Loss", "Value"), loss_rows),
        "",
    ]
    methods, judge_model = _judge_results(evaluation_summary)
    excluded = evaluation_summary.get("excluded_concepts") or {}
    if methods:
        judged_by = f", judged by `{_inline(judge_model)}`" if judge_model else ""
        lines += [
            (
                "AxBench judge scores (0–2; harmonic mean of concept, instruction and fluency ratings; best factor "
                f"per concept chosen on one half of the instructions, reported on the other){judged_by}:"
            ),
            "",
            _table(
                ("Method", *[label for _, label in _JUDGE_COLUMNS]),
                [
                    (f"`{_inline(name)}`", *[_format_metric(report.get(key)) for key, _ in _JUDGE_COLUMNS])
                    for name, report in methods.items()
                ],
            ),
            "",
        ]
        if excluded:
            lines += [
                f"Every method is averaged over the same concepts; {len(excluded)} concept(s) without a valid judgement "
                "for some method are left out of all of them:",
                "",
                *[f"- {_inline(concept)}: {_inline('; '.join(reasons))}" for concept, reasons in excluded.items()],
                "",
            ]
    offline = evaluation_summary.get("offline")
    if isinstance(offline, Mapping) and offline:
        lines += [_offline_markdown(offline), ""]
    text_metric = evaluation_summary.get("text_metric")
    if isinstance(text_metric, Mapping) and text_metric.get("rows"):
        lines += [_text_metric_markdown(text_metric), ""]
    for key in ("steering_factor_calibration", "prompted_steering_factor_calibration"):
        calibration = training_summary.get(key)
        if isinstance(calibration, Mapping) and calibration.get("table"):
            lines += [_calibration_markdown(calibration), ""]
    other = _flatten_numbers(
        {key: value for key, value in evaluation_summary.items() if key not in _STRUCTURED_EVALUATION_KEYS}
    )
    if other:
        shown = other[:MAX_LISTED_METRICS]
        lines += [
            f"Evaluation metrics{_first_of(len(shown), len(other))}:",
            "",
            _table(("Metric", "Value"), [(f"`{key}`", _format_metric(value)) for key, value in shown]),
        ]
    elif not methods and not offline and not text_metric:
        lines.append("Steering quality (AxBench LLM-judge scores or offline loss ratios): not measured.")
    return "\n".join(lines).rstrip()


def _prompting_placement_text(placement: Any) -> str:
    """Where the prompting baseline put its steering instruction, as a sentence (empty for results older than the
    `prompt_placement` option, which all used a system turn but did not say so)."""
    if placement == "user":
        return " Prompting writes the concept's steering instruction before the instruction, in the user turn."
    if placement == "system":
        return " Prompting gives the concept's steering instruction as a system turn."
    return ""


def _offline_markdown(offline: Mapping[str, Any]) -> str:
    """Offline gain and specificity ratios per concept set; an undefined ratio shows its reason, not a number."""
    placements = {result.get("prompt_placement") for result in offline.values() if isinstance(result, Mapping)}
    rows, prompted_rows = [], []
    for name, result in offline.items():
        if not isinstance(result, Mapping):
            continue
        losses = result.get("losses") or {}
        rows.append(
            (
                f"`{_inline(name)}`",
                _format_metric(result.get("num_concepts")),
                *_ratio_cells(result),
                _format_metric(losses.get("hypersteer")),
                _format_metric(losses.get("prompt")),
                _format_metric(losses.get("none")),
            )
        )
        if isinstance(result.get("prompt_hypersteer"), Mapping):
            prompted_rows.append(
                (
                    f"`{_inline(name)}`",
                    *_ratio_cells(result["prompt_hypersteer"]),
                    _format_metric(losses.get("prompt_hypersteer")),
                    _format_metric(losses.get("prompt")),
                )
            )
    lines = [
        "Offline metric (no judge): loss of held-out target responses. Gain ratio = (L_none − L_hypersteer) / "
        "(L_none − L_prompt); specificity ratio = (L_hypersteer,wrong − L_hypersteer) / (L_prompt,wrong − "
        "L_prompt), with a wrong concept as the control."
        + (_prompting_placement_text(placements.pop()) if len(placements) == 1 else ""),
        "",
        _table(("Concepts", "Count", "Gain ratio", "Specificity ratio", "L_hypersteer", "L_prompt", "L_none"), rows),
    ]
    if prompted_rows:
        lines += [
            "",
            "On top of the prompt (`prompt_hypersteer`: the prompt plus the vector of the same concept), the same ratios "
            "against the prompt alone:",
            "",
            _table(("Concepts", "Gain ratio", "Specificity ratio", "L_prompt+hypersteer", "L_prompt"), prompted_rows),
        ]
    return "\n".join(lines)


def _ratio_cells(result: Mapping[str, Any]) -> list[str]:
    """The gain and specificity ratio of one method's offline result, an undefined one as its reason."""
    undefined = result.get("undefined_ratios") or {}
    return [
        f"undefined: {_inline(undefined[key])}" if key in undefined else _format_metric(result.get(key))
        for key in ("gain_ratio", "specificity_ratio")
    ]


def _text_metric_markdown(result: Mapping[str, Any]) -> str:
    """The judge-free text metric (`modeling_hypersteer/text_metric.py`) per method and factor, with its headline."""
    headline = result.get("headline") or {}
    if headline.get("gain_ratio") is not None:
        ratio = f"**{_format_metric(headline['gain_ratio'])}** at factor {_format_metric(headline.get('factor'))}"
    else:
        ratio = f"undefined ({_inline(headline.get('undefined_reason', 'not measured'))})"
    rows = [
        (
            f"`{_inline(row.get('method'))}`",
            _format_metric(row.get("factor")),
            _format_metric(row.get("detector_accuracy")),
            _format_metric(row.get("gain_over_none")),
            _format_metric(row.get("nll")),
            _format_metric(row.get("distinct_bigrams")),
        )
        for row in result["rows"]
        if isinstance(row, Mapping)
    ]
    return "\n".join(
        [
            f"Judge-free text metric ({_format_metric(result.get('num_concepts'))} concepts, greedy generations for "
            "generic instructions): detector accuracy is the share of generations in which a TF-IDF + logistic "
            "regression detector trained on the concept's reference responses finds the concept; NLL is the "
            "unsteered base's per-token NLL of the generation (fluency); distinct bigrams = distinct / all word "
            "bigrams (1 = no repetition). Gain ratio (HyperSteer's accuracy gain over unsteered / prompting's, factor "
            f"chosen on half of the instructions and reported on the other): {ratio}. It is not comparable with "
            "published (LLM-judged) numbers." + _prompting_placement_text(result.get("prompt_placement")),
            "",
            _table(("Method", "Factor", "Detector accuracy", "Gain over none", "NLL", "Distinct bigrams"), rows),
        ]
    )


def calibration_table_markdown(calibration: Mapping[str, Any]) -> str:
    """A factor calibration's record (`text_metric.calibrate_steering_factors`) as a markdown table: one row per
    factor, whether it is within the fluency bound (and why not), then the reference rows."""
    rows = [
        (
            _format_factor(row.get("factor")),
            _format_metric(row.get("detector_accuracy")),
            _format_metric(row.get("nll")),
            _format_metric(row.get("distinct_bigrams")),
            "yes" if row.get("passes") else f"no: {_inline(row.get('rejected_because', ''))}",
        )
        for row in calibration["table"]
        if isinstance(row, Mapping)
    ]
    for name, row in (calibration.get("reference") or {}).items():
        if isinstance(row, Mapping):
            rows.append(
                (
                    f"`{_inline(name)}`",
                    _format_metric(row.get("detector_accuracy")),
                    _format_metric(row.get("nll")),
                    _format_metric(row.get("distinct_bigrams")),
                    "reference",
                )
            )
    return _table(("Factor", "Detector accuracy", "NLL", "Distinct bigrams", "Within the fluency bound"), rows)


def _calibration_markdown(calibration: Mapping[str, Any]) -> str:
    """How `default_steering_factor` (or `prompted_steering_factor`) was chosen after training
    (`train_hypersteer.py --calibrate_steering_factor`, `--calibrate_prompted_steering_factor`)."""
    factor = calibration.get("factor")
    if factor is None:
        outcome = "found no factor within the bound and left it unset"
    elif calibration.get("chosen_by") == "rule":
        outcome = f"chose **{_format_factor(factor)}**"
    else:
        outcome = f"found no factor within the bound and kept {_format_factor(factor)}"
    subject = (
        "Prompted steering factor (the vector added on top of a prompt that asks for the same concept)"
        if calibration.get("field") == "prompted_steering_factor"
        else "Default steering factor"
    )
    return "\n".join(
        [
            f"{subject}: the calibration at the end of training {outcome} on "
            f"{len(calibration.get('concepts') or [])} held-in concepts x {len(calibration.get('instructions') or [])} "
            f"generic instructions ({calibration.get('max_new_tokens')} greedy tokens), by the judge-free text metric. "
            f"Rule: {_inline(calibration.get('rule', ''))}."
            + _prompting_placement_text(calibration.get("prompt_placement")),
            "",
            calibration_table_markdown(calibration),
        ]
    )


def _prompted_use_markdown(config) -> str:
    """How to steer toward a description unlike the training concepts, when training calibrated that use."""
    if config.prompted_steering_factor is None:
        return ""
    instruction = prompt_steering_system_prompt("{concept}")
    return (
        "\n\nA description unlike the training concepts shows in text more often when the prompt asks for it too: "
        f"start the user turn with `{_inline(instruction)}`, a blank line, then the request, and pass the same "
        f"description as `steering_prompt` with `steering_factor={_format_factor(config.prompted_steering_factor)}` "
        "(`config.prompted_steering_factor`, calibrated after training on held-in concepts; see "
        "[Evaluation](#evaluation)). With the `modeling_hypersteer` package, "
        "`modeling_hypersteer.evaluation.prompt_steering_turns(concept, request)` writes that turn, and "
        '`hypersteer-serve` does both for a steering concept marked `"in_prompt": true`.'
    )


def _default_factor_origin(config, training_summary: Mapping[str, Any]) -> str:
    """Where the default factor comes from, when training calibrated it."""
    calibration = training_summary.get("steering_factor_calibration")
    if not isinstance(calibration, Mapping) or calibration.get("factor") != config.default_steering_factor:
        return ""
    how = (
        "the highest concept-detector accuracy within a fluency bound"
        if calibration.get("chosen_by") == "rule"
        else "no factor was within the fluency bound, so the previous default was kept"
    )
    return (
        f", chosen by calibration over {calibration.get('grid')} after training ({how}; see [Evaluation](#evaluation))"
    )


def _judge_results(evaluation_summary: dict) -> tuple[dict, str | None]:
    """`(methods, judge model)`: `evaluate_steering.py` writes the methods at the top level and the judge's endpoint
    details (`model`, `base_url`, request counts) under `"judge"`."""
    judge = evaluation_summary.get("judge")
    judge = judge if isinstance(judge, Mapping) else {}
    methods = evaluation_summary.get("methods", judge.get("methods"))
    if not isinstance(methods, Mapping):
        return {}, None
    methods = {name: report for name, report in methods.items() if isinstance(report, Mapping)}
    return methods, evaluation_summary.get("judge_model") or judge.get("model")


def _extra_limitations(evaluation_summary: dict) -> str:
    methods, _ = _judge_results(evaluation_summary)
    if methods:
        return ""
    if evaluation_summary:
        text = (
            "- **Offline evaluation only.** This checkpoint was evaluated offline only, with losses and loss "
            "ratios on held-out target responses and no LLM judge. Generation quality has not been rated."
        )
        if evaluation_summary.get("text_metric"):
            text = (
                "- **Offline evaluation only.** This checkpoint was evaluated without an LLM judge: loss ratios on "
                "held-out target responses and the judge-free text metric (a concept detector, the base's NLL and a "
                "repetition measure), which do not compare with published, judged numbers."
            )
    else:
        text = (
            "- **Not evaluated.** This checkpoint was not evaluated beyond its training and evaluation losses. "
            "Steering quality has not been rated."
        )
    return text + "\n"


def _evaluated_this_model(evaluation_summary: Mapping[str, Any], model_or_config, output_dir: Path) -> bool:
    """False (with a warning) when the summary records the fingerprint of other weights than the card's model."""
    recorded = evaluation_summary.get("model_fingerprint")
    if not recorded:
        return True
    from .evaluation import model_fingerprint

    if hasattr(model_or_config, "hypernetwork"):
        current = model_fingerprint(model_or_config.config, model_or_config.hypernetwork.state_dict())
    else:
        weights = output_dir / "model.safetensors"
        if not weights.is_file():
            return True
        from safetensors.torch import load_file

        current = model_fingerprint(_hypersteer_config(model_or_config), load_file(str(weights)))
    if current != recorded:
        logger.warning(
            f"{output_dir / EVALUATION_SUMMARY_FILE} was measured on other weights (model fingerprint {recorded[:12]}, "
            f"this model {current[:12]}); the card leaves it out. Rerun evaluate_steering.py on this checkpoint."
        )
        return False
    return True


def _base_model_markdown(base_name: str | None, base_is_hub_id: bool) -> str:
    if not base_name:
        return "(not recorded in the config)"
    if base_is_hub_id:
        return f"[`{base_name}`](https://huggingface.co/{base_name})"
    return f"`{_short_path(base_name)}` (a local path)"


def _base_model_warning(config_base: str | None, hub_base: str | None) -> str:
    """A warning when the config (which `from_pretrained` follows) does not name the base by a Hub id."""
    if _is_hub_id(config_base):
        return ""
    named = (
        f"names the base model as {_base_model_markdown(config_base, False)}, not as a Hub id"
        if config_base
        else "names no base model"
    )
    base = f"`{hub_base}`" if hub_base else "the base model"
    return (
        "\n> [!WARNING]\n"
        f"> The config {named}, so `from_pretrained` cannot find the base model on another machine. Load {base} "
        "yourself and pass it with `HyperSteerModel.from_pretrained(repo_id, base_model=base)`.\n"
    )


def _default_title(base_name: str | None) -> str:
    if base_name and _is_hub_id(base_name):
        return f"HyperSteer for {base_name.split('/')[-1]}"
    return "HyperSteer hypernetwork"


def _parameter_count_markdown(num_parameters: int | None) -> str:
    if num_parameters is None:
        return "not recorded"
    return f"{num_parameters:,d} ({num_parameters / 1e6:.2f} M)"


def _source_markdown(source: str) -> str:
    if _is_hub_id(source):
        return f"[`{source}`](https://huggingface.co/datasets/{source})"
    return f"`{_short_path(source)}` (local)"


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------


def _read_template() -> str:
    resource = resources.files(TEMPLATE_PACKAGE).joinpath(*TEMPLATE_RESOURCE)
    if not resource.is_file():
        raise FileNotFoundError(
            f"The model card template {'/'.join(TEMPLATE_RESOURCE)} is missing from the installed "
            f"{TEMPLATE_PACKAGE} package; reinstall it (setup.py ships it as package data)."
        )
    return resource.read_text(encoding="utf-8")


def _hypersteer_config(model_or_config):
    config = getattr(model_or_config, "config", model_or_config)
    # Duck-typed: a config loaded through remote code is another class object than this package's HyperSteerConfig.
    if getattr(config, "model_type", None) != "hypersteer":
        raise TypeError(
            f"Expected a HyperSteerModel or HyperSteerConfig, got {type(model_or_config).__name__} "
            f"(model_type={getattr(config, 'model_type', None)!r})."
        )
    return config


def _is_hub_id(name: str | None) -> bool:
    """Whether `name` reads as a Hub repository id rather than a local path."""
    if not name or os.path.isabs(name) or name.startswith((".", "~")) or os.path.exists(name):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _short_path(path: str) -> str:
    """The last three components of a local path, so the card does not publish the author's directory layout."""
    parts = Path(path).parts
    return "/".join(parts[-3:]) if len(parts) > 3 else str(path)


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{str(path)!r} is not valid JSON ({error}); fix or remove it before writing the card."
        ) from error
    if not isinstance(content, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object, got {type(content).__name__}.")
    return content


def _count_saved_parameters(weights_path: Path) -> int | None:
    if not weights_path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(weights_path), framework="pt") as handle:
        return sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())


def _flatten_numbers(mapping: Mapping[str, Any], prefix: str = "") -> list[tuple[str, float]]:
    items = []
    for key, value in mapping.items():
        if key in _SKIPPED_METRIC_KEYS:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            items += _flatten_numbers(value, prefix=f"{name}.")
        elif isinstance(value, numbers.Number) and not isinstance(value, bool):
            items.append((name, value))
    return items


def _first_of(shown: int, total: int) -> str:
    return f" (first {shown} of {total})" if total > shown else ""


def _format_number(value) -> str:
    if isinstance(value, numbers.Integral):
        return f"{int(value):,d}" if abs(value) >= 10_000 else str(int(value))
    value = float(value)
    if value.is_integer() and abs(value) < 1e6:
        return f"{value:.1f}"
    return f"{value:.4g}" if abs(value) < 1e-3 or abs(value) >= 1e6 else f"{value:.4f}"


def _format_factor(value) -> str:
    """A steering factor as a user types it: 1, 0.5, 1.5."""
    if value is None or isinstance(value, bool) or not isinstance(value, numbers.Real):
        return "not recorded"
    return f"{float(value):g}"


def _format_metric(value) -> str:
    if value is None or isinstance(value, bool) or not isinstance(value, numbers.Number):
        return "not measured"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return _format_number(value)


def _inline(text) -> str:
    """Text made safe for one Markdown table cell or list item."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


__all__ = [
    "EVALUATION_SUMMARY_FILE",
    "calibration_table_markdown",
    "push_to_hub",
    "render_model_card",
    "write_model_card",
]
