r"""llama.cpp control vectors: export a HyperSteer steering vector, and steer `generate` with a llama.cpp/repeng one.

Ready-to-copy commands:

    # One concept (no_context models: the vector depends on the concept only, so the export is exact)
    hypersteer-export outputs/quickstart --steering_prompt "references to oceans, tides and marine life" \
        --output oceans.gguf
    # Several concepts compose as in `generate`: the file holds sum_k factor_k * v_k
    hypersteer-export outputs/quickstart --steering_prompt "legal terminology" "pirate speech" --factor 1.0 0.5 \
        --output mix.gguf
    # cross_attention / in_context models read the user's prompt: export for one prompt, or the mean over a set
    hypersteer-export outputs/ca --steering_prompt "legal terminology" --context "Describe a city." --output city.gguf
    hypersteer-export outputs/ca --steering_prompt "legal terminology" --context_file prompts.txt --output mean.gguf
    # A concept the model never trained on: the vector at the model's prompted_steering_factor, to add while the
    # prompt asks for the concept too (the file records the instruction, and the command prints it)
    hypersteer-export outputs/quickstart --steering_prompt "terms related to online gambling" --in_prompt \
        --output gambling.gguf
    # then, in llama.cpp
    llama-cli -m SmolLM2-135M-Instruct.Q4_1.gguf --control-vector oceans.gguf -p "Describe a city."

and back, from Python:

    >>> from modeling_hypersteer.export import load_control_vector
    >>> vector = load_control_vector("repeng_happy.gguf", model)            # (1, hidden_size)
    >>> model.generate(**inputs, steering_vectors=vector.expand(batch_size, -1), steering_factor=1.0)

The file format (what llama.cpp's `common_control_vector_load` and repeng's `ControlVector.export_gguf` use): a GGUF
with `general.architecture = "controlvector"`, `controlvector.model_hint` (the base's `model_type`),
`controlvector.layer_count` (the number of direction tensors, as repeng writes it) and one F32 tensor `direction.N`
of shape `(hidden_size,)` per steered layer. llama.cpp adds `direction.N` to the output of its block `N` (0-based, the
same numbering as `model.model.layers`); it has no slot for block 0 and never reads `direction.0`. So HyperSteer's
`steering_layer = L` (the output of `model.model.layers[L]`) is exported as `direction.L`, and `L = 0` cannot be
exported. `tests/test_export.py` checks this numbering (and the sign) against the real llama.cpp.

What llama.cpp cannot reproduce, and what the file records (`hypersteer.*` keys):
- `no_context`: `v` depends on the concept only; the export is exact.
- `cross_attention` / `in_context`: `v` depends on the user's prompt. The file holds the vector for the one prompt
  given (`hypersteer.context = "prompt"`, exact for that prompt) or the mean over a prompt set
  (`hypersteer.context = "mean"`), with the prompts themselves in `hypersteer.context_prompts`.
- llama.cpp adds the vector at every position; a model with `steering_positions != "all"` or a `token_gate` steers
  differently in llama.cpp (the export warns).
- `in_prompt`: the vector is meant to be added while the prompt also asks for the concept (the use that shows
  concepts the model never trained on); the file records `hypersteer.in_prompt` and, in
  `hypersteer.prompt_instruction` (only then), the words to start the user turn with (the prompting baseline's,
  `evaluation.prompt_steering_turns`); context prompts are read with that instruction before them.

Importing (`load_control_vector`): HyperSteer steers one layer. A file with directions for several layers (repeng
writes one per layer) gives the direction of the model's steering layer and a warning naming the layers it ignores;
a file without that layer, or made for another hidden size or a deeper model, is refused with a message saying which
`steering_layer` would read it.
"""

import math
import re
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser
from transformers.utils import logging

from .cli import DTYPE_CHOICES, parse_arguments, resolve_dtype
from .evaluation import prompt_steering_system_prompt, prompt_steering_turns
from .modeling_hypersteer import HyperSteerModel


logger = logging.get_logger(__name__)

CONTROL_VECTOR_ARCHITECTURE = "controlvector"
DIRECTION_NAME = re.compile(r"^direction\.(\d+)$")
# Context modes recorded in `hypersteer.context`.
CONTEXT_NONE, CONTEXT_PROMPT, CONTEXT_MEAN = "none", "prompt", "mean"


