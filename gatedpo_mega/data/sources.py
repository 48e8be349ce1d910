"""Raw records from files: JSON, JSONL (gzip or not), Parquet, Arrow, ``save_to_disk`` folders, Hugging Face Hub
datasets (the data files of ``data.split`` in the dataset's folder of the local Hugging Face cache: gatedpo_mega/hub.py).

Each record comes out as ``(where, dict)``, or ``(where, Bad)`` when the record itself is unusable (a line that is
not JSON, not an object, not UTF-8) so that ``data.on_bad_record: skip`` can count it and go on. Problems with a
whole file (missing, corrupt or truncated gzip, corrupt Parquet) raise :class:`DataError` in both modes: a damaged
file is refused, never partly used. A gzip file is decompressed once in full before its first record is used,
because deflate turns flipped bytes into plausible lines long before the CRC at the stream's end reports them.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gatedpo_mega.data.errors import DataError, where
from gatedpo_mega.hub import hub_id, resolve

JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".ndjson", ".ndjson.gz")
TABLE_SUFFIXES = (".parquet", ".arrow")
DATA_SUFFIXES = JSON_SUFFIXES + TABLE_SUFFIXES
HUB_DATA_FILES = tuple(f"*{s}" for s in DATA_SUFFIXES)  # what is downloaded of a Hub dataset
_SAVED_METADATA = (
    "dataset_info.json",
    "dataset_infos.json",
    "state.json",
    "dataset_dict.json",
)  # not records
# The names a split goes by in file and folder names (the Hub's conventions, as ``datasets`` infers them).
SPLIT_WORDS = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test", "testing", "eval", "evaluation"),
}
_GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True, slots=True)
class Bad:
    """A record that cannot be used; ``reason`` is the counter's key, ``message`` the one line for the user."""

    reason: str
    message: str


Record = tuple[str, dict[str, Any] | Bad]


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for s in sorted(DATA_SUFFIXES, key=len, reverse=True):
        if name.endswith(s):
            return s
    return path.suffix.lower()


