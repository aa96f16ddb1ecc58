"""The published early-exit methods as recipes: exit heads + a training strategy + an exit
policy + a fit step, each registered under its name.

A recipe starts from a multi-exit model whose backbone is trained (your own model or a zoo
model: the cuts and heads it has say where the exits are) and returns a new, fitted model and
the policy to calibrate it with; the model passed in is never changed::

    fitted = splitexit.methods.fit_method("ztw", model, ds.train, calib=ds.calib)
    cal = calibrate(fitted.model.collect_logits(ds.calib.x), ds.calib.y, exit_macs,
                    fitted.policy, max_drop=0.01)

Methods that keep the backbone frozen train only what they add (``frozen_backbone``); the
joint ones fine-tune the whole model from the trained backbone, at half the learning rate.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..compress.binary import count_binary_layers
from ..cost import cost_table
from ..errors import InputError
from ..heads import ExitHead, create_head
from ..multiexit import MultiExitModel
from ..policies import AdditiveEnsemble, Entropy, ExitPolicy, MaxProb, Patience
from ..registry import Registry
from ..training import (
    ZTW,
    BoostNet,
    HeadsOnly,
    JointWeighted,
    QuickNets,
    SDNRamp,
    SelfDistillation,
    fit_class_means,
    fit_commitment,
    fit_ztw_ensemble,
    train,
)
from ..training.base import as_split, model_classes
from .gate import GatedMultiExitModel, calibrate_gate, fit_gate
from .online import OnlineCache
from .trecx import early_view_model

__all__ = ["Method", "Fitted", "METHODS", "register_method", "list_methods", "fit_method",
           "with_heads"]


@dataclass
class FitContext:
    """What a recipe's fit step gets: the model after training, the data and the settings."""

    model: MultiExitModel
    train: object
    calib: object | None
    policy: ExitPolicy
    max_drop: float
    seed: int


@dataclass(frozen=True)
class Method:
    """A published method as a recipe.

    Attributes:
        name: registry name (``splitexit train --method NAME``).
        paper: where it comes from.
        summary: one line on what it does.
        head: exit head type put at every exit (``None``: the model's own heads).
        head_kwargs: arguments of that head type.
        strategy: the training strategy (``None``: no gradient training).
        policy: the exit policy family it is calibrated with.
        frozen_backbone: ``True`` trains only what the method adds, on the trained backbone;
            ``False`` fine-tunes the whole model jointly from it.
        lr_scale: factor on the learning rate given to :func:`fit_method`.
        min_epochs: the fewest epochs the method needs for a model (QuickNets: one phase per
            exit), or ``None``.
        fit: the step after training: ``fit(ctx) -> (model, policy, info)`` (ensemble
            weights, commitment thresholds, a gate, class means ...), or ``None``.
        build: builds the model to train from the given one instead of re-heading it
            (T-RECX): ``build(model, head, cut)``, or ``None``.
        needs_calib: the fit step needs the calibration split.
    """

    name: str
    paper: str
    summary: str
    head: str | None = None
    head_kwargs: dict = field(default_factory=dict)
    strategy: Callable[[], object] | None = None
    policy: Callable[[], ExitPolicy] = MaxProb
    frozen_backbone: bool = True
    lr_scale: float = 1.0
    min_epochs: Callable[[MultiExitModel], int] | None = None
    fit: Callable[[FitContext], tuple] | None = None
    build: Callable[[MultiExitModel, str | None, str | None], MultiExitModel] | None = None
    needs_calib: bool = False


@dataclass
class Fitted:
    """A fitted method: the model, the policy to calibrate it with, and how it was fitted."""

    method: str
    model: MultiExitModel
    policy: ExitPolicy
    seconds: float
    info: dict = field(default_factory=dict)


#: every published method, by name
METHODS: Registry[Method] = Registry("method")


def register_method(method: Method) -> Method:
    """Add a recipe to :data:`METHODS` (refuses a name registered twice)."""
    return METHODS.add(method.name, method)


def list_methods() -> list[str]:
    return METHODS.list()


def with_heads(model: MultiExitModel, head: str | None, head_kwargs: dict | None = None
               ) -> MultiExitModel:
    """A copy of ``model`` whose exits (same cuts) get fresh heads of type ``head``, sized
    from the heads it has; ``head=None`` keeps a copy of its own heads."""
    if not isinstance(model, MultiExitModel):
        raise InputError(f"a method starts from a MultiExitModel (your backbone with exit "
                         f"heads at the cuts you want, e.g. splitexit.build_multiexit(...)), "
                         f"got {type(model).__name__}")
    new = copy.deepcopy(model)
    if head is None:
        return new
    heads = {}
    for cut, old in zip(new.head_cuts, new.heads):
        if not isinstance(old, ExitHead):
            raise InputError(f"the head at {cut!r} is a {type(old).__name__}, not an ExitHead "
                             "with a known input shape; build the model with create_head heads")
        heads[cut] = create_head(head, old.in_shape, old.num_classes, **(head_kwargs or {}))
    out = MultiExitModel(new.backbone, heads, input_shape=new.input_shape)
    spec = getattr(model, "spec", None)
    if isinstance(spec, dict):
        out.spec = {**spec, "head": head, "head_kwargs": dict(head_kwargs or {})}
    return out


