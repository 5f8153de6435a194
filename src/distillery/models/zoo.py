"""Cross-architecture models of SPEC §1.2: MLP, LeNet, AlexNet, VGG11, ResNet18, ResNet18_AP and their BN variants.

Layers, their order and their attribute names follow `[MTT-code]`/`[DC-code] networks.py`, so `parameters()` order
and `state_dict()` keys match the reference. Deliberate differences:
* activations are never in-place, so every model works under `torch.func` (grad, vmap);
* the first linear layer's input size is computed from `im_size` instead of being hard-coded for 32x32, so the same
  layers also run on 64x64 images (the reference would fail there); sizes that shrink a feature map too far raise
  `UserError`;
* the larger first-conv padding for grey images is applied to 28x28 grey images only (the case it exists for, and the
  rule `convnet.py` follows); the reference applies it to every one-channel input.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .registry import register_model

VGG11_CFG = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


def _is_grey28(channels: int, im_size: tuple[int, int]) -> bool:
    """True for 28x28 one-channel images, whose first conv the reference pads more so shapes match 32x32 RGB."""
    return channels == 1 and tuple(im_size) == (28, 28)


def _check_map(arch: str, channels: int, im_size: tuple[int, int], map_hw: tuple[int, int],
               min_side: int = 1) -> None:
    """Raise UserError if `arch` shrinks `im_size` images to a final feature map with a side below `min_side`."""
    if min(map_hw) < min_side:
        raise UserError(f"{arch} cannot take {channels}x{im_size[0]}x{im_size[1]} images (its feature maps get too "
                        "small); it supports 32x32 and 64x64 images and 28x28 grey ones, use a ConvNet such as "
                        "ConvNetD2 for smaller images")


def _norm2d(norm: str, channels: int) -> nn.Module:
    """The reference's two norms: 'instancenorm' = GroupNorm(C, C) with affine, 'batchnorm' = BatchNorm2d."""
    return nn.GroupNorm(channels, channels, affine=True) if norm == "instancenorm" else nn.BatchNorm2d(channels)


