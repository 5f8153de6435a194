"""The ConvNet family of SPEC §1.1 (DC/DSA/MTT/TESLA/RaT-BPTT all use the same definition)."""

from __future__ import annotations

import re
from functools import partial

from torch import Tensor, nn

from ..errors import UserError
from .instancenorm import InstanceNorm
from .registry import register_family, register_model

NORMS = {"NN": "none", "BN": "batchnorm", "LN": "layernorm", "IN": "instancenorm", "GN": "groupnorm"}
POOLS = {"NP": "none", "MP": "maxpooling", "AP": "avgpooling"}
ACTS = {"AS": "sigmoid", "AR": "relu", "AL": "leakyrelu", "ASwish": "swish"}


def _norm(kind: str, channels: int, hw: tuple[int, int]) -> nn.Module | None:
    if kind == "instancenorm":  # per-sample per-channel, learnable affine: GroupNorm(C, C), not nn.InstanceNorm2d
        return InstanceNorm(channels)  # an nn.GroupNorm(C, C) with a cheaper double backward (instancenorm.py)
    if kind == "batchnorm":
        return nn.BatchNorm2d(channels, affine=True)
    if kind == "layernorm":
        return nn.LayerNorm([channels, *hw], elementwise_affine=True)
    if kind == "groupnorm":
        return nn.GroupNorm(4, channels, affine=True)
    if kind == "none":
        return None
    raise UserError(f"unknown norm '{kind}'; use one of {sorted(set(NORMS.values()))}")


def _act(kind: str) -> nn.Module:
    acts = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "leakyrelu": partial(nn.LeakyReLU, 0.01), "swish": nn.SiLU}
    if kind not in acts:
        raise UserError(f"unknown activation '{kind}'; use one of {sorted(acts)}")
    return acts[kind]()


class ConvNet(nn.Module):
    """`depth` x [conv3x3 -> norm -> act -> pool], then one linear layer (or global average pooling if `gap`)."""

    def __init__(self, channels: int, num_classes: int, im_size: tuple[int, int] = (32, 32), width: int = 128,
                 depth: int = 3, act: str = "relu", norm: str = "instancenorm", pool: str = "avgpooling",
                 gap: bool = False):
        super().__init__()
        layers: list[nn.Module] = []
        h, w = im_size
        in_ch = channels
        for d in range(depth):
            # The reference code pads the first conv of 28x28 grey images by 3 (28 -> 32) so MNIST matches CIFAR shapes.
            pad = 3 if (d == 0 and channels == 1 and im_size[0] == 28) else 1
            layers.append(nn.Conv2d(in_ch, width, kernel_size=3, padding=pad))
            h, w = h + 2 * pad - 2, w + 2 * pad - 2
            norm_layer = _norm(norm, width, (h, w))
            if norm_layer is not None:
                layers.append(norm_layer)
            layers.append(_act(act))
            if pool != "none":
                if h < 2 or w < 2:
                    fix = f"use a smaller depth, e.g. ConvNetD{d}" if d else "use larger images (--resolution)"
                    raise UserError(f"ConvNet depth {depth} is too deep for {im_size[0]}x{im_size[1]} images; {fix}")
                layers.append(nn.MaxPool2d(2, 2) if pool == "maxpooling" else nn.AvgPool2d(2, 2))
                h, w = h // 2, w // 2
            in_ch = width
        self.features = nn.Sequential(*layers)
        if gap:
            self.features.append(nn.AdaptiveAvgPool2d(1))
            h = w = 1
        self.classifier = nn.Linear(width * h * w, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        """The features the classifier reads (the embedding contract, models/registry.py)."""
        return self.features(x).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.embed(x))


_TOKEN = re.compile(r"D(\d+)|W(\d+)|KIP|GAP|ASwish|NN|BN|LN|IN|GN|NP|MP|AP|AS|AR|AL")


def parse_convnet_name(name: str):
    """Parse SPEC §1.1 names (ConvNet, ConvNetD4, ConvNetW64, ConvNetBN, ConvNetAS, ConvNetKIP, ...) and combos."""
    rest = name[len("ConvNet"):]
    kwargs: dict = {}
    pos = 0
    while pos < len(rest):
        m = _TOKEN.match(rest, pos)
        if m is None:
            raise UserError(f"cannot parse model name '{name}' at '{rest[pos:]}'; ConvNet names combine "
                            "D<depth>, W<width>, NN/BN/LN/IN/GN (norm), NP/MP/AP (pool), AS/AR/AL/ASwish (act), KIP, GAP")
        tok = m.group(0)
        if m.group(1):
            kwargs["depth"] = int(m.group(1))
        elif m.group(2):
            kwargs["width"] = int(m.group(2))
        elif tok == "KIP":
            kwargs.update(width=1024, norm="none")
        elif tok == "GAP":
            kwargs["gap"] = True
        elif tok in NORMS:
            kwargs["norm"] = NORMS[tok]
        elif tok in POOLS:
            kwargs["pool"] = POOLS[tok]
        else:
            kwargs["act"] = ACTS[tok]
        pos = m.end()
    return lambda channels, num_classes, im_size: ConvNet(channels, num_classes, im_size, **kwargs)


for _name in ["ConvNet", "ConvNetD1", "ConvNetD2", "ConvNetD3", "ConvNetD4", "ConvNetD5", "ConvNetD6",
              "ConvNetW64", "ConvNetBN", "ConvNetNN", "ConvNetMP", "ConvNetGAP"]:
    register_model(_name)(parse_convnet_name(_name))
register_family("ConvNet", parse_convnet_name)
