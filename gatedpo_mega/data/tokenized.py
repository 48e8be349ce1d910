"""Tokenized pairs in flat arrays, and the report of what was kept and dropped."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np


class Pair(NamedTuple):
    prompt: list[int]
    chosen: list[int]  # response ids, EOS included where it survived truncation
    rejected: list[int]


class TokenizedPairs:
    """``len(pairs)`` pairs; pair ``i`` (its index is its position) is ``tokens[offsets[i, 0]:offsets[i, 1]]``
    (prompt), ``[1]:[2]`` (chosen), ``[2]:[3]`` (rejected). ``source_index`` is the record's index in the input."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, source_index: np.ndarray) -> None:
        self.tokens = tokens
        self.offsets = offsets
        self.source_index = source_index

    @classmethod
    def from_pairs(cls, pairs: list[Pair], source_index: list[int]) -> TokenizedPairs:
        offsets = np.zeros((len(pairs), 4), dtype=np.int64)
        pos = 0
        for i, (p, c, r) in enumerate(pairs):
            offsets[i] = (pos, pos + len(p), pos + len(p) + len(c), pos + len(p) + len(c) + len(r))
            pos = int(offsets[i, 3])
        flat = [t for pair in pairs for part in pair for t in part]
        return cls(np.asarray(flat, dtype=np.int32), offsets, np.asarray(source_index, dtype=np.int64))

    def __len__(self) -> int:
        return int(self.offsets.shape[0])

    def __getitem__(self, i: int) -> Pair:
        a, b, c, d = (int(x) for x in self.offsets[i])
        t = self.tokens
        return Pair(t[a:b].tolist(), t[b:c].tolist(), t[c:d].tolist())

    @property
    def prompt_lengths(self) -> np.ndarray:
        return self.offsets[:, 1] - self.offsets[:, 0]

    @property
    def chosen_lengths(self) -> np.ndarray:
        return self.offsets[:, 2] - self.offsets[:, 1]

    @property
    def rejected_lengths(self) -> np.ndarray:
        return self.offsets[:, 3] - self.offsets[:, 2]

    @property
    def row_lengths(self) -> np.ndarray:
        """The longer of the pair's two rows (prompt + response): the key for length bucketing."""
        return self.prompt_lengths + np.maximum(self.chosen_lengths, self.rejected_lengths)

    def subset(self, indices: np.ndarray) -> TokenizedPairs:
        return TokenizedPairs.from_pairs([self[int(i)] for i in indices], self.source_index[indices].tolist())

    def save(self, path: Path) -> None:
        with path.open("wb") as fh:
            np.savez(fh, tokens=self.tokens, offsets=self.offsets, source_index=self.source_index)

    @classmethod
    def load(cls, path: Path) -> TokenizedPairs:
        with np.load(path) as z:
            return cls(z["tokens"], z["offsets"], z["source_index"])


@dataclass(slots=True)
class DataReport:
    """What happened to every input record: ``records == kept + sum(dropped.values())`` always holds (a damaged
    file is refused, never counted)."""

    source: str
    records: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)  # the first few bad-record messages (skip mode)
    train: int = 0
    eval: int = 0
    truncated: dict[str, int] = field(default_factory=dict)  # kept pairs whose prompt / a response was cut

    def drop(self, reason: str, message: str | None = None) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        if message is not None and len(self.examples) < 5:
            self.examples.append(message)

    @property
    def total_dropped(self) -> int:
        return sum(self.dropped.values())

    def format(self) -> str:
        lines = [
            f"data: {self.source}",
            f"  records read {self.records}, kept {self.kept} (train {self.train}, eval {self.eval}), "
            f"dropped {self.total_dropped}",
        ]
        lines += [f"    dropped {reason}: {n}" for reason, n in sorted(self.dropped.items())]
        if self.truncated:
            lines.append(
                f"  truncated (kept): prompt {self.truncated.get('prompt', 0)}, "
                f"response {self.truncated.get('response', 0)}"
            )
        lines += [f"    e.g. {m}" for m in self.examples]
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> DataReport:
        return cls(**json.loads(text))
