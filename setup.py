from setuptools import find_packages, setup


setup(
    name="modeling-hypersteer",
    version="0.1.0",
    description="HyperSteer: steering vectors from natural-language prompts with a hypernetwork, HuggingFace-native.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["modeling_hypersteer", "modeling_hypersteer.*"]),
    package_data={"modeling_hypersteer": ["resources/*.jsonl", "resources/*.md", "model_cards/*.md"]},
    py_modules=["train_hypersteer", "evaluate_steering", "generate_concept_data", "quickstart"],
    install_requires=[
        "torch>=2.4",
        # Tested range: the suite runs on 5.24; `make test` reruns the remote-code test on the lower bound (5.23 is the
        # first release with `activation_checkpointing_enable`, which training uses). The remote code picks the cache
        # keyword the installed release declares (`cache` from 5.24, `past_key_values` before).
        "transformers>=5.23.0,<6",
        "datasets>=3.0",
        "accelerate>=1.0",
        "evaluate>=0.4",
        "huggingface-hub>=1.0",
        "openai>=1.40",
        "safetensors>=0.4",
        "matplotlib>=3.7",
        "pyyaml>=6.0",
        "tqdm>=4.60",
        # The judge-free text metric's concept detector (modeling_hypersteer/text_metric.py; library code, not remote code).
        "scikit-learn>=1.3",
    ],
    extras_require={
        # llama-cpp-python (the real llama.cpp round-trip test) is built once from its sdist by `make install` into
        # ~/.cache/hypersteer/wheels and installed from there, not through an extra.
        "dev": [
            "pytest>=8",
            "gguf>=0.10",
            "pandas>=2",
            "pyarrow>=14",
            "fastapi>=0.110",
            "uvicorn>=0.29",
            "gradio>=5",
            "playwright>=1.40",
            # tests/test_serve.py: a third-party OpenAI client, and FastAPI's TestClient (which needs httpx)
            "langchain-openai>=1.0",
            "httpx>=0.27",
        ],
        "gguf": ["gguf>=0.10"],
        "demo": ["gradio>=5", "gguf>=0.10"],
        "serve": ["fastapi>=0.110", "uvicorn>=0.29"],
    },
    entry_points={
        "console_scripts": [
            "hypersteer-serve = modeling_hypersteer.serve:main",
            "hypersteer-export = modeling_hypersteer.export:main",
            "hypersteer-demo = modeling_hypersteer.demo:main",
        ]
    },
)