def _require_gguf():
    try:
        import gguf
    except ImportError as error:
        raise ImportError(
            "Reading and writing llama.cpp control vectors needs the `gguf` package: `pip install gguf` (or "
            "`pip install modeling-hypersteer[gguf]`)."
        ) from error
    return gguf


# ---------------------------------------------------------------------------------------------------------------
# Layer numbering
# ---------------------------------------------------------------------------------------------------------------


def control_vector_layer(steering_layer: int, num_hidden_layers: int) -> int:
    """The llama.cpp direction index `N` (tensor `direction.N`) that steers like HyperSteer's `steering_layer`.

    Both count blocks from 0 and add to the block's output, so `N = steering_layer`; llama.cpp applies directions to
    blocks `1 .. num_hidden_layers - 1` only.

    Raises:
        `ValueError` for `steering_layer = 0` (llama.cpp never steers block 0) or a layer outside the model.
    """
    if not 0 <= steering_layer < num_hidden_layers:
        raise ValueError(
            f"steering_layer={steering_layer} is outside the base's {num_hidden_layers} layers (0..{num_hidden_layers - 1})."
        )
    if steering_layer == 0:
        raise ValueError(
            "steering_layer=0 cannot be exported: llama.cpp has no control-vector slot for block 0 (it reads "
            "`direction.1` .. `direction.N-1` only). Train or build the HyperSteer model with steering_layer >= 1."
        )
    return steering_layer


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ControlVector:
    """A control vector as stored in a GGUF file.

    Args:
        directions (`dict[int, torch.FloatTensor]`): llama.cpp block index `N` -> direction of shape `(hidden_size,)`.
        model_hint (`str`, *optional*): `controlvector.model_hint`, the base's `model_type` (e.g. `"llama"`).
        metadata (`dict`): every other key/value of the file (HyperSteer's own under `hypersteer.`).
    """

    directions: dict[int, torch.Tensor]
    model_hint: str | None = None
    metadata: dict = field(default_factory=dict)

    @property
    def hidden_size(self) -> int:
        return next(iter(self.directions.values())).shape[0]


def write_control_vector(path: str | Path, control_vector: ControlVector) -> Path:
    """Write `control_vector` as a llama.cpp control-vector GGUF (F32 `direction.N` tensors) and return the path."""
    gguf = _require_gguf()
    if not control_vector.directions:
        raise ValueError("The control vector has no directions; nothing to write.")
    sizes = {tuple(direction.shape) for direction in control_vector.directions.values()}
    if len(sizes) != 1 or len(next(iter(sizes))) != 1:
        raise ValueError(f"Every direction must be 1-D of one hidden size, got shapes {sorted(sizes)}.")
    if min(control_vector.directions) < 1:
        raise ValueError(
            f"Direction layers must be >= 1 (llama.cpp never reads `direction.0`), got {sorted(control_vector.directions)}."
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), CONTROL_VECTOR_ARCHITECTURE)
    try:
        writer.add_string(f"{CONTROL_VECTOR_ARCHITECTURE}.model_hint", control_vector.model_hint or "")
        writer.add_uint32(f"{CONTROL_VECTOR_ARCHITECTURE}.layer_count", len(control_vector.directions))
        for key, value in control_vector.metadata.items():
            _add_metadata(writer, key, value)
        for layer in sorted(control_vector.directions):
            direction = control_vector.directions[layer].detach().to("cpu", torch.float32).contiguous().numpy()
            writer.add_tensor(f"direction.{layer}", direction)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return path


def _add_metadata(writer, key: str, value) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_int64(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, (list, tuple)) and value:
        writer.add_array(key, list(value))
    elif isinstance(value, (list, tuple)):
        return  # GGUF cannot type an empty array; an absent key reads back as empty
    else:
        raise TypeError(f"Metadata {key!r} has type {type(value).__name__}; use bool, int, float, str or a list.")


# ---------------------------------------------------------------------------------------------------------------
# Export: HyperSteer -> control vector
# ---------------------------------------------------------------------------------------------------------------


