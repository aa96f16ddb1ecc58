"""Exit heads: small classifiers attached at a cut.

Every head takes the payload tensor at its cut (``(N, C, H, W)``, ``(N, C, L)`` or ``(N, F)``)
and returns logits. A head that also uses the previous exit's logits (a cascade) sets
``uses_previous = True`` and is called as ``head(features, previous_logits)``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError
from .registry import Registry
from .stages import per_sample_shape

__all__ = ["HEADS", "ExitHead", "LinearHead", "SDNHead", "ConvHead", "CascadingHead", "ClassMeansHead",
           "BinaryHead", "create_head", "list_heads", "register_head", "head_in_shape"]

#: head classes ``cls(in_shape, num_classes, **kw)``, by type name
HEADS: Registry[Callable[..., ExitHead]] = Registry("head type")


def register_head(name: str):
    """Class decorator adding a head type to the registry used by :func:`create_head` (and
    setting the class's ``kind`` to ``name``)."""
    return HEADS.register(name, stamp="kind")


def list_heads() -> list[str]:
    return HEADS.list()


def head_in_shape(in_shape) -> tuple[int, ...]:
    """A head's per-sample input shape from ``in_shape``: a shape such as ``(16, 8, 8)``, or
    what ``StagedModel.payload_shapes(x)[cut]`` gives for a cut: a list of one shape per
    tensor of the payload there (a one-tensor cut's list is its shape).

    Raises:
        InputError: a list of several shapes (a cut inside a block: pick the tensor), or not
            a shape of positive ints.
    """
    if isinstance(in_shape, (list, tuple)) and in_shape and all(
            isinstance(s, (list, tuple)) for s in in_shape):
        if len(in_shape) != 1:
            raise InputError(
                f"in_shape lists {len(in_shape)} shapes {[tuple(s) for s in in_shape]}: that "
                "cut carries several tensors (it lies inside a block); give the shape of the "
                "tensor that feeds the head, payload_shapes(x)[cut][i], and attach the head as "
                "'cut@i'")
        in_shape = in_shape[0]
    return per_sample_shape(in_shape, "a head's in_shape")


def create_head(kind: str, in_shape: Sequence[int], num_classes: int, **kwargs) -> ExitHead:
    """Build a registered head for per-sample input shape ``in_shape`` (a shape, or the list
    ``backbone.payload_shapes(x)[cut]`` of a one-tensor cut).

    Raises:
        InputError: unknown head type (the message lists the known ones), a bad ``in_shape``
            or ``num_classes``.
    """
    return HEADS.get(kind)(head_in_shape(in_shape), num_classes, **kwargs)


class ExitHead(nn.Module):
    """Base class: remembers its input shape and class count so it can be saved and rebuilt."""

    kind = "base"
    uses_previous = False

    def __init__(self, in_shape: Sequence[int], num_classes: int):
        super().__init__()
        self.in_shape = head_in_shape(in_shape)
        try:
            classes = operator.index(num_classes)
        except TypeError:
            classes = 0
        if isinstance(num_classes, bool) or classes < 1:
            raise InputError(f"num_classes must be an int >= 1, got {num_classes!r}")
        self.num_classes = classes

    def config(self) -> dict:
        """JSON-able description that :func:`create_head` rebuilds the head from."""
        return {"kind": self.kind, "in_shape": list(self.in_shape),
                "num_classes": self.num_classes, **self.extra_config()}

    def extra_config(self) -> dict:
        return {}


def _pool_flat(x: torch.Tensor) -> torch.Tensor:
    if x.dim() > 2:
        return x.flatten(2).mean(-1)
    return x


def _fixed_kernel(in_shape: Sequence[int], out_spatial: Sequence[int]) -> tuple[int, ...] | None:
    """The fixed pooling kernel equal to adaptive pooling from ``in_shape`` to ``out_spatial``
    (when every spatial size divides), from the head's static input shape, so the choice is
    plain Python at trace and export time."""
    spatial = tuple(in_shape[1:])
    if len(spatial) != 2 or any(s % o for s, o in zip(spatial, out_spatial)):
        return None
    return tuple(s // o for s, o in zip(spatial, out_spatial))


def _exporting_onnx() -> bool:
    """Whether torch.onnx is exporting (it traces): the tracing-state test is a C call,
    ``is_in_onnx_export`` alone costs microseconds on every batch-1 head call."""
    return torch._C._get_tracing_state() is not None and torch.onnx.is_in_onnx_export()


def _windows(size: int, out: int) -> list[tuple[int, int]]:
    """Adaptive pooling's windows: ``[floor(i * size / out), ceil((i + 1) * size / out))``."""
    return [(i * size // out, -(-(i + 1) * size // out)) for i in range(out)]


def _adaptive_pool2d_sliced(x: torch.Tensor, out: Sequence[int], mode: str) -> torch.Tensor:
    """Adaptive max/avg pooling as slices (ONNX has no adaptive pooling for sizes that do not
    divide); equal to ``F.adaptive_{mode}_pool2d``."""
    reduce = (lambda t, d: t.amax(d, keepdim=True)) if mode == "max" else \
        (lambda t, d: t.mean(d, keepdim=True))
    h, w = (int(v) for v in x.shape[-2:])
    wins = [_windows(h, out[0]), _windows(w, out[1])]
    sizes = [{b - a for a, b in ws} for ws in wins]
    if all(len(z) == 1 for z in sizes):  # equal windows: one stride-1 pool, then pick starts
        k = tuple(next(iter(z)) for z in sizes)
        pooled = (F.max_pool2d(x, k, stride=1) if mode == "max"
                  else F.avg_pool2d(x, k, stride=1))
        rows = torch.tensor([a for a, _ in wins[0]])
        cols = torch.tensor([a for a, _ in wins[1]])
        return pooled.index_select(-2, rows).index_select(-1, cols)
    rows = torch.cat([reduce(x[..., a:b, :], -2) for a, b in wins[0]], -2)
    return torch.cat([reduce(rows[..., a:b], -1) for a, b in wins[1]], -1)


class _GridHead(ExitHead):
    """Pools to at most ``pool_size`` per spatial side, then one linear layer (SDN, pool)."""

    def __init__(self, in_shape, num_classes, pool_size: int = 4):
        super().__init__(in_shape, num_classes)
        self.pool_size = pool_size
        self.out_spatial = tuple(min(pool_size, s) for s in self.in_shape[1:])
        self._kernel = _fixed_kernel(self.in_shape, self.out_spatial)
        features = self.in_shape[0]
        for s in self.out_spatial:
            features *= s
        self.fc = nn.Linear(features, num_classes)

    def extra_config(self) -> dict:
        return {"pool_size": self.pool_size}

    def _pool(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        return _grid_pool(x, self.out_spatial, self._kernel, mode)

    def _classify(self, pooled: torch.Tensor) -> torch.Tensor:
        # the functional form: the Linear module's call costs microseconds at batch 1, on
        # every sample that reaches the exit
        return F.linear(pooled.flatten(1), self.fc.weight, self.fc.bias)


def _max_rows_then_columns(x: torch.Tensor, kernel: tuple[int, ...]) -> torch.Tensor:
    """``F.max_pool2d(x, kernel)`` (non-overlapping windows that tile the map) as two
    reductions, rows then columns: the same values bit for bit (a maximum does not round)
    and about twice as fast on CPU above batch 1, where max pooling is an SDN head's
    slowest op; at batch 1 the single pooling call is faster."""
    n, c, h, w = x.shape
    kh, kw = kernel
    rows = x.view(n, c, h // kh, kh, w).amax(3)
    return rows.view(n, c, h // kh, w // kw, kw).amax(4)


def _grid_pool(x: torch.Tensor, out: Sequence[int], kernel: tuple[int, ...] | None,
               mode: str) -> torch.Tensor:
    """Max or average pooling of ``x`` to the grid ``out``: a fixed kernel when the sizes
    divide (faster, same windows), slices while exporting to ONNX, else adaptive pooling."""
    is_max = mode == "max"
    if x.dim() == 4 and kernel is not None:
        if is_max and x.shape[0] > 1 and x.is_contiguous() and not _exporting_onnx():
            return _max_rows_then_columns(x, kernel)
        return F.max_pool2d(x, kernel) if is_max else F.avg_pool2d(x, kernel)
    if x.dim() == 4 and _exporting_onnx():
        return _adaptive_pool2d_sliced(x, out, mode)
    if x.dim() == 4:
        return F.adaptive_max_pool2d(x, out) if is_max else F.adaptive_avg_pool2d(x, out)
    if x.dim() == 3:
        return F.adaptive_max_pool1d(x, out) if is_max else F.adaptive_avg_pool1d(x, out)
    return x


@register_head("linear")
class LinearHead(ExitHead):
    """Global average pooling then one linear layer (the cheapest useful head)."""

    def __init__(self, in_shape, num_classes):
        super().__init__(in_shape, num_classes)
        self.fc = nn.Linear(self.in_shape[0], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(_pool_flat(x))


@register_head("sdn")
class SDNHead(_GridHead):
    """Shallow-Deep Networks' internal classifier: a learned mix of max and average pooling.

    Feature maps larger than ``pool_size`` are pooled down to it; the mix weight ``alpha``
    is learned (``alpha * max + (1 - alpha) * avg``), then one linear layer.
    """

    def __init__(self, in_shape, num_classes, pool_size: int = 4):
        super().__init__(in_shape, num_classes, pool_size)
        self.alpha = nn.Parameter(torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mx, av = self._pool(x, "max"), self._pool(x, "avg")
        if _exporting_onnx():
            # ONNX has no lerp: the exporter writes both of lerp's branches and a Where (7
            # nodes); the weight is a constant here, so write the one branch lerp takes for it
            # (the same arithmetic, 3 nodes)
            w = float(self.alpha.detach().clamp(0, 1))
            mixed = av + w * (mx - av) if w < 0.5 else mx - (1 - w) * (mx - av)
            return self._classify(mixed)
        # alpha * max + (1 - alpha) * avg in one op (fewer dispatches at batch 1)
        return self._classify(torch.lerp(av, mx, self.alpha.clamp(0, 1)))


@register_head("pool")
class PoolHead(_GridHead):
    """Average pooling to a small grid (at most ``pool_size`` per side), then one linear layer.

    SDN's head without the max branch: max pooling is the slowest part of an SDN head on CPU
    (memory-bound, about 4x an average pool of the same map at batch 256), so this head keeps
    most of the spatial information for a fraction of the time an exit costs on every sample
    that reaches it.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._classify(self._pool(x, "avg"))


@register_head("conv")
class ConvHead(ExitHead):
    """A small convolutional head: (depthwise-separable) conv, BN, ReLU, pooling, linear.

    ``depthwise=True`` gives T-RECX's depthwise + pointwise head. ``channels`` defaults to
    twice the input channels; ``stride`` to 2 on feature maps of 16 or more, else 1.
    """

    def __init__(self, in_shape, num_classes, channels: int | None = None,
                 depthwise: bool = False, stride: int | None = None):
        super().__init__(in_shape, num_classes)
        c_in = self.in_shape[0]
        channels = channels or 2 * c_in
        if stride is None:  # keep the head cheap on large feature maps
            stride = 2 if min(self.in_shape[1:], default=0) >= 16 else 1
        self.channels, self.depthwise, self.stride = channels, depthwise, stride
        dims = len(self.in_shape) - 1
        if dims not in (1, 2):
            raise InputError(f"a conv head needs (C, L) or (C, H, W) features, got {in_shape}")
        conv = nn.Conv2d if dims == 2 else nn.Conv1d
        bn = nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d
        if depthwise:
            layers = [conv(c_in, c_in, 3, stride=stride, padding=1, groups=c_in, bias=False),
                      bn(c_in), nn.ReLU(), conv(c_in, channels, 1, bias=False)]
        else:
            layers = [conv(c_in, channels, 3, stride=stride, padding=1, bias=False)]
        self.body = nn.Sequential(*layers, bn(channels), nn.ReLU())
        self.fc = nn.Linear(channels, num_classes)

    def extra_config(self) -> dict:
        return {"channels": self.channels, "depthwise": self.depthwise, "stride": self.stride}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(_pool_flat(self.body(x)))


@register_head("depthwise")
class DepthwiseHead(ConvHead):
    """T-RECX-style head: depthwise 3x3 + pointwise conv, then pooling and linear."""

    def __init__(self, in_shape, num_classes, channels: int | None = None,
                 stride: int | None = None, depthwise: bool = True):
        super().__init__(in_shape, num_classes, channels=channels, depthwise=True, stride=stride)


@register_head("module")
class ModuleHead(ExitHead):
    """Wraps any ``nn.Module`` as a head (e.g. B-LeNet's published branch)."""

    def __init__(self, in_shape, num_classes, module: nn.Module | None = None):
        super().__init__(in_shape, num_classes)
        if module is None:
            raise InputError("ModuleHead needs module=")
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


@register_head("cascading")
class CascadingHead(ExitHead):
    """ZTW's cascading head: a base head plus a linear map of the previous exit's logits.

    Zero Time Waste feeds each head the (detached) logits of the head before it, so later
    heads reuse earlier heads' work. ``base(features) + W @ previous`` is a linear classifier
    over ``[base features, previous logits]``. The first head of a model gets no previous
    logits (``previous=None``) and is its base head alone. :class:`MultiExitModel` carries the
    previous logits per sample and shrinks them with the batch.

    Args:
        base: head type of the feature path (``"sdn"`` as in ZTW, or any registered head).
        base_kwargs: keyword arguments of the base head.
    """

    uses_previous = True

    def __init__(self, in_shape, num_classes, base: str = "sdn", base_kwargs: dict | None = None):
        super().__init__(in_shape, num_classes)
        if base == "cascading":
            raise InputError("a cascading head cannot wrap another cascading head; "
                             "use base='sdn', 'linear', 'conv' or 'depthwise'")
        self.base_kind, self.base_kwargs = base, dict(base_kwargs or {})
        self.base = create_head(base, in_shape, num_classes, **self.base_kwargs)
        self.previous = nn.Linear(num_classes, num_classes, bias=False)
        nn.init.zeros_(self.previous.weight)

    def extra_config(self) -> dict:
        return {"base": self.base_kind, "base_kwargs": self.base_kwargs}

    def forward(self, x: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
        out = self.base(x)
        if previous is None:
            return out
        if previous.shape != out.shape:
            raise InputError(f"previous logits have shape {tuple(previous.shape)}, expected "
                             f"{tuple(out.shape)}: the previous exit must predict the same classes")
        return out + self.previous(previous.detach())


@register_head("class-means")
class ClassMeansHead(ExitHead):
    """E2CM: no trained weights, only the class means of globally pooled features.

    Fit it in one pass over training features with :meth:`accumulate` then :meth:`finish`
    (or :func:`splitexit.training.fit_class_means` for a whole model). Its logits are the
    negative Euclidean distances to the class means, so the softmax over them is E2CM's score.
    The means are buffers, not parameters: nothing here takes a gradient step.
    """

    def __init__(self, in_shape, num_classes):
        super().__init__(in_shape, num_classes)
        features = self.in_shape[0]
        self.register_buffer("means", torch.zeros(num_classes, features))
        self.register_buffer("sums", torch.zeros(num_classes, features, dtype=torch.float64))
        self.register_buffer("counts", torch.zeros(num_classes, dtype=torch.float64))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    def reset(self) -> None:
        """Forget the accumulated sums (start a new pass)."""
        self.sums.zero_()
        self.counts.zero_()
        self.fitted.fill_(False)

    @torch.no_grad()
    def accumulate(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch of features ``x`` with class ``labels`` to the running class sums."""
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise InputError(f"labels must lie in [0, {self.num_classes}), got "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        pooled = _pool_flat(x).double()
        self.sums.index_add_(0, labels, pooled)
        self.counts += torch.bincount(labels, minlength=self.num_classes).double()

    @torch.no_grad()
    def finish(self) -> None:
        """Turn the running sums into means.

        Raises:
            InputError: a class never appeared in the data the head was fitted on.
        """
        missing = (self.counts == 0).nonzero().flatten().tolist()
        if missing:
            raise InputError(f"classes {missing} have no training samples; fit the class means "
                             "on data that covers every class")
        self.means.copy_((self.sums / self.counts[:, None]).float())
        self.fitted.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.fitted):
            raise InputError("this class-means head is not fitted yet; run "
                             "splitexit.training.fit_class_means(model, train_split) first")
        return -torch.cdist(_pool_flat(x).float(), self.means)


@register_head("binary")
class BinaryHead(ExitHead):
    """A binarised exit head: sign weights and activations, straight-through gradients.

    A binary 3x3 convolution (batch-normalised sign inputs, per-channel scaled sign weights),
    BatchNorm, pooling and a binary linear layer with a real-valued per-class scale. See
    :mod:`splitexit.compress.binary` for the layers.
    """

    def __init__(self, in_shape, num_classes, channels: int | None = None):
        super().__init__(in_shape, num_classes)
        from .compress.binary import BinaryConv1d, BinaryConv2d, BinaryLinear

        c_in = self.in_shape[0]
        dims = len(self.in_shape) - 1
        self.channels = channels or 2 * c_in
        if dims == 2:
            body = [BinaryConv2d(c_in, self.channels, 3, padding=1),
                    nn.BatchNorm2d(self.channels)]
        elif dims == 1:
            body = [BinaryConv1d(c_in, self.channels, 3, padding=1),
                    nn.BatchNorm1d(self.channels)]
        else:
            body = [BinaryLinear(c_in, self.channels), nn.BatchNorm1d(self.channels)]
        self.body = nn.Sequential(*body)
        self.fc = BinaryLinear(self.channels, num_classes)
        self.scale = nn.Parameter(torch.ones(num_classes))

    def extra_config(self) -> dict:
        return {"channels": self.channels}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(_pool_flat(self.body(x))) * self.scale
