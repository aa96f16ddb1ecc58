"""CBNet steps 1 to 3: B-LeNet (BranchyNet), easy / hard samples and the converter's targets."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..calibration import choose_operating_point, sweep
from ..data import Split
from ..errors import InputError
from ..multiexit import MultiExitModel
from ..policies import Entropy
from ..stages import Stage, StagedModel
from ..training import JointWeighted, train
from ..training.base import TrainHistory
from ..zoo import create_multiexit

BRANCHYNET_WEIGHTS = (1.0, 0.3)  # BranchyNet's loss weights: first branch, final exit

# 1. BranchyNet ----------------------------------------------------------------------------
def train_branchynet(data: Split, num_classes: int, input_shape: Sequence[int], *,
                     epochs: int = 5, weights: Sequence[float] = BRANCHYNET_WEIGHTS,
                     lr: float = 2e-3, batch_size: int = 128, seed: int = 0,
                     init: nn.Module | None = None, progress: bool | None = None
                     ) -> tuple[MultiExitModel, TrainHistory]:
    """Train B-LeNet (the published branch after conv1 as exit 0) with BranchyNet's loss.

    Args:
        data: the training split.
        num_classes: number of classes.
        input_shape: per-sample input shape, e.g. ``(1, 28, 28)``.
        epochs: training epochs.
        weights: loss weight per exit (BranchyNet: 1.0 for the branch, 0.3 for the final exit).
        lr: learning rate.
        batch_size: batch size.
        seed: seed of initialisation and shuffling.
        init: a trained LeNet (``create_model("lenet", ...)``) whose weights start the main
            path; ``None`` trains from scratch as published.
        progress: show progress bars (``None``: when stderr is a terminal).

    Returns:
        The trained :class:`MultiExitModel` in eval mode and its training history.
    """
    torch.manual_seed(seed)
    model = create_multiexit("b-lenet", num_classes, input_shape, head="published")
    if init is not None:
        try:
            model.backbone.load_state_dict(init.state_dict())
        except RuntimeError as exc:
            raise InputError("init must be a LeNet built with the same classes and input "
                             f"shape (create_model('lenet', ...)): {exc}") from exc
    history = train(model, data, JointWeighted(weights), epochs=epochs, lr=lr,
                    batch_size=batch_size, seed=seed, progress=progress)
    return model.eval(), history


def _require_branchynet(model: nn.Module) -> None:
    if not isinstance(model, MultiExitModel) or model.num_exits < 2:
        raise InputError("CBNet needs a B-LeNet with an early exit: build it with "
                         "splitexit.cbnet.train_branchynet or create_multiexit('b-lenet', ..., "
                         "head='published')")


# 2. Easy / hard ---------------------------------------------------------------------------
@torch.no_grad()
def first_exit_logits(model: MultiExitModel, x: torch.Tensor, batch_size: int = 1024
                      ) -> torch.Tensor:
    """Logits of the first exit only (the stages after it are not run)."""
    _require_branchynet(model)
    model.eval()
    first_stage = model.exit_stages[0]
    chunks = []
    for i in range(0, len(x), batch_size):
        payload = model.backbone.run(x[i: i + batch_size], 0, first_stage + 1)
        chunks.append(model.run_head(0, payload, None))
    return torch.cat(chunks)


def first_exit_entropy(model: MultiExitModel, x: torch.Tensor, batch_size: int = 1024
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax entropy (nats) and prediction of the first exit for every image of ``x``."""
    logits = first_exit_logits(model, x, batch_size)
    return Entropy().statistic(logits), logits.argmax(dim=1)


def choose_threshold(model: MultiExitModel, calib: Split, max_drop: float = 0.01) -> float:
    """BranchyNet's entropy threshold, chosen on the calibration split (never the test split).

    The threshold is the cheapest one whose early-exit accuracy stays within ``max_drop``
    (a fraction) of the final exit's calibration accuracy.

    Raises:
        InputError: no threshold meets the target (relax ``max_drop``).
    """
    _require_branchynet(model)
    logits = model.collect_logits(calib.x)
    reference = float((logits[-1].argmax(1) == calib.y).double().mean())
    # Exit costs only order the candidates; the real ones need not be measured here.
    exit_costs = [float(e + 1) for e in range(model.num_exits)]
    points = sweep(logits, calib.y, exit_costs, Entropy())
    op = choose_operating_point(points, reference_accuracy=reference, max_drop=max_drop)
    return float(op.policy.threshold)


# 3. Targets -------------------------------------------------------------------------------
@dataclass
class CBNetTargets:
    """The target images of the converter and which target every training image maps to.

    Attributes:
        threshold: entropy threshold ``T`` (easy: first-exit entropy < ``T``).
        easy: per training image, whether it is easy.
        target_index: index into the training set of each target image.
        target_class: class of each target.
        assignment: per training image, the index of its target in ``target_index``.
        fallback_classes: classes whose target (or one of whose k-means targets) is a hard
            image because no suitable easy image existed.
        warnings: one sentence per fallback.
    """

    threshold: float
    easy: torch.Tensor
    target_index: torch.Tensor
    target_class: torch.Tensor
    assignment: torch.Tensor
    fallback_classes: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def hard_fraction(self) -> float:
        """Share of hard training images."""
        return float((~self.easy).double().mean())

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """The target images, taken from the training images ``x`` they were selected from."""
        return x[self.target_index]

    def summary(self) -> dict:
        """JSON-friendly description (for checkpoints and reports)."""
        return {"threshold": self.threshold, "hard_fraction": self.hard_fraction,
                "target_index": self.target_index.tolist(),
                "target_class": self.target_class.tolist(),
                "fallback_classes": self.fallback_classes, "warnings": self.warnings}


