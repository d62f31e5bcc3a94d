r"""Probe: does a fixed (untrained) lexical concept direction add specificity on top of a trained no-context model?

Each concept's vector is the trained model's `v(s)` plus `norm * u(s)`, where `u(s)` is the steering prompt's mean
output-token embedding centred on the vocabulary mean (unit length); the vectors are scored with the ablation's offline
metric and rows. Only `no_context` models qualify (their vector does not depend on the row).

    python benchmarks/quality/probe_fixed_lexical.py --run nocontext_offset_center --norms 0,16,32,48 \
        >> benchmarks/results/quality_probe_fixed_lexical.jsonl
"""

import argparse
import json
import sys
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import quality_ablation  # noqa: E402

from modeling_hypersteer import HyperSteerModel  # noqa: E402
from modeling_hypersteer.modeling_hypersteer import HyperSteerLexicalPrior, tokenize_steering_prompts  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="A trained no_context experiment in --work_dir.")
    parser.add_argument("--norms", default="0,16,32,48", help="Comma-separated norms of the lexical term.")
    parser.add_argument("--split", default="heldout", choices=quality_ablation.EVALUATION_SETS)
    parser.add_argument("--heldback_data", default="../shared/data/axbench_more/concept_llama")
    parser.add_argument("--heldback_concepts", type=int, default=24)
    parser.add_argument("--heldback_rows_per_concept", type=int, default=2)
    parser.add_argument("--work_dir", default="/tmp/hypersteer-quality")
    parser.add_argument("--heldout_rows_per_concept", type=int, default=8)
    parser.add_argument("--steering_factor", type=float, default=1.0)
    parser.add_argument("--eval_batch_size", type=int, default=8)
    parser.add_argument("--eval_max_length", type=int, default=320)
    args = parser.parse_args()
    config = quality_ablation.load_experiment(args.run)
    if config.get("hypernet_type") != "no_context":
        raise ValueError(f"--run {args.run!r} is not a no_context experiment; its vectors depend on the row.")
    rows = quality_ablation.evaluation_rows(config, args.heldout_rows_per_concept)
    if args.split == "heldback":
        rows["heldback"] = quality_ablation.heldback_rows(
            args.heldback_data, args.heldback_concepts, args.heldback_rows_per_concept
        )
    model = HyperSteerModel.from_pretrained(Path(args.work_dir) / args.run).eval()
    concepts = sorted({row["output_concept"] for row in rows[args.split]})
    with torch.no_grad():
        trained = model.compute_steering_vectors(steering_prompt=concepts).float()
        # The direction the `lexical` prior reads, from the model's own code (whether or not the model has that prior).
        prior = HyperSteerLexicalPrior(model.get_output_embeddings().weight)
        tokens = tokenize_steering_prompts(model.tokenizer, concepts, model.config.max_steering_prompt_length)
        lexical = prior(tokens["steering_input_ids"], tokens["steering_attention_mask"], model.language_model).float()
    for norm in (float(value) for value in args.norms.split(",")):
        vectors = {concept: trained[index] + norm * lexical[index] for index, concept in enumerate(concepts)}
        result = quality_ablation.score(
            model, model.tokenizer, rows, args, splits=(args.split,), concept_vectors=vectors
        )[args.split]
        print(
            json.dumps(
                {
                    "run": args.run,
                    "split": args.split,
                    "lexical_norm": norm,
                    "specificity_ratio": result["specificity_ratio"],
                    "gain_ratio": result["gain_ratio"],
                    "losses": result["losses"],
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
