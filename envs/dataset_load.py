"""Reading a labelled data file for the ``dataset`` env: JSONL/JSON, CSV/TSV, Parquet or a saved HF dataset.

Files load through Hugging Face ``datasets`` (``load_dataset("csv" | "json" | "parquet", data_files=...)``,
``load_from_disk`` for a directory written by ``save_to_disk``). Nothing is downloaded: the packaged
builders read the local file. ``datasets`` writes an Arrow cache while it builds; that cache goes to a
temporary directory deleted right after (``keep_in_memory``), never to ``~/.cache/huggingface``.

CSV cells are read as text, exactly as written (``007`` stays ``007``, ``NA`` stays ``NA``; an empty cell
is ``""``), so a value never changes type because rows were appended. Row numbers count data rows from 1
in file order; for CSV the header is not counted (row 1 is the line after it) and each row's first line in
the file is kept too, for messages (a quoted field can span lines).
"""

from __future__ import annotations

import csv
import functools
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMATS = ("csv", "json", "parquet", "disk")
_SUFFIXES = {
    ".csv": "csv",
    ".tsv": "csv",
    ".jsonl": "json",
    ".json": "json",
    ".ndjson": "json",
    ".parquet": "parquet",
    ".pq": "parquet",
}


@dataclass(frozen=True)
class Table:
    """The rows of a data file.

    Attributes:
        path: The file (or saved-dataset directory) as resolved.
        format: ``"csv"``, ``"json"``, ``"parquet"`` or ``"disk"``.
        columns: Column names in file order.
        rows: One dict per data row, in file order (do not mutate: tables are cached per process).
        lines: For CSV, the file line each row starts on (1-based, header included); else None.

    """

    path: str
    format: str
    columns: tuple[str, ...]
    rows: tuple[dict[str, Any], ...]
    lines: tuple[int, ...] | None = None

    def where(self, row: int) -> str:
        """How a message names 1-based data row ``row``: ``"5"``, or ``"5 (line 6)"`` for CSV."""
        if self.lines is None or not 0 < row <= len(self.lines):
            return str(row)
        return f"{row} (line {self.lines[row - 1]})"


def detect_format(path: Path, fmt: str | None) -> str:
    """The format to read ``path`` as: ``fmt`` if given, else from the suffix (a directory: ``"disk"``).

    Raises:
        ValueError: For an unknown suffix (naming the ones known and the ``format`` option).

    """
    if fmt is not None:
        return fmt
    if path.is_dir():
        return "disk"
    found = _SUFFIXES.get(path.suffix.lower())
    if found is None:
        known = ", ".join(sorted(_SUFFIXES))
        raise ValueError(
            f"path {str(path)!r}: cannot tell the format from the suffix {path.suffix!r} (known: {known}); "
            f"set env.options.format to one of {FORMATS}"
        )
    return found


def load_table(path: str, fmt: str | None = None, source_split: str | None = None) -> Table:
    """Read a data file (cached per process while the file's size and modification time are unchanged).

    Args:
        path: A file, or a directory written by ``Dataset.save_to_disk``/``DatasetDict.save_to_disk``.
        fmt: One of :data:`FORMATS`, or None to tell from ``path``.
        source_split: For a saved ``DatasetDict``: the split to read (needed when it has several).

    Raises:
        ValueError: If the path does not exist, the format is unknown, or the file does not parse (the
            loader's message is kept).

    """
    resolved = Path(path).expanduser().resolve()
    if not resolved.exists():
        raise ValueError(
            f"path {path!r}: no such file or directory (resolved to {resolved}); fix env.options.path"
        )
    fmt = detect_format(resolved, fmt)
    stat = resolved.stat()
    return _load_cached(str(resolved), fmt, source_split, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _load_cached(path: str, fmt: str, source_split: str | None, mtime_ns: int, size: int) -> Table:
    """Load once per (file, format, split, version): the trainer, evals and reports each build the env."""
    del mtime_ns, size  # part of the cache key only: a changed file is read again
    import datasets  # imported here: `rltk envs list` and the other envs need not pay for it

    bars = datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # a 2,000-row file needs no progress bar in every env build
    try:
        ds = _read(datasets, path, fmt, source_split)
    except ValueError:
        raise
    except Exception as exc:  # pandas / pyarrow errors: keep their message, say which file and format
        raise ValueError(
            f"could not read {path} as {fmt}: {type(exc).__name__}: {exc}; fix the file or env.options.format"
        ) from exc
    finally:
        if not bars:
            datasets.enable_progress_bars()
    rows = tuple(ds.to_list())
    lines = _csv_lines(path, len(rows)) if fmt == "csv" else None
    return Table(path, fmt, tuple(ds.column_names), rows, lines)


def _read(datasets: Any, path: str, fmt: str, source_split: str | None) -> Any:
    """The ``datasets.Dataset`` of one file or saved directory, built in a temporary cache."""
    if fmt == "disk":
        loaded = datasets.load_from_disk(path, keep_in_memory=True)
        if isinstance(loaded, datasets.DatasetDict):
            names = list(loaded)
            if source_split is None and len(names) == 1:
                source_split = names[0]
            if source_split not in loaded:
                raise ValueError(
                    f"{path} is a saved DatasetDict with splits {names}; set env.options.source_split to "
                    f"the one to read (got {source_split!r})"
                )
            return loaded[source_split]
        return loaded
    kwargs: dict[str, Any] = {}
    if fmt == "csv":
        kwargs = _csv_kwargs(datasets, path)
    with tempfile.TemporaryDirectory(prefix="rltk-dataset-") as cache:
        return datasets.load_dataset(
            fmt, data_files=path, split="train", cache_dir=cache, keep_in_memory=True, **kwargs
        )


def _csv_kwargs(datasets: Any, path: str) -> dict[str, Any]:
    """Every column as text (the header read first), the separator from the suffix, no NA guessing."""
    sep = "\t" if path.lower().endswith(".tsv") else ","
    with open(path, newline="", encoding="utf-8-sig") as f:
        header = next(csv.reader(f, delimiter=sep), None)
    if not header:
        raise ValueError(f"{path}: no header row; the first line of a CSV must name its columns")
    repeated = sorted({c for c in header if header.count(c) > 1})
    if repeated:
        raise ValueError(f"{path}: the header names columns {repeated} more than once; rename them")
    features = datasets.Features({c: datasets.Value("string") for c in header})
    return {"features": features, "keep_default_na": False, "sep": sep}


def _csv_lines(path: str, n_rows: int) -> tuple[int, ...] | None:
    """The file line each data row starts on, read by Python's csv module; None if it counts other rows."""
    sep = "\t" if path.lower().endswith(".tsv") else ","
    starts: list[int] = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter=sep)
        next(reader, None)
        end = reader.line_num
        for record in reader:
            if record:  # blank lines are skipped, as the loader skips them
                starts.append(end + 1)
            end = reader.line_num
    return tuple(starts) if len(starts) == n_rows else None
