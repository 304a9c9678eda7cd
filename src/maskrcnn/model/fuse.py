"""BatchNorm folded into the convolution before it, for inference only.

A BatchNorm in eval mode is an affine map per channel, ``y = x * s + t`` with
``s = w / sqrt(var + eps)`` and ``t = b - mean * s``; after a convolution ``x = W * z + c`` it
can be folded into the convolution's weights, ``y = (W s) * z + (c s + t)``. On R50-FPN at
800 px the 53 frozen BatchNorms of the ResNet body are a full read and write of every feature
map, 0.46 s of a 4.8 s ``predict`` on a Zen 3 at 2 threads; folded, they cost nothing.

``fold_batchnorm(model)`` marks every (convolution, frozen BatchNorm) pair of a model in place
(``batchnorm=True``: trainable ``nn.BatchNorm2d`` pairs too, with their running statistics). It
changes neither the parameters nor the module tree: ``state_dict`` keeps every BatchNorm
buffer (a checkpoint saved afterwards is the same file).

When a pair runs folded:
- a frozen BatchNorm always, training included: its scale and shift never train, so the
  folded weight ``W s`` is a function of the trainable ``W`` alone. With autograd on it is
  computed in each call from ``W`` (a weight-sized multiply), and the gradient reaches ``W``
  through it; the two feature-map-sized passes of the norm and their backward go. On an R50-FPN
  training step at 800 px that is 8% of the step (``docs/benchmarks.md``). The trainer folds.
- a trainable ``nn.BatchNorm2d`` only while both modules are in eval mode and autograd is off
  (``predict``, ``evaluate``, ``export``); otherwise it runs as before, so its gradients and
  training-mode statistics are exactly those of the unfolded model.

Without autograd the folded weights are computed once and kept until any of the pair's tensors
changes (an optimiser step, ``load_state_dict``, ``.to()``, an in-place op under
``torch.no_grad()``): each tensor's version counter and storage are part of the cache key.
A change written through ``.data`` is not seen (``.data`` has a version counter of its own):
change folded weights in place under ``torch.no_grad()`` instead.

Rounding: ``(W s) * z`` and ``(W * z) s`` differ by float32 rounding only (about 1e-6 of a
feature's scale); the parity tests against torchvision and Detectron2 hold with the frozen
BatchNorms folded, on the AVX-512 and the AVX2 kernels.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .backbone import FrozenBatchNorm2d
from .layout import Conv2d, conv2d

# Which child holds the norm that directly follows a conv child, by the names this package
# gives them (ResNet blocks: conv1/bn1; torchvision v2 heads: conv1/norm1, mask_fcn1/mask_norm1;
# FPN: inner_blocks[i]/inner_norms[i]; a ResNet shortcut: downsample[0]/downsample[1]).
_NORM_OF_CONV = (("conv", "bn"), ("conv", "norm"), ("mask_fcn", "mask_norm"))
_NORM_LISTS = (("inner_blocks", "inner_norms"), ("layer_blocks", "layer_norms"))


def _affine(norm: nn.Module) -> tuple[Tensor, Tensor]:
    """(C,) scale and shift of a BatchNorm in eval mode, computed in float64."""
    var, mean = norm.running_var.double(), norm.running_mean.double()
    weight = norm.weight.double() if norm.weight is not None else torch.ones_like(var)
    bias = norm.bias.double() if norm.bias is not None else torch.zeros_like(var)
    scale = weight * (var + norm.eps).rsqrt()
    return scale, bias - mean * scale


class FoldedConv2d(Conv2d):
    """A ``Conv2d`` that applies the BatchNorm after it itself when folding applies.

    Same parameters and state-dict keys as the convolution it was; ``_fold_norm`` is a plain
    reference (not a submodule) to the norm, which stays where it was in the module tree.
    """

    _fold_norm: nn.Module
    _fold_cache: tuple[tuple, Tensor, Tensor] | None

    def folds(self) -> bool:
        """True when this call runs folded: a frozen norm always; a trainable one in eval mode
        (both modules) without autograd."""
        if isinstance(self._fold_norm, FrozenBatchNorm2d):
            return True
        return not self.training and not self._fold_norm.training and not torch.is_grad_enabled()

    def _key(self, kind: str, tensors: list[Tensor | None]) -> tuple:
        """What the cached tensors were computed from: each tensor's storage, version and dtype."""
        return (kind, self._fold_norm.eps, *((t.data_ptr(), t._version, t.dtype) for t in tensors if t is not None))

    def _folded(self) -> tuple[Tensor, Tensor]:
        norm = self._fold_norm
        trains = torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in (self.weight, self.bias))
        if trains:  # W s from this call's W, so that the gradient reaches W; only s and t are kept
            key = (
                *self._key("affine", [norm.weight, norm.bias, norm.running_mean, norm.running_var]),
                self.weight.dtype,
            )
            if self._fold_cache is None or self._fold_cache[0] != key:
                scale, shift = _affine(norm)
                self._fold_cache = (key, scale.to(self.weight.dtype), shift.to(self.weight.dtype))
            scale, shift = self._fold_cache[1], self._fold_cache[2]
            weight = self.weight * scale[:, None, None, None]  # (O, I/g, kh, kw)
            return weight, shift if self.bias is None else shift + self.bias * scale
        key = self._key("folded", [self.weight, self.bias, norm.weight, norm.bias, norm.running_mean, norm.running_var])
        if self._fold_cache is None or self._fold_cache[0] != key:
            scale, shift = _affine(norm)
            weight = (self.weight.double() * scale[:, None, None, None]).to(self.weight.dtype)  # (O, I/g, kh, kw)
            bias = shift if self.bias is None else shift + self.bias.double() * scale
            self._fold_cache = (key, weight.detach(), bias.to(self.weight.dtype).detach())
        return self._fold_cache[1], self._fold_cache[2]

    def forward(self, x: Tensor) -> Tensor:
        if not self.folds():
            return super().forward(x)
        weight, bias = self._folded()
        return conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups, self.winograd)


class FoldedFrozenBatchNorm2d(FrozenBatchNorm2d):
    """A ``FrozenBatchNorm2d`` that passes its input through when its conv applied it."""

    _fold_conv: FoldedConv2d

    def forward(self, x: Tensor) -> Tensor:
        return x if self._fold_conv.folds() else super().forward(x)


class FoldedBatchNorm2d(nn.BatchNorm2d):
    """A ``nn.BatchNorm2d`` (eval mode: running statistics) that passes its input through when
    its conv applied it; in training mode it normalises and updates its statistics as before."""

    _fold_conv: FoldedConv2d

    def forward(self, x: Tensor) -> Tensor:
        return x if self._fold_conv.folds() else super().forward(x)


def conv_norm_pairs(model: nn.Module, batchnorm: bool = False) -> list[tuple[str, nn.Conv2d, nn.Module]]:
    """Every (convolution, frozen BatchNorm applied directly to its output) pair of ``model``, as
    (the conv's qualified name, conv, norm); with ``batchnorm`` also the trainable
    ``nn.BatchNorm2d`` ones (those with running statistics)."""
    pairs: list[tuple[str, nn.Conv2d, nn.Module]] = []

    def add(name: str, conv: nn.Module | None, norm: nn.Module | None) -> None:
        if type(conv) is Conv2d and _foldable(norm, batchnorm):
            pairs.append((name, conv, norm))  # type: ignore[arg-type]

    for prefix, parent in model.named_modules():
        children = dict(parent.named_children())
        dot = f"{prefix}." if prefix else ""
        for name, child in children.items():
            for conv_word, norm_word in _NORM_OF_CONV:
                if name.startswith(conv_word) and name[len(conv_word) :].isdigit():
                    add(dot + name, child, children.get(norm_word + name[len(conv_word) :]))
        for convs, norms in _NORM_LISTS:
            if isinstance(children.get(convs), nn.ModuleList) and isinstance(children.get(norms), nn.ModuleList):
                for i, (conv, norm) in enumerate(zip(children[convs], children[norms])):
                    add(f"{dot}{convs}.{i}", conv, norm)
        if prefix.endswith("downsample") and isinstance(parent, nn.Sequential) and len(parent) == 2:
            add(f"{dot}0", parent[0], parent[1])
    return pairs


def _foldable(norm: nn.Module | None, batchnorm: bool) -> bool:
    if type(norm) is FrozenBatchNorm2d:
        return True
    return batchnorm and type(norm) is nn.BatchNorm2d and norm.track_running_stats and norm.running_mean is not None


def fold_batchnorm(model: nn.Module, batchnorm: bool = False) -> int:
    """Mark every conv + frozen BatchNorm pair of ``model`` (in place) to run folded at inference;
    with ``batchnorm``, the conv + ``nn.BatchNorm2d`` pairs too.

    ``maskrcnn.load(fold_bn=True)``, ``export`` and the trainer fold the frozen ones only: folding torchvision v2's FPN and head
    BatchNorms as well moved one mask of its parity fixture to IoU 0.968 with torchvision's on
    the AVX2 kernels (test_parity_v2 asks 0.98; it holds with the frozen ones folded).
    Idempotent; the model's parameters, buffers and ``state_dict`` are unchanged. Returns the
    number of pairs marked by this call.
    """
    pairs = conv_norm_pairs(model, batchnorm)
    for _, conv, norm in pairs:
        # Swapping the class keeps the instance (parameters, hooks, state-dict keys, the
        # parent's reference): only ``forward`` changes.
        conv.__class__ = FoldedConv2d
        object.__setattr__(conv, "_fold_norm", norm)  # not a submodule: no second state-dict entry
        object.__setattr__(conv, "_fold_cache", None)
        norm.__class__ = FoldedFrozenBatchNorm2d if type(norm) is FrozenBatchNorm2d else FoldedBatchNorm2d
        object.__setattr__(norm, "_fold_conv", conv)
    return len(pairs)
