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


def _varied_lines(n: int) -> bytes:
    """Records that compress to many deflate blocks (identical lines would compress to almost nothing)."""
    recs = [
        {"prompt": f"Question {i} about {i * 7919 % 1000}?", "chosen": f" a{i}", "rejected": f" b{i}"}
        for i in range(n)
    ]
    return ("\n".join(json.dumps(r) for r in recs) + "\n").encode()


@pytest.mark.parametrize("mode", ["error", "skip"])
def test_truncated_gzip(capsys, cache_dir: Path, tmp_path: Path, mode: str) -> None:
    data = gzip.compress(_varied_lines(3000), mtime=0)
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    rc, err = run_cli(capsys, cache_dir, path, f"data.on_bad_record={mode}")
    assert_one_line(rc, err, "cut.jsonl.gz line ", "looks corrupted", "truncated")


@pytest.mark.parametrize("mode", ["error", "skip"])
def test_gzip_with_flipped_bytes_is_refused(capsys, cache_dir: Path, tmp_path: Path, mode: str) -> None:
    """Deflate turns flipped bytes into garbage lines before the CRC reports them: the file is refused as
    corrupted in both modes, never read as bad JSON records."""
    data = bytearray(gzip.compress(_varied_lines(3000), mtime=0))
    for k in range(5):
        data[len(data) // 2 + 7 * k] ^= 0xFF
    path = tmp_path / "flipped.jsonl.gz"
    path.write_bytes(bytes(data))
    rc, err = run_cli(capsys, cache_dir, path, f"data.on_bad_record={mode}")
    assert_one_line(rc, err, "flipped.jsonl.gz line ", "the gzip file looks corrupted")
    assert "JSON" not in err and "UTF-8" not in err, err


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


LONE_SURROGATES = ["\\ud800", "\\udfff"]  # JSON escapes that json.loads turns into an unencodable str


@pytest.mark.parametrize("escape", LONE_SURROGATES)
@pytest.mark.parametrize("field", ["prompt", "chosen", "rejected"])
def test_lone_surrogate_is_a_bad_record(
    capsys, cache_dir: Path, tmp_path: Path, escape: str, field: str
) -> None:
    bad = json.dumps({**GOOD, field: "ab"}).replace('"ab"', f'"a{escape}b"')
    path = write_lines(tmp_path / "a.jsonl", [json.dumps(GOOD), bad])
    rc, err = run_cli(capsys, cache_dir, path)
    assert_one_line(rc, err, f"a.jsonl line 2: field '{field}' holds a lone surrogate", "at character 1")


@pytest.mark.parametrize("escape", LONE_SURROGATES)
@pytest.mark.parametrize("field", ["prompt", "chosen", "rejected"])
def test_skip_counts_lone_surrogates(cache_dir: Path, tmp_path: Path, escape: str, field: str) -> None:
    bad = json.dumps({**GOOD, field: "ab"}).replace('"ab"', f'"a{escape}b"')
    path = write_lines(tmp_path / "a.jsonl", [json.dumps(GOOD), bad, json.dumps(GOOD)])
    cfg = DataConfig(source=str(path), cache_dir=str(cache_dir), on_bad_record="skip", eval_fraction=0.0)
    r = load_preference_data(cfg, seed=0).report
    assert (r.records, r.kept, r.dropped) == (3, 2, {"invalid_unicode": 1})
    assert r.examples == [
        f"{path} line 2: field '{field}' holds a lone surrogate (invalid unicode) at character 1"
    ]


@pytest.mark.parametrize("kind", ["transcript", "message"])
def test_lone_surrogate_in_hh_and_chat_records(capsys, cache_dir: Path, tmp_path: Path, kind: str) -> None:
    if kind == "transcript":
        rec = {"chosen": "\n\nHuman: hi\n\nAssistant: ok", "rejected": "\n\nHuman: hi\n\nAssistant: XX"}
        name = "rejected"
    else:
        turn = [{"role": "user", "content": "hi"}]
        rec = {
            "chosen": [*turn, {"role": "assistant", "content": "ok"}],
            "rejected": [*turn, {"role": "assistant", "content": "XX"}],
        }
        name = "rejected[1].content"
    path = write_lines(tmp_path / "a.jsonl", [json.dumps(rec).replace("XX", "X\\udc00")])
    rc, err = run_cli(capsys, cache_dir, path)
    assert_one_line(rc, err, f"a.jsonl line 1: field '{name}' holds a lone surrogate")


def test_train_tokenizer_skips_lone_surrogates(capsys, cache_dir: Path, tmp_path: Path) -> None:
    """The tokenizer is trained on validated records only: a lone surrogate never reaches SentencePiece."""
    lines = [
        json.dumps({"prompt": f"Question {i}?", "chosen": f" yes {i}", "rejected": f" no {i}"})
        for i in range(50)
    ]
    lines.append(json.dumps(GOOD).replace('" 4."', '" 4\\ud800."'))
    path = write_lines(tmp_path / "a.jsonl", lines)
    common = [f"data.source={path}", f"data.cache_dir={cache_dir}", "--vocab-size", "300"]
    common += ["--output", str(tmp_path / "tok")]
    capsys.readouterr()
    rc = main(["data", "train-tokenizer", *common])
    err = capsys.readouterr().err
    assert_one_line(rc, err, "a.jsonl line 51: field 'chosen' holds a lone surrogate")
    rc = main(["data", "train-tokenizer", "data.on_bad_record=skip", *common])
    assert rc == 0 and (tmp_path / "tok" / "tokenizer.model").is_file()


@pytest.mark.parametrize("mode", ["error", "skip"])
def test_invalid_utf8_line_is_a_bad_record(capsys, cache_dir: Path, tmp_path: Path, mode: str) -> None:
    path = tmp_path / "a.jsonl"
    good = json.dumps(GOOD).encode()
    path.write_bytes(
        b"\n".join([good, b'{"prompt": "x\xff", "chosen": " a", "rejected": " b"}', good]) + b"\n"
    )
    rc, err = run_cli(capsys, cache_dir, path, f"data.on_bad_record={mode}")
    if mode == "error":
        assert_one_line(rc, err, "a.jsonl line 2: not valid UTF-8 (byte 13 of the line)")
    else:
        assert rc == 0 and err == "", err
        r = load_preference_data(
            DataConfig(source=str(path), cache_dir=str(cache_dir), on_bad_record="skip"), seed=0
        ).report
        assert (r.records, r.kept, r.dropped) == (3, 2, {"not_utf8": 1})


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
        assert r.kept + r.total_dropped == r.records


def test_line_numbers_count_leading_blank_lines(capsys, cache_dir: Path, tmp_path: Path) -> None:
    path = write_lines(tmp_path / "a.jsonl", ["", "  ", json.dumps(GOOD), '{"prompt": '])
    rc, err = run_cli(capsys, cache_dir, path)
    assert_one_line(rc, err, "a.jsonl line 4: not valid JSON")


def test_an_integer_of_thousands_of_digits_is_a_bad_record(capsys, cache_dir: Path, tmp_path: Path) -> None:
    huge = '{"prompt": "a", "chosen": "b", "rejected": "c", "n": ' + "7" * 5000 + "}"
    path = write_lines(tmp_path / "a.jsonl", [json.dumps(GOOD), huge])
    rc, err = run_cli(capsys, cache_dir, path)
    assert_one_line(rc, err, "a.jsonl line 2: not valid JSON (Exceeds the limit (4300 digits)")
    array = tmp_path / "b.json"
    array.write_text(f"[{json.dumps(GOOD)}, {huge}]")
    rc, err = run_cli(capsys, cache_dir, array)
    assert_one_line(rc, err, "b.json: not valid JSON (Exceeds the limit (4300 digits)")
