"""CBNet: a converting autoencoder turns hard images into easy ones for a lightweight classifier.

The method (Dogra et al., CBNet; TECHNIQUES.md section 3), step by step:

1. :func:`train_branchynet` trains B-LeNet (BranchyNet's joint weighted loss).
2. :func:`first_exit_entropy` scores every training image at the first exit;
   :func:`choose_threshold` picks the entropy threshold ``T`` on the calibration split, and
   an image is **easy** when its entropy is below ``T``, else **hard**.
3. :func:`select_targets` picks, per class, the training image with the lowest first-exit
   entropy (one target), or, with ``per_class > 1``, k-means clusters of the class, each with
   its own lowest-entropy representative (EncodeNet's multi-target variant).
4. :class:`ConvertingAutoencoder` (the published fully connected 784-512-384-256-64-784, a
   convolutional variant, or a convolutional encoder with a fully connected decoder) learns
   to map every image of a class, hard and easy, to its target
   (:func:`train_converter`).
5. :func:`light_classifier` truncates B-LeNet after its first exit (conv1 + branch);
   :func:`finetune_classifier` optionally adapts it to converted images.
6. :class:`CBNetPipeline` = converter + light classifier, with input validation; it saves and
   loads as safetensors + JSON (:func:`save_pipeline`, :func:`load_pipeline`) and exports to
   ONNX (:func:`export_onnx`, run with :class:`OnnxPipeline`); as an exit program
   (:func:`splitexit.program.as_multiexit`) it also bundles like any model
   (:func:`splitexit.deploy.bundle`).
7. For deployment, :func:`fold_pipeline` composes the converter's linear output layer with the
   classifier's first convolution, and :func:`lean_pipeline` runs the chain as flat primitive
   layers with exact rewrites (fused ReLUs in ONNX, no module dispatch in PyTorch).

:func:`train_cbnet` runs steps 1 to 6 from a data set.

**Fallback when a class has no easy sample** (or, with k-means, a cluster has none): its target
is the image with the lowest first-exit entropy among that class's (or cluster's) images even
though it is hard. The choice is recorded in :attr:`CBNetTargets.warnings` and
:attr:`CBNetTargets.fallback_classes` and emitted as a :class:`UserWarning`; converted images of
such a class are then only as easy as that target, so raise ``T`` or train B-LeNet longer.
"""

from .converter import (
                        ConvertingAutoencoder,
                        convert,
                        distill_converter,
                        finetune_classifier,
                        train_converter,
)
from .core import (
                        BRANCHYNET_WEIGHTS,
                        CBNetTargets,
                        choose_threshold,
                        first_exit_entropy,
                        first_exit_logits,
                        light_classifier,
                        select_targets,
                        train_branchynet,
)
from .fallback import FallbackCBNet, calibrate_fallback, fallback_model
from .fold import FoldedPipeline, fold_linear, fold_pipeline
from .lean import LeanPipeline, Reshape, lean_layers, lean_pipeline
from .pipeline import (
                        CBNetPipeline,
                        CBNetRun,
                        CBNetSettings,
                        OnnxPipeline,
                        export_onnx,
                        load_pipeline,
                        save_pipeline,
                        train_cbnet,
)

__all__ = [
    "BRANCHYNET_WEIGHTS", "CBNetSettings", "CBNetRun", "CBNetTargets", "CBNetPipeline",
    "ConvertingAutoencoder", "FallbackCBNet", "FoldedPipeline", "LeanPipeline", "OnnxPipeline",
    "Reshape", "calibrate_fallback", "choose_threshold", "convert", "distill_converter",
    "export_onnx", "fallback_model", "finetune_classifier", "first_exit_entropy",
    "first_exit_logits", "fold_linear", "fold_pipeline", "lean_layers", "lean_pipeline",
    "light_classifier", "load_pipeline", "save_pipeline", "select_targets", "train_branchynet",
    "train_cbnet", "train_converter",
]
