"""Bad input: one line naming file, line (or row) and field, exit code 2; or counted under on_bad_record: skip."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gatedpo_mega.data import DataConfig, DataError, load_preference_data
from gatedpo_mega.data.cli import main
from gatedpo_mega.errors import UserError

GOOD = {"prompt": "What is 2 plus 2?", "chosen": " 4.", "rejected": " 5."}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("err-cache")


def run_cli(
    capsys: pytest.CaptureFixture[str], cache_dir: Path, source: Path, *extra: str
) -> tuple[int, str]:
    capsys.readouterr()  # drop what setting up the case printed
    rc = main(["data", "inspect", f"data.source={source}", f"data.cache_dir={cache_dir}", *extra])
    err = capsys.readouterr().err
    return rc, err


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def assert_one_line(rc: int, err: str, *parts: str) -> None:
    assert rc == 2, err
    assert err.startswith("gatedpo: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for p in parts:
        assert p in err, (p, err)


def test_missing_file(capsys, cache_dir: Path, tmp_path: Path) -> None:
    rc, err = run_cli(capsys, cache_dir, tmp_path / "nope.jsonl")
    assert_one_line(rc, err, "nope.jsonl", "does not exist")


def test_truncated_gzip(capsys, cache_dir: Path, tmp_path: Path) -> None:
    data = gzip.compress(("\n".join(json.dumps(GOOD) for _ in range(2000)) + "\n").encode())
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    rc, err = run_cli(capsys, cache_dir, path)
    assert_one_line(rc, err, "cut.jsonl.gz line ", "gzip stream is truncated")


def test_line_not_json(capsys, cache_dir: Path, tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "a.jsonl", [json.dumps(GOOD), '{"prompt": "x", "chosen": ', json.dumps(GOOD)]
    )
    rc, err = run_cli(capsys, cache_dir, path)
    assert_one_line(rc, err, "a.jsonl line 2: not valid JSON", "on_bad_record")


def test_missing_column(capsys, cache_dir: Path, tmp_path: Path) -> None:
    path = write_lines(tmp_path / "a.jsonl", [json.dumps(GOOD), json.dumps({"prompt": "p", "chosen": " c"})])
    rc, err = run_cli(capsys, cache_dir, path)
    assert_one_line(rc, err, "a.jsonl line 2: missing field 'rejected'", "data.rejected_field")


def test_wrong_type(capsys, cache_dir: Path, tmp_path: Path) -> None:
    path = write_lines(tmp_path / "a.jsonl", [json.dumps({**GOOD, "chosen": 7})])
    rc, err = run_cli(capsys, cache_dir, path)
    assert_one_line(rc, err, "a.jsonl line 1: field 'chosen' must be a string", "got int")


def test_wrong_type_in_parquet_names_the_row(capsys, cache_dir: Path, tmp_path: Path) -> None:
    import datasets

    path = tmp_path / "a.parquet"
    datasets.Dataset.from_list([GOOD, {**GOOD, "rejected": None}]).to_parquet(str(path))
    rc, err = run_cli(capsys, cache_dir, path)
    assert_one_line(rc, err, "a.parquet row 1: field 'rejected' must be a string, got null")


def test_corrupt_parquet(capsys, cache_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "a.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    rc, err = run_cli(capsys, cache_dir, path)
    assert_one_line(rc, err, "a.parquet: not a readable Parquet file")


def test_bad_tokenizer_path(capsys, cache_dir: Path, tmp_path: Path) -> None:
    path = write_lines(tmp_path / "a.jsonl", [json.dumps(GOOD)])
    rc, err = run_cli(capsys, cache_dir, path, f"data.tokenizer={tmp_path / 'missing.model'}")
    assert_one_line(rc, err, "data.tokenizer", "missing.model", "no such file")


def test_skip_counts_and_reports(capsys, cache_dir: Path, tmp_path: Path) -> None:
    lines = [json.dumps(GOOD)] * 5 + [
        "not json",
        "[1, 2]",
        json.dumps({"prompt": "p"}),
        json.dumps({**GOOD, "chosen": 1}),
    ]
    path = write_lines(tmp_path / "a.jsonl", lines)
    rc = main(
        ["data", "inspect", f"data.source={path}", f"data.cache_dir={cache_dir}", "data.on_bad_record=skip"]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "records read 9, kept 5" in out
    for reason in ("not_json: 1", "not_object: 1", "missing_field: 1", "wrong_type: 1"):
        assert f"dropped {reason}" in out, out
    assert "a.jsonl line 6: not valid JSON" in out


def test_skip_keeps_records_before_a_truncated_gzip(cache_dir: Path, tmp_path: Path) -> None:
    data = gzip.compress(("\n".join(json.dumps(GOOD) for _ in range(3000)) + "\n").encode())
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    cfg = DataConfig(source=str(path), cache_dir=str(cache_dir), on_bad_record="skip", eval_fraction=0.0)
    d = load_preference_data(cfg, seed=0)
    assert d.report.dropped == {"unreadable_file": 1} and 0 < d.report.kept < 3000


def test_no_usable_pairs_is_an_error(cache_dir: Path, tmp_path: Path) -> None:
    path = write_lines(tmp_path / "a.jsonl", [json.dumps({**GOOD, "chosen": "  "})])
    with pytest.raises(DataError, match=r"no usable training pairs.*empty_response 1"):
        load_preference_data(DataConfig(source=str(path), cache_dir=str(cache_dir)), seed=0)


@pytest.mark.slow
def test_real_process_prints_one_line(cache_dir: Path, tmp_path: Path) -> None:
    path = write_lines(tmp_path / "a.jsonl", ["{oops"])
    cmd = [sys.executable, "-m", "gatedpo_mega.data.cli", "data", "inspect", f"data.source={path}"]
    cmd.append(f"data.cache_dir={cache_dir}")
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"gatedpo: error: {path} line 1: not valid JSON (Expecting property name enclosed in double quotes) "
        "(data.on_bad_record: skip counts such records and goes on)"
    )


# ---------------------------------------------------------------------------------------------------------------
# Property: random byte-level corruption never escapes as anything but a UserError


def _sample_bytes(n: int = 40) -> bytes:
    recs = [
        {"prompt": f"Question {i}?", "chosen": f" answer {i}", "rejected": f" wrong {i + 1}"}
        for i in range(n)
    ]
    return ("\n".join(json.dumps(r) for r in recs) + "\n").encode()


PLAIN = _sample_bytes()
GZ = gzip.compress(PLAIN, mtime=0)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    gz=st.booleans(),
    edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=6),
    cut=st.one_of(st.none(), st.floats(0, 1)),
    skip=st.booleans(),
)
def test_random_corruption_never_crashes(cache_dir: Path, gz: bool, edits, cut, skip: bool) -> None:
    data = bytearray(GZ if gz else PLAIN)
    for pos, byte in edits:
        data[int(pos * len(data))] = byte
    if cut is not None:
        data = data[: int(cut * len(data))]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("data.jsonl.gz" if gz else "data.jsonl")
        path.write_bytes(bytes(data))
        cfg = DataConfig(
            source=str(path), cache_dir=str(cache_dir), on_bad_record="skip" if skip else "error"
        )
        try:
            d = load_preference_data(cfg, seed=0)
        except UserError as e:
            assert "\n" not in str(e) and str(e)
            return
        r = d.report
        assert r.kept + sum(v for k, v in r.dropped.items() if k != "unreadable_file") == r.records
