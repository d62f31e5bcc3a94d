"""A browser demo: unsteered, prompt-steered, HyperSteer and Prompt + HyperSteer answers side by side, and the concept
as a control vector.

Ready-to-copy commands:

    pip install "modeling-hypersteer[demo]"
    hypersteer-demo outputs/quickstart                       # http://127.0.0.1:7860
    hypersteer-demo outputs/quickstart --port 7861 --max_new_tokens 96 --max_steering_factor 8

The concept box takes one concept per line, optionally with its own factor after a bar (`pirate speech | 0.5`); lines
without one use the slider's factor. Several lines compose as in `generate` (`sum_k factor_k * v_k`). Prompt steering
writes the concepts into the user turn before the prompt (`prompt_steering_turns`, the evaluation's baseline; factors
do not apply to it). "Prompt + HyperSteer" adds the concepts' vectors on top of that prompt, each at the second
slider's factor (the model's calibrated `prompted_steering_factor`, else half the steering factor): the use that
shows concepts the model never trained on. The four answers come from ONE batched, greedy `generate` call (rows: the
plain prompt unsteered, the prompt with the steering instruction unsteered, the plain prompt steered by HyperSteer,
the prompt with the steering instruction steered by HyperSteer) and stream token by token.

"Export control vector" writes the current concepts as a llama.cpp control vector (see `modeling_hypersteer.export`);
for `cross_attention` / `in_context` models the vector is the one for the prompt in the page.
"""

import math
import queue
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer
from transformers.utils import logging

from .cli import DTYPE_CHOICES, parse_arguments, resolve_dtype
from .data import format_prompt
from .evaluation import prompt_steering_turns
from .export import _positional_model, export_control_vector
from .modeling_hypersteer import HyperSteerModel


logger = logging.get_logger(__name__)

METHOD_LABELS = ("Unsteered", "Prompt-steered", "HyperSteer", "Prompt + HyperSteer")
ANSWER_IDS = ("unsteered", "prompt_steered", "hypersteer", "prompt_hypersteer")
MAX_CONCEPTS = 8


class DemoInputError(ValueError):
    """Bad input typed in the page; its message is shown in the page."""


def parse_concepts(text: str, default_factor: float, max_factor: float) -> list[tuple[str, float]]:
    """Read the concept box: one concept per line, optionally `concept | factor`.

    Returns:
        `[(concept, factor), ...]` in line order.

    Raises:
        [`DemoInputError`] naming the bad line: no concept, an unreadable factor, or a factor outside
        `[-max_factor, max_factor]`.
    """
    _check_factor(default_factor, max_factor, "The slider's factor")
    concepts = []
    for number, line in enumerate((text or "").splitlines(), start=1):
        if not line.strip():
            continue
        concept, factor = line, default_factor
        if "|" in line:
            concept, raw = line.rsplit("|", 1)
            try:
                factor = float(raw)
            except ValueError:
                raise DemoInputError(
                    f"Line {number}: cannot read the factor {raw.strip()!r}; write `concept | 0.5`."
                ) from None
            _check_factor(factor, max_factor, f"Line {number}: the factor")
        concept = concept.strip()
        if not concept:
            raise DemoInputError(f"Line {number} has a factor but no concept; write `concept | {factor:g}`.")
        concepts.append((concept, factor))
    if not concepts:
        raise DemoInputError(
            "Enter a concept to steer toward, e.g. `references to oceans, tides and marine life` (one per line)."
        )
    if len(concepts) > MAX_CONCEPTS:
        raise DemoInputError(f"{len(concepts)} concepts given; the demo composes at most {MAX_CONCEPTS}.")
    return concepts


def _check_factor(factor, max_factor: float, what: str) -> None:
    if factor is None or not math.isfinite(factor) or abs(factor) > max_factor:
        raise DemoInputError(f"{what} is {factor}, outside the allowed range [-{max_factor:g}, {max_factor:g}].")


class _RowStreamer(BaseStreamer):
    """Collects the generated tokens of every batch row and hands them to the page as they come.

    `generate` first `put`s the prompt `(batch_size, sequence_length)`, then one token per row per step
    `(batch_size,)`; `end()` closes the stream. Each `put` after the prompt becomes one queue item of shape
    `(batch_size,)`.
    """

    def __init__(self):
        self.queue: queue.Queue = queue.Queue()
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.queue.put(value.reshape(value.shape[0], -1))

    def end(self) -> None:
        self.queue.put(None)


class _StopWhenSet(StoppingCriteria):
    """Stops every row of a `generate` call once `event` is set."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


@dataclass
class DemoSettings:
    """What the page allows and how it generates."""

    max_new_tokens: int = 128
    max_steering_factor: float = 10.0
    default_steering_factor: float = 1.0
    # The factor of the vectors on top of the prompt; None when the model was never calibrated for that use.
    prompted_steering_factor: float | None = None

    @property
    def prompted_factor(self) -> float:
        """The second slider's starting value: the calibrated factor, else half the steering factor."""
        if self.prompted_steering_factor is not None:
            return self.prompted_steering_factor
        return self.default_steering_factor / 2

    @classmethod
    def for_model(cls, model: HyperSteerModel, **kwargs) -> "DemoSettings":
        """Settings whose factors are the ones `model`'s config carries."""
        return cls(
            default_steering_factor=model.config.default_steering_factor,
            prompted_steering_factor=model.config.prompted_steering_factor,
            **kwargs,
        )