def _as_lists(steering_prompt, steering_factor, default_factor: float) -> tuple[list[str], list[float]]:
    prompts = [steering_prompt] if isinstance(steering_prompt, str) else list(steering_prompt or [])
    if not prompts or any(not isinstance(prompt, str) or not prompt.strip() for prompt in prompts):
        raise ValueError(
            f"Pass at least one non-empty steering prompt (a concept such as 'references to legal terminology'), got "
            f"{steering_prompt!r}."
        )
    if steering_factor is None:
        factors = [default_factor] * len(prompts)
    elif isinstance(steering_factor, (int, float)):
        factors = [float(steering_factor)] * len(prompts)
    else:
        factors = [float(value) for value in steering_factor]
        if len(factors) == 1:
            factors = factors * len(prompts)
    if len(factors) != len(prompts):
        raise ValueError(
            f"Got {len(factors)} steering factors for {len(prompts)} steering prompts; pass one factor per prompt "
            "(or a single factor for all)."
        )
    if not all(math.isfinite(value) for value in factors):
        raise ValueError(f"Steering factors must be finite numbers, got {factors}.")
    return prompts, factors


def compute_export_vector(
    model: HyperSteerModel,
    steering_prompt: str | Sequence[str],
    steering_factor: float | Sequence[float] | None = None,
    contexts: Sequence[str] | None = None,
    batch_size: int = 8,
    in_prompt: bool = False,
) -> tuple[torch.FloatTensor, dict]:
    """The vector llama.cpp should add: `sum_k factor_k * v_k` (as `generate` composes concepts), and its metadata.

    Args:
        steering_prompt (`str` or `list[str]`): the concept(s).
        steering_factor (`float` or `list[float]`, *optional*): one factor per concept (or one for all); defaults to
            `config.default_steering_factor`, or with `in_prompt` to `config.prompted_steering_factor`.
        contexts (`list[str]`, *optional*): user prompts (plain text, rendered with the chat template like a chat
            turn). Required for `cross_attention` / `in_context`: one prompt gives the exact vector for it, several
            their mean. Ignored (with a warning) for `no_context`.
        batch_size (`int`, defaults to 8): context prompts per base pass.
        in_prompt (`bool`, defaults to `False`): export for use on top of a prompt that asks for the concepts too
            (`evaluation.prompt_steering_turns`); contexts are read with that request before them.

    Returns:
        `(vector, metadata)`: a `torch.FloatTensor` of shape `(hidden_size,)` and the `hypersteer.*` keys to record.

    Raises:
        `ValueError` with `in_prompt` and no factor when the model was never calibrated for that use
        (`config.prompted_steering_factor` is None).
    """
    config = model.config
    default_factor = config.default_steering_factor
    if in_prompt:
        default_factor = config.prompted_steering_factor
        if default_factor is None and steering_factor is None:
            raise ValueError(
                "This model has no `prompted_steering_factor` (train_hypersteer.py "
                "--calibrate_prompted_steering_factor sets it), so an `in_prompt` export needs its factor: pass one "
                "(`--factor 0.5`)."
            )
    prompts, factors = _as_lists(steering_prompt, steering_factor, default_factor)
    contexts = list(contexts or [])
    if config.hypernet_type == "no_context":
        if contexts:
            logger.warning(
                f"Ignoring {len(contexts)} context prompt(s): a no_context model's vector depends on the concept only."
            )
            contexts = []
        with torch.no_grad():
            vector = model.compute_steering_vectors(steering_prompt=[prompts], steering_factor=[factors])[0]
        context_mode = CONTEXT_NONE
    else:
        if not contexts:
            raise ValueError(
                f"A `{config.hypernet_type}` model's vector depends on the user's prompt: pass the prompt to export "
                "for (`--context`, exact for that prompt) or a prompt set (`--context_file`, exported as the mean)."
            )
        vector = _mean_context_vector(model, prompts, factors, contexts, batch_size, in_prompt)
        context_mode = CONTEXT_PROMPT if len(contexts) == 1 else CONTEXT_MEAN
    if config.steering_positions != "all":
        logger.warning(
            f"This model steers only {config.steering_positions!r} positions (`steering_positions`); llama.cpp adds the "
            "control vector at every position, so steered outputs there will differ."
        )
    if config.token_gate:
        logger.warning(
            "This model scales `v` per token with a learned gate (`token_gate=True`); llama.cpp adds the ungated "
            "vector at every position, so steered outputs there will differ."
        )
    metadata = {
        "hypersteer.base_model": config.base_model_name_or_path or "",
        "hypersteer.base_num_hidden_layers": int(config.base_num_hidden_layers),
        "hypersteer.hidden_size": int(config.hidden_size),
        "hypersteer.steering_layer": int(config.steering_layer),
        "hypersteer.hypernet_type": config.hypernet_type,
        "hypersteer.steering_positions": config.steering_positions,
        "hypersteer.token_gate": bool(config.token_gate),
        "hypersteer.steering_prompts": prompts,
        "hypersteer.steering_factors": factors,
        "hypersteer.context": context_mode,
        "hypersteer.context_count": len(contexts),
        "hypersteer.context_prompts": contexts,
        "hypersteer.in_prompt": bool(in_prompt),
    }
    if in_prompt:
        metadata["hypersteer.prompt_instruction"] = prompt_steering_system_prompt(prompts)
    return vector.detach().float().cpu(), metadata


