"""Install moe_ep. ``moe_ep/kernels`` links to the top-level ``kernels/`` folder (no ``__init__.py`` there, so a
checkout root on ``sys.path`` never shadows another distribution's top-level ``kernels`` package); an install copies
it into ``moe_ep/kernels/``.

The ranges below are what the code needs (floors: the oldest versions it uses the APIs of); the tested set of
versions is pinned in constraints.txt, which ``launch/setup_venv.sh`` installs with.
"""
from setuptools import setup

# The training application beyond the layer library (``import moe_ep`` needs torch alone): progress bar, PNG plots,
# --tensorboard event files, the corpus and plots' arrays, the transformers-layout export of convert.
# Floors: matplotlib 3.5 has Figure(layout=...) and set_yticks(labels=); tqdm 4.36 set_postfix(refresh=) in every
# bar class (its changelog); tensorboard 1.15 is the oldest torch.utils.tensorboard accepts.
TRAIN = ["matplotlib>=3.5", "tqdm>=4.36", "tensorboard>=1.15", "numpy", "safetensors>=0.4"]

setup(
    name="moe_ep",
    version="0.1.0",
    description="Expert-parallel Mixture-of-Experts runtime (DeepSeek-style routing, balancing, dispatch)",
    python_requires=">=3.10",
    packages=["moe_ep", "moe_ep.kernels", "moe_ep.checkpoint", "moe_ep.dispatch", "moe_ep.distill", "moe_ep.models",
              "moe_ep.integrations", "moe_ep.parallel", "moe_ep.training"],
    # torch 2.5: torch.distributed.tensor is public (DTensor in checkpoints).
    install_requires=["torch>=2.5"],
    extras_require={
        "triton": ["triton>=3.0"],
        "deepspeed": ["deepspeed>=0.14"],
        "hf": ["transformers>=4.52"],
        "train": TRAIN,
        "test": ["pytest", "pytest-timeout", "numpy", "transformers>=4.52", "triton>=3.0", "deepspeed>=0.14", *TRAIN],
    },
)