class SteeringDemo:
    """The page's logic, kept apart from Gradio so it can be called directly."""

    def __init__(self, model: HyperSteerModel, settings: DemoSettings | None = None):
        if model.tokenizer is None or not getattr(model.tokenizer, "chat_template", None):
            raise ValueError("The demo needs the model's tokenizer with a chat template; save it with the model.")
        self.model = model
        self.tokenizer = model.tokenizer
        self.settings = settings or DemoSettings.for_model(model)
        self.lock = threading.Lock()  # one generation at a time on the shared model
        self.export_dir = Path(tempfile.mkdtemp(prefix="hypersteer-demo-"))

    def _check_prompt(self, user_prompt: str) -> str:
        if not user_prompt or not user_prompt.strip():
            raise DemoInputError("Enter a prompt for the model to answer.")
        return user_prompt.strip()

    def stream_answers(
        self, concept_text: str, factor: float, user_prompt: str, prompted_factor: float | None = None
    ) -> Iterator[tuple[str, str, str, str]]:
        """Yield the four answers `(unsteered, prompt_steered, hypersteer, prompt_hypersteer)` as they grow.

        `prompted_factor` is every concept's factor on top of the prompt (defaults to `settings.prompted_factor`).

        Raises:
            [`DemoInputError`] for an empty concept or prompt, or a factor out of range.
        """
        concepts = parse_concepts(concept_text, factor, self.settings.max_steering_factor)
        if prompted_factor is None:
            prompted_factor = self.settings.prompted_factor
        _check_factor(prompted_factor, self.settings.max_steering_factor, "The factor on top of the prompt")
        user_prompt = self._check_prompt(user_prompt)
        names = [concept for concept, _ in concepts]
        prompted_text = format_prompt(self.tokenizer, *prompt_steering_turns(names, user_prompt))
        texts = [format_prompt(self.tokenizer, user_prompt), prompted_text] * 2
        padding_side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        try:
            inputs = self.tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
        finally:
            self.tokenizer.padding_side = padding_side
        inputs = inputs.to(self.model.get_input_embeddings().weight.device)
        streamer = _RowStreamer()
        failure = []
        # A page that stops reading (a new click, a closed tab) closes this generator: the running `generate` is then
        # stopped at its next step and joined before the model is released, so two calls never share its hooks.
        cancelled = threading.Event()

        def run():
            try:
                with torch.no_grad():
                    self.model.generate(
                        **inputs,
                        # Composition with empty lists leaves the first two rows unsteered in the same batch.
                        steering_prompt=[[], [], names, names],
                        steering_factor=[[], [], [value for _, value in concepts], [prompted_factor] * len(names)],
                        max_new_tokens=self.settings.max_new_tokens,
                        do_sample=False,
                        streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([_StopWhenSet(cancelled)]),
                    )
            except Exception as error:  # reported to the page's caller below, never lost in the thread
                failure.append(error)
                streamer.end()

        eos = self.generation_eos_ids()
        tokens = [[] for _ in texts]
        finished = [False for _ in texts]
        with self.lock:
            thread = threading.Thread(target=run, daemon=True)
            thread.start()
            try:
                while (step := streamer.queue.get()) is not None:
                    for row in range(len(texts)):
                        for token in step[row].tolist():
                            if finished[row]:
                                break
                            if token in eos:
                                finished[row] = True
                            else:
                                tokens[row].append(token)
                    yield tuple(self.tokenizer.decode(row, skip_special_tokens=True) for row in tokens)
            finally:
                cancelled.set()
                thread.join()
        if failure:
            raise failure[0]
        yield tuple(self.tokenizer.decode(row, skip_special_tokens=True) for row in tokens)

    def generation_eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        if self.tokenizer.eos_token_id is not None:
            eos.append(self.tokenizer.eos_token_id)
        return set(eos)

    def export(self, concept_text: str, factor: float, user_prompt: str) -> Path:
        """Write the current concepts as a llama.cpp control vector and return its path."""
        concepts = parse_concepts(concept_text, factor, self.settings.max_steering_factor)
        contexts = None
        if self.model.config.hypernet_type != "no_context":
            contexts = [self._check_prompt(user_prompt)]
        slug = "-".join("".join(ch if ch.isalnum() else "_" for ch in name)[:40] for name, _ in concepts)[:80]
        path = self.export_dir / f"{slug or 'concept'}.gguf"
        with self.lock:
            return export_control_vector(
                self.model, path, [name for name, _ in concepts], [value for _, value in concepts], contexts
            )


