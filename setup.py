"""Datong: one Transformer backbone for text, images and image-text pretraining."""

from setuptools import find_packages, setup

setup(
    name="datong",
    version="0.1.0",
    description="One JAX/Flax Transformer backbone for text, image and image-text pretraining.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["datong", "datong.*"]),
    install_requires=[
        "jax>=0.10.2,<0.13",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "tensorflow-datasets>=4.9.9",
        "grain>=0.2.15",
        "einops>=0.8",
        "numpy",
        "scikit-learn",  # the embedded `digits` builder
        "pillow",  # PNG grids
        "tqdm",  # progress bar
        "tensorboardX",  # TensorBoard event files without TensorFlow
        "matplotlib",  # loss-curve plots
    ],
    extras_require={
        # nbclient + nbformat + ipykernel: tests/test_notebooks.py runs examples/*.ipynb.
        "test": ["pytest>=8", "pytest-xdist", "nbclient", "nbformat", "ipykernel"],
    },
    entry_points={"console_scripts": ["datong=datong.cli:main"]},
)
