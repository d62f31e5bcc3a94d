"""Hub integration: the model card, `push_to_hub`, `train_hypersteer.py --push_to_hub`, and a download-style round trip.

Nothing reaches the Hub. `HfApi.create_repo` and `HfApi.upload_folder` are replaced by fakes. The fakes record each
call and copy what would be uploaded into `tmp_path`, filtered with huggingface_hub's own pattern rules. Every
other upload path goes through `HfApi.create_commit`, which fails the test if it is called. `Trainer` 5.23 reaches
the Hub only through `transformers.trainer.hf_api()`, a cached `HfApi` instance (`create_repo` in `init_hf_repo`,
`upload_folder` in `push_to_hub` and `_push_from_checkpoint`). Patching the class therefore captures its calls too.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch
from conftest import BLOCK_PACKAGE_PREAMBLE, build_tiny_base, cli_arguments, save_tiny_base
from huggingface_hub import CommitInfo, HfApi, ModelCard, RepoUrl
from huggingface_hub.hf_api import DEFAULT_IGNORE_PATTERNS
from huggingface_hub.utils import filter_repo_objects
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import train_hypersteer
from modeling_hypersteer import HyperSteerConfig, HyperSteerModel
from modeling_hypersteer.model_card import push_to_hub, render_model_card, write_model_card
from modeling_hypersteer.modeling_hypersteer import AUTO_MAP, REMOTE_CODE_FILES


PACKAGE_DIR = Path(__file__).resolve().parent.parent / "modeling_hypersteer"
STEERING_PROMPTS = ["references to legal terminology", "C/C++ syntax"]
# What `PreTrainedTokenizerFast.save_pretrained` writes for the tiny tokenizer of conftest.py.
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
CHECKPOINT_FILES = {
    "README.md",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    *REMOTE_CODE_FILES,
    *TOKENIZER_FILES,
}


class FakeHub:
    """Stands in for the Hub: records `create_repo` / `upload_folder` calls and keeps a copy of each upload."""

    def __init__(self, root: Path):
        self.root = root
        self.repos: list[dict] = []
        self.uploads: list[dict] = []

    def create_repo(self, api, repo_id, *, token=None, private=None, exist_ok=False, repo_type=None, **kwargs):
        self.repos.append({"repo_id": repo_id, "private": private, "exist_ok": exist_ok, "repo_type": repo_type})
        return RepoUrl(f"https://huggingface.co/{repo_id if '/' in repo_id else 'fake-user/' + repo_id}")

    def upload_folder(
        self,
        api,
        *,
        repo_id,
        folder_path,
        path_in_repo=None,
        commit_message=None,
        revision=None,
        allow_patterns=None,
        ignore_patterns=None,
        run_as_future=False,
        **kwargs,
    ):
        folder_path = Path(folder_path)
        ignore = [ignore_patterns] if isinstance(ignore_patterns, str) else list(ignore_patterns or [])
        candidates = sorted(
            path.relative_to(folder_path).as_posix() for path in folder_path.rglob("*") if path.is_file()
        )
        files = list(
            filter_repo_objects(
                candidates, allow_patterns=allow_patterns, ignore_patterns=ignore + DEFAULT_IGNORE_PATTERNS
            )
        )
        destination = self.root / f"upload-{len(self.uploads)}" / (path_in_repo or "")
        for name in files:
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(folder_path / name, destination / name)
        self.uploads.append(
            {
                "repo_id": repo_id,
                "commit_message": commit_message,
                "path_in_repo": path_in_repo,
                "revision": revision,
                "files": set(files),
                "folder": destination,
            }
        )
        oid = f"{len(self.uploads):040x}"
        info = CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/{oid}",
            commit_message=commit_message,
            commit_description="",
            oid=oid,
        )
        if run_as_future:
            future = Future()
            future.set_result(info)
            return future
        return info


@pytest.fixture
def hub(monkeypatch, tmp_path):
    fake = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(HfApi, "create_repo", lambda api, *args, **kwargs: fake.create_repo(api, *args, **kwargs))
    monkeypatch.setattr(HfApi, "upload_folder", lambda api, **kwargs: fake.upload_folder(api, **kwargs))

    def no_commit(*args, **kwargs):
        raise AssertionError(f"Unexpected Hub commit: create_commit{args[1:]}{kwargs}")

    monkeypatch.setattr(HfApi, "create_commit", no_commit)
    return fake


def _python_snippet(card: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", card, flags=re.DOTALL)
    assert len(blocks) == 1, blocks
    return blocks[0]


def _prompts(tokenizer):
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
        for text in ("Explain sorting.", "Hi")
    ]
    return tokenizer(texts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")


def test_push_to_hub_uploads_the_checkpoint_and_a_card_with_the_key_facts(hub, tiny_tokenizer):
    model = HyperSteerModel.from_base_model(
        build_tiny_base("gemma2", len(tiny_tokenizer)),
        tokenizer=tiny_tokenizer,
        base_model_name_or_path="me/tiny-gemma2-base",
        base_model_revision="0123abc",
        steering_layer=3,
        hypernet_type="no_context",
        hypernet_num_layers=2,
        hypernet_init="random",
        token_gate=True,
        steering_positions="generated",
    )
    heldin = [f"held-in concept {index}" for index in range(7)]
    heldout = ["references to legal terminology", "C/C++ syntax", "mathematical equations"]
    split = {"heldin_concepts": heldin, "heldout_concepts": heldout, "sources": ["data.parquet"], "seed": 42}

    info = push_to_hub(
        model,
        "me/hypersteer-tiny",
        private=True,
        commit_message="Upload",
        concept_split=split,
        dataset_names=["pyvene/axbench-concept500"],
    )

    assert hub.repos == [{"repo_id": "me/hypersteer-tiny", "private": True, "exist_ok": True, "repo_type": None}]
    assert len(hub.uploads) == 1
    upload = hub.uploads[0]
    assert upload["repo_id"] == "me/hypersteer-tiny" and upload["commit_message"] == "Upload"
    assert upload["path_in_repo"] is None
    assert str(info) == info.commit_url == f"https://huggingface.co/me/hypersteer-tiny/commit/{info.oid}"
    assert upload["files"] == CHECKPOINT_FILES
    folder = upload["folder"]

    # The weights are the hypernetwork's, complete, and nothing of the base.
    weights = load_file(folder / "model.safetensors")
    hypernet_state = model.hypernetwork.state_dict()
    assert set(weights) == {f"hypernetwork.{key}" for key in hypernet_state}
    for key, value in hypernet_state.items():
        assert torch.equal(weights[f"hypernetwork.{key}"], value)
    base_shapes = {tuple(value.shape) for value in model.language_model.state_dict().values() if value.dim() == 2}
    vocab_shape = tuple(model.language_model.get_input_embeddings().weight.shape)
    assert vocab_shape in base_shapes and all(tuple(value.shape) != vocab_shape for value in weights.values())
    num_parameters = sum(value.numel() for value in weights.values())
    assert num_parameters == sum(parameter.numel() for parameter in model.hypernetwork.parameters())

    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}
    assert config["base_model_name_or_path"] == "me/tiny-gemma2-base"
    for name in REMOTE_CODE_FILES:
        assert (folder / name).read_bytes() == (PACKAGE_DIR / name).read_bytes()

    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.license == "apache-2.0"
    assert card.data.pipeline_tag == "text-generation"
    assert card.data.base_model == "me/tiny-gemma2-base"
    assert card.data.datasets == ["pyvene/axbench-concept500"]
    assert {"hypersteer", "steering", "activation-steering"} <= set(card.data.tags)
    text = card.text
    for fact in (
        "https://huggingface.co/papers/2506.03292",
        "[`me/tiny-gemma2-base`](https://huggingface.co/me/tiny-gemma2-base)",
        "| Base model revision | `0123abc` |",
        "| Steering layer | 3 (of 4 decoder layers, 0-based) |",
        "| Variant (`hypernet_type`) | `no_context`:",
        "| Hypernetwork blocks (`hypernet_num_layers`) | 2 |",
        "| Hypernetwork initialisation (`hypernet_init`) | `random`:",
        "| Token gate (`token_gate`) | on:",
        "| Steering positions (`steering_positions`) | `generated`:",
        f"| Hypernetwork parameters | {num_parameters:,d} (",
        "| Held-in (training) concepts | 7 |",
        "| Held-out concepts | 3 |",
        "(split seed 42)",
        "| Held-out concepts (`eval_heldout_loss`) | not measured |",
        "| Held-in concepts, held-out prompts (`eval_heldin_loss`) | not measured |",
        "Steering quality (AxBench LLM-judge scores or offline loss ratios): not measured.",
        "**Not evaluated.**",
        'repo_id = "me/hypersteer-tiny"',
        "AutoModelForCausalLM.from_pretrained(repo_id, trust_remote_code=True)",
        'tokenizer.padding_side = "left"',
        "steering_prompt=",
        "steering_factor=",
        "**Prompt-style leakage.**",
        "interpretability and alignment",
        "released under the **Apache-2.0** licence",
        "remains\nunder its own licence",
    ):
        assert fact in text, fact
    for concept in heldout:
        assert f"- {concept}\n" in text
    assert "> [!WARNING]" not in text
    compile(_python_snippet(text), "usage-snippet", "exec")


def test_card_shows_recorded_numbers_only_and_counts_saved_weights(tmp_path):
    local_base = tmp_path / "some" / "where" / "bases" / "tiny"
    local_base.mkdir(parents=True)
    config = HyperSteerConfig(
        base_model_name_or_path=str(local_base),
        steering_layer=1,
        hidden_size=32,
        base_num_hidden_layers=2,
        hypernet_num_layers=1,
    )
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    save_file(
        {"hypernetwork.a": torch.zeros(3, 4), "hypernetwork.b": torch.zeros(5)}, output_dir / "model.safetensors"
    )
    (output_dir / "training_summary.json").write_text(
        json.dumps(
            {
                "metrics": {
                    "eval_heldin_loss": 2.5,
                    "eval_heldout_loss": 3.25,
                    "train_loss": 4.0,
                    "train_samples": 40,
                },
                "concept_split": "concept_split.json",
                "sources": [str(tmp_path / "data" / "train_data.parquet")],
            }
        )
    )
    (output_dir / "concept_split.json").write_text(
        json.dumps({"heldin_concepts": ["a", "b"], "heldout_concepts": ["c"], "sources": [], "seed": 1})
    )
    # The shape `evaluate_steering.py` writes (without a fingerprint: e.g. a summary from before fingerprints).
    offline = {
        "num_concepts": 3,
        "losses": {"none": 2.0, "prompt": 1.5, "hypersteer": 1.36, "prompt_wrong": 1.7, "hypersteer_wrong": 1.37},
        "gain_ratio": 1.28,
        "specificity_ratio": 0.05,
        "undefined_ratios": {},
        "prompt_placement": "user",
    }
    undefined = {
        **offline,
        "gain_ratio": None,
        "undefined_ratios": {
            "gain_ratio": "prompting did not lower the loss (L_none - L_prompt = -0.1, not positive)"
        },
    }
    (output_dir / "evaluation_summary.json").write_text(
        json.dumps(
            {
                "offline": {"heldout": offline, "heldin": undefined},
                "num_instructions": 12,
                "meta_info": {"cpu_count": 2},
                "config": {"batch_size": 8},
            }
        )
    )

    card = ModelCard.load(write_model_card(output_dir, config))
    assert card.data.base_model is None and card.data.datasets is None  # local paths are not Hub ids
    text = card.text
    for fact in (
        "> [!WARNING]",
        "`where/bases/tiny` (a local path)",  # the last three path components, not the author's layout
        "/data/train_data.parquet` (local)",
        "| Hypernetwork parameters | 17 (0.00 M) |",
        "| Held-in (training) concepts | 2 |",
        "| Held-out concepts | 1 |",
        "Training rows: 40.",
        "| Held-in concepts, held-out prompts (`eval_heldin_loss`) | 2.5000 |",
        "| Held-out concepts (`eval_heldout_loss`) | 3.2500 |",
        "| `heldout` | 3 | 1.2800 | 0.0500 | 1.3600 | 1.5000 | 2.0 |",
        "| `heldin` | 3 | undefined: prompting did not lower the loss (L_none - L_prompt = -0.1, not positive) | 0.0500 |",
        "| `num_instructions` | 12 |",
        "Prompting writes the concept's steering instruction before the instruction, in the user turn.",
        "**Offline evaluation only.**",
        'repo_id = "path/to/this/checkpoint"',
    ):
        assert fact in text, fact
    assert str(tmp_path) not in text
    assert "judge scores" not in text
    assert "cpu_count" not in text and "batch_size" not in text  # run records are not results

    judged = {
        "judge": {"model": "gpt-4o-mini", "base_url": "https://api.openai.com/v1", "requests_sent": 3},
        "excluded_concepts": {"d": ["prompt: no samples"]},
        "methods": {
            "hypersteer": {
                "score": 0.608,
                "concept_score": 1.1,
                "instruction_score": 1.5,
                "fluency_score": None,
                "num_concepts": 3,
                "failed_judgements": 2,
                "best_factors": {"c": 1.0},
                "per_concept": {"c": {"score": 0.608}},
            }
        },
    }
    text = render_model_card(config, evaluation_summary=judged, num_parameters=17)
    assert "judged by `gpt-4o-mini`" in text
    assert "- d: prompt: no samples" in text
    assert "| `hypersteer` | 0.6080 | 1.1000 | 1.5000 | not measured | 3 | 2 |" in text
    assert "Offline evaluation only" not in text and "Not evaluated" not in text
    assert "| Held-out concepts (`eval_heldout_loss`) | not measured |" in text
    assert "The held-in / held-out concept split was not recorded." in text
    # A Hub id given for the base goes into the metadata, but the config still names a local path: keep the warning.
    card = ModelCard(render_model_card(config, base_model="me/tiny-base", num_parameters=17))
    assert card.data.base_model == "me/tiny-base" and card.data.base_model_relation == "adapter"
    assert "> [!WARNING]" in card.text and "Load `me/tiny-base` yourself" in card.text
    with pytest.raises(TypeError, match="HyperSteerModel or HyperSteerConfig"):
        render_model_card(AutoModelForCausalLM)


def test_train_hypersteer_push_to_hub_uploads_the_hypersteer_card(hub, tiny_tokenizer, axbench_dir, tmp_path):
    output_dir = tmp_path / "run"
    argv = cli_arguments(
        base_model_name_or_path=save_tiny_base(tmp_path / "base", tiny_tokenizer),
        steering_layer=2,
        hypernet_num_layers=2,
        dataset_name_or_path=axbench_dir / "concept10" / "prod_2b_l20_v1" / "train_data.parquet",
        heldout_concepts=3,
        max_examples_per_concept=2,
        eval_examples_per_concept=1,
        max_length=128,
        per_device_train_batch_size=2,
        max_steps=2,
        eval_strategy="no",
        logging_steps=1,
        output_dir=output_dir,
        report_to="none",
        seed=0,
        push_to_hub=True,
        hub_model_id="me/x",
    )
    metrics = train_hypersteer.main(argv)

    assert hub.repos and all(repo["repo_id"] == "me/x" for repo in hub.repos)
    assert hub.uploads and all(upload["repo_id"] == "me/x" for upload in hub.uploads)
    final = hub.uploads[-1]
    assert final["commit_message"] == "Train HyperSteer" and final["path_in_repo"] is None
    assert CHECKPOINT_FILES | {"concept_split.json", "training_summary.json"} <= final["files"]
    assert not any(name.startswith("checkpoint-") for name in final["files"])
    assert all(key.startswith("hypernetwork.") for key in load_file(final["folder"] / "model.safetensors"))
    assert json.loads((final["folder"] / "config.json").read_text())["auto_map"] == AUTO_MAP

    split = json.loads((final["folder"] / "concept_split.json").read_text())
    summary = json.loads((final["folder"] / "training_summary.json").read_text())
    assert len(split["heldout_concepts"]) == 3 and len(split["heldin_concepts"]) >= 3
    # Every card Trainer uploaded during the run is ours, not Trainer's generic one.
    for upload in hub.uploads:
        if "README.md" in upload["files"]:
            card = ModelCard.load(upload["folder"] / "README.md")
            assert card.data.library_name == "transformers" and "hypersteer" in card.data.tags
            assert "More information needed" not in card.text and "## Training procedure" not in card.text
    text = ModelCard.load(final["folder"] / "README.md").text
    for fact in (
        "# x\n",
        'repo_id = "me/x"',
        f"| Held-in (training) concepts | {len(split['heldin_concepts'])} |",
        "| Held-out concepts | 3 |",
        f"| Held-in concepts, held-out prompts (`eval_heldin_loss`) | {metrics['eval_heldin_loss']:.4f} |",
        f"| Held-out concepts (`eval_heldout_loss`) | {summary['metrics']['eval_heldout_loss']:.4f} |",
        "`concept10/prod_2b_l20_v1/train_data.parquet` (local)",
        "AutoModelForCausalLM.from_pretrained(repo_id, trust_remote_code=True)",
    ):
        assert fact in text, fact
    for concept in split["heldout_concepts"]:
        assert f"- {' '.join(concept.split())}" in text


def test_uploaded_folder_loads_with_remote_code_only_and_generates_the_same(hub, tiny_tokenizer, tmp_path):
    base_dir = tmp_path / "base"
    build_tiny_base("llama", len(tiny_tokenizer)).save_pretrained(base_dir)
    model = HyperSteerModel.from_base_model(
        AutoModelForCausalLM.from_pretrained(base_dir),
        tokenizer=tiny_tokenizer,
        steering_layer=2,
        hypernet_num_layers=2,
        token_gate=True,
    )
    with torch.no_grad():
        # An untrained model steers by exactly zero; a non-zero head makes a lost weight show in the tokens.
        model.hypernetwork.output_projection.weight.normal_(0.0, 0.5)
    inputs = _prompts(tiny_tokenizer)
    generate_kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": tiny_tokenizer.pad_token_id}
    expected = model.generate(**inputs, steering_prompt=STEERING_PROMPTS, **generate_kwargs)
    unsteered = model.generate(**inputs, steering_prompt=STEERING_PROMPTS, steering_factor=0.0, **generate_kwargs)
    assert not torch.equal(expected, unsteered)

    push_to_hub(model, "me/roundtrip")
    download = tmp_path / "download" / "me--roundtrip"
    shutil.copytree(hub.uploads[-1]["folder"], download)
    torch.save(
        {"inputs": dict(inputs), "expected": expected, "generate_kwargs": generate_kwargs}, tmp_path / "reference.pt"
    )
    snippet = _python_snippet((download / "README.md").read_text(encoding="utf-8"))
    snippet = snippet.replace('repo_id = "me/roundtrip"', f"repo_id = {str(download)!r}")
    script = (
        textwrap.dedent(
            f"""
        import importlib, torch

        try:
            importlib.import_module("modeling_hypersteer")
        except ImportError:
            pass
        else:
            raise AssertionError("the package should not be importable")

        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained({str(download)!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        reference = torch.load({str(tmp_path / "reference.pt")!r})
        tokens = model.generate(**reference["inputs"], steering_prompt={STEERING_PROMPTS!r},
                                **reference["generate_kwargs"])
        assert torch.equal(tokens, reference["expected"]), (tokens, reference["expected"])
        print("GENERATION-OK")
        """
        )
        + "\n# The card's usage snippet, pointed at the downloaded folder:\n"
        + snippet
        + '\nprint("SNIPPET-OK")\n'
    )
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_PACKAGE_PREAMBLE + script],
        check=False,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        env={**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"},
    )
    assert "GENERATION-OK" in result.stdout and "SNIPPET-OK" in result.stdout, result.stderr[-3000:]
