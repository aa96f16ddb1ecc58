"""Training strategies for multi-exit models; each is a small object passed to :func:`train`."""

from .base import Strategy, TrainConfig, TrainHistory, evaluate_exits, seed_everything, train
from .boost import BoostNet, boostnet_policy
from .classmeans import fit_class_means
from .distill import SelfDistillation
from .joint import Baseline, HeadsOnly, JointWeighted
from .quicknets import QuickNets, fit_commitment
from .sdn import SDNRamp
from .ztw import ZTW, fit_ztw_ensemble

__all__ = ["Strategy", "TrainConfig", "TrainHistory", "train", "seed_everything",
           "evaluate_exits", "Baseline", "JointWeighted", "HeadsOnly", "SDNRamp",
           "SelfDistillation", "ZTW", "fit_ztw_ensemble", "BoostNet", "boostnet_policy",
           "QuickNets", "fit_commitment", "fit_class_means"]
