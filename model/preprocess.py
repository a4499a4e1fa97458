"""Any real-world image -> a 28x28 MNIST-style uint8 digit (white ink on black).

Serving and fine-tuning both go through :func:`prepare_digit`, so the model sees uploads
exactly the way it sees predictions. The last steps follow how MNIST itself was made: crop
the ink, scale its longer side to 20 px keeping the aspect ratio, and place it in a 28x28
field so that its centre of mass sits at the centre.

Two ways to find the ink:

- Small images (scans, MNIST files, icons; longer side <= ``SMALL_SIDE``, also once an exact
  integer enlargement is undone) and digital ones (drawings, renders: a flat border, or, for
  crops to the ink box, a border much of which is exactly the image's extreme value) are
  clean: ink is whatever differs from the border's colour, less pieces the frame cuts off
  beside a digit that is clear of it. This path costs tens of microseconds.
- Larger images are treated as photos of paper. The paper's own colour and lighting are
  estimated per channel by a morphological closing (it erases strokes, keeps shadows and
  gradients) and divided out; ink is how much light the darkest channel lost, so blue, red
  and black ink all count. Thin long structures (ruled and squared lines) are opened away,
  and the digit is the largest group of strokes near the centre, not the paper's edges.
"""

from __future__ import annotations

import io
import math
import struct
import warnings

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Each request is preprocessed in its own API-server process or thread: no OpenCV thread pool
# on top (it would only contend with the other requests for the same cores).
cv2.setNumThreads(1)
# Errors only: a corrupt upload is reported to its client, not logged by OpenCV.
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)

ALLOWED_FORMATS = frozenset({"PNG", "JPEG", "MPO", "BMP", "GIF", "WEBP", "TIFF"})
DEFAULT_MAX_PIXELS = 25_000_000  # a 5000x5000 photo; larger headers are refused before decoding

MIN_CONTRAST = 0.12  # ink must differ from the background by this much (of full scale)
NOISE_FLOOR = 0.15  # after stretching the ink to [0, 1], weaker signal is treated as paper
DIGIT_BOX = 20
FIELD = 28

SMALL_SIDE = 48  # longer side up to which an image is read as a clean scan
FLAT = 2.5 / 255  # a digital image's background varies by less than this
EXTREME_BORDER = 0.35  # a crop's border at the image's extreme value: photos <= 0.36 of 1,200, crops mostly >= 0.4
WORK_SIDE = 256  # photos are analysed at this longer side (decoded reduced when larger)
BACKGROUND_STEP = 4  # the paper and its lighting are estimated at 1/4 of the working size
PHOTO_MIN_INK = 0.2  # a photo's strongest ink must absorb this share of the paper's light
DARK_PAPER = 0.3  # below this brightness a surface is a desk or a shadow, not paper to write on
PHOTO_FLOOR = 0.2  # the photo's ink, stretched so that its strokes' level is 1, is paper below this
MIN_STROKE = 0.016  # strokes are at least this wide (share of the shorter side); lines are thinner


class ImageProblem(ValueError):
    """A client's image we cannot use. ``status_code`` is the HTTP status to answer with."""

    status_code = 422
    code = "invalid_image"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotAnImage(ImageProblem):
    status_code = 415
    code = "unsupported_image_type"


class CorruptImage(ImageProblem):
    status_code = 422
    code = "corrupt_image"


class ImageTooLarge(ImageProblem):
    status_code = 413
    code = "image_too_large"


class NoInk(ImageProblem):
    status_code = 422
    code = "no_ink"


