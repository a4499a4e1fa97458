"""The rules for what clients send as text: digit labels and base64 (no server needed)."""

from __future__ import annotations

import base64

import pytest
from pydantic import ValidationError

from service.http.bodies import decode_base64
from service.http.errors import ClientError
from service.http.labels import parse_label
from service.routes.schemas import FinetuneJSON, LabelledImageJSON

# str.isdigit() accepts all of these; int() takes some of them as digits. None is a label.
NOT_LABELS = ["²", "₀", "፪", "٧", "𝟕", "７", "10", "-1", " 7", "7 ", "", "a", "7.0"]


@pytest.mark.parametrize("text", NOT_LABELS)
def test_a_text_label_is_one_ascii_digit_and_nothing_else(text: str) -> None:
    with pytest.raises(ClientError) as caught:
        parse_label(text, "labels[3]")
    assert caught.value.status_code == 422 and caught.value.code == "invalid_label"
    assert "labels[3]" in caught.value.detail


def test_the_ten_ascii_digits_are_labels() -> None:
    assert [parse_label(digit) for digit in "0123456789"] == list(range(10))


@pytest.mark.parametrize("raw", ["true", "false", "7.0", '"7"', "10", "-1", "null", "[7]"])
def test_a_json_label_is_an_integer_0_to_9(raw: str) -> None:
    with pytest.raises(ValidationError) as caught:
        LabelledImageJSON.model_validate_json(f'{{"image": "AA==", "label": {raw}}}')
    assert [error["loc"] for error in caught.value.errors()] == [("label",)]
    with pytest.raises(ValidationError) as caught:
        FinetuneJSON.model_validate_json(f'{{"samples": [{{"image": "AA==", "label": {raw}}}]}}')
    assert [error["loc"] for error in caught.value.errors()] == [("samples", 0, "label")]


def test_json_integer_labels_are_taken() -> None:
    assert [LabelledImageJSON.model_validate_json(f'{{"image": "AA==", "label": {d}}}').label
            for d in range(10)] == list(range(10))


PAYLOAD = bytes(range(256)) * 3  # every byte value: the encodings hold '+', '/', '-' and '_'


SHORT = PAYLOAD[:-1]  # 767 bytes: its encoding ends in one '=' of padding


@pytest.mark.parametrize(("encoded", "expected"), [
    (base64.b64encode(PAYLOAD).decode(), PAYLOAD),
    (base64.encodebytes(PAYLOAD).decode(), PAYLOAD),  # what `base64` without -w0 prints: 76-column lines
    (base64.encodebytes(PAYLOAD).decode().replace("\n", "\r\n"), PAYLOAD),
    (base64.urlsafe_b64encode(PAYLOAD).decode(), PAYLOAD),
    (base64.urlsafe_b64encode(SHORT).decode().rstrip("="), SHORT),
    (base64.b64encode(SHORT).decode().rstrip("=") + "\n", SHORT),
    (" ".join(base64.b64encode(PAYLOAD).decode()[i:i + 8] for i in range(0, 1024, 8)), PAYLOAD),
    ("data:image/png;base64," + base64.encodebytes(PAYLOAD).decode(), PAYLOAD),
], ids=["plain", "wrapped", "crlf", "urlsafe", "urlsafe-unpadded", "unpadded", "spaces", "data-url-wrapped"])
def test_base64_as_people_produce_it_is_accepted(encoded: str, expected: bytes) -> None:
    assert decode_base64(encoded) == expected


@pytest.mark.parametrize("encoded", [
    "", "   ", "====", "QUJD*", "QUJD\x00", "QU=JD", "QQ==QQ==", "QUJDR", "+/-_", "ＱＵＪＤ", "QUJD٧",
    base64.b64encode(PAYLOAD).decode() + "-",  # the two alphabets mixed
], ids=["empty", "blank", "only-padding", "star", "nul", "inner-padding", "padding-twice", "truncated", "mixed",
        "fullwidth", "arabic-digit", "mixed-tail"])
def test_anything_else_is_a_422_naming_the_field(encoded: str) -> None:
    with pytest.raises(ClientError) as caught:
        decode_base64(encoded, "samples[2].image")
    assert caught.value.status_code == 422 and caught.value.code == "invalid_base64"
    assert "samples[2].image" in caught.value.detail
