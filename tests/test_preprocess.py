"""Real-world images -> MNIST-style digits: modes, orientation, polarity, position, size, limits."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from model.data import normalize
from model.preprocess import (
    CorruptImage,
    ImageTooLarge,
    NoInk,
    NotAnImage,
    already_mnist,
    declared_pixels,
    prepare_digit,
)


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def dark_on_light(digit: np.ndarray, scale: int = 3, canvas=(150, 170), at=(10, 70)) -> np.ndarray:
    """An MNIST digit as ink on paper: inverted, scaled up, pasted off-centre on white."""
    big = np.array(Image.fromarray(255 - digit).resize((28 * scale, 28 * scale), Image.Resampling.BILINEAR))
    paper = np.full(canvas, 255, dtype=np.uint8)
    paper[at[0] : at[0] + big.shape[0], at[1] : at[1] + big.shape[1]] = big
    return paper


def predict(model, digits: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(normalize(torch.from_numpy(digits))).argmax(1).numpy()


@pytest.fixture(scope="module")
def model(base_registry):
    return base_registry.load_model()[0]


def test_dark_on_light_off_centre_3x_matches_raw_accuracy(model, mnist_test) -> None:
    images, labels = mnist_test
    n = 1000
    raw = images[:n].numpy()
    rendered = np.stack([prepare_digit(encode(Image.fromarray(dark_on_light(d)))) for d in raw])
    raw_accuracy = (predict(model, raw) == labels[:n].numpy()).mean()
    rendered_accuracy = (predict(model, rendered) == labels[:n].numpy()).mean()
    assert rendered_accuracy >= raw_accuracy - 0.005, (raw_accuracy, rendered_accuracy)


def test_mnist_png_round_trip_keeps_accuracy(model, mnist_test) -> None:
    images, labels = mnist_test
    raw = images[:500].numpy()
    processed = np.stack([prepare_digit(encode(Image.fromarray(d))) for d in raw])
    assert (predict(model, processed) == labels[:500].numpy()).mean() >= 0.985


def reference_digit(mnist_test) -> tuple[np.ndarray, int]:
    images, labels = mnist_test
    return images[0].numpy(), int(labels[0])


@pytest.mark.parametrize("variant", ["rgba_canvas", "palette", "gray16", "rgb_jpeg", "exif_rotated", "tiny", "huge",
                                     "bmp", "gif", "webp", "tiff"])
def test_image_variants_are_read_as_the_same_digit(variant: str, model, mnist_test) -> None:
    digit, label = reference_digit(mnist_test)
    paper = dark_on_light(digit)
    if variant == "rgba_canvas":  # a canvas drawing: black strokes on a transparent background
        rgba = np.zeros((*paper.shape, 4), dtype=np.uint8)
        rgba[..., 3] = 255 - paper
        data = encode(Image.fromarray(rgba, "RGBA"))
    elif variant == "palette":
        data = encode(Image.fromarray(paper).convert("P"))
    elif variant == "gray16":
        data = encode(Image.fromarray(paper.astype(np.uint16) * 257))
    elif variant == "rgb_jpeg":
        data = encode(Image.fromarray(paper).convert("RGB"), "JPEG", quality=85)
    elif variant == "exif_rotated":  # pixels stored rotated; EXIF says how to turn them upright
        stored = Image.fromarray(paper).transpose(Image.Transpose.ROTATE_90)
        exif = Image.Exif()
        exif[0x0112] = 6  # "rotate 90 CW to display"
        data = encode(stored.convert("RGB"), "JPEG", exif=exif.tobytes(), quality=95)
    elif variant == "tiny":
        data = encode(Image.fromarray(255 - digit).resize((14, 14)))
    elif variant == "huge":
        data = encode(Image.fromarray(paper).resize((1500, 1300)))
    else:
        data = encode(Image.fromarray(paper), variant.upper())
    assert predict(model, prepare_digit(data)[None])[0] == label


def test_output_is_centred_mnist_style(mnist_test) -> None:
    digit, _ = reference_digit(mnist_test)
    out = prepare_digit(encode(Image.fromarray(dark_on_light(digit, at=(0, 0)))))
    assert out.shape == (28, 28) and out.dtype == np.uint8
    rows, cols = np.nonzero(out)
    assert max(rows.max() - rows.min(), cols.max() - cols.min()) + 1 <= 21  # longer side fits 20 px
    mass = out.astype(float)
    cy = (mass.sum(1) @ np.arange(28)) / mass.sum()
    cx = (mass.sum(0) @ np.arange(28)) / mass.sum()
    assert abs(cy - 13.5) <= 1 and abs(cx - 13.5) <= 1
    assert out[0].max() == 0 and out[:, 0].max() == 0  # white digit on black


def test_a_digit_in_mnists_own_format_is_read_as_it_is(mnist_test) -> None:
    digit = mnist_test[0][0].numpy()
    assert already_mnist(digit)
    assert np.array_equal(prepare_digit(encode(Image.fromarray(digit))), digit)  # not re-normalised
    moved = np.roll(digit, 3, axis=1)  # off centre: normalised again, back to the centre
    assert not already_mnist(moved)
    out = prepare_digit(encode(Image.fromarray(moved)))
    cx = (out.astype(float).sum(0) @ np.arange(28)) / out.sum()
    assert abs(cx - 13.5) <= 1
    faint = (digit // 40).astype(np.uint8)  # barely visible ink still gets the no-ink answer
    with pytest.raises(NoInk):
        prepare_digit(encode(Image.fromarray(faint)))


@pytest.mark.parametrize("value", [0, 255, 128])
def test_uniform_image_has_no_ink(value: int) -> None:
    with pytest.raises(NoInk):
        prepare_digit(encode(Image.new("L", (40, 40), value)))


def test_transparent_canvas_has_no_ink() -> None:
    with pytest.raises(NoInk):
        prepare_digit(encode(Image.new("RGBA", (40, 40), (0, 0, 0, 0))))


def test_not_an_image_and_corrupt_images() -> None:
    with pytest.raises(NotAnImage):
        prepare_digit(b"hello, this is text")
    with pytest.raises(CorruptImage):
        prepare_digit(b"")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    png = encode(Image.fromarray(noise))
    with pytest.raises(CorruptImage):
        prepare_digit(png[: len(png) // 2])


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims huge dimensions; its pixel data would be a decompression bomb."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    idat = zlib.compress(b"\0" * 1000)
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
            + struct.pack(">I", len(idat)) + b"IDAT" + idat + struct.pack(">I", zlib.crc32(b"IDAT" + idat)))


def test_oversized_dimensions_are_refused_before_decoding() -> None:
    with pytest.raises(ImageTooLarge):
        prepare_digit(png_header_only(60000, 60000))
    with pytest.raises(ImageTooLarge):
        prepare_digit(png_header_only(3000, 3000), max_pixels=1_000_000)


# ------------------------------------------------------------------ photos and their look-alikes


def photo_of_paper(lines: bool, size=(300, 400), seed: int = 0) -> bytes:
    """A JPEG of paper without a digit: tint, a lighting gradient, noise, maybe ruled lines."""
    rng = np.random.default_rng(seed)
    xs = np.arange(size[1])[None, :]
    light = 0.95 - 0.35 * xs / size[1]
    page = np.stack([light * 0.97, light * 0.94, light * 0.85], axis=-1) + rng.normal(0, 0.01, (*size, 1))
    if lines:
        for y in range(20, size[0], 32):
            page[y : y + 2] *= np.array([0.6, 0.72, 0.9])
    return encode(Image.fromarray(np.clip(page * 255, 0, 255).astype(np.uint8)), "JPEG", quality=70)


@pytest.mark.parametrize("lines", [False, True], ids=["blank_page", "lined_paper"])
def test_a_photo_of_paper_without_a_digit_has_no_ink(lines: bool) -> None:
    with pytest.raises(NoInk):
        prepare_digit(photo_of_paper(lines))


def test_uniform_colour_photo_has_no_ink() -> None:
    with pytest.raises(NoInk):
        prepare_digit(encode(Image.new("RGB", (400, 300), (200, 60, 90)), "JPEG", quality=60))


def test_low_resolution_8x8_scans_stay_readable(model, mnist_test) -> None:
    """Digits scanned at 8x8 (the sklearn digits' resolution), as dark ink on white."""
    images, labels = mnist_test
    n = 1000
    scans = [encode(Image.fromarray(255 - d).resize((8, 8), Image.Resampling.BOX)) for d in images[:n].numpy()]
    accuracy = (predict(model, np.stack([prepare_digit(s) for s in scans])) == labels[:n].numpy()).mean()
    assert accuracy >= 0.72, accuracy  # 8x8 loses much detail: 73 % before photos were handled, keep it


def test_cmyk_and_photo_path_read_the_same_digit(model, mnist_test) -> None:
    digit, label = reference_digit(mnist_test)
    paper = Image.fromarray(dark_on_light(digit))
    assert predict(model, prepare_digit(encode(paper.convert("CMYK"), "JPEG", quality=90))[None])[0] == label
    assert predict(model, prepare_digit(encode(paper.convert("CMYK"), "TIFF"))[None])[0] == label


def test_a_big_photo_is_decoded_reduced(model, mnist_test) -> None:
    from model.photoset import compose

    images, labels = mnist_test
    photo = compose(np.random.default_rng(1), images[3].numpy(), "ruled", 4000)
    assert declared_pixels(photo) > 4000 * 2000
    assert predict(model, prepare_digit(photo)[None])[0] == int(labels[3])
    with pytest.raises(ImageTooLarge):
        prepare_digit(photo, max_pixels=1_000_000)


def test_declared_pixels_reads_the_header_only() -> None:
    assert declared_pixels(png_header_only(8000, 6000)) == 48_000_000
    with pytest.raises(ImageTooLarge):  # PIL's decompression-bomb bound, whatever max_pixels is
        declared_pixels(png_header_only(60000, 60000))
    assert declared_pixels(encode(Image.new("L", (30, 20)))) == 600
    with pytest.raises(NotAnImage):
        declared_pixels(b"plain text")
    with pytest.raises(CorruptImage):
        declared_pixels(b"")