def _is_saved_dataset(folder: Path) -> bool:
    return any((folder / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _names_word(path: str, word: str) -> bool:
    """``word`` stands alone in ``path``: between separators or digits, not inside a longer name (``train`` in
    ``data/train-00000-of-00001.parquet`` and ``train.jsonl``, not in ``train_prefs.parquet`` or ``constrained``)."""
    return (
        re.search(rf"(?<![A-Za-z0-9]){re.escape(word)}(?![A-Za-z]|_[A-Za-z])", path, re.IGNORECASE)
        is not None
    )


def split_names(paths: list[str]) -> list[str]:
    """The split names the paths use: a split word alone or with ``_suffix`` words (``train``, ``test_prefs``)."""
    words = "|".join(w for ws in SPLIT_WORDS.values() for w in ws)
    found = (
        re.findall(rf"(?<![A-Za-z0-9])((?:{words})(?:_[A-Za-z]+)*)(?![A-Za-z])", p, re.IGNORECASE)
        for p in paths
    )
    return sorted({name.lower() for names in found for name in names})


def split_files(paths: list[str], split: str) -> list[str]:
    """The paths (relative, in a dataset's folder) of split ``split``: those whose name or folder names it
    (``SPLIT_WORDS``, else the split's own name); when no path names any split, all of them are ``train``."""
    words = SPLIT_WORDS.get(split, (split,))
    chosen = [p for p in paths if any(_names_word(p, w) for w in words)]
    if not chosen and not split_names(paths) and split == "train":
        return list(paths)
    return chosen


def _is_hub_snapshot(folder: Path) -> bool:
    """A dataset's folder in the Hugging Face cache (``datasets--org--name/snapshots/<commit>``)."""
    return folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("datasets--")


def _snapshot_files(folder: Path, split: str, source: str) -> list[Path]:
    paths = sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.is_file() and _suffix(p) in DATA_SUFFIXES and p.name not in _SAVED_METADATA
    )
    if not paths:
        raise DataError(
            f"data.source {source}: the Hub dataset holds no data files ({', '.join(DATA_SUFFIXES)}) in {folder}"
        )
    chosen = split_files(paths, split)
    if not chosen:
        named = ", ".join(split_names(paths)) or "train (no file names a split)"
        raise DataError(f"data.source {source}: no files of split '{split}' (data.split); splits: {named}")
    return [folder / p for p in chosen]


def resolve_files(source: str, split: str = "train") -> list[Path]:
    """The local files behind ``source`` (for reading and for the cache key). A Hub dataset id is resolved to its
    folder in the Hugging Face cache (downloaded when missing and the Hub is reachable), then to ``split``'s files."""
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        if _is_saved_dataset(path):
            return sorted(p for p in path.rglob("*") if p.is_file())
        if _is_hub_snapshot(path):
            return _snapshot_files(path, split, source)
        files = sorted(p for p in path.rglob("*") if p.is_file() and _suffix(p) in DATA_SUFFIXES)
        if not files:
            raise DataError(
                f"data.source {source}: folder holds no data files ({', '.join(DATA_SUFFIXES)}) "
                "and is not a save_to_disk dataset"
            )
        return files
    return _snapshot_files(hub_dataset(source), split, source)


def hub_dataset(source: str) -> Path:
    """The folder of the Hub dataset ``source`` (an id) in the local Hugging Face cache."""
    ident = hub_id(source)
    if ident is None:
        raise DataError(f"data.source {source}: file does not exist")
    return resolve(ident, field="data.source", repo_type="dataset", patterns=HUB_DATA_FILES)


def files_digest(files: list[Path]) -> str:
    """Hash of the files' names and bytes: a changed file gives a new tokenized cache."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def read_records(source: str, *, split: str = "train") -> Iterator[Record]:
    path = Path(source).expanduser()
    files = resolve_files(source, split)
    if path.is_dir() and _is_saved_dataset(path):
        yield from _read_saved(path, split)
    else:
        for f in files:
            yield from _read_file(f)


def _read_file(path: Path) -> Iterator[Record]:
    suffix = _suffix(path)
    if suffix == ".parquet":
        yield from _read_parquet(path)
    elif suffix == ".arrow":
        yield from _read_arrow(path)
    else:
        yield from _read_json(path)


def _gzip_lines(path: Path) -> Iterator[bytes]:
    """The decompressed lines; damage (zlib error, CRC or length mismatch, cut short) is one ``DataError`` naming
    the line reached."""
    n = 0
    try:
        with gzip.open(path, "rb") as fh:
            for n, line in enumerate(fh, start=1):  # noqa: B007 (n names the damage below)
                yield line
    except EOFError:
        raise DataError(
            f"{path} line {n + 1}: the gzip file looks corrupted (its stream is truncated: file cut short?)"
        ) from None
    except (gzip.BadGzipFile, zlib.error, OSError) as e:
        raise DataError(f"{path} line {n + 1}: the gzip file looks corrupted ({_first_line(e)})") from None


def _open_bytes_lines(path: Path) -> Iterator[bytes]:
    with path.open("rb") as fh:
        gz = fh.read(2) == _GZIP_MAGIC
    if path.name.lower().endswith(".gz") and not gz:
        raise DataError(f"{path}: not a gzip file (name ends in .gz)")
    if not gz:
        try:
            with path.open("rb") as fh:
                yield from fh
        except OSError as e:
            raise DataError(f"{path}: could not be read ({_first_line(e)})") from None
        return
    for _ in _gzip_lines(path):  # the whole stream checked before any line is used
        pass
    yield from _gzip_lines(path)


def _read_json(path: Path) -> Iterator[Record]:
    lines = _open_bytes_lines(path)
    first: bytes | None = None
    blank = 0  # leading blank lines: line numbers count them
    for first in lines:
        if first.strip():
            break
        blank += 1
    if first is None or not first.strip():
        return
    if first.lstrip().startswith(b"[") and not path.name.lower().endswith((".jsonl", ".jsonl.gz")):
        yield from _read_json_array(path, b"\n" * blank + first + b"".join(lines))
        return
    for n, raw in enumerate(_chain(first, lines), start=blank + 1):
        if raw.strip():
            yield _parse_line(path, n, raw)


def _chain(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    yield first
    yield from rest


def _parse_line(path: Path, n: int, raw: bytes) -> Record:
    loc = where(str(path), n)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return loc, Bad("not_utf8", f"{loc}: not valid UTF-8 (byte {e.start} of the line)")
    try:
        obj = json.loads(text)
    except (
        ValueError,
        RecursionError,
    ) as e:  # ValueError: JSONDecodeError, or an integer of over 4300 digits
        msg = (
            e.msg
            if isinstance(e, json.JSONDecodeError)
            else "nested too deeply"
            if isinstance(e, RecursionError)
            else str(e).split(":")[0]
        )
        return loc, Bad("not_json", f"{loc}: not valid JSON ({msg})")
    if not isinstance(obj, dict):
        return loc, Bad("not_object", f"{loc}: expected a JSON object, got {type(obj).__name__}")
    return loc, obj


def _read_json_array(path: Path, data: bytes) -> Iterator[Record]:
    try:
        items = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {e.lineno}: not valid JSON ({e.msg})") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply") from None
    except ValueError as e:  # an integer of over 4300 digits
        raise DataError(f"{path}: not valid JSON ({str(e).split(':')[0]})") from None
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a JSON list of records or one record per line")
    for i, obj in enumerate(items):
        loc = where(str(path), i, unit="item")
        if isinstance(obj, dict):
            yield loc, obj
        else:
            yield loc, Bad("not_object", f"{loc}: expected a JSON object, got {type(obj).__name__}")


def _rows(name: str, rows: Iterator[dict[str, Any]]) -> Iterator[Record]:
    for i, row in enumerate(rows):
        yield where(name, i, unit="row"), row


def _read_parquet(path: Path) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    def rows() -> Iterator[dict[str, Any]]:
        try:
            pf = pq.ParquetFile(path)
            for batch in pf.iter_batches(batch_size=1024):
                yield from batch.to_pylist()
        except (pa.ArrowException, OSError, ValueError) as e:
            raise DataError(f"{path}: not a readable Parquet file ({_first_line(e)})") from None

    yield from _rows(str(path), rows())


def _read_arrow(path: Path) -> Iterator[Record]:
    import pyarrow as pa

    def rows() -> Iterator[dict[str, Any]]:
        errors: list[str] = []
        for opener in (pa.ipc.open_stream, pa.ipc.open_file):  # datasets writes streams; others write files
            try:
                with pa.memory_map(str(path)) as source:
                    table = opener(source).read_all()
            except (pa.ArrowException, OSError, ValueError) as e:
                errors.append(_first_line(e))
                continue
            for batch in table.to_batches(max_chunksize=1024):
                yield from batch.to_pylist()
            return
        raise DataError(f"{path}: not a readable Arrow file ({errors[-1]})")

    yield from _rows(str(path), rows())


def _read_saved(folder: Path, split: str) -> Iterator[Record]:
    import datasets

    try:
        ds: Any = datasets.load_from_disk(str(folder))
    except Exception as e:  # datasets raises many types for a damaged folder
        raise DataError(f"{folder}: not a readable save_to_disk dataset ({_first_line(e)})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{folder}: no split '{split}' (data.split); splits: {', '.join(ds)}")
        ds = ds[split]
    yield from _rows(str(folder), iter(ds))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__
