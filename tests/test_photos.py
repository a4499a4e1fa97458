"""Phone photos of handwritten digits over real HTTP read as well as the same digits as clean scans."""

from __future__ import annotations

from collections import defaultdict

import requests

from model.photoset import CONDITIONS, photo_set
from tests.conftest import png_of, post_png

PER_CONDITION = 50


def read(url: str, data: bytes, name: str, kind: str) -> int:
    response = requests.post(f"{url}/predict", files={"file": (name, data, kind)}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["digit"]


def test_photos_read_as_well_as_clean_scans(start_server, registry_copy, mnist_test) -> None:
    images, labels = (t.numpy() for t in mnist_test)
    photos = photo_set(images, labels, PER_CONDITION, seed=0)
    server = start_server(registry_copy.root, trainer_enabled="false")
    right: dict[str, list[bool]] = defaultdict(list)
    clean: dict[str, list[bool]] = defaultdict(list)
    for photo in photos:
        right[photo.condition].append(read(server.url, photo.jpeg, "photo.jpg", "image/jpeg") == photo.label)
        clean[photo.condition].append(post_png(server.url, png_of(images[photo.mnist_index])).json()["digit"]
                                      == photo.label)
    table = "\n".join(f"{c:<12} photos {sum(right[c]) / PER_CONDITION:6.1%}   "
                      f"clean {sum(clean[c]) / PER_CONDITION:6.1%}" for c in CONDITIONS)
    photo_accuracy = sum(map(sum, right.values())) / len(photos)
    clean_accuracy = sum(map(sum, clean.values())) / len(photos)
    print(f"\n{table}\nall          photos {photo_accuracy:6.1%}   clean {clean_accuracy:6.1%}")
    assert photo_accuracy >= 0.98, table
    assert clean_accuracy - photo_accuracy <= 0.015, table
