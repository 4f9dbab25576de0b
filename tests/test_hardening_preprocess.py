"""Preprocessing under attack: cost bounded from the header, the paper's transform, finite inputs only."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from torchvision import transforms

from runtime.core.package import Preprocess
from runtime.serving.preprocess import (
    InputError,
    check_image_size,
    check_normalized,
    decode_image,
    encoded_to_input,
    pixels_to_input,
)

INTERPOLATIONS = {
    "bicubic": transforms.InterpolationMode.BICUBIC,
    "bilinear": transforms.InterpolationMode.BILINEAR,
    "nearest": transforms.InterpolationMode.NEAREST,
}


def encode(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` RGB pixels, with one tiny compressed row of data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )


def paper_transform(pre: Preprocess) -> transforms.Compose:
    """The evaluation transform of the paper's code (timm/torchvision), on PIL images."""
    interpolation = INTERPOLATIONS[pre.interpolation]
    if pre.resize == "stretch":
        resize = [transforms.Resize((pre.input_size, pre.input_size), interpolation=interpolation)]
    else:
        resize = [
            transforms.Resize(int(pre.input_size / pre.crop_pct), interpolation=interpolation),
            transforms.CenterCrop(pre.input_size),
        ]
    return transforms.Compose([*resize, transforms.ToTensor(), transforms.Normalize(pre.mean, pre.std)])


@pytest.mark.parametrize(
    "pre",
    [
        Preprocess(input_size=224),
        Preprocess(input_size=32, crop_pct=0.9, interpolation="bilinear"),
        Preprocess(input_size=32, crop_pct=1.0, interpolation="nearest", mean=(0.5,) * 3, std=(0.5,) * 3),
        Preprocess(input_size=48, resize="stretch"),
    ],
    ids=["timm-default", "bilinear-0.9", "nearest-1.0", "stretch"],
)
def test_encoded_images_equal_the_paper_transform_bit_for_bit(pre: Preprocess) -> None:
    rng = np.random.default_rng(pre.input_size)
    sizes = [(pre.input_size, pre.input_size), (17, 300), (301, 40), (255, 256), (500, 377), (3, 2)]
    for height, width in sizes:
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        for fmt in ("PNG", "JPEG"):
            data = encode(pixels, fmt)
            expected = paper_transform(pre)(Image.open(io.BytesIO(data)).convert("RGB"))
            actual = encoded_to_input([data], pre)[0]
            assert torch.equal(actual, expected), (height, width, fmt)


def test_a_20000x1_png_is_refused_from_its_header_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode(np.zeros((1, 20000, 3), dtype=np.uint8), "PNG")
    assert len(data) < 200

    def no_decoding(self):  # the refusal must come before a single pixel is decoded
        raise AssertionError("decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    # Fast because nothing is decoded (checked above), not timed: a wall-clock bound breaks on a busy machine.
    with pytest.raises(
        InputError, match=r"image 0: image of 20000x1 pixels has an aspect ratio of 20000\.0:1"
    ):
        encoded_to_input([data], Preprocess(input_size=224))


@pytest.mark.parametrize(
    ("width", "height", "message"),
    [
        (1_000_000, 1, "aspect ratio"),
        (6000, 6000, "exceeds the limit of 25000000 pixels"),
        (2**31 - 1, 2**31 - 1, "decompression bomb|exceeds the limit"),
        (0, 5, "could not be decoded"),
    ],
)
def test_huge_claims_are_refused_before_decoding(width: int, height: int, message: str) -> None:
    with pytest.raises(InputError, match=message):
        decode_image(png_header_only(width, height))


def test_limits_are_configurable_and_dimension_products_cannot_overflow() -> None:
    check_image_size(64, 2, max_aspect_ratio=32)
    with pytest.raises(InputError, match="above the limit of 8:1"):
        check_image_size(64, 2, max_aspect_ratio=8)
    with pytest.raises(InputError, match="exceeds the limit"):
        check_image_size(2**62, 2**62)
    with pytest.raises(InputError, match="is empty"):
        check_image_size(0, 10)
    strip = encode(np.zeros((2, 100, 3), dtype=np.uint8), "PNG")
    assert encoded_to_input([strip], Preprocess(input_size=8), max_aspect_ratio=50).shape == (1, 3, 8, 8)


def test_pixels_with_extreme_shapes_are_refused() -> None:
    pre = Preprocess(input_size=32)
    with pytest.raises(InputError, match=r"aspect ratio of 2000\.0:1"):
        pixels_to_input(torch.zeros(1, 1, 2000, 3, dtype=torch.uint8), pre)
    with pytest.raises(InputError, match="exceeds the limit of 100 pixels"):
        pixels_to_input(torch.zeros(1, 20, 20, 3, dtype=torch.uint8), pre, max_pixels=100)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 3e38, -2e4])
def test_non_finite_or_huge_normalized_inputs_are_refused(value: float) -> None:
    images = torch.zeros(3, 3, 8, 8)
    images[1, 2, 3, 4] = value
    with pytest.raises(InputError, match=r"input rows \[1\] contain NaN or Inf, or values beyond"):
        check_normalized(images, 8)
    images[1, 2, 3, 4] = 9.0
    assert check_normalized(images, 8) is images
