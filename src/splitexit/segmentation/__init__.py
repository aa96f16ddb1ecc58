"""Multi-exit segmentation (MESS): a dense backbone in the zoo (``segnet``), dense exit heads,
pixel-confidence exit policies, mIoU metrics, two-stage and joint training, a head search
within a MAC budget chosen on the calibration split, and threshold sweeps over mIoU.

Dense exits run on the one exit loop (:mod:`splitexit.runtime.loop`): an exit's output is a
logit map ``(N, C, H, W)``, the policy's statistic reduces it to one confidence per sample, and
exited samples leave the batch as in classification (``MultiExitModel(..., dense=True)``).
"""

from . import backbone  # noqa: E402,F401,I001  registers "segnet" in the zoo
from .heads import DENSE_HEADS, DenseHead, create_dense_head, list_dense_heads, upsample_factor
from .metrics import (
    confusion_matrix,
    miou,
    pixel_accuracy,
    sample_confusions,
    segmentation_metrics,
)
from .model import create_segmenter, head_macs, segmenter_config
from .onnx_steps import DenseSteps
from ..policies.dense import MeanConfidence, PixelShare
from .search import (
    DEFAULT_CANDIDATES,
    CandidateBank,
    LatencyTable,
    SearchResult,
    assemble,
    choose_point,
    choose_policy,
    fit_candidates,
    head_label,
    measure_latency_table,
    policy_score,
    search_heads,
    summarize_candidates,
    train_candidates,
)
from .sweep import (
    ExitSummary,
    dense_oracle,
    dense_sweep,
    first_exits,
    stack_summaries,
    summarize_exits,
    summarize_logits,
)

__all__ = ["DENSE_HEADS", "DenseHead", "create_dense_head", "list_dense_heads",
           "upsample_factor", "confusion_matrix", "miou", "pixel_accuracy",
           "sample_confusions", "segmentation_metrics", "MeanConfidence", "PixelShare",
           "create_segmenter", "segmenter_config", "head_macs", "DEFAULT_CANDIDATES",
           "CandidateBank", "SearchResult", "assemble", "fit_candidates", "search_heads",
           "choose_policy", "policy_score", "choose_point", "head_label", "LatencyTable",
           "measure_latency_table",
           "summarize_candidates", "train_candidates", "ExitSummary", "dense_oracle",
           "dense_sweep", "first_exits", "stack_summaries", "summarize_exits",
           "summarize_logits", "train_two_stage", "train_joint", "DenseSteps"]


def train_two_stage(model, data, backbone_epochs: int, head_epochs: int, config=None,
                    **overrides):
    """MESS's two-stage training: the backbone alone (cross-entropy on its output), then the
    heads with the backbone frozen. Returns both stages' histories."""
    from ..training import Baseline, HeadsOnly, train

    first = train(model, data, Baseline(), config, epochs=backbone_epochs, **overrides)
    second = train(model, data, HeadsOnly(), config, epochs=head_epochs, **overrides)
    return first, second


def train_joint(model, data, epochs: int, weights=None, config=None, **overrides):
    """Joint training: every exit's pixel-wise cross-entropy summed (BranchyNet-style
    weights), backbone and heads together from the start."""
    from ..training import JointWeighted, train

    return train(model, data, JointWeighted(weights), config, epochs=epochs, **overrides)