def _mean_context_vector(model, prompts, factors, contexts, batch_size, in_prompt=False) -> torch.FloatTensor:
    """Mean over `contexts` of each context's composed vector (with `in_prompt`, each context asks for the concepts
    first); returns shape `(hidden_size,)`."""
    from .data import format_prompt

    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ValueError("Exporting for a context needs the model's tokenizer; load the model with its tokenizer.")
    if any(not isinstance(context, str) or not context.strip() for context in contexts):
        raise ValueError(f"Context prompts must be non-empty strings, got {contexts!r}.")
    device = model.get_input_embeddings().weight.device
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    total = None
    try:
        for start in range(0, len(contexts), batch_size):
            chunk = contexts[start : start + batch_size]
            texts = [
                format_prompt(tokenizer, prompt_steering_turns(prompts, context)[0] if in_prompt else context)
                for context in chunk
            ]
            encoding = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt").to(device)
            with torch.no_grad():
                vectors = model.compute_steering_vectors(
                    input_ids=encoding["input_ids"],
                    attention_mask=encoding["attention_mask"],
                    steering_prompt=[prompts] * len(chunk),
                    steering_factor=[factors] * len(chunk),
                )  # (len(chunk), hidden_size)
            chunk_sum = vectors.float().sum(dim=0)
            total = chunk_sum if total is None else total + chunk_sum
    finally:
        tokenizer.padding_side = padding_side
    return total / len(contexts)


def export_control_vector(
    model: HyperSteerModel,
    path: str | Path,
    steering_prompt: str | Sequence[str],
    steering_factor: float | Sequence[float] | None = None,
    contexts: Sequence[str] | None = None,
    batch_size: int = 8,
    in_prompt: bool = False,
) -> Path:
    """Write the concept(s) as a llama.cpp control vector at `path` (see [`compute_export_vector`] for the args)."""
    config = model.config
    layer = control_vector_layer(config.steering_layer, config.base_num_hidden_layers)
    vector, metadata = compute_export_vector(model, steering_prompt, steering_factor, contexts, batch_size, in_prompt)
    model_hint = model.language_model.config.get_text_config().model_type
    return write_control_vector(path, ControlVector({layer: vector}, model_hint=model_hint, metadata=metadata))


# ---------------------------------------------------------------------------------------------------------------
# Import: control vector -> steering_vectors
# ---------------------------------------------------------------------------------------------------------------


