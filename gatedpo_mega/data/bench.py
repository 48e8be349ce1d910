"""Tokenizing throughput: ``python -m gatedpo_mega.data.bench SOURCE [TOKENIZER]`` prints records/s for
``data.num_proc`` 1 and 2 (reading, parsing, batched encoding, truncation; no cache). Prints, never asserts."""

from __future__ import annotations

import sys
import tempfile
import time

from gatedpo_mega.data.config import DataConfig
from gatedpo_mega.data.pipeline import resolve_tokenizer, tokenize


def main(argv: list[str]) -> None:
    source = argv[0] if argv else "builtin"
    tokenizer = argv[1] if len(argv) > 1 else "builtin"
    with tempfile.TemporaryDirectory() as cache:
        print(f"{'num_proc':>8} {'records':>8} {'seconds':>8} {'records/s':>10}   {source} / {tokenizer}")
        for num_proc in (1, 2):
            cfg = DataConfig(source=source, tokenizer=tokenizer, cache_dir=cache, num_proc=num_proc,
                             max_length=1024, max_prompt_length=512)  # fmt: skip
            tok = resolve_tokenizer(cfg, 0)
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                _, _, report = tokenize(cfg, tok, seed=0)
                best = min(best, time.perf_counter() - t0)
            print(f"{num_proc:>8} {report.records:>8} {best:>8.3f} {report.records / best:>10.0f}")


if __name__ == "__main__":
    main(sys.argv[1:])
