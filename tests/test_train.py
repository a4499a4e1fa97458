from __future__ import annotations

import copy

import torch

from model.nets import build
from model.train import TrainConfig, evaluate, train


def test_one_epoch_on_10k_images_beats_95_percent(mnist_train, mnist_test) -> None:
    images, labels = mnist_train
    model = build("digitnet")
    history = train(model, images[:10000], labels[:10000], TrainConfig(epochs=1, seed=1), show_progress=False)
    result = evaluate(model, *mnist_test)
    assert len(history) == 1 and history[0].samples_per_s > 0
    assert result.accuracy > 0.95, result.accuracy
    assert sum(map(sum, result.confusion)) == 10000
    assert len(result.per_class_accuracy) == 10


def test_training_is_reproducible_with_a_seed(mnist_train) -> None:
    images, labels = mnist_train
    config = TrainConfig(epochs=1, seed=3, augment=True)
    initial = build("simplenet")
    weights = []
    for _ in range(2):
        model = copy.deepcopy(initial)
        train(model, images[:512], labels[:512], config, show_progress=False)
        weights.append(model.classifier[3].weight.detach().clone())
    assert torch.allclose(weights[0], weights[1], atol=1e-5)
