"""Tokenisation of concept rows into model inputs (chat template, labels on the response only) and the collator."""

from dataclasses import dataclass
from typing import Any

import datasets
import torch
from datasets import Dataset, DatasetDict, Value
from jinja2.exceptions import TemplateError
from transformers import PreTrainedTokenizerBase
from transformers.utils import logging

from ..modeling_hypersteer import tokenize_steering_prompts


logger = logging.get_logger(__name__)

MODEL_INPUT_COLUMNS = (
    "input_ids",
    "attention_mask",
    "labels",
    "steering_input_ids",
    "steering_attention_mask",
    "steering_factor",
)
# Columns a distillation row adds to `MODEL_INPUT_COLUMNS`, with the value each is padded with. `contrast_*` is the
# second description the row is steered by (on the same text); `teacher_*` / `teacher_contrast_*` are the prompt and
# response under the frozen base with the first / second description in the prompt (see `HyperSteerTrainer`).
DISTILLATION_COLUMNS = {
    "contrast_steering_input_ids": "pad",
    "contrast_steering_attention_mask": 0,
    "teacher_input_ids": "pad",
    "teacher_attention_mask": 0,
    "teacher_labels": -100,
    "teacher_contrast_input_ids": "pad",
    "teacher_contrast_attention_mask": 0,
    "teacher_contrast_labels": -100,
}


def format_prompt(tokenizer: PreTrainedTokenizerBase, instruction: str, system_prompt: str | None = None) -> str:
    """Renders one user turn (and an optional system turn) with the tokenizer's chat template, ready for the reply.

    The text comes from `apply_chat_template(..., tokenize=False, add_generation_prompt=True)`, so it already holds
    BOS when the template writes it: tokenise it with `add_special_tokens=False`. If the template rejects a system
    role (e.g. Gemma-2's), the system text is folded into the user turn as `"{system_prompt}\\n\\n{instruction}"`.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"The tokenizer {type(tokenizer).__name__} ({getattr(tokenizer, 'name_or_path', '')!r}) has no chat "
            "template; HyperSteer formats prompts like the instruction-tuned base does. Load the base's "
            "instruction-tuned tokenizer or set `tokenizer.chat_template`."
        )
    user = {"role": "user", "content": instruction}
    if system_prompt is None:
        return tokenizer.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
    try:
        return tokenizer.apply_chat_template(
            [{"role": "system", "content": system_prompt}, user], tokenize=False, add_generation_prompt=True
        )
    except TemplateError as err:
        logger.warning_once(
            f"The chat template rejects a system turn ({err}); folding the system prompt into the user turn instead."
        )
        folded = {"role": "user", "content": f"{system_prompt}\n\n{instruction}"}
        return tokenizer.apply_chat_template([folded], tokenize=False, add_generation_prompt=True)


# Rendered as the assistant's reply to find what the chat template writes after a reply; plain ASCII words that no
# template trims or escapes.
_SENTINEL_REPLY = "HyperSteer sentinel reply"


def turn_end_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokens that end an assistant turn in the tokenizer's chat template, i.e. what the chat model generates when
    its reply is done: `<end_of_turn>` for Gemma-2, `<|im_end|>` for SmolLM2 and Qwen2, `<|eot_id|>` for Llama-3.

    Read from the template itself: a user turn and an assistant turn whose text is a sentinel are rendered, and the
    text after the sentinel (without the whitespace that separates turns) is tokenised. A template that writes nothing
    after a reply falls back to the EOS token, with a warning.
    """
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _SENTINEL_REPLY}]
    rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
    position = rendered.rfind(_SENTINEL_REPLY)
    tail = rendered[position + len(_SENTINEL_REPLY) :].strip() if position >= 0 else ""
    if tail:
        return tokenizer(tail, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"The chat template of {type(tokenizer).__name__} writes no turn end after an assistant reply and the "
            "tokenizer has no EOS token, so labels could not teach steered generation to stop. Set "
            "`tokenizer.eos_token`."
        )
    logger.warning_once(
        f"The chat template writes nothing after an assistant reply; labels end with the EOS token "
        f"{tokenizer.eos_token!r} instead."
    )
    return [tokenizer.eos_token_id]