def _lowest(indices: torch.Tensor, entropy: torch.Tensor) -> int:
    return int(indices[entropy[indices].argmin()])


def select_targets(x: torch.Tensor, y: torch.Tensor, entropy: torch.Tensor, threshold: float,
                   num_classes: int, *, predictions: torch.Tensor | None = None,
                   per_class: int = 1, seed: int = 0) -> CBNetTargets:
    """Pick the converter's target images.

    With ``per_class=1`` (CBNet) a class's target is its lowest-entropy easy image. With
    ``per_class=k > 1`` (EncodeNet) the class's images are clustered into ``k`` groups by
    k-means on their pixels and each cluster's target is its lowest-entropy easy image; every
    image maps to its own cluster's target. When ``predictions`` (the first exit's) are given,
    only easy images the first exit classifies correctly qualify, so a target is never an image
    the light classifier gets wrong. Without any qualifying image, the lowest-entropy image of
    the class (or cluster) is used and the fallback is recorded (see the module docstring).

    Args:
        x: training images ``(N, ...)``.
        y: their labels ``(N,)``.
        entropy: first-exit entropy per image (:func:`first_exit_entropy`).
        threshold: entropy threshold ``T``.
        num_classes: number of classes; every class needs at least one image.
        predictions: the first exit's predicted class per image, optional.
        per_class: targets per class (k-means clusters when > 1).
        seed: k-means seed.

    Returns:
        The :class:`CBNetTargets`.

    Raises:
        InputError: mismatched lengths, a class without images, ``per_class < 1`` or a
            threshold that is not a non-negative number.
    """
    n = len(y)
    if x.shape[0] != n or entropy.shape != (n,):
        raise InputError(f"x, y and entropy must describe the same {n} images, got shapes "
                         f"{tuple(x.shape)}, {tuple(y.shape)}, {tuple(entropy.shape)}")
    if predictions is not None and predictions.shape != (n,):
        raise InputError(f"predictions must have shape ({n},), got {tuple(predictions.shape)}")
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise InputError(f"per_class must be an integer >= 1, got {per_class!r}")
    if not isinstance(threshold, (int, float)) or not threshold >= 0:
        raise InputError(f"threshold must be an entropy >= 0 (nats), got {threshold!r}")
    easy = entropy < threshold
    qualifies = easy if predictions is None else easy & (predictions == y)
    target_index: list[int] = []
    target_class: list[int] = []
    assignment = torch.empty(n, dtype=torch.long)
    fallback_classes: list[int] = []
    notes: list[str] = []
    for c in range(num_classes):
        members = torch.nonzero(y == c).flatten()
        if len(members) == 0:
            raise InputError(f"class {c} has no training image; CBNet needs at least one image "
                             "per class to pick its target")
        for group in _clusters(x[members], per_class, seed):
            idx = members[group]
            good = idx[qualifies[idx]]
            if len(good):
                chosen = _lowest(good, entropy)
            else:
                chosen = _lowest(idx, entropy)
                where = f"class {c}" if per_class == 1 else f"a k-means cluster of class {c}"
                notes.append(f"{where} has no easy image the first exit classifies correctly "
                             f"(entropy < {threshold:.4g}); using its lowest-entropy image "
                             f"(index {chosen}, entropy {float(entropy[chosen]):.4g}) as target")
                if c not in fallback_classes:
                    fallback_classes.append(c)
            assignment[idx] = len(target_index)
            target_index.append(chosen)
            target_class.append(c)
    for note in notes:
        warnings.warn(note, UserWarning, stacklevel=2)
    return CBNetTargets(float(threshold), easy, torch.tensor(target_index),
                        torch.tensor(target_class), assignment, fallback_classes, notes)


def _clusters(images: torch.Tensor, k: int, seed: int) -> list[torch.Tensor]:
    """Positions of each k-means cluster (one group of everything when ``k == 1``)."""
    n = images.shape[0]
    if k == 1 or n == 1:
        return [torch.arange(n)]
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    k = min(k, n)
    with threadpool_limits(1):  # tiny problems: threads only add contention
        labels = KMeans(n_clusters=k, n_init=3, random_state=seed).fit_predict(
            images.reshape(n, -1).double().numpy())
    groups = [torch.from_numpy(np.flatnonzero(labels == j)) for j in range(k)]
    return [g for g in groups if len(g)]



# 5. Light classifier ----------------------------------------------------------------------
def light_classifier(model: MultiExitModel) -> StagedModel:
    """B-LeNet truncated after its first exit: the stages up to it plus its head (a copy).

    Args:
        model: a trained B-LeNet (:func:`train_branchynet`).

    Returns:
        A :class:`StagedModel` with stages ``conv1`` and ``branch``, independent of ``model``.
    """
    _require_branchynet(model)
    first_stage = model.exit_stages[0]
    stages = [copy.deepcopy(s) for s in model.backbone.stages[: first_stage + 1]]
    stages.append(Stage(copy.deepcopy(model.heads[0]), "branch"))
    return StagedModel(stages, [*model.backbone.cut_names[:first_stage], model.head_cuts[0]]
                       ).eval()