class MLP(nn.Module):
    """flatten -> FC 128 -> ReLU -> FC 128 -> ReLU -> FC num_classes."""

    def __init__(self, channels: int, num_classes: int, im_size: tuple[int, int]):
        super().__init__()
        self.fc_1 = nn.Linear(channels * im_size[0] * im_size[1], 128)
        self.fc_2 = nn.Linear(128, 128)
        self.fc_3 = nn.Linear(128, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The features the last linear layer classifies (the embedding contract, models/registry.py)."""
        return F.relu(self.fc_2(F.relu(self.fc_1(x.flatten(1)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_3(self.embed(x))


class LeNet(nn.Module):
    """conv5x5 c->6 -> ReLU -> MaxPool2 -> conv5x5 6->16 -> ReLU -> MaxPool2 -> FC 120 -> FC 84 -> FC num_classes."""

    def __init__(self, channels: int, num_classes: int, im_size: tuple[int, int]):
        super().__init__()
        pad = 2 if _is_grey28(channels, im_size) else 0
        self.features = nn.Sequential(
            nn.Conv2d(channels, 6, kernel_size=5, padding=pad), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(6, 16, kernel_size=5), nn.ReLU(), nn.MaxPool2d(2, 2),
        )
        map_hw = tuple(((s + 2 * pad - 4) // 2 - 4) // 2 for s in im_size)
        _check_map("LeNet", channels, im_size, map_hw)
        self.fc_1 = nn.Linear(16 * map_hw[0] * map_hw[1], 120)
        self.fc_2 = nn.Linear(120, 84)
        self.fc_3 = nn.Linear(84, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The features the last linear layer classifies (the embedding contract, models/registry.py)."""
        return F.relu(self.fc_2(F.relu(self.fc_1(self.features(x).flatten(1)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_3(self.embed(x))


class AlexNet(nn.Module):
    """The DC/MTT 5-conv AlexNet (no norm), or with BatchNorm after every conv (`norm='batchnorm'`, DC's AlexNetBN)."""

    def __init__(self, channels: int, num_classes: int, im_size: tuple[int, int], norm: str = "none"):
        super().__init__()
        pad = 4 if _is_grey28(channels, im_size) else 2
        # (in, out, kernel, padding, max-pool after?)
        convs = [(channels, 128, 5, pad, True), (128, 192, 5, 2, True), (192, 256, 3, 1, False),
                 (256, 192, 3, 1, False), (192, 192, 3, 1, True)]
        layers: list[nn.Module] = []
        for cin, cout, kernel, padding, pool in convs:
            layers.append(nn.Conv2d(cin, cout, kernel_size=kernel, padding=padding))
            if norm == "batchnorm":
                layers.append(nn.BatchNorm2d(cout))
            layers.append(nn.ReLU())
            if pool:
                layers.append(nn.MaxPool2d(2, 2))
        self.features = nn.Sequential(*layers)
        map_hw = tuple((s + 2 * pad - 4) // 8 for s in im_size)  # later convs keep the size; three 2x2 pools
        _check_map("AlexNetBN" if norm == "batchnorm" else "AlexNet", channels, im_size, map_hw)
        self.fc = nn.Linear(192 * map_hw[0] * map_hw[1], num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The features the last linear layer classifies (the embedding contract, models/registry.py)."""
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embed(x))


class VGG11(nn.Module):
    """VGG11: eight conv3x3 + norm + ReLU with five 2x2 max-pools, then one linear layer."""

    def __init__(self, channels: int, num_classes: int, im_size: tuple[int, int], norm: str = "instancenorm"):
        super().__init__()
        first_pad = 3 if _is_grey28(channels, im_size) else 1
        layers: list[nn.Module] = []
        in_ch = channels
        for i, v in enumerate(VGG11_CFG):
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(in_ch, v, kernel_size=3, padding=first_pad if i == 0 else 1), _norm2d(norm, v),
                           nn.ReLU()]
                in_ch = v
        self.features = nn.Sequential(*layers)
        map_hw = tuple((s + 2 * first_pad - 2) // 32 for s in im_size)
        _check_map("VGG11BN" if norm == "batchnorm" else "VGG11", channels, im_size, map_hw)
        self.classifier = nn.Linear(512 * map_hw[0] * map_hw[1], num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The features the last linear layer classifies (the embedding contract, models/registry.py)."""
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


def _resnet_map(size: int, ap: bool) -> int:
    """Side of ResNet18's final feature map (the one flattened into the classifier) for input side `size`."""
    for _ in range(3):  # downsampling in layer2..4: a 2x2 avg-pool (AP) or a 3x3 stride-2 conv with padding 1
        size = size // 2 if ap else (size - 1) // 2 + 1
    return size if ap else size // 4  # the plain ResNet18 ends with avg_pool2d(4)


class BasicBlock(nn.Module):
    """ResNet basic block; with `ap` a stride-2 conv becomes a stride-1 conv followed by a 2x2 average pool."""

    def __init__(self, in_planes: int, planes: int, stride: int, norm: str, ap: bool):
        super().__init__()
        self.stride = stride
        self.ap = ap
        conv_stride = 1 if ap else stride
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=conv_stride, padding=1, bias=False)
        self.bn1 = _norm2d(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = _norm2d(norm, planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            pool = [nn.AvgPool2d(2, 2)] if ap else []
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, kernel_size=1, stride=conv_stride, bias=False),
                                          *pool, _norm2d(norm, planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        if self.ap and self.stride != 1:
            out = F.avg_pool2d(out, kernel_size=2, stride=2)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR ResNet-18: conv3x3 -> 4 stages of 2 BasicBlocks (64..512) -> avg_pool2d(4) -> FC; `ap`: ResNet18_AP."""

    def __init__(self, channels: int, num_classes: int, im_size: tuple[int, int], norm: str = "instancenorm",
                 ap: bool = False):
        super().__init__()
        self.ap = ap
        self.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = _norm2d(norm, 64)
        in_planes = 64
        stages = []
        for planes, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            stages.append(nn.Sequential(BasicBlock(in_planes, planes, stride, norm, ap),
                                        BasicBlock(planes, planes, 1, norm, ap)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        map_hw = tuple(_resnet_map(s, ap) for s in im_size)
        arch = "ResNet18" + ("BN" if norm == "batchnorm" else "") + ("_AP" if ap else "")
        # With AP the last stage runs on the final map, and instance norm of a 1x1 map is a constant (torch even
        # raises for a batch of one), so it must be at least 2x2. The plain ResNet18's last stage sees >= 4x4.
        _check_map(arch, channels, im_size, map_hw, min_side=2 if ap and norm == "instancenorm" else 1)
        self.classifier = nn.Linear(512 * map_hw[0] * map_hw[1], num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The features the last linear layer classifies (the embedding contract, models/registry.py)."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return (out if self.ap else F.avg_pool2d(out, 4)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


# name -> (class, keyword arguments): the reference's names for each variant
VARIANTS = {
    "MLP": (MLP, {}),
    "LeNet": (LeNet, {}),
    "AlexNet": (AlexNet, {"norm": "none"}),            # as in MTT/DC: no normalization
    "AlexNetBN": (AlexNet, {"norm": "batchnorm"}),     # BatchNorm after every conv (DC's AlexNetBN)
    "VGG11": (VGG11, {"norm": "instancenorm"}),
    "VGG11BN": (VGG11, {"norm": "batchnorm"}),
    "ResNet18": (ResNet18, {"norm": "instancenorm"}),  # the MTT/DC default
    "ResNet18BN": (ResNet18, {"norm": "batchnorm"}),
    "ResNet18_AP": (ResNet18, {"norm": "instancenorm", "ap": True}),  # average-pool downsampling
    "ResNet18BN_AP": (ResNet18, {"norm": "batchnorm", "ap": True}),
}
for _name, (_cls, _kwargs) in VARIANTS.items():
    register_model(_name)(partial(_cls, **_kwargs))
