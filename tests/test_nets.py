from __future__ import annotations

import pytest
import torch

from model.nets import ARCHITECTURES, SimpleNet, build


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("batch", [1, 5])
def test_shapes(arch: str, batch: int) -> None:
    model = build(arch).eval()
    assert model(torch.zeros(batch, 1, 28, 28)).shape == (batch, 10)


def test_simplenet_flattens_32x13x13_after_pooling() -> None:
    """The seed tutorial flattened 32*26*26; after a 2x2 max-pool the maps are 13x13."""
    model = SimpleNet()
    assert model.classifier[1].in_features == 32 * 13 * 13
    assert model.features(torch.zeros(1, 1, 28, 28)).shape == (1, 32, 13, 13)


def test_unknown_architecture() -> None:
    with pytest.raises(ValueError, match="unknown architecture"):
        build("resnet9000")
