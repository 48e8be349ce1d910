"""Where the test suite's time goes, from pytest's JUnit XML (``pytest --junitxml=FILE``): one row per test file
(tests, seconds, share), the slowest tests, and, given a second file, the two side by side.

    python tools/test_durations.py after.xml [--before before.xml] [--top 15]

The seconds of a test are pytest's: its setup (fixtures it is the first to use), call and teardown."""

from __future__ import annotations

import argparse
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path


def read(path: Path) -> dict[str, float]:
    """``{test id: seconds}`` of every test case in a JUnit XML file (skipped ones included, at their time)."""
    cases: dict[str, float] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        module = case.get("classname", "").split(".")
        file = "/".join(module[:2]) + ".py" if len(module) >= 2 else case.get("file", "?")
        cases[f"{file}::{case.get('name')}"] = float(case.get("time", "0"))
    return cases


def by_file(cases: dict[str, float]) -> dict[str, tuple[int, float]]:
    files: dict[str, list[float]] = defaultdict(list)
    for test, seconds in cases.items():
        files[test.split("::")[0]].append(seconds)
    return {f: (len(s), sum(s)) for f, s in files.items()}


def table(after: dict[str, float], before: dict[str, float] | None) -> str:
    a = by_file(after)
    b = by_file(before) if before else {}
    total_a = sum(s for _, s in a.values())
    if b:
        total_b = sum(s for _, s in b.values())
        rows = [
            "| file | tests before | s before | tests after | s after | ratio |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for f in sorted(set(a) | set(b), key=lambda f: -b.get(f, (0, 0.0))[1]):
            nb, sb = b.get(f, (0, 0.0))
            na, sa = a.get(f, (0, 0.0))
            ratio = f"{sb / sa:.1f}x" if sa > 0 and sb > 0 else "-"
            rows.append(f"| {f} | {nb} | {sb:.0f} | {na} | {sa:.0f} | {ratio} |")
        n_b, n_a = sum(n for n, _ in b.values()), sum(n for n, _ in a.values())
        rows.append(
            f"| **total** | {n_b} | {total_b:.0f} | {n_a} | {total_a:.0f} | {total_b / total_a:.1f}x |"
        )
        return "\n".join(rows)
    rows = ["| file | tests | seconds | share |", "|---|---:|---:|---:|"]
    for f, (n, s) in sorted(a.items(), key=lambda kv: -kv[1][1]):
        rows.append(f"| {f} | {n} | {s:.0f} | {100 * s / total_a:.0f}% |")
    rows.append(f"| **total** | {sum(n for n, _ in a.values())} | {total_a:.0f} | 100% |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("after", type=Path, help="JUnit XML of the run to describe")
    p.add_argument("--before", type=Path, help="JUnit XML of an earlier run, for a side-by-side table")
    p.add_argument("--top", type=int, default=15, help="how many of the slowest tests to list (default 15)")
    args = p.parse_args(argv)
    after = read(args.after)
    before = read(args.before) if args.before else None
    print(table(after, before))
    print(f"\nslowest {args.top}:")
    for test, seconds in sorted(after.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"{seconds:8.1f} s  {test}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
