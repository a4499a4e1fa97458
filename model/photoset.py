"""Phone-style photos of handwritten digits, made from MNIST *test* digits (deterministic per seed).

Each photo is one MNIST digit drawn as pen ink on paper and photographed the way a phone
does it: tinted or coloured paper, ruled or squared lines, uneven lighting, blue/black/red
ink, slight rotation and skew, a little blur and sensor noise, JPEG quality 35-85, 60-400 px
on the longer side. Besides the paper kinds there are hand-made-style cases: a sticky note
on a desk, a whiteboard marker digit, a digit near the image edge, a shadow across the
digit, and a digit photographed at an angle (perspective).

The image is composed as reflectance (paper x lines x ink, per RGB channel) in a 320 px
render, warped like a hand-held camera, lit, then scaled, blurred, noised and JPEG-encoded.

    python -m model.photoset --out DIR [--per-condition 60] [--seed 0]

writes DIR/<condition>/<n>_label<d>.jpg (and DIR/<condition>/<n>_label<d>_clean.png, the same
MNIST digit as a clean scan).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

RENDER = 320  # shorter side of the render, px
INKS = {"black": (0.10, 0.10, 0.13), "blue": (0.10, 0.17, 0.62), "red": (0.72, 0.10, 0.14)}
MARKERS = {**INKS, "green": (0.08, 0.45, 0.22)}
PAPERS = {"white": (0.97, 0.97, 0.96), "cream": (0.98, 0.94, 0.82), "grey": (0.86, 0.86, 0.85),
          "blue": (0.84, 0.90, 0.98), "pink": (0.98, 0.86, 0.89), "green": (0.87, 0.96, 0.87)}
NOTES = {"yellow": (1.0, 0.92, 0.42), "pink": (1.0, 0.66, 0.78), "green": (0.70, 0.94, 0.62),
         "blue": (0.66, 0.86, 0.98)}
DESKS = {"wood": (0.47, 0.33, 0.22), "grey": (0.35, 0.35, 0.36), "dark": (0.15, 0.15, 0.16),
         "white": (0.80, 0.80, 0.78)}
LINE_COLOURS = ((0.60, 0.72, 0.90), (0.68, 0.68, 0.70), (0.55, 0.75, 0.85))


@dataclass(frozen=True)
class Photo:
    condition: str
    label: int
    mnist_index: int  # index into the MNIST test split
    jpeg: bytes


def jitter(rng: np.random.Generator, colour: tuple[float, ...], amount: float = 0.03) -> np.ndarray:
    return np.clip(np.asarray(colour, np.float32) + rng.uniform(-amount, amount, 3), 0, 1).astype(np.float32)


def digit_alpha(digit: np.ndarray, height: int, thicken: int = 0, max_width: int | None = None) -> np.ndarray:
    """The MNIST digit's ink coverage (0..1) cropped to its strokes, scaled to ``height`` px
    (less if it would be wider than ``max_width``)."""
    ys, xs = np.nonzero(digit)
    crop = digit[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].astype(np.float32) / 255.0
    if max_width and crop.shape[1] * height > max_width * crop.shape[0]:
        height = max(2, round(max_width * crop.shape[0] / crop.shape[1]))
    width = max(2, round(crop.shape[1] * height / crop.shape[0]))
    alpha = cv2.resize(crop, (width, height), interpolation=cv2.INTER_CUBIC)
    alpha = cv2.GaussianBlur(np.clip(alpha, 0, 1), (0, 0), max(0.6, height / 120))
    if thicken:
        alpha = cv2.dilate(alpha, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (thicken, thicken)))
    return np.clip(alpha * 1.25, 0, 1)  # MNIST's soft edges -> solid pen cores


class Page:
    """Reflectance of a page [H,W,3], built layer by layer."""

    def __init__(self, rng: np.random.Generator, height: int, width: int, paper: np.ndarray) -> None:
        self.rng, self.height, self.width = rng, height, width
        grain = rng.normal(0, 0.012, (height, width, 1)).astype(np.float32)
        self.rgb = np.clip(paper[None, None, :] + grain, 0, 1)

    def lines(self, spacing: float, thickness: float, colour: np.ndarray, vertical: bool) -> None:
        coverage = np.zeros((self.height, self.width), np.float32)
        offset = self.rng.uniform(0, spacing)
        length = self.width if not vertical else self.height
        for pos in np.arange(offset, (self.height if not vertical else self.width), spacing):
            p0, p1 = (0, pos), (length, pos)
            if vertical:
                p0, p1 = (pos, 0), (pos, length)
            shift = 4
            pts = [(round(x * 2**shift), round(y * 2**shift)) for x, y in (p0, p1)]
            cv2.line(coverage, pts[0], pts[1], 1.0, max(1, round(thickness)), cv2.LINE_AA, shift)
        coverage *= self.rng.uniform(0.5, 0.9)
        self.rgb *= 1 - coverage[..., None] * (1 - colour[None, None, :])

    def ink(self, alpha: np.ndarray, top: int, left: int, colour: np.ndarray, strength: float) -> None:
        h, w = alpha.shape
        region = self.rgb[top : top + h, left : left + w]
        region *= 1 - (alpha * strength)[..., None] * (1 - colour[None, None, :])


def place(rng: np.random.Generator, size: tuple[int, int], box: tuple[int, int], near_edge: bool) -> tuple[int, int]:
    (height, width), (h, w) = size, box
    if near_edge:
        margin = round(rng.uniform(0.02, 0.06) * min(height, width))
        side = rng.integers(4)
        top = rng.integers(margin, height - h - margin + 1)
        left = rng.integers(margin, width - w - margin + 1)
        if side == 0:
            top = margin
        elif side == 1:
            top = height - h - margin
        elif side == 2:
            left = margin
        else:
            left = width - w - margin
        return int(top), int(left)
    cy = height / 2 + rng.uniform(-0.12, 0.12) * height
    cx = width / 2 + rng.uniform(-0.12, 0.12) * width
    top = int(np.clip(round(cy - h / 2), 2, height - h - 2))
    left = int(np.clip(round(cx - w / 2), 2, width - w - 2))
    return top, left


def camera_warp(rng: np.random.Generator, rgb: np.ndarray, angle: float, shear: float, keystone: float,
                border: int = cv2.BORDER_REFLECT101) -> np.ndarray:
    """Rotation, skew and perspective of a hand-held camera (page edges reflected, not black)."""
    height, width = rgb.shape[:2]
    corners = np.float32([[0, 0], [width, 0], [width, height], [0, height]])
    centre = corners.mean(0)
    rotate = cv2.getRotationMatrix2D(tuple(centre), angle, 1.0)
    rotate[0, 1] += shear
    rotate[0, 2] -= shear * centre[1]
    moved = cv2.transform(corners[None], rotate)[0]
    moved += rng.uniform(-keystone, keystone, (4, 2)).astype(np.float32) * np.float32([width, height])
    matrix = cv2.getPerspectiveTransform(corners, moved.astype(np.float32))
    return cv2.warpPerspective(rgb, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=border)


def lighting(rng: np.random.Generator, height: int, width: int, shadow: bool) -> np.ndarray:
    """Illumination [H,W,3]: a brightness ramp in a random direction, a colour cast, maybe a shadow."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    theta = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(theta) * xs / width + np.sin(theta) * ys / height) + 0.5
    light = rng.uniform(0.8, 1.0) * (1 - rng.uniform(0.0, 0.4) * np.clip(ramp, 0, 1))
    if shadow:  # a soft-edged half-plane through the middle third (a hand or a phone's shadow)
        phi = rng.uniform(0, 2 * np.pi)
        cx, cy = width * rng.uniform(0.35, 0.65), height * rng.uniform(0.35, 0.65)
        side = (np.cos(phi) * (xs - cx) + np.sin(phi) * (ys - cy)) / rng.uniform(2, 14)
        light *= 1 - rng.uniform(0.3, 0.55) / (1 + np.exp(-np.clip(side, -30, 30)))
    cast = jitter(rng, (1.0, 0.97, 0.92) if rng.random() < 0.5 else (0.95, 0.97, 1.0), 0.03)
    return light[..., None] * cast[None, None, :]


