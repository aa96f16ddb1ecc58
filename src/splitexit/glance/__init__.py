"""Glance and focus (GFNet): a cheap glance at the whole image downsampled, then full-resolution
patches at places a patch policy picks, one recurrent step each, exiting after any step when
confident. The steps are the exits of a :class:`~splitexit.multiexit.MultiExitModel`, so the
one exit loop, calibration, lowering and ONNX export all apply.

Example:
    >>> net = GFNet(GFNetConfig(image=160, glance=40, patch=40, stride=8, steps=2))
    >>> fit_gfnet(net, load_dataset("cluttered-fashion").train)
    >>> model = net.multiexit("learned")      # or "random", "centre"
    >>> result = model.infer(x, MaxProb(0.9))  # real per-sample exits
"""

from .distil import distil_encoders, finetune_student
from .grid import PatchGrid, crop_patches
from .model import (
    FocusStage,
    FusionCell,
    GFNet,
    GFNetConfig,
    GlanceStage,
    conv_encoder,
    full_resolution_backbone,
)
from .onnx_steps import GFNetSteps
from .patch_policies import (
    PATCH_POLICIES,
    CentrePatchPolicy,
    LearnedPatchPolicy,
    LocaliserPolicy,
    PatchPolicy,
    RandomPatchPolicy,
)
from .ppo import PPOConfig, gae, ppo_update
from .train import (
    GFNetSchedule,
    distil_localiser,
    fit_gfnet,
    ink_scores,
    one_step_lookahead,
    step_accuracies,
    train_backbone,
    train_classifier_stages,
    train_policy,
    warm_start_policy,
)

__all__ = ["PatchGrid", "crop_patches", "GFNet", "GFNetConfig", "GlanceStage", "FocusStage",
           "FusionCell", "conv_encoder", "full_resolution_backbone", "PatchPolicy",
           "LearnedPatchPolicy", "LocaliserPolicy", "RandomPatchPolicy", "CentrePatchPolicy", "PATCH_POLICIES",
           "PPOConfig", "gae", "ppo_update", "GFNetSchedule", "fit_gfnet", "train_classifier_stages",
           "train_policy", "train_backbone", "step_accuracies", "one_step_lookahead",
           "warm_start_policy", "ink_scores", "GFNetSteps", "distil_localiser", "distil_encoders",
           "finetune_student"]