def identify(data: bytes) -> Image.Image:
    """Open an image lazily (header only), refusing unknown formats."""
    if not data:
        raise CorruptImage("the image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise NotAnImage(
            f"not a supported image; send one of {', '.join(sorted(ALLOWED_FORMATS - {'MPO'}))}"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(f"image dimensions are too large: {exc}") from None
    except Exception as exc:
        raise CorruptImage(f"the image header could not be read: {exc}") from None
    if image.format not in ALLOWED_FORMATS:
        raise NotAnImage(f"{image.format} images are not supported; send PNG, JPEG, BMP, GIF, WebP or TIFF")
    width, height = image.size
    if width < 1 or height < 1:
        raise CorruptImage("the image has no pixels")
    return image


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def small_grey_png(data: bytes, max_pixels: int) -> np.ndarray | None:
    """A small plain 8-bit greyscale PNG (an MNIST file, a scan) decoded by OpenCV, several times
    quicker than PIL; None for any other image (PIL then decodes it and names any problem)."""
    if len(data) < 33 or data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR":
        return None
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    if (depth, colour) != (8, 0) or max(width, height) > SMALL_SIDE or width * height > max_pixels:
        return None
    if b"tRNS" in data or b"eXIf" in data:  # transparency or an orientation: PIL's business
        return None
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    return pixels if pixels is not None and pixels.shape == (height, width) else None


def declared_pixels(data: bytes) -> int:
    """width x height as the header declares it, without decoding (raises like :func:`open_image`).
    A PNG's size is read straight from its IHDR chunk (a microsecond, against ~40 for PIL)."""
    if len(data) >= 24 and data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
            raise ImageTooLarge(f"image dimensions are too large: {width}x{height} pixels")
        return width * height
    width, height = identify(data).size
    return width * height


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, reduce_to: int | None = None) -> Image.Image:
    """Identify and decode an image, refusing oversized dimensions *before* decoding pixels.

    With ``reduce_to``, a larger image is decoded at a reduced size whose longer side is still
    at least ``reduce_to``: JPEG through the decoder's DCT scaling, others by box reduction.
    """
    image = identify(data)
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLarge(f"image is {width}x{height} = {width * height:,} pixels; the limit is {max_pixels:,}")
    longer = max(width, height)
    try:
        if reduce_to and longer > reduce_to and image.format in ("JPEG", "MPO"):
            scale = reduce_to / longer
            image.draft(image.mode, (max(1, round(width * scale)), max(1, round(height * scale))))
        image.load()
    except Exception as exc:
        raise CorruptImage(f"the image data is corrupt or truncated: {exc}") from None
    factor = max(image.size) // reduce_to if reduce_to else 1
    if factor >= 2:
        image = image.reduce(factor)
    return image


def to_pixels(image: Image.Image, longer: int | None = None) -> np.ndarray:
    """float32 in [0,1] (1 = white), [H,W] or [H,W,3] for colour; EXIF orientation applied,
    alpha flattened onto white paper; shrunk to ``longer`` px on the longer side if larger."""
    if image.getexif().get(0x0112, 1) != 1:  # only photos carry an orientation
        image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        pixels = np.asarray(image, dtype=np.float32)
        top = 65535.0 if mode.startswith("I;16") or pixels.max() > 255 else 255.0 if pixels.max() > 1 else 1.0
        return shrink(np.clip(pixels * np.float32(1 / top), 0.0, 1.0), longer)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = shrink(np.asarray(image.convert("RGBA")), longer) * np.float32(1 / 255)
        alpha = rgba[..., 3:]
        return rgba[..., :3] * alpha + (1.0 - alpha)  # onto white paper
    if mode not in ("L", "RGB"):
        image = image.convert("L" if mode == "1" else "RGB")
    return shrink(np.asarray(image), longer) * np.float32(1 / 255)


def shrink(pixels: np.ndarray, longer: int | None) -> np.ndarray:
    return resize_to(pixels, longer) if longer and max(pixels.shape[:2]) > longer else pixels


def border_of(pixels: np.ndarray) -> np.ndarray:
    return np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])


def flat_border(pixels: np.ndarray) -> bool:
    """A digital image (a drawing, a render, a clean scan, a crop of one): its border is one flat
    colour, or, where ink touches the edges (a crop to the ink box, an enlarged 8x8 scan), much
    of the border is exactly the image's lightest (or darkest) value: paper no camera made, whose
    sensor noise, grain and lighting leave hardly a border pixel at the extreme."""
    border = border_of(pixels)
    off = np.abs(border - np.median(border, axis=0))
    if float(np.mean((off.max(axis=-1) if off.ndim == 2 else off) <= FLAT)) >= 0.9:
        return True
    gray = luminance(pixels)
    edge = border_of(gray)
    lowest, highest = cv2.minMaxLoc(gray)[:2]
    extreme = highest if float(np.median(edge)) > 0.5 else lowest
    return float(np.mean(np.abs(edge - extreme) <= FLAT)) >= EXTREME_BORDER


