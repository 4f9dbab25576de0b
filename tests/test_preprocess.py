"""Image decoding and preprocessing: policies, limits and clear errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from runtime.core.package import Preprocess
from runtime.serving.preprocess import (
    InputError,
    check_normalized,
    decode_image,
    encoded_to_input,
    pixels_to_input,
)


def encode(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def test_png_round_trips_exactly_and_jpeg_decodes():
    pixels = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(decode_image(encode(pixels, "PNG"))), pixels)
    assert np.asarray(decode_image(encode(pixels, "JPEG"))).shape == (20, 30, 3)
    gray = np.full((5, 6), 77, dtype=np.uint8)
    assert np.asarray(decode_image(encode(gray, "PNG"))).shape == (5, 6, 3)


def test_decode_refuses_garbage_other_formats_and_huge_images():
    with pytest.raises(InputError, match="could not be decoded"):
        decode_image(b"\x89PNG\r\n\x1a\n broken")
    # Only the JPEG and PNG decoders ever see client bytes.
    with pytest.raises(InputError, match="not a JPEG or PNG file"):
        decode_image(encode(np.zeros((4, 4, 3), dtype=np.uint8), "GIF"))
    big = encode(np.zeros((100, 200, 3), dtype=np.uint8), "PNG")
    with pytest.raises(InputError, match="200x100 pixels exceeds the limit of 10000"):
        decode_image(big, max_pixels=10_000)


def test_normalization_uses_the_tasks_mean_and_std():
    pre = Preprocess(input_size=4, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    pixels = torch.full((1, 4, 4, 3), 255, dtype=torch.uint8)
    out = pixels_to_input(pixels, pre)
    assert out.shape == (1, 3, 4, 4)
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([1.0, 3.0, 1.0]))


def test_resize_policies():
    # A left-dark, right-bright image: center crop keeps the middle, stretch keeps all columns.
    pixels = torch.zeros(1, 16, 32, 3, dtype=torch.uint8)
    pixels[:, :, 16:] = 255
    crop = Preprocess(input_size=8, mean=(0, 0, 0), std=(1, 1, 1), crop_pct=1.0, interpolation="nearest")
    stretch = Preprocess(
        input_size=8, mean=(0, 0, 0), std=(1, 1, 1), resize="stretch", interpolation="nearest"
    )
    cropped, stretched = pixels_to_input(pixels, crop), pixels_to_input(pixels, stretch)
    assert cropped.shape == stretched.shape == (1, 3, 8, 8)
    assert cropped[0, 0, 0, :4].max() == 0 and cropped[0, 0, 0, 4:].min() == 1
    assert stretched[0, 0, 0, :4].max() == 0 and stretched[0, 0, 0, 4:].min() == 1
    # Shorter side to size/crop_pct then a center crop: a 2:1 image keeps its middle half.
    wide = Preprocess(input_size=8, mean=(0, 0, 0), std=(1, 1, 1), crop_pct=1.0, interpolation="bilinear")
    ramp = (
        torch.linspace(0, 255, 64).round().to(torch.uint8).view(1, 1, 64, 1).expand(1, 32, 64, 3).contiguous()
    )
    out = pixels_to_input(ramp, wide)[0, 0, 0]
    assert 0.2 < out[0] < 0.3 and 0.7 < out[-1] < 0.8


def test_exact_size_pixels_skip_resizing_and_other_sizes_match_encoded_images():
    pre = Preprocess(input_size=8)
    pixels = torch.randint(0, 256, (3, 8, 8, 3), dtype=torch.uint8)
    mean = torch.tensor(pre.mean).view(3, 1, 1)
    std = torch.tensor(pre.std).view(3, 1, 1)
    expected = (pixels[1].permute(2, 0, 1).float() / 255 - mean) / std
    batch = pixels_to_input(pixels, pre)
    assert torch.allclose(batch[1], expected, atol=1e-6)
    # Any other size takes the encoded images' transform: pixels and their PNG give the same input.
    other = torch.randint(0, 256, (2, 13, 21, 3), dtype=torch.uint8)
    encoded = [encode(p.numpy(), "PNG") for p in other]
    assert torch.equal(encoded_to_input(encoded, pre), pixels_to_input(other, pre))


def test_encoded_errors_name_the_image_and_fp32_checks():
    good = encode(np.zeros((8, 8, 3), dtype=np.uint8), "PNG")
    with pytest.raises(InputError, match="image 1:"):
        encoded_to_input([good, b"nope"], Preprocess(input_size=8))
    with pytest.raises(InputError, match=r"FP32 \[N, 3, 8, 8\]"):
        check_normalized(torch.zeros(1, 3, 9, 8), 8)
    bad = torch.zeros(3, 3, 8, 8)
    bad[2, 0, 0, 0] = float("inf")
    with pytest.raises(InputError, match=r"rows \[2\]"):
        check_normalized(bad, 8)
