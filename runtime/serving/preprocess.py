"""Client images to model input: decode JPEG/PNG, resize per the task's policy, normalize.

Encoded images and uint8 pixels share one tensor path (resize, crop, normalize), vectorized
over a batch. Pixels that already have the task's input size skip resizing: the client has
done it. Resizing uses torch's antialiased interpolation, close to (not bit-equal with) PIL.
"""

from __future__ import annotations

import io
import math
import warnings

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from runtime.core.package import Preprocess

DEFAULT_MAX_PIXELS = 25_000_000
ACCEPTED_FORMATS = ("JPEG", "PNG")


class InputError(ValueError):
    """Client input that cannot become a model input; the message names the problem."""


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Tensor:
    """JPEG or PNG bytes to uint8 RGB ``[H, W, 3]``; refuses images over ``max_pixels`` before decoding."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in ACCEPTED_FORMATS:
                raise InputError(f"image format {image.format} is not accepted (send JPEG or PNG)")
            width, height = image.size
            if width * height > max_pixels:
                raise InputError(f"image of {width}x{height} pixels exceeds the limit of {max_pixels} pixels")
            rgb = image.convert("RGB")
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise InputError(f"image refused as a decompression bomb: {error}") from error
    except Exception as error:  # Pillow raises many types for undecodable data
        raise InputError(
            f"image could not be decoded as JPEG or PNG ({type(error).__name__}: {error})"
        ) from error
    return torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(height, width, 3)


def _resize_crop(images: Tensor, pre: Preprocess) -> Tensor:
    """``[N, 3, H, W]`` float in 0..255 to ``[N, 3, S, S]`` by the task's resize policy."""
    size = pre.input_size
    height, width = images.shape[-2:]
    if (height, width) == (size, size):
        return images
    mode = pre.interpolation
    antialias = mode != "nearest"
    if pre.resize == "stretch":
        return F.interpolate(images, size=(size, size), mode=mode, antialias=antialias)
    scale_size = math.floor(size / pre.crop_pct)
    if height <= width:
        new_h, new_w = scale_size, max(scale_size, int(scale_size * width / height))
    else:
        new_h, new_w = max(scale_size, int(scale_size * height / width)), scale_size
    resized = F.interpolate(images, size=(new_h, new_w), mode=mode, antialias=antialias)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return resized[..., top : top + size, left : left + size]


def pixels_to_input(pixels: Tensor, pre: Preprocess) -> Tensor:
    """uint8 ``[N, H, W, 3]`` to normalized fp32 ``[N, 3, S, S]``."""
    if pixels.dtype != torch.uint8 or pixels.dim() != 4 or pixels.shape[-1] != 3:
        raise InputError(f"pixels must be uint8 [N, H, W, 3], got {pixels.dtype} {list(pixels.shape)}")
    images = pixels.permute(0, 3, 1, 2).float()
    images = _resize_crop(images, pre).clamp(0, 255) / 255.0
    mean = torch.tensor(pre.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((images - mean) / std).contiguous()


def encoded_to_input(images: list[bytes], pre: Preprocess, max_pixels: int = DEFAULT_MAX_PIXELS) -> Tensor:
    """Encoded images (sizes may differ) to normalized fp32 ``[N, 3, S, S]``."""
    rows = []
    for index, data in enumerate(images):
        try:
            decoded = decode_image(data, max_pixels)
        except InputError as error:
            raise InputError(f"image {index}: {error}") from None
        rows.append(pixels_to_input(decoded.unsqueeze(0), pre))
    return torch.cat(rows)


def check_normalized(images: Tensor, input_size: int) -> Tensor:
    """An fp32 ``[N, 3, S, S]`` tensor the client normalized itself; refuses NaN and Inf."""
    expected = [3, input_size, input_size]
    if images.dtype != torch.float32 or images.dim() != 4 or list(images.shape[1:]) != expected:
        raise InputError(f"input must be FP32 [N, {', '.join(map(str, expected))}], got {list(images.shape)}")
    finite = torch.isfinite(images.view(images.shape[0], -1)).all(dim=1)
    if not bool(finite.all()):
        bad = torch.nonzero(~finite).flatten().tolist()
        raise InputError(f"input rows {bad} contain NaN or Inf")
    return images
