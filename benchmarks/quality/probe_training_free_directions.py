r"""Probe: can a direction read from the frozen base, with no training, stand in for a concept's LM-trained vector?

Never-trained descriptions get from HyperSteer little more than what such a direction gives them (the lexical prior),
and the vectors that do show a concept in text are trained per concept (`probe_vector_regression.py`). This probe
measures six directions per concept, none trained for that concept, against those trained vectors, and alone in text:

* `lexical`: the lexical prior's `u(s)`, the mean output embedding of the description's tokens, centred on the
  vocabulary mean;
* `lexical_idf`: the same mean weighted by each token's inverse document frequency over a large description list
  (Concept16K), so the words every description uses ("references", "related", "terms", "the") count for little;
* `prompted_last`: the base's residual at the steering layer over the last prompt tokens when the concept is asked for
  in the user turn (as the prompting baseline asks), minus the same without it, averaged over instructions;
* `prompted_answer`: the same difference over the tokens of the base's own unsteered answer (teacher-forced);
* `self_written`: DiffMean over text *about* the concept that the base writes itself, for any description: the mean
  residual over its greedy answers to `SELF_WRITTEN_TEMPLATES` (asked to write about the description), minus the same
  mean over the held-in concepts (a fixed reference at inference);
* `diffmean_rows`: AxBench's DiffMean over the concept's real rows (positive responses minus the negatives), for
  reference: what text about the concept gives when it is written well.

Against the trained vectors: the cosine of each concept's direction with its own vector, both centred on their
held-in means (the shared part says nothing about which concept it is), and retrieval (own vector nearest). In text:
each direction alone, scaled to `--text_norm` times each `--text_factors` value, on the run's first 12 held-in concepts
(for this probe every concept is untrained), against prompting and the unsteered base.

    python benchmarks/quality/probe_training_free_directions.py --run_dir /tmp/hq4/recipe_prior48_600 \
        --output_dir /tmp/hq5/vector_regression --name recipe_prior48_600
"""

import argparse
import math
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers


REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
sys.path.insert(0, str(REPO_ROOT / "benchmarks" / "quality"))

import quality_ablation  # noqa: E402
from probe_vector_regression import (  # noqa: E402
    add_vector_arguments,
    centred_cosines,
    positive_training_rows,
    report,
    summary,
    trained_concept_vectors,
)

from modeling_hypersteer import HyperSteerModel  # noqa: E402
from modeling_hypersteer.baselines import diffmean_vectors, mean_response_residual  # noqa: E402
from modeling_hypersteer.concept_data import ABOUT_PROMPT_TEMPLATES  # noqa: E402
from modeling_hypersteer.data import format_prompt, load_concept_data  # noqa: E402
from modeling_hypersteer.data.distillation import load_concept_descriptions  # noqa: E402
from modeling_hypersteer.evaluation import generate_samples, prompt_steering_turns  # noqa: E402
from modeling_hypersteer.modeling_hypersteer import (  # noqa: E402
    HyperSteerPrior,
    steering_layer_output,
    tokenize_steering_prompts,
)
from modeling_hypersteer.text_metric import CALIBRATION_INSTRUCTIONS, ConceptDetector, text_metric  # noqa: E402


RESULTS_PATH = REPO_ROOT / "benchmarks" / "results" / "probe_training_free_directions.json"
# Where the prompted difference is read: the last tokens of the prompt (the assistant header the reply starts from).
PROMPT_TAIL_TOKENS = 3
# Requests that make the base write about a description (its own text about the concept, for `self_written`).
SELF_WRITTEN_TEMPLATES = ABOUT_PROMPT_TEMPLATES[:3]


DIRECTIONS = ("lexical", "lexical_idf", "prompted_last", "prompted_answer", "self_written", "diffmean_rows")


def idf_token_weights(tokenizer, descriptions: list[str], vocab_size: int) -> torch.Tensor:
    """`(vocab_size,)` inverse document frequency `log((N + 1) / (df + 1))` of every token over `descriptions`."""
    document_frequency = Counter()
    for description in descriptions:
        document_frequency.update(set(tokenizer(description, add_special_tokens=False)["input_ids"]))
    weights = torch.full((vocab_size,), math.log(len(descriptions) + 1))
    for token_id, count in document_frequency.items():
        weights[token_id] = math.log((len(descriptions) + 1) / (count + 1))
    return weights