def _tokenize_batch(
    batch: dict[str, list],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    max_steering_prompt_length: int,
    system_prompt: str | None,
) -> dict[str, list]:
    """Tokenises a batch of rows; rows whose prompt leaves no room for a response token are left out."""
    turn_end = turn_end_ids(tokenizer)
    prompts = [format_prompt(tokenizer, instruction, system_prompt) for instruction in batch["input"]]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(list(batch["output"]), add_special_tokens=False)["input_ids"]
    steering = tokenize_steering_prompts(tokenizer, list(batch["output_concept"]), max_steering_prompt_length)
    steering_lengths = steering["steering_attention_mask"].sum(dim=1).tolist()
    steering_ids = steering["steering_input_ids"].tolist()
    factors = batch.get("steering_factor") or [1.0] * len(prompts)

    features = {name: [] for name in MODEL_INPUT_COLUMNS}
    for row, (prompt, response) in enumerate(zip(prompt_ids, response_ids)):
        budget = max_length - len(prompt)
        if budget <= 0:
            continue
        response = (response + turn_end)[:budget]
        features["input_ids"].append(prompt + response)
        features["attention_mask"].append([1] * (len(prompt) + len(response)))
        features["labels"].append([-100] * len(prompt) + response)
        length = steering_lengths[row]
        features["steering_input_ids"].append(steering_ids[row][:length])
        features["steering_attention_mask"].append([1] * length)
        features["steering_factor"].append(float(factors[row]))
    return features


def tokenize_example(
    example: dict[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int = 1024,
    max_steering_prompt_length: int = 64,
    system_prompt: str | None = None,
) -> dict[str, list] | None:
    """Tokenises one AxBench row into HyperSteer model inputs.

    The prompt (`input` through `format_prompt`) and the response (`output`) are tokenised separately and their ids
    concatenated, so the labels are exactly the response tokens followed by the chat template's turn end
    (`turn_end_ids`, e.g. `<end_of_turn>` for Gemma-2); prompt positions get -100. When the row exceeds `max_length`,
    the response is cut from the right (then without the turn end). The steering prompt
    (`output_concept`) goes through `tokenize_steering_prompts`, exactly as at inference.

    Returns:
        `dict` with `input_ids`, `attention_mask`, `labels` (lists of length `sequence_length`),
        `steering_input_ids`, `steering_attention_mask` (lists of length `steering_sequence_length`) and
        `steering_factor` (`float`, the row's own or 1.0), or `None` when the prompt alone fills `max_length`.
    """
    batch = {key: [value] for key, value in example.items()}
    features = _tokenize_batch(batch, tokenizer, max_length, max_steering_prompt_length, system_prompt)
    if not features["input_ids"]:
        return None
    return {name: values[0] for name, values in features.items()}


def tokenize_dataset(
    dataset: Dataset | DatasetDict,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int = 1024,
    max_steering_prompt_length: int = 64,
    system_prompt: str | None = None,
    num_proc: int | None = None,
    batch_size: int = 256,
) -> Dataset | DatasetDict:
    """Maps `tokenize_example` over a dataset (or each split of a `DatasetDict`), keeping only model input columns.

    Rows whose prompt alone fills `max_length` are dropped and counted in a warning. `max_steering_prompt_length`
    should be the model's `config.max_steering_prompt_length` so that training and inference truncate alike.

    Returns:
        The same container with the columns `input_ids`, `attention_mask`, `labels`, `steering_input_ids`,
        `steering_attention_mask` and `steering_factor` (`float32`).
    """
    if isinstance(dataset, DatasetDict):
        return DatasetDict(
            {
                name: tokenize_dataset(
                    split, tokenizer, max_length, max_steering_prompt_length, system_prompt, num_proc, batch_size
                )
                for name, split in dataset.items()
            }
        )
    missing = [column for column in ("input", "output", "output_concept") if column not in dataset.column_names]
    if missing:
        raise ValueError(
            f"Cannot tokenize: the dataset lacks column(s) {missing} (it has {dataset.column_names}); load it with "
            "`load_concept_data` or rename the columns to the AxBench schema."
        )
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"`max_length` must be an int >= 2, got {max_length!r}.")
    if len(dataset) == 0:
        empty = {name: [] for name in MODEL_INPUT_COLUMNS}
        return Dataset.from_dict(empty, features=_model_input_features())
    tokenized = dataset.map(
        _tokenize_batch,
        batched=True,
        batch_size=batch_size,
        num_proc=num_proc,
        remove_columns=dataset.column_names,
        fn_kwargs={
            "tokenizer": tokenizer,
            "max_length": max_length,
            "max_steering_prompt_length": max_steering_prompt_length,
            "system_prompt": system_prompt,
        },
        features=_model_input_features(),
        desc="Tokenizing",
    )
    dropped = len(dataset) - len(tokenized)
    if dropped == len(dataset):
        raise ValueError(
            f"All {dropped} rows were dropped: no prompt leaves room for a response within max_length={max_length}. "
            "Raise `max_length`."
        )
    if dropped:
        logger.warning(
            f"Dropped {dropped} of {len(dataset)} rows whose chat-formatted prompt alone fills max_length={max_length} "
            "tokens, leaving no response token to train on. Raise `max_length` to keep them."
        )
    return tokenized


