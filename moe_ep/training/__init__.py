"""Training: the driver, its trainers, the training configuration, metrics, plots and checkpoints of a run.

``run(trainer, sampler, parallel, cfg)`` (driver.py) is the one training loop; ``PlainTrainer`` (plain.py),
``training.deepspeed.DeepSpeedTrainer`` and ``moe_ep.distill.Distiller`` are its trainers. docs/training.md
describes them; docs/design.md draws the layers.
"""
from .checkpoints import load_checkpoint, save_checkpoint
from .config import TrainConfig
from .driver import RunResult, Trainer, evaluate, run
from .plain import PlainTrainer

__all__ = ["PlainTrainer", "RunResult", "TrainConfig", "Trainer", "evaluate", "load_checkpoint", "run",
           "save_checkpoint"]
