"""Attention kernels over a per-row task prefix.

``prefix_attention_reference`` is the pure-PyTorch contract. ``prefix_attention`` is the Triton kernel,
imported lazily on first access so that importing :mod:`kernels` never imports :mod:`triton` (check
:func:`triton_available` first).
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
import types
from typing import Any

from kernels.reference import prefix_attention_reference, prefix_mask

__all__ = ["prefix_attention", "prefix_attention_reference", "prefix_mask", "triton_available"]

_LAZY = "prefix_attention"


@functools.cache
def _triton_imports() -> bool:
    try:
        import triton  # noqa: F401
    except (ImportError, OSError, RuntimeError):  # a broken install can fail beyond ImportError
        return False
    return True


def triton_available() -> bool:
    """True when triton imports and can run: on a CUDA device, or in its CPU interpreter.

    The interpreter is selected by ``TRITON_INTERPRET=1``, which must be set before
    :mod:`kernels.prefix_attention` is first imported.
    """
    if not _triton_imports():
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    import torch

    return torch.cuda.is_available()


class _KernelsPackage(types.ModuleType):
    """Keeps ``kernels.prefix_attention`` bound to the launcher function.

    When a submodule is imported the import system binds it as an attribute of its package; here the
    submodule ``kernels/prefix_attention.py`` shares its name with the function it defines, so that
    binding is redirected to the function.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name == _LAZY and isinstance(value, types.ModuleType):
            value = value.prefix_attention
        super().__setattr__(name, value)


def __getattr__(name: str) -> Any:
    if name == _LAZY:
        importlib.import_module(f"{__name__}.{_LAZY}")  # binds the function through _KernelsPackage
        return globals()[_LAZY]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


sys.modules[__name__].__class__ = _KernelsPackage
