"""sparsity_jax: sparse attention (Routing, MoA, SparseD) on one block-sparse kernel family."""

from setuptools import find_packages, setup

setup(
    name="sparsity_jax",
    version="0.1.0",
    description="Sparse attention methods for JAX on block-sparse Pallas kernels.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.12",
    packages=find_packages(include=["sparsity_jax", "sparsity_jax.*", "pallas_kernels",
                                    "pallas_kernels.*"]),
    install_requires=[
        "jax>=0.11.2",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "numpy>=1.26",
        "absl-py>=2.1",
        "ml_collections>=1.0",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
        "scipy>=1.13",
        "matplotlib>=3.8",
        "safetensors>=0.4.3",  # Hugging Face checkpoints (sparsity_jax/checkpoints).
        "gguf>=0.19",  # GGUF files: parsing and (de)quantization (sparsity_jax/checkpoints/gguf.py).
        "tokenizers>=0.19",
        "jinja2>=3.1",  # Chat templates.
    ],
    extras_require={
        "dev": ["pytest>=8", "hypothesis>=6.100", "pytest-timeout>=2.3",
                "pytest-xdist>=3.5"],
    },
)
