"""An export's integrity: ``SHA256SUMS`` over every file, written last and checked before any load.

``SHA256SUMS`` is in ``sha256sum -c`` format, so ``sha256sum -c SHA256SUMS`` inside an export checks it
without rltk. :func:`check_export` (``rltk export --check``, ``rltk eval`` and ``rltk serve`` before they
load an export) re-hashes the directory against it.
"""

from __future__ import annotations

import re
from pathlib import Path

from rltk.durable import sha256_file

SUMS = "SHA256SUMS"
_SUM_LINE = re.compile(r"^([0-9a-f]{64}) [ *](.+)$")  # sha256sum's text (" ") and binary ("*") modes
_REEXPORT = "Fix: re-export it (rltk export RUN_DIR --out NEW_DIR) and do not edit or add files in an export"


class ExportError(RuntimeError):
    """An export could not be produced, did not verify, or no longer matches its ``SHA256SUMS``."""


def _files(root: Path) -> list[str]:
    """Every file under ``root`` but ``SHA256SUMS``, as sorted relative POSIX paths."""
    names = (p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    return sorted(n for n in names if n != SUMS)


def write_sums(out: Path) -> None:
    """Write ``out/SHA256SUMS`` over every other file of ``out`` (``sha256sum -c`` format, sorted by name)."""
    (out / SUMS).write_text("".join(f"{sha256_file(out / name)}  {name}\n" for name in _files(out)))


def _read_sums(path: Path) -> dict[str, str]:
    """``{name: sha256}`` from ``path/SHA256SUMS``; raises :class:`ExportError` if absent or malformed."""
    sums = path / SUMS
    if not path.is_dir():
        raise ExportError(f"{path} is not a directory; pass the --out directory of an rltk export")
    if not sums.is_file():
        raise ExportError(
            f"{path} has no {SUMS}, so it cannot be checked (not an rltk export, or one written before rltk "
            f"wrote {SUMS}). {_REEXPORT}."
        )
    want: dict[str, str] = {}
    for number, line in enumerate(sums.read_text().splitlines(), start=1):
        m = _SUM_LINE.match(line)
        if m is None:
            raise ExportError(
                f"{sums} line {number} is not '<64 hex digits>  <file name>': {line[:80]!r}. {_REEXPORT}."
            )
        want[m.group(2)] = m.group(1)
    return want


def check_export(path: str | Path) -> list[str]:
    """Re-hash every file of the export at ``path`` against its ``SHA256SUMS``.

    Returns:
        The names of the files checked, sorted.

    Raises:
        ExportError: Naming each changed, missing or added file (or an absent/malformed ``SHA256SUMS``).

    """
    path = Path(path)
    want = _read_sums(path)
    have = _files(path)
    problems = [f"{name} is missing" for name in sorted(want.keys() - set(have))]
    for name in have:
        if name not in want:
            problems.append(f"{name} was added (not in {SUMS})")
        elif (digest := sha256_file(path / name)) != want[name]:
            problems.append(f"{name} changed (sha256 {digest[:12]}…, {SUMS} says {want[name][:12]}…)")
    if problems:
        raise ExportError(
            f"the export at {path} does not match its {SUMS}: {'; '.join(problems)}. {_REEXPORT}."
        )
    return have
