"""Install moe_ep; the top-level ``kernels/`` folder installs as ``moe_ep.kernels``."""
from setuptools import setup

setup(
    name="moe_ep",
    version="0.1.0",
    description="Expert-parallel Mixture-of-Experts runtime (DeepSeek-style routing, balancing, dispatch)",
    python_requires=">=3.10",
    packages=["moe_ep", "moe_ep.kernels", "moe_ep.checkpoint", "moe_ep.dispatch", "moe_ep.distill", "moe_ep.models",
              "moe_ep.integrations", "moe_ep.parallel", "moe_ep.training"],
    package_dir={"moe_ep": "moe_ep", "moe_ep.kernels": "kernels"},
    install_requires=["torch>=2.4", "safetensors", "tqdm", "matplotlib", "numpy"],
    extras_require={
        "triton": ["triton"],
        "deepspeed": ["deepspeed"],
        "test": ["pytest", "pytest-timeout", "numpy", "transformers", "triton", "deepspeed"],
    },
)
