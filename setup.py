"""moe_jax: upcycle pretrained dense LLMs into Mixture-of-Experts models in JAX/Flax."""
from setuptools import find_packages, setup

CORE = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "ml-collections==1.1.0",
    "absl-py==2.5.1",
    "gguf==0.19.0",
    "safetensors==0.8.0",
    "tokenizers==0.23.3",
    "numpy==2.4.6",
    # jax needs ml_dtypes>=0.5. 0.7.0 takes 0.8 s to import with numpy 2.4 (it adds its ufunc
    # loops one by one, each a linear search), in every process that imports jax; 0.6.0: 6 ms.
    "ml_dtypes==0.6.0",
    "tqdm==4.70.1",
    "tensorboardX==2.6.5",
    "matplotlib==3.11.2",
]
EXTRAS = {
    "dev": ["pytest==9.2.0", "pytest-xdist==3.8.0", "hypothesis==6.170.15", "chex==0.1.92"],
    # torch==2.13.0 is served as a CPU wheel from local disk here; unpinned it pulls CUDA.
    "hf": ["torch==2.13.0", "transformers==5.23.0", "accelerate==1.15.0"],
    # lm-evaluation-harness (moe_jax.harness) and Hugging Face datasets input (data.source).
    "eval": ["lm-eval==0.4.13", "datasets==5.2.0"],
    # notebooks/: executed by `make notebooks` and tests/test_notebooks.py (pandas: 04).
    "notebooks": ["nbclient==0.11.0", "nbformat==5.11.1", "ipykernel==7.4.0", "pandas==3.1.1"],
}

setup(
    name="moe_jax",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.11",
    packages=find_packages(include=["moe_jax*", "pallas_kernels*", "experiments*", "configs*"]),
    install_requires=CORE,
    extras_require=EXTRAS,
    package_data={"moe_jax": ["harness_tasks/*/*.yaml", "harness_tasks/*/*.jsonl"]},
)