def fit_method(name: str, model: MultiExitModel, data, *, calib=None, epochs: int = 3,
               lr: float = 2e-3, batch_size: int = 128, seed: int = 0, head: str | None = None,
               max_drop: float = 0.01, cut: str | None = None, progress: bool | None = None
               ) -> Fitted:
    """Fit the published method ``name`` (:func:`list_methods`) on ``model``.

    Args:
        model: a multi-exit model with a trained backbone; its cuts are the exits. It is not
            changed: the recipe fits a copy.
        data: the training split (or an ``(x, y)`` pair).
        calib: the calibration split, for methods whose fit step chooses thresholds (the exit
            gate); ``None`` otherwise.
        epochs: training epochs (a method may need more: QuickNets trains one phase per exit).
        lr: learning rate; the recipe scales it (heads alone learn faster, joint fine-tuning
            slower).
        head: head type for the methods that keep the model's heads (``None``: the model's).
        max_drop: the accuracy drop the exit gate's operating point may cost on ``calib``.
        cut: for a method with one early exit (T-RECX), the model's exit cut it goes at
            (default: the one closest to a third of the MACs).

    Raises:
        InputError: an unknown method (the message lists them), a model that is not a
            multi-exit model, a method that needs ``calib`` without it.
    """
    method = METHODS.get(name)
    if method.needs_calib and calib is None:
        raise InputError(f"method {name!r} chooses its operating point on the calibration "
                         "split: pass calib=ds.calib")
    data = as_split(data)
    t0 = time.perf_counter()
    if cut is not None and method.build is None:
        raise InputError(f"method {name!r} keeps every exit of the model; cut= chooses the "
                         "single exit of a method that has one (t-recx)")
    built = (method.build(model, head, cut) if method.build is not None
             else with_heads(model, method.head or head,
                             method.head_kwargs if method.head else None))
    info: dict = {"paper": method.paper, "training": method.summary}
    if method.strategy is not None:
        n = max(epochs, method.min_epochs(built)) if method.min_epochs else epochs
        train(built, data, method.strategy(), epochs=n, lr=lr * method.lr_scale,
              batch_size=batch_size, seed=seed, progress=progress)
        info["epochs"] = n
    policy = method.policy()
    if method.fit is not None:
        built.eval()
        built, policy, extra = method.fit(FitContext(built, data, calib, policy, max_drop,
                                                     seed))
        info.update(extra)
    return Fitted(name, built.eval(), policy, time.perf_counter() - t0, info)


# fit steps ------------------------------------------------------------------------------------
def _ztw_fit(ctx: FitContext):
    policy = fit_ztw_ensemble(ctx.model, ctx.train, steps=200)
    return ctx.model, policy, {"ensemble_weights": [list(w) for w in policy.weights]}


def _class_means_fit(ctx: FitContext):
    info = fit_class_means(ctx.model, ctx.train)
    return ctx.model, ctx.policy, {"gradient_steps": 0, "passes": info["passes"],
                                   "samples": info["samples"]}


def _binary_fit(ctx: FitContext):
    return ctx.model, ctx.policy, {"binary_layers": count_binary_layers(ctx.model.heads)}


def _quicknets_fit(ctx: FitContext):
    commit = fit_commitment(ctx.model, ctx.calib if ctx.calib is not None else ctx.train,
                            precision=0.99)
    return ctx.model, ctx.policy, {"commitment_thresholds": list(commit.threshold)}


def _gate_fit(ctx: FitContext):
    from ..calibration import calibrate

    model, calib = ctx.model, as_split(ctx.calib, "calib")
    costs = cost_table(model, calib.x[:8], measure=False)
    with torch.no_grad():
        logits = model.collect_logits(calib.x)
    # the operating point the gate learns to anticipate: within max_drop on calib
    op = calibrate(logits, calib.y, costs.exit_macs, ctx.policy, max_drop=ctx.max_drop)
    gated = GatedMultiExitModel.from_multiexit(model)
    fitted = fit_gate(gated, ctx.train, op.policy, seed=ctx.seed)
    chosen = calibrate_gate(gated, calib, op.policy, costs.exit_macs, costs.backbone_macs)
    return gated, op.policy, {"gate_threshold": chosen["gate_threshold"],
                              "gate_balanced_accuracy_train": fitted["balanced_accuracy"],
                              "calib_accuracy": chosen["accuracy"]}


