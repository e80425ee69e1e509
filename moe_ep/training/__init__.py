"""Training loop, metrics and plots shared by the launchers (launch/train.py).

Checkpoints live in ``moe_ep.checkpoint``; their training-state functions are re-exported here.
"""
from ..checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .loop import RunResult, evaluate, train
from .plots import plot_run

__all__ = ["RunResult", "TrainConfig", "evaluate", "latest_checkpoint", "load_checkpoint", "plot_run",
           "save_checkpoint", "train"]
