"""Training loop, metrics and plots shared by the launchers (launch/train.py); checkpoints are ``moe_ep.checkpoint``."""
from .config import TrainConfig
from .loop import RunResult, evaluate, train
from .plots import plot_run

__all__ = ["RunResult", "TrainConfig", "evaluate", "plot_run", "train"]
