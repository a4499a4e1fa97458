"""V2 tensor data, as it travels: JSON ``data``, the binary tensor data extension, gRPC contents.

Pure functions from wire forms to numpy arrays or lists of bytes, and back; no server here.
Binary data is flat, row-major, little-endian. BYTES elements in binary form are each a
4-byte little-endian length followed by the bytes; in JSON they are strings, which this
service reads as base64 (or data URLs), since encoded images are not UTF-8 text.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np

from service.http.bodies import byte_count, decode_base64
from service.http.errors import echo
from service.v2.errors import as_protocol_error, bad_request

HEADER_LENGTH = "inference-header-content-length"
LENGTH_PREFIX = struct.Struct("<I")


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(JSON header, binary tensor data): the header is the first ``Inference-Header-Content-Length``
    bytes; without that header the whole body is JSON."""
    if header_length is None:
        return body, b""
    length = byte_count(header_length)
    if length is None:
        raise bad_request(f"Inference-Header-Content-Length must be a byte count, got {echo(header_length)}")
    if length > len(body):
        raise bad_request(f"Inference-Header-Content-Length is {length} but the body has only {len(body)} bytes")
    return body[:length], body[length:]


def bytes_from_raw(raw: bytes, count: int, name: str) -> list[bytes]:
    """BYTES elements from their binary form (length-prefixed), exactly ``count`` of them."""
    elements, offset = [], 0
    while offset < len(raw):
        if offset + LENGTH_PREFIX.size > len(raw):
            raise bad_request(f"input '{name}': binary BYTES data ends inside the length of element {len(elements)}")
        (size,) = LENGTH_PREFIX.unpack_from(raw, offset)
        offset += LENGTH_PREFIX.size
        if offset + size > len(raw):
            raise bad_request(f"input '{name}': element {len(elements)} declares {size} bytes but "
                              f"only {len(raw) - offset} follow")
        elements.append(raw[offset:offset + size])
        offset += size
    if len(elements) != count:
        raise bad_request(f"input '{name}': the shape says {count} elements but the binary data holds {len(elements)}")
    return elements


def bytes_from_base64(data: list, count: int, name: str) -> list[bytes]:
    """BYTES elements from JSON: each a base64 string or data URL."""
    flat = _flatten(data)
    if len(flat) != count:
        raise bad_request(f"input '{name}': the shape says {count} elements but data holds {len(flat)}")
    elements = []
    for index, text in enumerate(flat):
        if not isinstance(text, str):
            raise bad_request(f"input '{name}': element {index} must be a base64 string, not {type(text).__name__}")
        with as_protocol_error(f"input '{name}': ", status=400):
            elements.append(decode_base64(text, f"{name}[{index}]"))
    return elements


def bytes_from_list(elements: Sequence[bytes], count: int, name: str) -> list[bytes]:
    """BYTES elements from gRPC ``contents.bytes_contents``."""
    if len(elements) != count:
        raise bad_request(f"input '{name}': the shape says {count} elements but contents hold {len(elements)}")
    return list(elements)


def uint8_from_raw(raw: bytes, count: int, name: str) -> np.ndarray:
    if len(raw) != count:
        raise bad_request(f"input '{name}': the shape says {count} UINT8 elements ({count} bytes) "
                          f"but the binary data has {len(raw)} bytes")
    return np.frombuffer(raw, dtype=np.uint8)


def uint8_from_values(data: list | Sequence[int], count: int, name: str) -> np.ndarray:
    """UINT8 elements from JSON ``data`` (flat or nested) or gRPC ``contents.uint_contents``."""
    try:
        values = np.asarray(data)
    except ValueError:
        raise bad_request(f"input '{name}': data is ragged; send a flat list or equal-length nested lists") from None
    if values.size != count:
        raise bad_request(f"input '{name}': the shape says {count} elements but data holds {values.size}")
    if values.size and (values.dtype.kind not in "iu" or values.min() < 0 or values.max() > 255):
        raise bad_request(f"input '{name}': UINT8 data must be integers from 0 to 255")
    return values.reshape(-1).astype(np.uint8)


def raw_of(array: np.ndarray) -> bytes:
    """An output tensor in binary form: flat, row-major, little-endian."""
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def json_of(array: np.ndarray) -> list:
    """An output tensor as JSON ``data``: flat, row-major."""
    return array.reshape(-1).tolist()


def _flatten(data: list) -> list:
    flat: list = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat
