"""K copies of a ConvNet run as ONE network: groups=K convolutions, GroupNorm(K·g, K·C), a batched linear head.

Image batch k of `xs` (K, B, C, H, W) meets parameter set k only: the K inputs are stacked along channels
(B, K·C, H, W), a conv with groups=K keeps the K channel blocks apart, a group norm with K times the groups
normalises each block as its own network would, activations and pools are channel-wise, and the head is one
batched matmul. So training the grouped network on the sum of the K losses equals training K networks separately
(tested), with one kernel per layer instead of K: what experts (K at once) and evaluation (R runs at once) use.

Parameters are K-blocks of the template's, in `module.parameters()` order: conv and norm tensors concatenated along
dim 0 (K·out, ...), head tensors stacked (K, ...); `to_flats` and `from_flats` convert to and from the (K, P) flat
vectors that expert stores hold.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .convnet import ConvNet
from .functional import FunctionalModel
from .instancenorm import InstanceNorm, InstanceNormFunction

_POINTWISE = (nn.ReLU, nn.Sigmoid, nn.LeakyReLU, nn.SiLU, nn.AvgPool2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d)


def groupable(module: nn.Module) -> bool:
    """Whether `module` is a ConvNet that GroupedConvNet can run K times at once (no BatchNorm or LayerNorm)."""
    if not isinstance(module, ConvNet):
        return False
    return all(isinstance(layer, (nn.Conv2d, nn.GroupNorm, *_POINTWISE)) for layer in module.features)


class GroupedConvNet:
    """K ConvNets with the template's architecture as one network; parameters are passed in, not owned."""

    def __init__(self, template: nn.Module, k: int) -> None:
        if not groupable(template):
            raise ValueError(f"{type(template).__name__} cannot be grouped; check groupable() first")
        self.template, self.k = template, k
        self.fm = FunctionalModel(template)
        head = {id(p) for p in template.classifier.parameters()}
        self._stacked = [id(p) in head for p in template.parameters()]  # head: (K, ...); the rest: (K·dim0, ...)

    def from_flats(self, flats: Tensor) -> list[Tensor]:
        """Grouped parameter tensors (new leaves) from K flat vectors (K, P)."""
        out, offset = [], 0
        for shape, numel, stacked in zip(self.fm.shapes, self.fm.numels, self._stacked):
            block = flats[:, offset:offset + numel]
            offset += numel
            out.append(block.reshape(self.k, *shape) if stacked else block.reshape(self.k * shape[0], *shape[1:]))
        return [p.detach().clone().requires_grad_(True) for p in out]

    def to_flats(self, params: list[Tensor]) -> Tensor:
        """The K flat vectors (K, P) of grouped parameters (a K-block of dim 0 is one network's tensor)."""
        return torch.cat([p.reshape(self.k, -1) for p in params], dim=1)

    def __call__(self, params: list[Tensor], xs: Tensor) -> Tensor:
        """Logits (K, B, classes) of network k on images xs[k], for xs (K, B, C, H, W)."""
        k, b = xs.shape[:2]
        x = xs.transpose(0, 1).reshape(b, k * xs.shape[2], *xs.shape[3:])
        it = iter(params)
        for layer in self.template.features:
            if isinstance(layer, nn.Conv2d):
                x = F.conv2d(x, next(it), next(it), layer.stride, layer.padding, layer.dilation, groups=k)
            elif isinstance(layer, InstanceNorm):
                x = InstanceNormFunction.apply(x, next(it), next(it), layer.eps)[0]
            elif isinstance(layer, nn.GroupNorm):
                x = F.group_norm(x, k * layer.num_groups, next(it), next(it), layer.eps)
            else:
                x = layer(x)
        weight, bias = next(it), next(it)
        features = x.reshape(b, k, -1)
        return torch.einsum("bkf,kof->kbo", features, weight) + bias[:, None, :]