def photograph(rng: np.random.Generator, rgb: np.ndarray, light: np.ndarray, longer: int | None = None) -> bytes:
    """Lit page -> a phone JPEG: scaled to 60-400 px (or ``longer``), blurred, noised, quality 35-85."""
    height, width = rgb.shape[:2]
    drawn = round(float(np.exp(rng.uniform(np.log(60), np.log(400)))))
    longer = longer or drawn
    scale = longer / max(height, width)
    size = (max(8, round(width * scale)), max(8, round(height * scale)))
    image = cv2.resize(rgb * light, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
    sigma = rng.uniform(0.0, 1.2)
    if sigma > 0.3:
        image = cv2.GaussianBlur(image, (0, 0), sigma)
    image = image * 255 + rng.normal(0, rng.uniform(1, 4), image.shape)
    bgr = np.clip(image, 0, 255).astype(np.uint8)[..., ::-1]
    ok, jpeg = cv2.imencode(".jpg", np.ascontiguousarray(bgr), [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(35, 86))])
    assert ok
    return jpeg.tobytes()


def pick(rng: np.random.Generator, table: dict[str, tuple]) -> np.ndarray:
    return jitter(rng, table[list(table)[rng.integers(len(table))]])


def compose(rng: np.random.Generator, digit: np.ndarray, condition: str, longer: int | None = None) -> bytes:
    """One photo of ``digit`` (MNIST uint8 [28,28]) under ``condition``; ``longer`` fixes its size."""
    aspect = rng.uniform(0.75, 1.33)
    height, width = (RENDER, round(RENDER * aspect)) if aspect >= 1 else (round(RENDER / aspect), RENDER)
    short = min(height, width)
    digit_height = round(rng.uniform(0.42, 0.7) * short)
    if condition == "sticky_note":
        digit_height = round(rng.uniform(0.3, 0.45) * short)
    paper = pick(rng, NOTES if condition == "sticky_note" else PAPERS)
    if condition == "whiteboard":
        paper = jitter(rng, (0.93, 0.95, 0.96), 0.02)
    page = Page(rng, height, width, paper)
    if condition == "ruled":
        page.lines(digit_height * rng.uniform(0.9, 1.4), rng.uniform(1, 2.5), jitter(rng, LINE_COLOURS[0]), False)
        if rng.random() < 0.3:  # the red margin line
            page.lines(width * 2, rng.uniform(1, 2.5), jitter(rng, (0.9, 0.5, 0.5)), True)
    elif condition == "squared":
        spacing, colour = digit_height * rng.uniform(0.25, 0.5), jitter(rng, LINE_COLOURS[rng.integers(3)])
        thickness = rng.uniform(1, 2)
        page.lines(spacing, thickness, colour, False)
        page.lines(spacing, thickness, colour, True)
    thicken = round(digit_height * 0.05) if condition == "whiteboard" else 0
    alpha = digit_alpha(digit, digit_height, thicken, max_width=round(0.8 * width))
    top, left = place(rng, (height, width), alpha.shape, condition == "near_edge")
    if condition == "whiteboard":  # ghost of a wiped-off digit
        ghost = digit_alpha(digit[:, ::-1], digit_height, max_width=round(0.8 * width))
        gtop, gleft = place(rng, (height, width), ghost.shape, False)
        page.ink(cv2.GaussianBlur(ghost, (0, 0), 4), gtop, gleft, np.float32([0.5, 0.5, 0.55]), 0.12)
    ink = pick(rng, MARKERS if condition == "whiteboard" else INKS)
    page.ink(alpha, top, left, ink, rng.uniform(0.8, 1.0))
    rgb = page.rgb
    if condition == "sticky_note":  # the note lies turned on a desk and fills 60-85 % of the frame
        desk = np.empty((round(height / 0.72), round(width / 0.72), 3), np.float32)
        desk[:] = pick(rng, DESKS)
        desk += rng.normal(0, 0.02, desk.shape[:2])[..., None].astype(np.float32)
        y0, x0 = (desk.shape[0] - height) // 2, (desk.shape[1] - width) // 2
        desk[y0 : y0 + height, x0 : x0 + width] = rgb
        rgb = cv2.warpAffine(desk, cv2.getRotationMatrix2D((desk.shape[1] / 2, desk.shape[0] / 2),
                                                           rng.uniform(-12, 12), rng.uniform(0.85, 1.15)),
                             (desk.shape[1], desk.shape[0]), borderMode=cv2.BORDER_REPLICATE)
    keystone = rng.uniform(0.06, 0.12) if condition == "angle" else rng.uniform(0, 0.03)
    rgb = camera_warp(rng, np.clip(rgb, 0, 1), rng.uniform(-8, 8), rng.uniform(-0.12, 0.12), keystone,
                      cv2.BORDER_REPLICATE if condition == "sticky_note" else cv2.BORDER_REFLECT101)
    light = lighting(rng, *rgb.shape[:2], shadow=condition == "shadow")
    if condition == "whiteboard":  # glare from the ceiling light
        ys, xs = np.mgrid[0 : rgb.shape[0], 0 : rgb.shape[1]].astype(np.float32)
        cy, cx, r = rng.uniform(0, rgb.shape[0]), rng.uniform(0, rgb.shape[1]), rng.uniform(0.15, 0.4) * short
        light = light + rng.uniform(0.1, 0.3) * np.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * r * r))[..., None]
    return photograph(rng, rgb, light, longer)


