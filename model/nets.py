"""Network definitions. Input: normalized float [N,1,28,28]; output: logits [N,10]."""

from __future__ import annotations

import torch
from torch import nn

from model.data import normalize


class SimpleNet(nn.Module):
    """The seed tutorial's net, fixed: after a 2x2 max-pool the 26x26 maps are 13x13.

    The tutorial flattened ``32*26*26`` features, which does not match the pooled tensor.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=3),  # 28 -> 26
            nn.ReLU(),
            nn.MaxPool2d(2),  # 26 -> 13
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * 13 * 13, 128),
            nn.ReLU(),
            nn.Linear(128, 10),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


def conv_bn(in_channels: int, out_channels: int, kernel_size: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class DigitNet(nn.Module):
    """The default net: three conv-BN-ReLU stages, each followed by a 2x2 max-pool.

    Sized by measurement to train past 99.4% in a few minutes on 2 CPU cores: most of the
    work happens after the first pool, where the maps are 14x14 and 7x7.
    """

    def __init__(self, width: int = 24) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            conv_bn(1, w, kernel_size=5), nn.MaxPool2d(2),  # 28 -> 14
            conv_bn(w, 2 * w), nn.MaxPool2d(2),  # 14 -> 7
            conv_bn(2 * w, 4 * w), nn.MaxPool2d(2),  # 7 -> 3
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * 3 * 3, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


ARCHITECTURES: dict[str, type[nn.Module]] = {"digitnet": DigitNet, "simplenet": SimpleNet}
DEFAULT_ARCH = "digitnet"


def build(arch: str = DEFAULT_ARCH) -> nn.Module:
    try:
        return ARCHITECTURES[arch]()
    except KeyError:
        raise ValueError(f"unknown architecture {arch!r}; choose from {sorted(ARCHITECTURES)}") from None


class ProbabilityHead(nn.Module):
    """The serving contract around a net: uint8 pixels [N,28,28] (white digit on black) in,
    probabilities [N,10] out. Normalisation and softmax live here once, so torch.compile and
    the exported ONNX graph compute exactly the same thing."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(normalize(pixels)), dim=1)
