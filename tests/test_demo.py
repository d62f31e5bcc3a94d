"""The Gradio demo (`hypersteer-demo`), driven in a real headless Chromium through playwright's Python API.

Chromium comes from Debian's package (`apt-get install -y chromium`, done by `.ci/run`); playwright's own browser
download is not used. The screenshot is written to `$HYPERSTEER_ARTIFACTS_DIR` (CI sets it) or the test's tmp dir.
"""

import shutil

import pytest
import torch
from conftest import build_tiny_base, free_port

from modeling_hypersteer import HyperSteerModel
from modeling_hypersteer.demo import (
    ANSWER_IDS,
    DemoInputError,
    DemoSettings,
    SteeringDemo,
    build_demo,
    parse_concepts,
)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
STEERING_LAYER = 2


def _tiny_model(tokenizer, hypernet_type="no_context"):
    model = HyperSteerModel.from_base_model(
        build_tiny_base("llama", len(tokenizer)),
        tokenizer=tokenizer,
        hypernet_type=hypernet_type,
        steering_layer=STEERING_LAYER,
        hypernet_num_layers=1,
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        weight = model.hypernetwork.output_projection.weight
        weight.copy_(torch.randn(weight.shape, generator=generator) * 0.5)
    return model.eval()


def test_parse_concepts_reads_lines_and_factors_and_names_bad_input():
    assert parse_concepts("legal terms\n\n pirate speech | -0.5 \n", 1.5, 10.0) == [
        ("legal terms", 1.5),
        ("pirate speech", -0.5),
    ]
    for text, factor, message in [
        ("  \n ", 1.0, "Enter a concept"),
        ("legal terms | 12", 1.0, r"Line 1: the factor is 12.0, outside the allowed range \[-10, 10\]"),
        ("legal terms", 11.0, "The slider's factor is 11.0, outside"),
        ("legal terms | lots", 1.0, "cannot read the factor 'lots'"),
        (" | 0.5", 1.0, "Line 1 has a factor but no concept"),
    ]:
        with pytest.raises(DemoInputError, match=message):
            parse_concepts(text, factor, 10.0)


def test_streamed_answers_are_the_unsteered_prompt_steered_hypersteer_and_prompt_hypersteer_rows(tiny_tokenizer):
    model = _tiny_model(tiny_tokenizer)
    demo = SteeringDemo(model, DemoSettings(max_new_tokens=10))
    steps = list(demo.stream_answers("legal terms\npirate speech | 0.5", 2.0, "Explain sorting.", 0.75))
    assert len(steps) > 2  # streamed: partial answers before the final one
    unsteered, prompted, steered, prompted_steered = steps[-1]
    assert all(answer for answer in steps[-1])

    def alone(text, **steering):
        inputs = tiny_tokenizer(text, add_special_tokens=False, return_tensors="pt")
        ids = model.generate(**inputs, max_new_tokens=10, do_sample=False, **steering)
        return tiny_tokenizer.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    from modeling_hypersteer.data import format_prompt
    from modeling_hypersteer.evaluation import prompt_steering_system_prompt

    plain = format_prompt(tiny_tokenizer, "Explain sorting.")
    # The demo's prompt steering is the evaluation's baseline: the instruction before the prompt in the user turn.
    prompted_prompt = format_prompt(
        tiny_tokenizer, f"{prompt_steering_system_prompt('legal terms; pirate speech')}\n\nExplain sorting."
    )
    # The HyperSteer row has the longest prompt's padding removed only when prompts are equally long; the prompt row
    # is the longest, so it is unpadded and must match exactly.
    assert prompted == alone(prompted_prompt, steering_factor=0.0, steering_vectors=torch.zeros(1, 32))
    # Every concept's vector on top of the prompt, at the second factor (the lines' own factors are the HyperSteer row's).
    assert prompted_steered == alone(
        prompted_prompt, steering_prompt=[["legal terms", "pirate speech"]], steering_factor=[[0.75, 0.75]]
    )
    assert prompted_steered != prompted
    assert steered == alone(plain, steering_prompt=[["legal terms", "pirate speech"]], steering_factor=[[2.0, 0.5]])
    assert unsteered == alone(plain, steering_factor=0.0, steering_vectors=torch.zeros(1, 32))
    assert steered != unsteered


def test_the_factor_on_top_of_the_prompt_defaults_to_the_calibrated_one_else_half_the_steering_factor(tiny_tokenizer):
    model = _tiny_model(tiny_tokenizer)
    assert DemoSettings.for_model(model).prompted_factor == model.config.default_steering_factor / 2
    model.config.prompted_steering_factor = 0.3
    settings = DemoSettings.for_model(model, max_new_tokens=6)
    assert (settings.prompted_factor, settings.max_new_tokens) == (0.3, 6)
    demo = SteeringDemo(model)
    assert demo.settings.prompted_factor == 0.3
    by_default = list(demo.stream_answers("legal terms", 1.0, "Explain sorting."))[-1]
    assert by_default == list(demo.stream_answers("legal terms", 1.0, "Explain sorting.", 0.3))[-1]
    assert by_default[3] != list(demo.stream_answers("legal terms", 1.0, "Explain sorting.", 2.0))[-1][3]
    with pytest.raises(DemoInputError, match="The factor on top of the prompt is 11.0, outside"):
        next(demo.stream_answers("legal terms", 1.0, "Explain sorting.", 11.0))


def test_a_stream_closed_early_stops_its_generation_and_releases_the_model(tiny_tokenizer):
    model = _tiny_model(tiny_tokenizer)
    layer = model.language_model.model.layers[STEERING_LAYER]
    hooks_before = len(layer._forward_hooks)
    demo = SteeringDemo(model, DemoSettings(max_new_tokens=400))
    stream = demo.stream_answers("legal terms", 1.0, "Explain sorting.")
    next(stream)
    assert len(layer._forward_hooks) > hooks_before  # generating, steered
    stream.close()  # what Gradio does when the page stops listening
    assert not demo.lock.locked()
    assert len(layer._forward_hooks) == hooks_before  # the generate call has ended and removed its hook
    assert all(answer for answer in list(demo.stream_answers("legal terms", 1.0, "Explain sorting."))[-1])


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (`apt-get install -y chromium`; .ci/run does it)")
def test_demo_in_a_real_browser(tmp_path, tiny_tokenizer, artifacts_dir):
    pytest.importorskip("gradio", reason="the demo extra (gradio) is not installed")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (dev extra) is not installed")
    from modeling_hypersteer.export import read_control_vector

    model = _tiny_model(tiny_tokenizer)
    page_app = build_demo(model, DemoSettings(max_new_tokens=12, max_steering_factor=5.0))
    port = free_port()
    page_app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
            page.goto(f"http://127.0.0.1:{port}/")
            concepts, prompt = page.locator("#concepts textarea"), page.locator("#prompt textarea")
            answers = [page.locator(f"#{name} textarea") for name in ANSWER_IDS]
            status = page.locator("#status")

            concepts.fill("references to legal terminology\npirate speech | 0.5")
            prompt.fill("Explain sorting.")
            page.click("#generate")
            for answer in answers:
                sync_api.expect(answer).not_to_have_value("", timeout=30_000)
            page.wait_for_timeout(500)
            texts = [answer.input_value() for answer in answers]
            assert all(text.strip() for text in texts)
            assert texts[2] != texts[0] and texts[3] != texts[1]
            page.screenshot(path=str(artifacts_dir / "demo.png"), full_page=True)

            # The concept as a llama.cpp control vector, downloaded through the page.
            page.click("#export")
            download_button = page.locator("#download")
            sync_api.expect(download_button).to_be_visible(timeout=30_000)
            with page.expect_download() as download_info:
                download_button.click()
            downloaded = tmp_path / "downloaded.gguf"
            download_info.value.save_as(downloaded)
            slider_factor = model.config.default_steering_factor
            expected = model.compute_steering_vectors(
                steering_prompt=[["references to legal terminology", "pirate speech"]],
                steering_factor=[[slider_factor, 0.5]],
            )[0]
            torch.testing.assert_close(read_control_vector(downloaded).directions[STEERING_LAYER], expected.detach())

            # Bad input shows a message in the page, never a traceback.
            for concept_text, message in [
                ("", "Enter a concept"),
                ("pirate speech | 99", "outside the allowed range [-5, 5]"),
            ]:
                concepts.fill(concept_text)
                page.click("#generate")
                sync_api.expect(status).to_contain_text(message, timeout=30_000)
                assert "Traceback" not in page.content()
            page.click("#export")
            sync_api.expect(status).to_contain_text("outside the allowed range [-5, 5]", timeout=30_000)
            browser.close()
    finally:
        page_app.close()