def build_demo(model: HyperSteerModel, settings: DemoSettings | None = None):
    """The Gradio `Blocks` page for `model` (not launched)."""
    import gradio as gr

    demo_logic = SteeringDemo(model, settings)
    settings = demo_logic.settings
    limit = settings.max_steering_factor

    def answer(concept_text, factor, prompted_factor, user_prompt):
        try:
            for answers in demo_logic.stream_answers(concept_text, factor, user_prompt, prompted_factor):
                yield *answers, ""
        except DemoInputError as error:
            yield *([""] * len(METHOD_LABELS)), f"⚠️ {error}"

    def export(concept_text, factor, user_prompt):
        try:
            path = demo_logic.export(concept_text, factor, user_prompt)
        except DemoInputError as error:
            return gr.DownloadButton(visible=False), f"⚠️ {error}"
        return (
            gr.DownloadButton(label=f"Download {path.name}", value=str(path), visible=True),
            f"Control vector ready: `direction.{model.config.steering_layer}`, load it in llama.cpp with "
            f"`--control-vector {path.name}`.",
        )

    # No telemetry: the page makes no network calls of its own.
    base_name = (
        model.config.base_model_name_or_path
        or model.language_model.name_or_path
        or model.language_model.config.get_text_config().model_type
    )
    with gr.Blocks(title="HyperSteer", analytics_enabled=False) as page:
        gr.Markdown(
            f"## HyperSteer: steer `{base_name}` with a sentence\n"
            f"`{model.config.hypernet_type}` hypernetwork, steering layer {model.config.steering_layer}. One concept "
            "per line; `concept | 0.5` gives a line its own factor."
        )
        with gr.Row():
            concepts = gr.Textbox(
                label="Concept(s)",
                placeholder="references to oceans, tides and marine life",
                lines=2,
                elem_id="concepts",
            )
            factor = gr.Slider(
                minimum=-limit,
                maximum=limit,
                value=settings.default_steering_factor,
                step=0.05,
                label="Steering factor",
                elem_id="factor",
            )
            prompted_factor = gr.Slider(
                minimum=-limit,
                maximum=limit,
                value=settings.prompted_factor,
                step=0.05,
                label="Factor on top of the prompt ("
                + (
                    "the model's calibrated one"
                    if settings.prompted_steering_factor is not None
                    else "not calibrated; starts at half the steering factor"
                )
                + ")",
                elem_id="prompted_factor",
            )
        prompt = gr.Textbox(label="Your prompt", placeholder="Describe a city.", lines=2, elem_id="prompt")
        with gr.Row():
            generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
            export_button = gr.Button("Export control vector (llama.cpp .gguf)", elem_id="export")
            download = gr.DownloadButton("Download", visible=False, elem_id="download")
        status = gr.Markdown(elem_id="status")
        with gr.Row():
            outputs = [
                gr.Textbox(label=label, lines=8, interactive=False, elem_id=elem_id)
                for label, elem_id in zip(METHOD_LABELS, ANSWER_IDS)
            ]
        generate_button.click(answer, [concepts, factor, prompted_factor, prompt], [*outputs, status])
        export_button.click(export, [concepts, factor, prompt], [download, status])
    return page


@dataclass
class DemoArguments:
    """Arguments of `hypersteer-demo`."""

    model: str = field(metadata={"help": "A saved HyperSteer folder or Hub id (the first positional argument)."})
    host: str = field(default="127.0.0.1", metadata={"help": "Address to listen on."})
    port: int = field(default=7860, metadata={"help": "Port to listen on."})
    max_new_tokens: int = field(default=128, metadata={"help": "Tokens generated per answer."})
    max_steering_factor: float = field(default=10.0, metadata={"help": "Largest |factor| the page accepts."})
    dtype: str = field(default="auto", metadata={"help": "Dtype of the base model.", "choices": list(DTYPE_CHOICES)})

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"`--max_new_tokens` must be at least 1, got {self.max_new_tokens}.")
        if not math.isfinite(self.max_steering_factor) or self.max_steering_factor <= 0:
            raise ValueError(
                f"`--max_steering_factor` must be a positive finite number, got {self.max_steering_factor}."
            )


def make_parser() -> HfArgumentParser:
    return HfArgumentParser(
        DemoArguments,
        prog="hypersteer-demo",
        usage="hypersteer-demo MODEL [--host 127.0.0.1] [--port 7860] [--max_new_tokens 128] [--max_steering_factor 10]",
        description=__doc__.split("\n\n")[0],
    )


def main(argv: Sequence[str] | None = None) -> None:
    argv = _positional_model(list(sys.argv[1:] if argv is None else argv))
    (args,) = parse_arguments(make_parser(), argv)
    try:
        import gradio  # noqa: F401
    except ImportError as error:
        raise ImportError('The demo needs Gradio: `pip install "modeling-hypersteer[demo]"`.') from error
    model = HyperSteerModel.from_pretrained(args.model, dtype=resolve_dtype(args.dtype)).eval()
    settings = DemoSettings.for_model(
        model, max_new_tokens=args.max_new_tokens, max_steering_factor=args.max_steering_factor
    )
    build_demo(model, settings).queue().launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()


__all__ = [
    "ANSWER_IDS",
    "DemoArguments",
    "DemoInputError",
    "DemoSettings",
    "SteeringDemo",
    "build_demo",
    "main",
    "parse_concepts",
]