def read_control_vector(path: str | Path) -> ControlVector:
    """Read a llama.cpp / repeng control-vector GGUF.

    Raises:
        `ValueError` when the file is not a control vector (architecture, tensor names, types or shapes).
    """
    gguf = _require_gguf()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Control vector file {str(path)!r} does not exist.")
    reader = gguf.GGUFReader(str(path))
    fields = {name: _field_value(reader_field) for name, reader_field in reader.fields.items()}
    architecture = fields.get("general.architecture")
    if architecture != CONTROL_VECTOR_ARCHITECTURE:
        raise ValueError(
            f"{path} has general.architecture={architecture!r}, not {CONTROL_VECTOR_ARCHITECTURE!r}: it is not a "
            "control vector (a model GGUF, perhaps). Pass a file written by `hypersteer-export`, repeng or llama.cpp."
        )
    directions = {}
    for tensor in reader.tensors:
        match = DIRECTION_NAME.match(tensor.name)
        if match is None:
            raise ValueError(
                f"{path} holds a tensor {tensor.name!r}; control vectors hold only `direction.N` tensors."
            )
        layer = int(match.group(1))
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32 or len(tensor.shape) != 1:
            raise ValueError(
                f"{path}: `{tensor.name}` is {tensor.tensor_type.name} of shape {list(tensor.shape)}; llama.cpp reads "
                "1-D F32 directions only."
            )
        directions[layer] = directions.get(layer, 0) + torch.tensor(tensor.data.astype("float32").copy())
    if not directions:
        raise ValueError(f"{path} holds no `direction.N` tensors.")
    if len({direction.shape for direction in directions.values()}) != 1:
        raise ValueError(f"{path}: the directions have different sizes; a control vector has one hidden size.")
    metadata = {
        name: value
        for name, value in fields.items()
        if not name.startswith("GGUF.") and name not in ("general.architecture",)
    }
    model_hint = metadata.pop(f"{CONTROL_VECTOR_ARCHITECTURE}.model_hint", None) or None
    return ControlVector(directions=directions, model_hint=model_hint, metadata=metadata)


def _field_value(reader_field):
    try:
        return reader_field.contents()
    except (ValueError, IndexError, UnicodeDecodeError):
        return None


def load_control_vector(path: str | Path, model: HyperSteerModel, strength: float = 1.0) -> torch.FloatTensor:
    """Read a llama.cpp / repeng control vector as `steering_vectors` for `model.generate`.

    llama.cpp adds `strength * direction.N` to the output of block `N`; so does `model.generate(...,
    steering_vectors=vector.expand(batch_size, -1), steering_factor=1.0)` when `N` is the model's steering layer
    (`generate` multiplies by `steering_factor`, which defaults to `config.default_steering_factor`).

    Returns:
        `torch.FloatTensor` of shape `(1, hidden_size)` on the device of the steering layer.

    Raises:
        `ValueError` when the vector's width differs from the base's hidden size, when it names a layer the base
        does not have, or when it has no direction for the model's steering layer. Directions for other layers are
        ignored with a warning (HyperSteer steers one layer).
    """
    if not math.isfinite(strength):
        raise ValueError(f"`strength` must be a finite number, got {strength!r}.")
    control_vector = read_control_vector(path)
    config = model.config
    num_layers = config.base_num_hidden_layers
    if control_vector.hidden_size != config.hidden_size:
        raise ValueError(
            f"{path} holds {control_vector.hidden_size}-dimensional directions but this model's base has hidden size "
            f"{config.hidden_size}: the control vector was made for another model."
        )
    recorded_layers = control_vector.metadata.get("hypersteer.base_num_hidden_layers")
    too_deep = [layer for layer in control_vector.directions if layer >= num_layers]
    if too_deep or (recorded_layers is not None and recorded_layers != num_layers):
        deepest = max(control_vector.directions)
        raise ValueError(
            f"{path} was made for a base with {recorded_layers or f'more than {deepest}'} layers (it has directions "
            f"for layers {sorted(control_vector.directions)}), but this model's base has {num_layers}."
        )
    layer = config.steering_layer
    if layer not in control_vector.directions:
        raise ValueError(
            f"{path} has directions for layers {sorted(control_vector.directions)} but none for this model's "
            f"steering_layer={layer}. Build the HyperSteer model with `steering_layer` set to one of those layers "
            "(llama.cpp's `direction.N` is the output of `model.model.layers[N]`)."
        )
    ignored = sorted(set(control_vector.directions) - {layer})
    if ignored:
        warnings.warn(
            f"{path} has directions for layers {sorted(control_vector.directions)}; HyperSteer steers one layer, so "
            f"only layer {layer} is used and layers {ignored} are ignored (llama.cpp would add all of them).",
            UserWarning,
            stacklevel=2,
        )
    if config.steering_positions != "all" or config.token_gate:
        logger.warning(
            "llama.cpp adds a control vector at every position; this model steers "
            f"{config.steering_positions!r} positions{' with a token gate' if config.token_gate else ''}, so its "
            "outputs will differ from llama.cpp's."
        )
    device = model.hypernetwork.output_projection.weight.device
    return (strength * control_vector.directions[layer]).to(device=device, dtype=torch.float32)[None, :]


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ExportArguments:
    """Arguments of `hypersteer-export`."""

    model: str = field(metadata={"help": "A saved HyperSteer folder or Hub id (the first positional argument)."})
    steering_prompt: list[str] = field(metadata={"help": "One or more concepts; several compose as in `generate`."})
    output: str = field(metadata={"help": "Path of the control-vector GGUF to write (e.g. concept.gguf)."})
    factor: list[float] | None = field(
        default=None,
        metadata={
            "help": "One steering factor per concept, or one for all (default: the model's default factor; with "
            "--in_prompt, its prompted_steering_factor)."
        },
    )
    in_prompt: bool = field(
        default=False,
        metadata={
            "help": "Export for use while the prompt also asks for the concept (what shows concepts the model never "
            "trained on): the factor defaults to the model's prompted_steering_factor, and the words to start the "
            "user turn with are printed and stored in the file."
        },
    )
    context: list[str] | None = field(
        default=None,
        metadata={
            "help": "User prompt(s) to export for (cross_attention / in_context models): one prompt gives its exact "
            "vector, several their mean."
        },
    )
    context_file: str | None = field(
        default=None,
        metadata={"help": "A prompt set to average over: text lines, or JSONL/parquet with `input`/`instruction`."},
    )
    batch_size: int = field(default=8, metadata={"help": "Context prompts per base pass."})
    dtype: str = field(
        default="float32", metadata={"help": "Dtype of the base model.", "choices": list(DTYPE_CHOICES)}
    )

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"`--batch_size` must be at least 1, got {self.batch_size}.")
        if self.context and self.context_file:
            raise ValueError("Pass either `--context` or `--context_file`, not both.")