@torch.no_grad()
def weighted_lexical_directions(model, concepts: list[str], token_weights: torch.Tensor) -> torch.Tensor:
    """`(num_concepts, hidden_size)` unit directions: the `token_weights`-weighted mean output embedding of each
    description's concept tokens, centred on the vocabulary mean. All-ones weights give the lexical prior's `u(s)`."""
    output_embeddings = model.get_output_embeddings().weight.detach().float()
    tokens = tokenize_steering_prompts(model.tokenizer, concepts, model.config.max_steering_prompt_length)
    input_ids, attention_mask = tokens["steering_input_ids"], tokens["steering_attention_mask"]
    mask = HyperSteerPrior.concept_token_mask(model.language_model, input_ids, attention_mask).float()
    weights = mask * token_weights[input_ids]
    mean = (output_embeddings[input_ids] * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp(min=1e-6)
    return F.normalize(mean - output_embeddings.mean(0), dim=-1)


def _steering_layer_residual(model, texts: list[str]) -> torch.Tensor:
    """`(len(texts), sequence_length, hidden_size)` float32 residual of the base at the steering layer, padded as the
    tokenizer pads."""
    batch = model.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return steering_layer_output(
        model.language_model, model.config.steering_layer, batch["input_ids"], batch["attention_mask"]
    ).float()


@torch.no_grad()
def prompted_directions(model, concepts: list[str], instructions: list[str]) -> dict[str, torch.Tensor]:
    """`{"prompted_last", "prompted_answer"}`: `(num_concepts, hidden_size)` mean differences of the steering layer's
    residual with and without the concept asked for in the user turn (see the module docstring)."""
    tokenizer, language_model = model.tokenizer, model.language_model
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        plain = [format_prompt(tokenizer, instruction) for instruction in instructions]
        encoded = tokenizer(plain, return_tensors="pt", padding=True, add_special_tokens=False)
        generated = language_model.generate(**encoded, max_new_tokens=24, do_sample=False)
        answers = [
            tokenizer(text, add_special_tokens=False)["input_ids"]
            for text in tokenizer.batch_decode(generated[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
        ]
        answer_length = min(len(answer) for answer in answers)
        answers = [tokenizer.decode(answer[:answer_length]) for answer in answers]

        def states(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
            tail = _steering_layer_residual(model, prompts)[:, -PROMPT_TAIL_TOKENS:].mean(1)
            with_answers = [prompt + answer for prompt, answer in zip(prompts, answers)]
            return tail, _steering_layer_residual(model, with_answers)[:, -answer_length:].mean(1)

        plain_tail, plain_answer = states(plain)
        last, over_answer = [], []
        for concept in concepts:
            tail, answer = states(
                [
                    format_prompt(tokenizer, *prompt_steering_turns(concept, instruction))
                    for instruction in instructions
                ]
            )
            last.append((tail - plain_tail).mean(0))
            over_answer.append((answer - plain_answer).mean(0))
    finally:
        tokenizer.padding_side = padding_side
    return {"prompted_last": torch.stack(last), "prompted_answer": torch.stack(over_answer)}


def self_written_rows(model, concepts: list[str], output_dir: Path, max_new_tokens: int) -> list[dict]:
    """Rows `{input, output, output_concept}`: the base's greedy answer to every `SELF_WRITTEN_TEMPLATES` request for
    every concept (kept in `output_dir/self_written.jsonl` and reused from there)."""
    tasks = [
        {"concept": concept, "instruction": template.format(concept=concept), "split": "test"}
        for concept in concepts
        for template in SELF_WRITTEN_TEMPLATES
    ]
    samples = generate_samples(
        model,
        model.tokenizer,
        tasks,
        ["none"],
        [0.0],
        generations_path=output_dir / "self_written.jsonl",
        max_new_tokens=max_new_tokens,
        do_sample=False,
        batch_size=16,
    )
    return [
        {"input": sample["instruction"], "output": sample["generation"], "output_concept": sample["concept"]}
        for sample in samples
    ]


def self_written_directions(model, concepts: list[str], heldin: list[int], rows: list[dict]) -> torch.Tensor:
    """`(num_concepts, hidden_size)`: each concept's mean residual over its self-written `rows`, minus the mean of
    those over the `heldin` concepts."""
    by_concept = {concept: [row for row in rows if row["output_concept"] == concept] for concept in concepts}
    means = torch.stack([mean_response_residual(model, model.tokenizer, by_concept[concept]) for concept in concepts])
    return means - means[heldin].mean(0)


def vector_text_rows(model, detector, concepts, vectors, factors, generations_path) -> list[dict]:
    """The text metric's rows for `vectors` (`{concept: vector}`, method `vector`, at every factor) against prompting
    and the unsteered base: 48 greedy tokens for each concept's instructions."""
    metric = text_metric(
        model,
        model.tokenizer,
        detector,
        concepts,
        ["vector", "prompt", "none"],
        factors,
        max_new_tokens=48,
        generations_path=generations_path,
        concept_vectors={"vector": vectors},
    )
    keys = ("method", "factor", "detector_accuracy", "detector_probability", "nll", "distinct_bigrams")
    return [{key: row.get(key) for key in keys} for row in metric["rows"]]


def own_centred_cosines(directions: torch.Tensor, targets: torch.Tensor, heldin: list[int], rows: list[int]):
    """Cosines of `directions[rows]` with `targets[rows]`, each centred on its own held-in mean."""
    centred = directions[rows] - directions[heldin].mean(0)
    return centred_cosines(centred, targets[rows] - targets[heldin].mean(0), torch.zeros(directions.shape[-1]))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_vector_arguments(parser)
    parser.add_argument(
        "--idf_descriptions",
        default="../shared/data/axbench_more/concept16k/descriptions.jsonl",
        help="Description list whose document frequencies weight `lexical_idf`.",
    )
    parser.add_argument("--text_norm", type=float, default=32.0, help="Norm of each direction at factor 1 in text.")
    parser.add_argument("--text_factors", default="1,2,4", help="Factors of the text check ('' to skip it).")
    parser.add_argument("--text_concepts", type=int, default=12, help="Held-in concepts of the text check.")
    parser.add_argument(
        "--self_written_tokens", type=int, default=64, help="Tokens of each self-written answer (`self_written`)."
    )
    parser.add_argument(
        "--directions",
        default="lexical,lexical_idf,prompted_last,prompted_answer,self_written,diffmean_rows",
        help="Directions to measure (comma-separated).",
    )
    parser.add_argument("--name", default=None, help="Row name in results/probe_training_free_directions.json.")
    args = parser.parse_args(argv)
    kinds = [kind.strip() for kind in args.directions.split(",") if kind.strip()]
    unknown = sorted(set(kinds) - set(DIRECTIONS))
    if unknown:
        parser.error(f"--directions: unknown {unknown}; choose from {list(DIRECTIONS)}.")
    transformers.utils.logging.set_verbosity_warning()

    run_dir, output_dir = Path(args.run_dir), Path(args.output_dir)
    model = HyperSteerModel.from_pretrained(run_dir).eval()
    vectors, heldin_concepts, never_concepts = trained_concept_vectors(model, run_dir, output_dir, args)
    concepts = heldin_concepts + never_concepts["heldout"] + never_concepts["heldback"]
    groups, start = {}, 0
    for name, members in [("heldin", heldin_concepts), *never_concepts.items()]:
        groups[name] = list(range(start, start + len(members)))
        start += len(members)
    targets = torch.stack([vectors[concept] for concept in concepts]).float()

    vocab_size = model.get_output_embeddings().weight.shape[0]
    directions, idf_descriptions = {}, None
    if "lexical" in kinds:
        directions["lexical"] = weighted_lexical_directions(model, concepts, torch.ones(vocab_size))
    if "lexical_idf" in kinds:
        descriptions = load_concept_descriptions(quality_ablation.data_path(args.idf_descriptions))
        idf_descriptions = len(descriptions)
        idf = idf_token_weights(model.tokenizer, descriptions, vocab_size)
        directions["lexical_idf"] = weighted_lexical_directions(model, concepts, idf)
    if {"prompted_last", "prompted_answer"} & set(kinds):
        prompted = prompted_directions(model, concepts, list(CALIBRATION_INSTRUCTIONS))
        directions.update({kind: prompted[kind] for kind in ("prompted_last", "prompted_answer") if kind in kinds})
    if "self_written" in kinds:
        rows = self_written_rows(model, concepts, output_dir, args.self_written_tokens)
        directions["self_written"] = self_written_directions(model, concepts, groups["heldin"], rows)
    data = positive_training_rows(run_dir)[0]
    if "diffmean_rows" in kinds:
        heldback_data = load_concept_data(quality_ablation.data_path(args.heldback_data))
        wanted = set(concepts)
        positives = [
            dict(row)
            for source in (data, heldback_data)
            for row in source
            if not row["is_negative"] and row["output_concept"] in wanted
        ]
        negatives = [dict(row) for row in data if row["is_negative"]]
        diffmean = diffmean_vectors(model, model.tokenizer, positives, negatives, norm=1.0)
        directions["diffmean_rows"] = torch.stack([diffmean[concept] for concept in concepts])
    result = {
        "run_dir": str(run_dir),
        "command": "python benchmarks/quality/probe_training_free_directions.py " + " ".join(argv or sys.argv[1:]),
        **({"idf_descriptions": idf_descriptions} if idf_descriptions else {}),
        "directions": {},
    }
    for kind, direction in directions.items():
        pairwise = F.normalize(direction, dim=-1) @ F.normalize(direction, dim=-1).T
        result["directions"][kind] = {
            "norm": round(direction.norm(dim=-1).mean().item(), 2),
            "pairwise_cosine": round(pairwise.fill_diagonal_(float("nan")).nanmean().item(), 4),
            **{
                name: summary(own_centred_cosines(direction, targets, groups["heldin"], rows))
                for name, rows in groups.items()
            },
        }

    factors = [float(value) for value in args.text_factors.split(",") if value.strip()]
    if factors:
        text_concepts = heldin_concepts[: args.text_concepts]
        detector = ConceptDetector.from_rows(data, concepts=text_concepts)
        for kind, direction in directions.items():
            steering = {c: F.normalize(direction[concepts.index(c)], dim=-1) * args.text_norm for c in text_concepts}
            result["directions"][kind]["text"] = vector_text_rows(
                model, detector, text_concepts, steering, factors, output_dir / f"training_free_{kind}.jsonl"
            )
    return report(result, RESULTS_PATH, args.name)


if __name__ == "__main__":
    main()
