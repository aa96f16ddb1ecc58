"""Training strategies for multi-exit models; each is a small object passed to :func:`train`."""

from .base import Strategy, TrainConfig, TrainHistory, evaluate_exits, seed_everything, train
from .joint import Baseline, HeadsOnly, JointWeighted

__all__ = ["Strategy", "TrainConfig", "TrainHistory", "train", "seed_everything",
           "evaluate_exits", "Baseline", "JointWeighted", "HeadsOnly"]
