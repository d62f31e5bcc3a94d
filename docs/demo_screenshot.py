"""Regenerate `docs/demo.png`: `hypersteer-demo`'s page on SmolLM2-135M-Instruct, captured in headless Chromium.

    OMP_NUM_THREADS=1 python docs/demo_screenshot.py [path/to/hypersteer-checkpoint] [--concept TEXT] [--prompt TEXT]

Without a checkpoint it uses an untrained no_context hypernetwork whose last projection is random (seeded, |v| = 60,
about a third of the residual norm at layer 15), as the llama.cpp test does: the HyperSteer column then shows a
steered but not concept-specific answer. A trained checkpoint (e.g. `make quickstart`'s outputs/quickstart) shows
the real thing.
"""

import argparse
import shutil
import socket
from pathlib import Path

import torch
from playwright.sync_api import expect, sync_playwright
from transformers import AutoModelForCausalLM, AutoTokenizer

from modeling_hypersteer import HyperSteerModel
from modeling_hypersteer.demo import ANSWER_IDS, DemoSettings, build_demo
from modeling_hypersteer.smollm2 import smollm2_path


def load_model(checkpoint: str | None) -> HyperSteerModel:
    if checkpoint:
        return HyperSteerModel.from_pretrained(checkpoint).eval()
    directory = smollm2_path()
    model = HyperSteerModel.from_base_model(
        AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32),
        tokenizer=AutoTokenizer.from_pretrained(directory),
        hypernet_type="no_context",
        steering_layer=15,
        hypernet_num_layers=1,
        base_model_name_or_path="SmolLM2-135M-Instruct",
    ).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        weight = model.hypernetwork.output_projection.weight
        weight.copy_(torch.randn(weight.shape, generator=generator))
        vector = model.compute_steering_vectors(steering_prompt="references to oceans, tides and marine life")[0]
        weight.mul_(60.0 / vector.norm())
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", nargs="?", help="A saved HyperSteer folder (default: the random one above).")
    parser.add_argument("--concept", default="references to oceans, tides and marine life")
    parser.add_argument("--prompt", default="Describe your ideal weekend in two sentences.")
    args = parser.parse_args()
    model = load_model(args.checkpoint)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app = build_demo(model, DemoSettings.for_model(model, max_new_tokens=48, max_steering_factor=10.0))
    app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=shutil.which("chromium"),
                args=[
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--no-first-run",
                ],
            )
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator("#concepts textarea").fill(args.concept)
            page.locator("#prompt textarea").fill(args.prompt)
            page.click("#generate")
            for name in ANSWER_IDS:
                expect(page.locator(f"#{name} textarea")).not_to_have_value("", timeout=120_000)
            # Wait until the stream ends (the answers stop changing).
            previous = None
            while (current := [page.locator(f"#{name} textarea").input_value() for name in ANSWER_IDS]) != previous:
                previous = current
                page.wait_for_timeout(3_000)
            page.click("#export")
            expect(page.locator("#download")).to_be_visible(timeout=60_000)
            page.screenshot(path=str(Path(__file__).parent / "demo.png"), full_page=True)
            browser.close()
    finally:
        app.close()


if __name__ == "__main__":
    main()