def make_parser() -> HfArgumentParser:
    return HfArgumentParser(
        ExportArguments,
        prog="hypersteer-export",
        usage="hypersteer-export MODEL --steering_prompt P [P ...] [--factor F [F ...]] [--in_prompt] --output "
        "FILE.gguf [--context TEXT [TEXT ...] | --context_file FILE]",
        description=__doc__.split("\n\n")[0],
    )


def _positional_model(argv: list[str]) -> list[str]:
    """`hypersteer-export MODEL --flags ...`: the leading positional argument is `--model`."""
    if argv and not argv[0].startswith("-") and not (len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml"))):
        return ["--model", argv[0], *argv[1:]]
    return argv


def main(argv: Sequence[str] | None = None) -> Path:
    argv = _positional_model(list(sys.argv[1:] if argv is None else argv))
    (args,) = parse_arguments(make_parser(), argv)
    import logging as std_logging

    std_logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=std_logging.INFO)
    logger.setLevel(std_logging.INFO)
    contexts = args.context
    if args.context_file is not None:
        from .concept_data import load_instructions

        contexts = load_instructions(args.context_file, flag="--context_file")
    model = HyperSteerModel.from_pretrained(args.model, dtype=resolve_dtype(args.dtype))
    path = export_control_vector(
        model, args.output, args.steering_prompt, args.factor, contexts, args.batch_size, args.in_prompt
    )
    logger.info(
        f"Wrote {path}: direction.{model.config.steering_layer} for {args.steering_prompt}; use it with "
        f"`llama-cli -m <base>.gguf --control-vector {path}`."
    )
    if args.in_prompt:
        instruction = prompt_steering_system_prompt(args.steering_prompt)
        logger.info(f"Start each user turn with this line, then a blank line, then the request:\n{instruction}")
    return path


if __name__ == "__main__":
    main()


__all__ = [
    "ControlVector",
    "ExportArguments",
    "compute_export_vector",
    "control_vector_layer",
    "export_control_vector",
    "load_control_vector",
    "main",
    "read_control_vector",
    "write_control_vector",
]
