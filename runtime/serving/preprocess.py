"""Client images to model input: decode JPEG/PNG, resize per the task's policy, normalize.

Encoded images go through the paper's evaluation transform, computed as timm/torchvision compute
it on PIL images: resize the shorter side to ``int(size / crop_pct)`` (the longer side keeps the
aspect ratio, truncated), center crop ``size x size``, scale to 0..1, normalize by the task's mean
and std; ``resize: "stretch"`` resizes to ``size x size`` instead. uint8 ``pixels`` of exactly
``size x size`` are taken as already transformed (only normalized); other sizes go through the
same PIL transform as encoded images.

Cost is bounded before any pixel is decoded or allocated: the image size (read from the header;
PIL opens lazily) must stay within ``max_pixels`` and ``max_aspect_ratio``, so decoding holds at
most ``max_pixels`` pixels and the resized image at most ``size / crop_pct`` by ``max_aspect_ratio``
times that. Normalized ``input`` tensors must be finite and within ``MAX_INPUT_MAGNITUDE``.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from runtime.core.package import Preprocess

DEFAULT_MAX_PIXELS = 25_000_000
# Panoramas reach about 6:1; beyond this an image is a strip, and upscaling its short side costs
# memory in proportion to the ratio.
DEFAULT_MAX_ASPECT_RATIO = 32.0
# Normalized pixels lie within a few units of zero; values far beyond overflow fp32/bf16 in the
# forward (3e38 is finite but its square is not) and would return non-finite logits.
MAX_INPUT_MAGNITUDE = 1e4
ACCEPTED_FORMATS = ("JPEG", "PNG")
RESAMPLING = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


class InputError(ValueError):
    """Client input that cannot become a model input; the message names the problem."""


def check_image_size(
    width: int,
    height: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
) -> None:
    """Refuse an image by its dimensions alone, before anything of its size is allocated."""
    if width <= 0 or height <= 0:
        raise InputError(f"image of {width}x{height} pixels is empty")
    if width * height > max_pixels:  # Python integers: no overflow
        raise InputError(f"image of {width}x{height} pixels exceeds the limit of {max_pixels} pixels")
    if max(width, height) > max_aspect_ratio * min(width, height):
        raise InputError(
            f"image of {width}x{height} pixels has an aspect ratio of "
            f"{max(width, height) / min(width, height):.1f}:1, above the limit of {max_aspect_ratio:g}:1"
        )


def decode_image(
    data: bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
) -> Image.Image:
    """JPEG or PNG bytes to a decoded RGB image; the size limits are checked from the header first."""
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)  # reads the header only
    except Image.DecompressionBombError as error:
        raise InputError(f"image refused as a decompression bomb: {error}") from error
    except MemoryError:
        raise
    except Exception as error:  # UnidentifiedImageError, or a plugin's own error on a broken header
        raise InputError("image could not be decoded: it is not a JPEG or PNG file") from error
    check_image_size(*image.size, max_pixels=max_pixels, max_aspect_ratio=max_aspect_ratio)
    try:
        image.load()
        return image if image.mode == "RGB" else image.convert("RGB")
    except MemoryError:
        raise
    except Exception as error:  # Pillow raises many types for undecodable data
        raise InputError(
            f"image could not be decoded as JPEG or PNG ({type(error).__name__}: {error})"
        ) from error


def transform(image: Image.Image, pre: Preprocess) -> Image.Image:
    """The task's resize policy on a PIL image, as torchvision's ``Resize`` and ``CenterCrop`` do it."""
    size, resample = pre.input_size, RESAMPLING[pre.interpolation]
    if pre.resize == "stretch":
        return image.resize((size, size), resample)
    width, height = image.size
    short = int(size / pre.crop_pct)
    if width <= height:
        new_width, new_height = short, int(short * height / width)
    else:
        new_width, new_height = int(short * width / height), short
    resized = image.resize((new_width, new_height), resample)
    top, left = round((new_height - size) / 2), round((new_width - size) / 2)
    return resized.crop((left, top, left + size, top + size))


def normalize(pixels: Tensor, pre: Preprocess) -> Tensor:
    """uint8 ``[N, S, S, 3]`` to fp32 ``[N, 3, S, S]``: ``(x / 255 - mean) / std`` (ToTensor, Normalize)."""
    images = pixels.permute(0, 3, 1, 2).float().div(255)
    mean = torch.tensor(pre.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((images - mean) / std).contiguous()


def pixels_to_input(
    pixels: Tensor,
    pre: Preprocess,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
) -> Tensor:
    """uint8 ``[N, H, W, 3]`` to normalized fp32 ``[N, 3, S, S]``; ``S x S`` pixels are only normalized."""
    if pixels.dtype != torch.uint8 or pixels.dim() != 4 or pixels.shape[-1] != 3:
        raise InputError(f"pixels must be uint8 [N, H, W, 3], got {pixels.dtype} {list(pixels.shape)}")
    height, width = pixels.shape[1:3]
    size = pre.input_size
    if (height, width) != (size, size):
        check_image_size(width, height, max_pixels, max_aspect_ratio)
        rows = [np.asarray(transform(Image.fromarray(row.numpy()), pre)) for row in pixels]
        pixels = torch.from_numpy(np.stack(rows))
    return normalize(pixels, pre)


def encoded_to_input(
    images: list[bytes],
    pre: Preprocess,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
) -> Tensor:
    """Encoded images (sizes may differ) to normalized fp32 ``[N, 3, S, S]``, one decoded at a time."""
    rows = []
    for index, data in enumerate(images):
        try:
            decoded = decode_image(data, max_pixels, max_aspect_ratio)
        except InputError as error:
            raise InputError(f"image {index}: {error}") from None
        rows.append(np.asarray(transform(decoded, pre)))
        del decoded  # the full-size image goes before the next one is decoded
    return normalize(torch.from_numpy(np.stack(rows)), pre)


def check_normalized(images: Tensor, input_size: int) -> Tensor:
    """An fp32 ``[N, 3, S, S]`` tensor the client normalized itself; refuses NaN, Inf and huge values."""
    expected = [3, input_size, input_size]
    if images.dtype != torch.float32 or images.dim() != 4 or list(images.shape[1:]) != expected:
        raise InputError(f"input must be FP32 [N, {', '.join(map(str, expected))}], got {list(images.shape)}")
    # NaN fails the comparison too.
    within = images.abs().reshape(images.shape[0], -1).amax(dim=1) <= MAX_INPUT_MAGNITUDE
    if not bool(within.all()):
        bad = torch.nonzero(~within).flatten().tolist()
        raise InputError(
            f"input rows {bad} contain NaN or Inf, or values beyond ±{MAX_INPUT_MAGNITUDE:g} "
            "(normalized pixels lie within a few units of zero)"
        )
    return images