CONDITIONS = ("plain", "ruled", "squared", "sticky_note", "whiteboard", "near_edge", "shadow", "angle")


def photo_set(images: np.ndarray, labels: np.ndarray, per_condition: int, seed: int = 0,
              conditions: tuple[str, ...] = CONDITIONS) -> list[Photo]:
    """``per_condition`` photos of each condition from MNIST test ``images`` uint8 [N,28,28]."""
    photos = []
    for c, condition in enumerate(conditions):
        rng = np.random.default_rng([seed, c])
        for index in rng.choice(len(images), per_condition, replace=False):
            photos.append(Photo(condition, int(labels[index]), int(index), compose(rng, images[index], condition)))
    return photos


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--per-condition", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=os.environ.get("DIGITS_DATA_DIR", "data"))
    args = parser.parse_args()
    from model.data import load_split
    from model.preprocess import encode_png

    images, labels = (t.numpy() for t in load_split(args.data_dir, train=False))
    for n, photo in enumerate(photo_set(images, labels, args.per_condition, args.seed)):
        folder = args.out / photo.condition
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{n:04d}_label{photo.label}.jpg").write_bytes(photo.jpeg)
        (folder / f"{n:04d}_label{photo.label}_clean.png").write_bytes(encode_png(images[photo.mnist_index]))
    print(f"wrote {args.per_condition} photos x {len(CONDITIONS)} conditions to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
