"""The slice suite: named, deterministic kinds of input, each a few hundred labelled images.

Accuracy is measured per slice, not on one pool: a change that helps photos and breaks tight
crops shows up as one slice falling. Every handwritten slice is made from MNIST *test* digits
(or, for fine-tune uploads in tests, from any digits passed in); the printed slice renders the
digits in the font families of Debian's fonts-dejavu-core, fonts-liberation and
fonts-freefont-ttf packages. The same ``seed`` gives the same bytes on every machine.

    suite = build_suite(images, labels)            # [Slice], encoded image bytes + labels
    read = read_suite(suite, prepare_digit)        # each slice through a preprocessing
    right = correct_per_slice(read, model)         # bool per sample, per slice
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from model import photoset

DEFAULT_SIZE = 400  # images per slice: one error is 0.25 points
PHOTO_SIZE = 150  # photos are costlier to make and to read
GATE_SIZE = DEFAULT_SIZE  # images per slice for the gate and the manifests: a digit that goes wrong in one
GATE_PHOTOS = 40  # slice is ~40 broken samples, beyond chance among all slices; fewer photos: they cost most
FONT_DIRS = ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/truetype/liberation",
             "/usr/share/fonts/truetype/freefont")
# Regular, bold and italic faces of each family (Debian's file names); missing ones are skipped.
FONT_FILES = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSansMono.ttf",
    "LiberationSans-Regular.ttf", "LiberationSans-Bold.ttf", "LiberationSerif-Regular.ttf",
    "LiberationSerif-Bold.ttf", "LiberationSerif-Italic.ttf", "LiberationMono-Regular.ttf",
    "FreeSans.ttf", "FreeSansBold.ttf", "FreeSerif.ttf", "FreeSerifBold.ttf", "FreeSerifItalic.ttf",
    "FreeMono.ttf",
)

Builder = Callable[[np.random.Generator, np.ndarray, np.ndarray], bytes]  # (rng, digit, other digit) -> bytes


@dataclass(frozen=True)
class Slice:
    name: str
    description: str
    images: tuple[bytes, ...]
    labels: np.ndarray  # int64 [N]


@dataclass(frozen=True)
class ReadSlice:
    """A slice through one preprocessing: the 28x28 digits, and which images it could read at all."""

    name: str
    digits: np.ndarray  # uint8 [N,28,28]; zeros where unread
    labels: np.ndarray
    readable: np.ndarray  # bool [N]


# ------------------------------------------------------------------ rendering helpers


def png(pixels: np.ndarray) -> bytes:
    mode = "RGBA" if pixels.ndim == 3 else "L"
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8), mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg(pixels: np.ndarray, quality: int) -> bytes:
    ok, data = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return data.tobytes()


def ink_box(digit: np.ndarray) -> np.ndarray:
    """The digit (white on black) cropped to its ink."""
    ys, xs = np.nonzero(digit)
    return digit[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]


def scaled(ink: np.ndarray, height: int, width: int | None = None) -> np.ndarray:
    """Ink resized to ``height`` (and ``width``, else keeping the aspect ratio), smoothly."""
    width = width or max(1, round(ink.shape[1] * height / ink.shape[0]))
    return cv2.resize(ink, (width, height), interpolation=cv2.INTER_CUBIC if height > ink.shape[0] else cv2.INTER_AREA)


def on_paper(ink: np.ndarray, canvas: tuple[int, int], at: tuple[int, int]) -> np.ndarray:
    """Dark ink on white paper: ``ink`` (white on black) pasted at ``at`` on a white canvas."""
    paper = np.full(canvas, 255, np.uint8)
    h, w = ink.shape
    paper[at[0] : at[0] + h, at[1] : at[1] + w] = 255 - ink
    return paper


def tight(digit: np.ndarray, margin: int, height: int = 64) -> bytes:
    """The ink box plus ``margin`` px (in 28-px units), ``height`` px high, dark on light."""
    box = np.pad(ink_box(digit), margin)
    return png(255 - np.clip(scaled(box, height), 0, 255))


def low_resolution(digit: np.ndarray, side: int, upscale_to: int | None) -> bytes:
    """The ink box fitted into side x side (as the 8x8 scans of small data sets are), dark on
    light; sent as is or upscaled (nearest neighbour, as image viewers enlarge them)."""
    box = ink_box(digit)
    h, w = box.shape
    square = np.zeros((max(h, w),) * 2, np.uint8)
    square[(len(square) - h) // 2 :][:h, (len(square) - w) // 2 :][:, :w] = box
    small = 255 - cv2.resize(square, (side, side), interpolation=cv2.INTER_AREA)
    if upscale_to:
        small = cv2.resize(small, (upscale_to, upscale_to), interpolation=cv2.INTER_NEAREST)
    return png(small)


# ------------------------------------------------------------------ the handwritten conditions


def mnist_png(rng, digit, other) -> bytes:
    return png(digit)


def dark_off_centre(rng, digit, other) -> bytes:
    big = scaled(digit, 84)
    return png(on_paper(big, (150, 170), (int(rng.integers(0, 66)), int(rng.integers(0, 86)))))


def stretched(wide: bool) -> Builder:
    def build(rng, digit, other) -> bytes:
        box = ink_box(digit)
        factor = rng.uniform(1.8, 2.5)
        h, w = box.shape
        shape = (round(h * 3), round(w * 3 * factor)) if wide else (round(h * 3 * factor), round(w * 3))
        ink = scaled(box, shape[0], shape[1])
        return png(on_paper(ink, (shape[0] + 20, shape[1] + 20), (10, 10)))

    return build


def stroke_width(thick: bool) -> Builder:
    def build(rng, digit, other) -> bytes:
        big = scaled(digit, 112)
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (9, 9) if thick else (5, 5))
        big = cv2.dilate(big, kernel) if thick else cv2.erode(big, kernel)
        if not big.any():
            big = scaled(digit, 112)
        return png(255 - big)

    return build


def rotated(rng, digit, other) -> bytes:
    big = scaled(digit, 84)
    angle = float(rng.uniform(8, 15) * rng.choice([-1, 1]))
    turned = cv2.warpAffine(big, cv2.getRotationMatrix2D((42, 42), angle, 1.0), (84, 84))
    return png(255 - turned)


def heavy_jpeg(rng, digit, other) -> bytes:
    page = on_paper(scaled(digit, 84), (120, 120), (18, 18))
    return jpeg(page, int(rng.integers(8, 20)))


def inverted(rng, digit, other) -> bytes:
    return png(255 - digit)


def neighbour_fragment(rng, digit, other) -> bytes:
    """The digit with a third of the next digit on the form cut by the left or right edge."""
    big, neighbour = scaled(digit, 84), scaled(ink_box(other), 60)
    canvas = np.zeros((100, 124), np.uint8)
    canvas[8:92, 20:104] = big
    part = neighbour[:, -max(4, neighbour.shape[1] // 3):]
    top = 20
    if rng.random() < 0.5:
        canvas[top : top + 60, : part.shape[1]] = np.maximum(canvas[top : top + 60, : part.shape[1]], part)
    else:
        part = neighbour[:, : max(4, neighbour.shape[1] // 3)]
        canvas[top : top + 60, -part.shape[1]:] = np.maximum(canvas[top : top + 60, -part.shape[1]:], part)
    return png(255 - canvas)


def canvas_drawing(rng, digit, other) -> bytes:
    """A browser canvas: dark strokes whose alpha is the ink, on a transparent background."""
    alpha = cv2.resize(digit, (200, 200), interpolation=cv2.INTER_LINEAR)
    rgba = np.zeros((200, 200, 4), np.uint8)
    rgba[..., :3] = rng.integers(0, 60, 3)
    rgba[..., 3] = alpha
    return png(rgba)


def photo(condition: str) -> Builder:
    def build(rng, digit, other) -> bytes:
        return photoset.compose(rng, digit, condition)

    return build


HANDWRITTEN: dict[str, tuple[str, Builder, int]] = {
    "mnist_png": ("the MNIST test digit as its own 28x28 PNG", mnist_png, DEFAULT_SIZE),
    "dark_off_centre": ("dark on white, 3x, off-centre on a 150x170 page", dark_off_centre, DEFAULT_SIZE),
    "tight_crop": ("cropped to the ink box (touching all four edges), 64 px high, dark on light",
                   lambda rng, d, o: tight(d, 0), DEFAULT_SIZE),
    "tight_margin_1": ("ink box plus 1 px (28-px units), 64 px high", lambda rng, d, o: tight(d, 1), DEFAULT_SIZE),
    "tight_margin_2": ("ink box plus 2 px (28-px units), 64 px high", lambda rng, d, o: tight(d, 2), DEFAULT_SIZE),
    "wide": ("stretched 1.8-2.5x wide", stretched(True), DEFAULT_SIZE),
    "tall": ("stretched 1.8-2.5x tall", stretched(False), DEFAULT_SIZE),
    **{f"low_res_{side}": (f"ink box in {side}x{side} px, sent at {side}x{side}",
                           lambda rng, d, o, s=side: low_resolution(d, s, None), DEFAULT_SIZE)
       for side in (8, 12, 16)},
    **{f"low_res_{side}_upscaled": (f"ink box in {side}x{side} px, sent upscaled to 64x64 (nearest)",
                                    lambda rng, d, o, s=side: low_resolution(d, s, 64), DEFAULT_SIZE)
       for side in (8, 12, 16)},
    "thick": ("strokes dilated (9 px disk at 4x)", stroke_width(True), DEFAULT_SIZE),
    "thin": ("strokes eroded (5 px disk at 4x)", stroke_width(False), DEFAULT_SIZE),
    "rotated": ("rotated 8-15 degrees either way", rotated, DEFAULT_SIZE),
    "heavy_jpeg": ("dark on light, JPEG quality 8-19", heavy_jpeg, DEFAULT_SIZE),
    "inverted": ("dark on light 28x28 PNG", inverted, DEFAULT_SIZE),
    "neighbour_fragment": ("a third of the neighbouring digit cut by the left or right edge", neighbour_fragment,
                           DEFAULT_SIZE),
    "canvas": ("a 200x200 canvas drawing: strokes' alpha, transparent background", canvas_drawing, DEFAULT_SIZE),
    **{f"photo_{condition}": (f"phone photo, model/photoset.py condition {condition}", photo(condition), PHOTO_SIZE)
       for condition in photoset.CONDITIONS},
}


# ------------------------------------------------------------------ printed digits


@cache
def font_paths() -> tuple[Path, ...]:
    """The installed faces of FONT_FILES (fonts-dejavu-core, fonts-liberation, fonts-freefont-ttf)."""
    return tuple(Path(d) / name for name in FONT_FILES for d in FONT_DIRS if (Path(d) / name).is_file())


def printed_digit(rng: np.random.Generator, label: int, font: Path) -> bytes:
    """One digit in ``font``, 24-72 px, dark grey on a light page with a margin, maybe slightly turned."""
    size = int(rng.integers(24, 73))
    face = ImageFont.truetype(str(font), size)
    left, top, right, bottom = face.getbbox(str(label))
    margin = int(rng.integers(2, 12))
    page = Image.new("L", (right - left + 2 * margin, bottom - top + 2 * margin), int(rng.integers(215, 256)))
    ImageDraw.Draw(page).text((margin - left, margin - top), str(label), font=face, fill=int(rng.integers(0, 70)))
    if rng.random() < 0.3:
        page = page.rotate(float(rng.uniform(-4, 4)), resample=Image.Resampling.BILINEAR, expand=True,
                           fillcolor=page.getpixel((0, 0)))
    buffer = io.BytesIO()
    page.save(buffer, format="PNG")
    return buffer.getvalue()


# ------------------------------------------------------------------ building and reading


def slice_rng(name: str, seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def build_slice(name: str, images: np.ndarray, labels: np.ndarray, size: int | None = None,
                seed: int = 0) -> Slice:
    """One slice by name, from the digits ``images`` uint8 [N,28,28] (MNIST test for the suite)."""
    rng = slice_rng(name, seed)
    if name == "printed":
        fonts = font_paths()
        if not fonts:
            raise RuntimeError("no fonts for the printed slice: install fonts-dejavu-core fonts-liberation "
                               "fonts-freefont-ttf (make fonts does)")
        count = size or DEFAULT_SIZE
        digit_labels = rng.integers(0, 10, count)
        data = tuple(printed_digit(rng, int(d), fonts[int(rng.integers(len(fonts)))]) for d in digit_labels)
        return Slice(name, f"printed digits in {len(fonts)} faces of DejaVu, Liberation and FreeFont", data,
                     digit_labels.astype(np.int64))
    description, builder, default = HANDWRITTEN[name]
    # The same digits in every slice (the first ``size`` of one permutation): slices differ by
    # their condition only, and two slices compare pairwise.
    pick = np.random.default_rng(seed).permutation(len(images))[: size or default]
    others = rng.integers(0, len(images), len(pick))
    data = tuple(builder(rng, images[i], images[j]) for i, j in zip(pick, others, strict=True))
    return Slice(name, description, data, np.asarray(labels[pick], dtype=np.int64))


SLICE_NAMES = (*HANDWRITTEN, "printed")


def build_suite(images: np.ndarray, labels: np.ndarray, names: Iterable[str] = SLICE_NAMES,
                scale: float = 1.0, seed: int = 0, sizes: tuple[int, int] = (DEFAULT_SIZE, PHOTO_SIZE)) -> list[Slice]:
    """Every named slice, ``sizes`` images (other slices, photo slices); ``scale`` < 1 makes each
    proportionally smaller (quick checks)."""
    suite = []
    for name in names:
        default = sizes[1] if name.startswith("photo_") else sizes[0]
        suite.append(build_slice(name, images, labels, max(10, round(default * scale)), seed))
    return suite


def read_slice(piece: Slice, prepare: Callable[[bytes], np.ndarray]) -> ReadSlice:
    """``piece`` through ``prepare`` (bytes -> uint8 28x28); an image it refuses counts as unread."""
    digits = np.zeros((len(piece.images), 28, 28), np.uint8)
    readable = np.zeros(len(piece.images), bool)
    for i, data in enumerate(piece.images):
        try:
            digits[i] = prepare(data)
            readable[i] = True
        except ValueError:  # an ImageProblem: ours, or the frozen reference's own class
            pass
    return ReadSlice(piece.name, digits, piece.labels, readable)


def read_suite(suite: list[Slice], prepare: Callable[[bytes], np.ndarray]) -> list[ReadSlice]:
    return [read_slice(piece, prepare) for piece in suite]


def correct_per_slice(read: list[ReadSlice], model: torch.nn.Module) -> dict[str, np.ndarray]:
    """bool [N] per slice: read, and read as its label by ``model``."""
    from model.train import predict_logits

    result = {}
    for piece in read:
        predicted = predict_logits(model, torch.from_numpy(piece.digits)).argmax(1).numpy()
        result[piece.name] = piece.readable & (predicted == piece.labels)
    return result


def gate_suite(images: np.ndarray, labels: np.ndarray) -> list[ReadSlice]:
    """The suite at the gate's sizes, read through this preprocessing: what the gate and the
    manifests measure (build once per process: it does not depend on the model)."""
    from model.preprocess import prepare_digit

    names = [name for name in SLICE_NAMES if name != "printed" or font_paths()]  # an image without the fonts
    return read_suite(build_suite(images, labels, names, sizes=(GATE_SIZE, GATE_PHOTOS)), prepare_digit)


def slice_table(read: list[ReadSlice], model: torch.nn.Module) -> dict[str, dict[str, float | int]]:
    """What a manifest records: accuracy and size per slice."""
    right = correct_per_slice(read, model)
    return {name: {"accuracy": round(float(values.mean()), 4), "n": len(values)} for name, values in right.items()}


def accuracies(right: dict[str, np.ndarray]) -> dict[str, float]:
    return {name: round(float(values.mean()), 4) for name, values in right.items()}


def format_table(columns: dict[str, dict[str, float]], sizes: dict[str, int]) -> str:
    """Slices as rows, one accuracy column per heading."""
    headings = list(columns)
    lines = [f"{'slice':<26}{'n':>5}" + "".join(f"{h:>14}" for h in headings)]
    for name, n in sizes.items():
        lines.append(f"{name:<26}{n:>5}" + "".join(f"{columns[h][name]:>14.2%}" for h in headings))
    return "\n".join(lines)
