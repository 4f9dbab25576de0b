"""Where task packages come from: a listing of ids, a version stamp per package, and its content.

:class:`runtime.serving.task_store.TaskStore` reads packages only through :class:`PackageSource`.
:class:`DirectorySource` is the local task directory. An object store is another implementation of
the same three calls: ``ids`` lists the bucket's ``<task id>.safetensors`` keys, ``signature`` is an
object's ETag or generation (a changed object is a new version), and ``read`` fetches the object's
bytes into memory and parses them with :func:`runtime.core.package.package_from_bytes` (a package is
never mapped, so nothing changes under a loaded task). Pass it as ``TaskStore(..., source=...)``.
"""

from __future__ import annotations

import os
from collections.abc import Hashable
from pathlib import Path
from typing import Protocol

from runtime.core.backbone import Backbone
from runtime.core.files import shown
from runtime.core.package import (
    PACKAGE_SUFFIX,
    TASK_ID_PATTERN,
    PackageError,
    TaskPackage,
    check_task_id,
    load_package,
)

Signature = Hashable  # a package changed when its signature does


class TaskNotFoundError(LookupError):
    """No package for this task id in the repository."""


class PackageSource(Protocol):
    """A repository of task packages. Every call may do I/O: call it off an event loop."""

    def ids(self) -> list[str]:
        """The task ids with a package (valid ids only, sorted)."""
        ...

    def signature(self, task_id: str) -> Signature:
        """The package's version stamp; raises ``TaskNotFoundError`` or ``PackageError``."""
        ...

    def read(self, task_id: str, backbone: Backbone) -> TaskPackage:
        """The package, validated (for ``backbone``); raises ``TaskNotFoundError`` or ``PackageError``."""
        ...

    def package_name(self, task_id: str) -> str:
        """How messages name the package (never a server path)."""
        ...


class DirectorySource:
    """``DIR/<task id>.safetensors`` files: only valid ids, only regular files directly inside ``DIR``
    (symlinks followed); the signature is (mtime in ns, size)."""

    def __init__(self, directory: str | Path) -> None:
        self.root = Path(directory).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"task directory {directory} does not exist")

    def path_for(self, task_id: str) -> Path:
        """The package file of ``task_id``, refusing bad ids and anything resolving outside the directory."""
        check_task_id(task_id)
        path = (self.root / f"{task_id}{PACKAGE_SUFFIX}").resolve()
        if path.parent != self.root:
            raise PackageError(f"task {shown(task_id)}: package resolves outside the task directory")
        if not path.is_file():
            raise TaskNotFoundError(
                f"task {shown(task_id)}: no package {task_id}{PACKAGE_SUFFIX} in the task directory"
            )
        return path

    def ids(self) -> list[str]:
        ids = []
        for path in self.root.glob(f"*{PACKAGE_SUFFIX}"):
            task_id = path.name[: -len(PACKAGE_SUFFIX)]
            if TASK_ID_PATTERN.fullmatch(task_id):
                ids.append(task_id)
        return sorted(ids)

    def signature(self, task_id: str) -> Signature:
        path = self.path_for(task_id)
        try:
            stat = os.stat(path)
        except OSError as error:
            raise PackageError(f"task package {path.name}: cannot be read ({error.strerror})") from error
        return stat.st_mtime_ns, stat.st_size

    def read(self, task_id: str, backbone: Backbone) -> TaskPackage:
        path = self.path_for(task_id)
        return load_package(path, backbone, name=path.name)

    def package_name(self, task_id: str) -> str:
        return f"{task_id}{PACKAGE_SUFFIX}"
