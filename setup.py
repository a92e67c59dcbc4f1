"""Packaging for FlexSP-Megatron.

``megatron/flexsp`` is a namespace portion that sits next to the installed ``megatron.core``
(neither ships ``megatron/__init__.py``), so packages are found with find_namespace_packages.
There is no GPU extra: Transformer Engine and flash-attn must be built against the installed
torch with --no-build-isolation, which an extra cannot ask for; scripts/setup_gpu.sh does it.
"""

from setuptools import find_namespace_packages, setup

setup(
    name="flexsp-megatron",
    version="0.1.0",
    description="FlexSP: heterogeneous sequence parallelism for long-context LLM training on megatron.core",
    python_requires=">=3.10",
    packages=find_namespace_packages(
        include=["megatron.flexsp", "megatron.flexsp.*", "flexsp_patches", "flexsp_patches.*"]
    ),
    package_data={"megatron.flexsp.planner": ["presets/*.json"]},
    py_modules=["pretrain_gpt_flexsp"],
    install_requires=[
        "numpy>=1.24",
        "scipy>=1.11",  # scipy.optimize.milp on HiGHS
        "torch>=2.4",  # CI and the README install the CPU build torch==2.13.0 first
        "megatron-core>=0.16.1",  # 0.16.1 on Python 3.11; 0.19 on 3.12 GPU clusters
        "tqdm",
    ],
    extras_require={
        "dev": [
            "pytest>=7",
            "pytest-timeout>=2.2",
            "matplotlib",
            "ruff==0.17.5",
            "import-linter>=2.1",
            "transformers>=4.45",  # tests/convert build tiny HF models as the reference
            "safetensors>=0.4",
        ],
        "plot": ["matplotlib"],
        "tensorboard": ["tensorboard"],
        "wandb": ["wandb"],
        # --tokenizer-type HuggingFaceTokenizer (preprocess_data.py); flexsp-convert hf-to-flexsp / flexsp-to-hf
        "hf": ["transformers>=4.45", "safetensors>=0.4"],
    },
    entry_points={
        "console_scripts": [
            "flexsp-plan=megatron.flexsp.planner.cli:main",
            "flexsp-profile=megatron.flexsp.training.profiler:main",
            "flexsp-convert=megatron.flexsp.convert.cli:main",
        ]
    },
)