def _online_fit(ctx: FitContext):
    cache = OnlineCache(ctx.model, threshold=0.9, probe_fraction=0.5, target_agreement=0.98,
                        window=400, min_confident=200, lr=5e-3, seed=ctx.seed)
    traffic = ctx.train.x  # unlabelled: only the model's own answers teach the caches
    for i in range(0, len(traffic), 64):
        cache.process(traffic[i: i + 64])
    stats = cache.stats.to_dict()
    return ctx.model, cache.policy, {"enabled_exits": list(cache.enabled),
                                     "traffic_samples": stats["samples"],
                                     "served_agreement_during_traffic":
                                         stats["served_agreement"]}


def _trecx_build(model: MultiExitModel, head: str | None, cut: str | None) -> MultiExitModel:
    """T-RECX's single early exit at ``cut`` (default: the model's exit cut closest to a
    third of its MACs), with the model's own head there (or ``head``) and early-view
    assistance."""
    if not isinstance(model, MultiExitModel) or not model.head_cuts:
        raise InputError("T-RECX starts from a MultiExitModel with at least one exit cut")
    if cut is None:
        costs = cost_table(model, torch.zeros(1, *model.input_shape), measure=False)
        third = costs.exit_macs[-1] / 3
        e = min(range(len(model.head_cuts)), key=lambda i: abs(costs.exit_macs[i] - third))
    elif cut in model.head_cuts:
        e = model.head_cuts.index(cut)
    else:
        raise InputError(f"t-recx: cut {cut!r} is not one of the model's exit cuts "
                         f"{model.head_cuts}")
    cut = model.head_cuts[e]
    own: nn.Module | str = head or copy.deepcopy(model.heads[e])
    return early_view_model(model.backbone, cut, model_classes(model), model.input_shape,
                            head=own)


def _one_phase_per_exit(model: MultiExitModel) -> int:
    return model.num_exits


for _m in (
    Method("sdn", "SDN, Shallow-Deep Networks (ICML'19), IC-only",
           "sdn heads trained on the frozen backbone", head="sdn", strategy=HeadsOnly,
           lr_scale=2.0),
    Method("sdn-ramp", "SDN, Shallow-Deep Networks (ICML'19), joint",
           "sdn heads and backbone trained jointly with the weight ramp", head="sdn",
           strategy=SDNRamp, frozen_backbone=False, lr_scale=0.5),
    Method("pabee", "PABEE, patience-based early exit",
           "sdn heads on the frozen backbone, patience exit rule", head="sdn",
           strategy=HeadsOnly, policy=Patience, lr_scale=2.0),
    Method("ztw", "ZTW, Zero Time Waste (NeurIPS'21)",
           "cascading sdn heads on the frozen backbone + geometric ensemble",
           head="cascading", head_kwargs={"base": "sdn"}, strategy=ZTW, lr_scale=2.0,
           fit=_ztw_fit),
    Method("e2cm", "E2CM, Early Exit Class Means",
           "class means of pooled features, frozen backbone, no gradient steps",
           head="class-means", fit=_class_means_fit),
    Method("binary-heads", "binary early exits (BNN)",
           "binary heads (straight-through estimator), frozen backbone", head="binary",
           strategy=HeadsOnly, policy=Entropy, lr_scale=2.0, fit=_binary_fit),
    Method("branchynet", "BranchyNet (ICPR'16)",
           "joint weighted loss, entropy exit", strategy=JointWeighted, policy=Entropy,
           frozen_backbone=False, lr_scale=0.5),
    Method("self-distillation", "self-distillation: the deepest exit teaches the shallow ones",
           "joint loss with distillation from the final exit (T=3, alpha=0.5)",
           strategy=SelfDistillation, frozen_backbone=False, lr_scale=0.5),
    Method("boostnet", "BoostNet (AAAI'23)",
           "additive boosting model, sample re-weighting, gradient rescaling",
           strategy=BoostNet, policy=AdditiveEnsemble, frozen_backbone=False, lr_scale=0.5),
    Method("quicknets", "QuickNets",
           "cascaded training, one segment per phase on earlier exits' errors; commitment "
           "thresholds", strategy=QuickNets, frozen_backbone=False, lr_scale=0.5,
           min_epochs=_one_phase_per_exit, fit=_quicknets_fit),
    Method("t-recx", "T-RECX (tinyML, MLPerf Tiny)",
           "one early exit near a third of the MACs + early-view assistance, joint",
           strategy=JointWeighted, frozen_backbone=False, lr_scale=0.5, build=_trecx_build),
    Method("gate", "early-exit predictor (Dong et al.)",
           "sdn heads on the frozen backbone, then a tiny gate that sends hard samples "
           "straight to the final exit", head="sdn", strategy=HeadsOnly, lr_scale=2.0,
           fit=_gate_fit, needs_calib=True),
    Method("online-caching", "online layer caching",
           "sdn caches on the frozen backbone, learned from the model's own answers",
           head="sdn", fit=_online_fit),
):
    register_method(_m)
