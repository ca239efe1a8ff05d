from setuptools import find_packages, setup

setup(
    name="megatron-latent",
    version="0.1.0",
    description="3D-parallel pretraining of GPT models with latent thoughts (PonderLM-2) on megatron-core",
    packages=find_packages(include=["megatron_latent", "megatron_latent.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",
        "megatron-core==0.16.1",
        "numpy",
        # megatron dist_checkpointing's filesystem writer needs it (without it, save hangs).
        "psutil",
        "sentencepiece",
        "tokenizers",
        "tqdm",
        "zstandard",
    ],
    entry_points={
        "console_scripts": [
            "megatron-latent-pretrain = megatron_latent.pretrain:main",
            "megatron-latent-generate = megatron_latent.generate:main",
            "megatron-latent-build-corpus = megatron_latent.tools.build_corpus:main",
            "megatron-latent-check-hf-continuation = megatron_latent.tools.check_hf_continuation:main",
            "megatron-latent-compare-runs = megatron_latent.tools.compare_runs:main",
            "megatron-latent-convert-from-hf = megatron_latent.tools.convert_from_hf:main",
            "megatron-latent-convert-to-hf = megatron_latent.tools.convert_to_hf:main",
            "megatron-latent-inspect-dataset = megatron_latent.tools.inspect_dataset:main",
            "megatron-latent-perplexity = megatron_latent.tools.perplexity:main",
            "megatron-latent-plot-metrics = megatron_latent.tools.plot_metrics:main",
            "megatron-latent-preprocess = megatron_latent.tools.preprocess_data:main",
            "megatron-latent-scaling-study = megatron_latent.tools.scaling_study:main",
        ],
    },
    extras_require={
        "test": [
            "pytest>=7", "pytest-timeout", "ruff", "transformers>=4.46", "safetensors", "matplotlib",
            "lm-eval[hf]>=0.4", "wandb",
        ],
        "plot": ["matplotlib", "tensorboard"],
        # Weights & Biases logging (--wandb-project).
        "wandb": ["wandb"],
        "hf": ["transformers>=4.46", "safetensors"],
        "eval": ["lm-eval[hf]>=0.4", "transformers>=4.46", "safetensors"],
        # NVIDIA apex is not on PyPI (PyPI's `apex` is an unrelated package): build it from source or
        # use an NGC PyTorch container, which ships apex and Transformer Engine.
        "gpu": ["transformer-engine[pytorch]"],
    },
)
