"""Hugging Face folders in and out, and a destination that is complete or absent.

Output is written into a temporary folder beside the destination and renamed when complete, so an error (or an
interrupt) leaves nothing at the destination.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from gatedpo_mega.convert.errors import (
    CheckpointFormatError,
    DestinationError,
    MissingTensorError,
    UnexpectedTensorError,
)
from gatedpo_mega.convert.safetensors_io import SafetensorsReader, SafetensorsWriter, nbytes
from gatedpo_mega.formats import TOKENIZER_FILES

INDEX = "model.safetensors.index.json"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6, "G": 10**9})


def parse_size(text: str) -> int:
    """``2GB`` -> 2e9 bytes, ``500MiB`` -> 500 * 2**20, ``1000`` -> 1000."""
    m = _SIZE.match(text)
    unit = m.group(2).upper() if m else ""
    if not m or unit not in _UNITS or float(m.group(1)) <= 0:
        raise DestinationError(f"--max-shard-size {text!r} is not a size (e.g. 2GB, 500MB, 1GiB)")
    return int(float(m.group(1)) * _UNITS[unit])


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointFormatError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointFormatError(f"{path}: not valid JSON ({e})") from None


@contextlib.contextmanager
def staged_destination(dst: str | Path, *, force: bool, sources: tuple[Path, ...] = ()) -> Iterator[Path]:
    """A temporary folder beside ``dst``, renamed to ``dst`` when the block completes; removed on any error.
    An existing non-empty ``dst`` is refused unless ``force`` (then replaced, only once the new one is complete)."""
    dst = Path(dst).absolute()
    for src in sources:
        s = src.resolve()
        d = dst.resolve()
        if d == s or s in d.parents or d in s.parents:
            raise DestinationError(f"destination {dst} overlaps the source {src}")
    if dst.exists() and not dst.is_dir():
        raise DestinationError(f"destination {dst} exists and is not a folder")
    if dst.is_dir() and any(dst.iterdir()) and not force:
        raise DestinationError(f"destination {dst} exists and is not empty (pass --force to replace it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)


class HFFolder(Mapping[str, torch.Tensor]):
    """The weights of a Hugging Face safetensors folder as a lazy mapping (one tensor read per item)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise CheckpointFormatError(f"{self.root}: not a folder")
        self.config: dict[str, Any] = read_json(self.root / "config.json")
        index = self.root / INDEX
        files: dict[str, list[str]] = {}
        if index.exists():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointFormatError(f"{index}: no weight_map")
            for name, file in weight_map.items():
                files.setdefault(file, []).append(name)
            listed = set(files)
            for f in sorted(self.root.glob("*.safetensors")):
                if f.name not in listed:
                    raise UnexpectedTensorError(f"{f}: shard file not listed in {INDEX}")
        elif (self.root / "model.safetensors").exists():
            files = {"model.safetensors": []}
        else:
            other = [p.name for p in self.root.glob("*.bin")] + [p.name for p in self.root.glob("*.pt")]
            hint = f" (found {', '.join(sorted(other))}: convert it to safetensors first)" if other else ""
            raise CheckpointFormatError(f"{self.root}: no model.safetensors or {INDEX}{hint}")
        self._readers: dict[str, SafetensorsReader] = {}
        self._file_of: dict[str, str] = {}
        for file, names in sorted(files.items()):
            path = self.root / file
            if not path.exists():
                raise MissingTensorError(f"{path}: shard file listed in {INDEX} is missing")
            r = SafetensorsReader(path)
            self._readers[file] = r
            have = set(r.names())
            for n in names:
                if n not in have:
                    raise MissingTensorError(f"{path}: tensor {n} listed in {INDEX} is not in the file")
            for n in r.names():
                if names and n not in names:
                    raise UnexpectedTensorError(f"{path}: tensor {n} is not listed in {INDEX}")
                if n in self._file_of:
                    raise UnexpectedTensorError(f"{path}: tensor {n} is also in {self._file_of[n]}")
                self._file_of[n] = file

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._readers[self._file_of[name]].read(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._readers[self._file_of[name]].shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self._readers[self._file_of[name]].dtype(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)

    def close(self) -> None:
        for r in self._readers.values():
            r.close()


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer and generation-config files present in ``src``; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


def plan_shards(sizes: Mapping[str, int], max_shard_size: int) -> list[list[str]]:
    """Consecutive tensors grouped into shards of at most ``max_shard_size`` bytes (a larger tensor alone)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if shards[-1] and used + size > max_shard_size:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def write_hf_weights(
    dst: Path,
    shapes: Mapping[str, tuple[int, ...]],
    dtype: torch.dtype,
    get: Mapping[str, torch.Tensor],
    *,
    max_shard_size: int,
    on_shard_done: Any = None,
) -> list[str]:
    """Sharded safetensors ``model-0000i-of-0000n.safetensors`` and ``model.safetensors.index.json``; tensors are
    read from ``get`` one at a time in ``shapes`` order, and each is written before the next is read."""
    from tqdm import tqdm

    sizes = {n: nbytes(s, dtype) for n, s in shapes.items()}
    shards = plan_shards(sizes, max_shard_size)
    weight_map: dict[str, str] = {}
    files = []
    bar = tqdm(total=sum(sizes.values()), desc="writing", unit="B", unit_scale=True, delay=2.0, leave=False)
    for k, names in enumerate(shards, 1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        w = SafetensorsWriter(dst / file, {n: (shapes[n], dtype) for n in names}, {"format": "pt"})
        try:
            for n in names:
                w.write(n, get[n])
                weight_map[n] = file
                bar.update(sizes[n])
        except BaseException:
            w.abort()
            bar.close()
            raise
        w.close()
        files.append(file)
        if on_shard_done is not None:
            on_shard_done()
    bar.close()
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    (dst / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return files


def write_generation_config(dst: Path, hf_config: Mapping[str, Any]) -> None:
    """A minimal ``generation_config.json`` from the model config's special tokens (when none was copied)."""
    if (dst / "generation_config.json").exists():
        return
    gen: dict[str, Any] = {"_from_model_config": True}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if hf_config.get(key) is not None:
            gen[key] = hf_config[key]
    try:
        import transformers

        gen["transformers_version"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    (dst / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