def _model_input_features(with_distillation: bool = False) -> datasets.Features:
    ids = datasets.List(Value("int64"))
    features = datasets.Features(
        input_ids=ids,
        attention_mask=ids,
        labels=ids,
        steering_input_ids=ids,
        steering_attention_mask=ids,
        steering_factor=Value("float32"),
    )
    if with_distillation:
        features.update({name: ids for name in DISTILLATION_COLUMNS})
    return features


@dataclass
class HyperSteerDataCollator:
    """Pads tokenised HyperSteer rows (from `tokenize_dataset`) into a batch of tensors.

    Args:
        tokenizer (`PreTrainedTokenizerBase`): supplies `pad_token_id`; it must have a pad token.
        padding_side (`str`, *optional*, defaults to `"right"`): `"right"` or `"left"`, for the base-prompt tensors.
            Steering prompts are always right-padded, as `tokenize_steering_prompts` does at inference.
        pad_to_multiple_of (`int`, *optional*): round the base sequence length up to a multiple of this.
        label_pad_token_id (`int`, *optional*, defaults to -100): label of padding positions.

    Returns a `dict` with (each key present when the rows have it):
        - `input_ids` (`torch.LongTensor` of shape `(batch_size, sequence_length)`), padded with `pad_token_id`;
        - `attention_mask` (`torch.LongTensor` of shape `(batch_size, sequence_length)`), 0 on padding;
        - `labels` (`torch.LongTensor` of shape `(batch_size, sequence_length)`), -100 on prompt and padding;
        - `steering_input_ids` (`torch.LongTensor` of shape `(batch_size, steering_sequence_length)`), right-padded;
        - `steering_attention_mask` (`torch.LongTensor` of shape `(batch_size, steering_sequence_length)`);
        - `steering_factor` (`torch.FloatTensor` of shape `(batch_size,)`).

    >>> collator = HyperSteerDataCollator(tokenizer, padding_side="left")
    >>> batch = collator([
    ...     {"input_ids": [1, 5, 6, 7], "attention_mask": [1, 1, 1, 1], "labels": [-100, -100, 6, 7],
    ...      "steering_input_ids": [9, 8], "steering_attention_mask": [1, 1], "steering_factor": 1.0},
    ...     {"input_ids": [1, 5, 7], "attention_mask": [1, 1, 1], "labels": [-100, -100, 7],
    ...      "steering_input_ids": [9], "steering_attention_mask": [1], "steering_factor": 0.5},
    ... ])
    >>> batch["input_ids"]
    tensor([[1, 5, 6, 7],
            [0, 1, 5, 7]])
    >>> batch["labels"]
    tensor([[-100, -100,    6,    7],
            [-100, -100, -100,    7]])
    >>> batch["steering_input_ids"], batch["steering_factor"]
    (tensor([[9, 8],
            [9, 0]]), tensor([1.0000, 0.5000]))
    """

    tokenizer: PreTrainedTokenizerBase
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None
    label_pad_token_id: int = -100

    def __post_init__(self):
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"`padding_side` must be 'left' or 'right', got {self.padding_side!r}.")
        if self.tokenizer.pad_token_id is None:
            raise ValueError(
                f"The tokenizer {type(self.tokenizer).__name__} has no pad token, so rows of different lengths cannot "
                "be batched. Set one, e.g. `tokenizer.pad_token = tokenizer.eos_token`."
            )
        if self.pad_to_multiple_of is not None and (
            not isinstance(self.pad_to_multiple_of, int) or self.pad_to_multiple_of < 1
        ):
            raise ValueError(f"`pad_to_multiple_of` must be a positive int or None, got {self.pad_to_multiple_of!r}.")

    @staticmethod
    def _as_list(value) -> list[int]:
        return value.tolist() if isinstance(value, torch.Tensor) else list(value)

    def _present(self, features: list[dict], key: str) -> bool:
        count = sum(key in feature for feature in features)
        if 0 < count < len(features):
            raise ValueError(f"{count} of {len(features)} rows have {key!r}; either every row has it or none does.")
        return count == len(features)

    def _pad(self, sequences: list[list[int]], value: int, length: int, side: str) -> torch.Tensor:
        out = torch.full((len(sequences), length), value, dtype=torch.long)
        for row, sequence in enumerate(sequences):
            if sequence:
                tensor = torch.tensor(sequence, dtype=torch.long)
                if side == "left":
                    out[row, length - len(sequence) :] = tensor
                else:
                    out[row, : len(sequence)] = tensor
        return out

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("Cannot collate an empty list of rows.")
        if not self._present(features, "input_ids"):
            raise ValueError(
                f"Every row needs 'input_ids'; got keys {sorted(features[0])}. Run `tokenize_dataset` first."
            )
        ignored = sorted(set().union(*features) - set(MODEL_INPUT_COLUMNS) - set(DISTILLATION_COLUMNS))
        if ignored:
            logger.warning_once(f"HyperSteerDataCollator ignores the non-model column(s) {ignored}.")
        pad_token_id = self.tokenizer.pad_token_id
        input_ids = [self._as_list(feature["input_ids"]) for feature in features]
        length = max(len(ids) for ids in input_ids)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        if self._present(features, "attention_mask"):
            masks = [self._as_list(feature["attention_mask"]) for feature in features]
        else:
            masks = [[1] * len(ids) for ids in input_ids]
        batch = {
            "input_ids": self._pad(input_ids, pad_token_id, length, self.padding_side),
            "attention_mask": self._pad(masks, 0, length, self.padding_side),
        }
        if self._present(features, "labels"):
            labels = [self._as_list(feature["labels"]) for feature in features]
            batch["labels"] = self._pad(labels, self.label_pad_token_id, length, self.padding_side)
        if self._present(features, "steering_input_ids"):
            steering_ids = [self._as_list(feature["steering_input_ids"]) for feature in features]
            if self._present(features, "steering_attention_mask"):
                steering_masks = [self._as_list(feature["steering_attention_mask"]) for feature in features]
            else:
                steering_masks = [[1] * len(ids) for ids in steering_ids]
            steering_length = max(len(ids) for ids in steering_ids)
            batch["steering_input_ids"] = self._pad(steering_ids, pad_token_id, steering_length, "right")
            batch["steering_attention_mask"] = self._pad(steering_masks, 0, steering_length, "right")
        if self._present(features, "steering_factor"):
            batch["steering_factor"] = torch.tensor(
                [float(feature["steering_factor"]) for feature in features], dtype=torch.float32
            )
        for name, pad_value in DISTILLATION_COLUMNS.items():
            # Real rows carry these columns empty; a batch without distillation rows gets `(batch_size, 0)` tensors.
            if self._present(features, name):
                sequences = [self._as_list(feature[name]) for feature in features]
                value = pad_token_id if pad_value == "pad" else pad_value
                batch[name] = self._pad(sequences, value, max(len(sequence) for sequence in sequences), "right")
        return batch


__all__ = [
    "DISTILLATION_COLUMNS",
    "MODEL_INPUT_COLUMNS",
    "HyperSteerDataCollator",
    "format_prompt",
    "tokenize_dataset",
    "tokenize_example",
    "turn_end_ids",
]