def luminance(pixels: np.ndarray) -> np.ndarray:
    if pixels.ndim == 2:
        return pixels
    return pixels @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def scan_ink(gray: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """A clean image's ink strength in [0,1]: whatever differs from the border, either polarity.
    ``gray * scale`` is the brightness in [0,1] (a uint8 scan comes with ``scale`` 1/255)."""
    border = border_of(gray)
    background = float(np.partition(border, border.size // 2)[border.size // 2]) * scale  # the median
    darkest, lightest = (value * scale for value in cv2.minMaxLoc(gray)[:2])
    light_paper = background > 0.5  # -> invert
    peak = background - darkest if light_paper else lightest - background
    if peak < MIN_CONTRAST:
        raise NoInk("the image has no visible ink (it is blank or uniform); draw or photograph a digit")
    # (|gray - background| - NOISE_FLOOR * peak) / ((1 - NOISE_FLOOR) * peak), clipped at 0, in two passes
    sign = -1.0 if light_paper else 1.0
    span = (1.0 - NOISE_FLOOR) * peak
    ink = gray * np.float32(sign * scale / span)
    ink += np.float32((-sign * background - NOISE_FLOOR * peak) / span)
    return np.maximum(ink, 0.0, out=ink)


def undo_enlargement(pixels: np.ndarray) -> np.ndarray:
    """A small image enlarged by an integer factor, each pixel a k x k block (an 8x8 scan shown
    at 64x64), is read as the small image it is: that is exactly what it shows."""
    height, width = pixels.shape[:2]
    if height < 2 or width < 2 or np.any(pixels[0, 0] != pixels[0, 1]) or np.any(pixels[0, 0] != pixels[1, 0]):
        return pixels  # the first block is not even 2 x 2 (every photo ends here)
    common = math.gcd(height, width)
    for factor in range(common, 1, -1):
        if common % factor or max(height, width) // factor > SMALL_SIDE:
            continue
        row, column = pixels[height // 2], pixels[:, width // 2]  # through the digit: most images fail here
        if not (np.array_equal(row, np.repeat(row[::factor], factor, axis=0))
                and np.array_equal(column, np.repeat(column[::factor], factor, axis=0))):
            continue
        small = pixels[::factor, ::factor]
        if np.array_equal(np.repeat(np.repeat(small, factor, axis=0), factor, axis=1), pixels):
            return small
    return pixels


def without_edge_fragments(ink: np.ndarray) -> np.ndarray:
    """A clean image's ink without the pieces the frame cuts (a neighbouring digit's stroke on a
    form) when the digit itself is clear of the frame; a crop to the digit keeps all its ink."""
    if not (ink[0].any() or ink[-1].any() or ink[:, 0].any() or ink[:, -1].any()):
        return ink
    count, labels, stats, _ = cv2.connectedComponentsWithStats((ink > 0).view(np.uint8), connectivity=8)
    if count <= 2:
        return ink
    height, width = ink.shape
    left, top, box_w, box_h, areas = (stats[1:, i] for i in range(5))
    touches = (left == 0) | (top == 0) | (left + box_w >= width) | (top + box_h >= height)
    if touches[int(np.argmax(areas))]:
        return ink
    return np.where(np.isin(labels, np.flatnonzero(touches) + 1), np.float32(0), ink)


def resize_to(pixels: np.ndarray, longer: int, multiple: int = 1) -> np.ndarray:
    """Scale so the longer side is ``longer`` px (the shorter one rounded to ``multiple``).
    Area averaging only where it is needed: off its integer-factor path it is slow."""
    height, width = pixels.shape[:2]
    scale = longer / max(height, width)
    size = (max(multiple, round(width * scale / multiple) * multiple),
            max(multiple, round(height * scale / multiple) * multiple))
    return cv2.resize(pixels, size, interpolation=cv2.INTER_AREA if scale < 0.5 else cv2.INTER_LINEAR)


def light_ink(gray: np.ndarray) -> bool:
    """Is the ink lighter than the paper? Paper is the bulk of the picture and ink its longer
    tail; lighting multiplies, so the tails are compared as ratios to the median."""
    darkest, median, lightest = np.percentile(gray, [0.5, 50, 99.5]) + 0.02
    return lightest / median > 1.5 * median / darkest


def paper_ink(pixels: np.ndarray) -> np.ndarray:
    """A photo's ink strength in [0,1]: the share of light the darkest channel lost against
    the paper behind it (paper colour and lighting estimated locally, strokes closed away)."""
    # Chalk on a board, white pen on black paper? Judged in the middle: the frame may be mostly desk.
    if light_ink(luminance(middle_of(pixels)[::2, ::2])):
        pixels = 1.0 - pixels
    height, width = pixels.shape[:2]
    small = cv2.resize(pixels, (width // BACKGROUND_STEP, height // BACKGROUND_STEP), interpolation=cv2.INTER_AREA)
    size = max(3, min(small.shape[:2]) // 4) | 1
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (size, size))
    paper = cv2.morphologyEx(small, cv2.MORPH_CLOSE, kernel)
    # Upsampling smears bright paper over the dark side of sharp edges (a note on a desk, a
    # hard shadow), which would read as ink there; a minimum over the smear's reach undoes it.
    paper = cv2.erode(paper, cv2.getStructuringElement(cv2.MORPH_RECT, (3, 3)))
    paper = cv2.resize(paper, (pixels.shape[1], pixels.shape[0]), interpolation=cv2.INTER_LINEAR)
    # The share of light lost; on dark surfaces (a desk) noise would be a large share, so
    # darkness is measured against at least DARK_PAPER there.
    lost = cv2.divide(cv2.subtract(paper, pixels), cv2.max(paper, DARK_PAPER))
    if lost.ndim == 3:
        lost = cv2.max(cv2.max(lost[..., 0], lost[..., 1]), lost[..., 2])
    return np.clip(lost, 0.0, 1.0, out=lost)


def middle_of(pixels: np.ndarray) -> np.ndarray:
    """The middle 60 % of a picture (each way), where the digit is."""
    height, width = pixels.shape[:2]
    return pixels[height // 5 : height - height // 5, width // 5 : width - width // 5]


def stroke_half_width(half_width: np.ndarray) -> float:
    """Half the width of the widest strokes in the middle of an ink mask's distance transform
    (0 without ink there); the middle, so that a desk's dark edge does not count as a stroke."""
    inside = middle_of(half_width)
    inside = inside[inside > 0]
    return float(np.percentile(inside, 95)) if inside.size else 0.0


def disk_closure(mask: np.ndarray, radius: float) -> np.ndarray:
    """Pixels within ``radius`` of ``mask`` (uint8 0/1), by a distance transform: cost independent
    of the radius, unlike a dilation by a disk."""
    return (cv2.distanceTransform(1 - mask, cv2.DIST_L2, 3) <= radius).astype(np.uint8)


def digit_strokes(ink: np.ndarray) -> np.ndarray:
    """The digit's own strokes (soft ink, 0 elsewhere): thin lines opened away, the largest
    stroke group near the centre kept with the strokes close to it."""
    peak = float(np.percentile(ink[::2, ::2], 99.7))
    if peak < PHOTO_MIN_INK:
        raise NoInk("the photo shows no ink strokes (blank paper or uniform colour); photograph a digit")
    mask = (ink > 0.45 * peak).astype(np.uint8)
    short = min(ink.shape)
    half_width = cv2.distanceTransform(mask, cv2.DIST_L2, 3)
    # Opening by a disk of ~half the stroke width: strokes stay, thinner lines go.
    radius = max(1.0, 0.45 * max(MIN_STROKE * short, stroke_half_width(half_width)))
    cores = disk_closure((half_width >= radius).astype(np.uint8), radius) & mask
    count, labels, stats, centroids = cv2.connectedComponentsWithStats(cores, connectivity=8)
    if count <= 1:
        raise NoInk("the photo shows no ink strokes thick enough for a digit (only thin lines)")
    height, width = ink.shape
    areas = stats[1:, cv2.CC_STAT_AREA].astype(np.float64)
    offsets = (centroids[1:] - (width / 2, height / 2)) / (width / 2, height / 2)
    touches = ((stats[1:, cv2.CC_STAT_LEFT] == 0) | (stats[1:, cv2.CC_STAT_TOP] == 0)
               | (stats[1:, cv2.CC_STAT_LEFT] + stats[1:, cv2.CC_STAT_WIDTH] >= width)
               | (stats[1:, cv2.CC_STAT_TOP] + stats[1:, cv2.CC_STAT_HEIGHT] >= height))
    score = areas * np.exp(-0.5 * (offsets**2).sum(axis=1)) * np.where(touches, 0.02, 1.0)
    main = int(np.argmax(score))
    if areas[main] < (MIN_STROKE * short) ** 2 * 8:
        raise NoInk("the photo shows no ink strokes large enough for a digit")
    left, top, box_w, box_h = (int(v) for v in stats[main + 1, :4])
    right, bottom = left + box_w, top + box_h
    keep = [main + 1]
    # Strokes cut by the frame are the paper's edge or a neighbour, unless the digit itself is:
    # then the picture is cropped to it, and its other strokes reach the edges too.
    cropped = bool(touches[main])
    for other in np.argsort(-areas):
        if other == main or areas[other] < 0.03 * areas[main] or (touches[other] and not cropped):
            continue
        x, y, w, h = (int(v) for v in stats[other + 1, :4])
        gap = 0.3 * max(right - left, bottom - top)
        near = x < right + gap and x + w > left - gap and y < bottom + gap and y + h > top - gap
        if near and w < 1.5 * (right - left) + gap and h < 1.5 * (bottom - top) + gap:
            keep.append(other + 1)
            left, top, right, bottom = min(left, x), min(top, y), max(right, x + w), max(bottom, y + h)
    # Soft stroke edges lie outside the cores: widen the box and take the ink near the cores.
    reach = round(4 * radius)
    top, left = max(0, top - reach), max(0, left - reach)
    bottom, right = min(height, bottom + reach), min(width, right + reach)
    chosen = np.isin(labels[top:bottom, left:right], keep).astype(np.uint8)
    crop = ink[top:bottom, left:right] * disk_closure(chosen, reach)
    level = float(np.percentile(crop[chosen > 0], 95))
    crop = (crop - PHOTO_FLOOR * level) * (1.0 / ((1.0 - PHOTO_FLOOR) * level))
    return np.clip(crop, 0.0, 1.0, out=crop)


def place_in_field(digit: np.ndarray) -> np.ndarray:
    """A digit (<= 20x20, float [0,1]) in a 28x28 uint8 field, its centre of mass at the centre."""
    height, width = digit.shape
    moments = cv2.moments(digit)
    total = moments["m00"]
    if total <= 0:
        raise NoInk("the ink is too faint or too small to read")
    cy, cx = moments["m01"] / total, moments["m10"] / total
    top = min(max(round((FIELD - 1) / 2 - cy), 0), FIELD - height)  # keep the whole digit in view
    left = min(max(round((FIELD - 1) / 2 - cx), 0), FIELD - width)
    field = np.zeros((FIELD, FIELD), dtype=np.uint8)
    field[top : top + height, left : left + width] = digit * 255.0 + 0.5
    return field


def digit_from_ink(ink: np.ndarray) -> np.ndarray:
    """Crop the ink, fit its longer side to 20 px, centre it by mass in 28x28 -> uint8."""
    left, top, width, height = cv2.boundingRect((ink > 0).view(np.uint8))
    if not width:
        raise NoInk("the ink is too faint or too small to read")
    return place_in_field(resize_to(ink[top : top + height, left : left + width], DIGIT_BOX))


def already_mnist(grey: np.ndarray) -> bool:
    """MNIST's own format: 28x28, light ink on an exactly black field, the ink within the central
    20x20 box's size and centred by mass. Such a digit is read as it is: normalising it again
    (noise floor, a new crop and resize) only blurs it (MNIST test: 99.45 % so, 99.52 % as is)."""
    if grey.shape != (FIELD, FIELD) or border_of(grey).any() or grey.max() < MIN_CONTRAST * 255:
        return False
    *_, width, height = cv2.boundingRect(grey)
    moments = cv2.moments(grey)
    if not moments["m00"] or max(width, height) > DIGIT_BOX:
        return False
    centre = (FIELD - 1) / 2
    return abs(moments["m10"] / moments["m00"] - centre) <= 1 and abs(moments["m01"] / moments["m00"] - centre) <= 1


def prepare_digit(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded image bytes -> uint8 [28,28], white digit on black, MNIST-style.

    Raises an :class:`ImageProblem` subclass naming what is wrong with the image.
    """
    grey = small_grey_png(data, max_pixels)
    if grey is not None:
        return grey if already_mnist(grey) else digit_from_ink(scan_ink(grey, 1 / 255))
    pixels = undo_enlargement(to_pixels(open_image(data, max_pixels, reduce_to=WORK_SIDE), WORK_SIDE))
    if max(pixels.shape[:2]) <= SMALL_SIDE or flat_border(pixels):
        return digit_from_ink(without_edge_fragments(scan_ink(luminance(pixels))))
    return digit_from_ink(digit_strokes(paper_ink(resize_to(pixels, WORK_SIDE, BACKGROUND_STEP))))


def encode_png(pixels: np.ndarray) -> bytes:
    """uint8 [H,W] -> PNG bytes (used by tests, load tests and the CLI)."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(pixels, dtype=np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()
