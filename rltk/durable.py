"""Durable writes and file digests: what checkpoints, exports and metrics share to survive a kill -9."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (new, renamed or removed files) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path, fsync: bool = False) -> str:
    """The file's sha256 hex digest, read in 1 MiB chunks (a merged model can be many GB).

    ``fsync``: also flush the file to disk (a checkpoint hashes what it just wrote).
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
        if fsync:
            os.fsync(f.fileno())
    return digest.hexdigest()


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file, fsync it, rename it over ``path`` and fsync the dir."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON to ``path`` durably (:func:`write_bytes_atomic`)."""
    write_bytes_atomic(path, json.dumps(data, indent=1, sort_keys=True).encode())


def source_sha256(obj: object) -> str | None:
    """Sha256 of the file that defines ``obj`` (a class or function), or None where there is no file."""
    try:
        path = inspect.getsourcefile(obj if inspect.isclass(obj) or inspect.isfunction(obj) else type(obj))
    except TypeError:
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else None
