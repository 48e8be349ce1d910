"""Exported tokenizers: ``AutoTokenizer`` loads the folder and it encodes exactly as training did.

The built-in tokenizer through a real run and ``convert zero-to-hf``; a tokenizer from ``gatedpo data
train-tokenizer`` and SentencePiece models of other kinds (BPE, NFKC normalisation, a dummy prefix, no byte
fallback) through the export function itself.
"""

import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from distributed import run_distributed

from gatedpo_mega.cli import main
from gatedpo_mega.config import load_config
from gatedpo_mega.convert import ConvertError
from gatedpo_mega.convert.tokenizer import PROBE, classify, spm_to_hf, write_tokenizer
from gatedpo_mega.data import builtin
from gatedpo_mega.data.pipeline import encode_examples, load_preference_data, resolve_tokenizer
from gatedpo_mega.data.tokenizer import load_tokenizer
from gatedpo_mega.formats import HF_TOKENIZER, HF_TOKENIZER_CONFIG, SPM_MODEL

# Unicode, whitespace runs, digits, and characters no tokenizer here was trained on (byte fallback).
STRINGS = (
    *PROBE,
    "\n\nHuman: Sort these words alphabetically: plum, apple, zebra.\n\nAssistant: apple, plum, zebra.",
    "tab\there\r\nwindows line\u3000ideographic space",
    "          ten spaces, then\n\n\n\n\nfive newlines",
    "12345678901234567890 00007 ٣٤٥ ৪৫",
    "\U0001f9ea \U0001d518\U0001d52b\U0001d526 \ue000 \x07 \u0301e \ufeff \U00010348",
    "Ωμέγα Привет мир שלום مرحبا नमस्ते",
)


def assert_same_ids(folder: Path, model: Path, texts=STRINGS) -> None:
    """``AutoTokenizer`` on ``folder`` gives SentencePiece's ids; BOS first with special tokens, no EOS."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(model))
    hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert len(hf) == sp.get_piece_size()
    for text in texts:
        ids = list(sp.encode(text))
        assert hf(text, add_special_tokens=False)["input_ids"] == ids, text
        bos = [sp.bos_id()] if sp.bos_id() >= 0 else []
        assert hf(text)["input_ids"] == bos + ids, text
        if sp.unk_id() not in ids:  # SentencePiece decodes an unknown piece as " ⁇ ", Hugging Face as "<unk>"
            assert hf.decode(ids) == sp.decode(ids), text
    assert hf.eos_token_id == sp.eos_id()


@pytest.mark.multiprocess
@pytest.mark.slow
def test_zero_to_hf_of_a_builtin_run_writes_a_tokenizer_that_encodes_like_training(tmp_path, capsys):
    """One step on the built-in data, then ``zero-to-hf``: the folder's tokenizer gives the training tokenizer's ids
    on every test string and tokenizes the run's data into the very pairs training used; with the tokenizer cache
    gone, the export trains it again and writes the same files."""
    from convert_helpers import train_worker

    run = tmp_path / "run"
    overrides = [
        "model.num_layers=1", "model.hidden_size=32", "model.num_attention_heads=4", "model.num_query_groups=2",
        "model.ffn_hidden_size=64", "train.max_steps=1", "train.micro_batch_size=2", "train.global_batch_size=2",
        "train.warmup_steps=0", "data.builtin_pairs=24", "data.max_length=48", "data.max_prompt_length=32",
        "data.eval_fraction=0", f"data.cache_dir={tmp_path / 'cache'}", f"train.output_dir={run}",
    ]  # fmt: skip
    run_distributed(train_worker, 1, overrides)
    out = tmp_path / "hf"
    capsys.readouterr()
    assert main(["convert", "zero-to-hf", "--src", str(run), "--dst", str(out)]) == 0
    assert "tokenizer from the built-in tokenizer (data.seed 0)" in capsys.readouterr().out
    cfg = load_config(None, overrides)
    trained = resolve_tokenizer(cfg.data, cfg.train.seed)
    assert_same_ids(out, Path(trained.path))
    assert (out / SPM_MODEL).read_bytes() == Path(trained.path).read_bytes()

    # The run's own pairs again, from the exported folder used as data.tokenizer (BOS, EOS, truncation included).
    examples = builtin.generate(24, 0)
    hf = load_tokenizer(str(out))
    assert (hf.bos_id, hf.eos_id, hf.pad_id, hf.vocab_size) == (
        trained.bos_id, trained.eos_id, trained.pad_id, trained.vocab_size,
    )  # fmt: skip
    assert encode_examples(hf, examples, 1) == encode_examples(trained, examples, 1)
    again = dataclasses.replace(cfg.data, tokenizer=str(out), cache_dir=str(tmp_path / "cache2"))
    ours, theirs = load_preference_data(again, seed=0).train, load_preference_data(cfg.data, seed=0).train
    assert [ours[i] for i in range(len(ours))] == [theirs[i] for i in range(len(theirs))]

    Path(trained.path).unlink()  # the cache is gone: the export trains the built-in tokenizer again
    assert main(["convert", "zero-to-hf", "--src", str(run), "--dst", str(tmp_path / "hf2")]) == 0
    assert "trained again" in capsys.readouterr().out
    for name in (HF_TOKENIZER, HF_TOKENIZER_CONFIG, SPM_MODEL):
        assert (tmp_path / "hf2" / name).read_bytes() == (out / name).read_bytes(), name


def test_a_tokenizer_from_train_tokenizer_exports_to_the_same_ids(tmp_path):
    """``gatedpo data train-tokenizer`` on a small JSONL file, then the export: the folder loads without
    ``tokenizer.model`` (``tokenizer.json`` is the whole tokenizer), without sentencepiece or protobuf, and gives
    SentencePiece's ids."""
    records = [
        {"prompt": f"Question {i}: how much is {i} times {i + 3}?", "chosen": f" It is {i * (i + 3)}.",
         "rejected": f" Maybe {i + 1}, or näive guess {i}!"}
        for i in range(200)
    ]  # fmt: skip
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    rc = main(["data", "train-tokenizer", f"data.source={data}", f"data.cache_dir={tmp_path / 'cache'}",
               "--vocab-size", "300", "--output", str(tmp_path / "tok")])  # fmt: skip
    assert rc == 0
    source = classify(tmp_path / "tok", "test")
    assert source is not None and source.kind == "sentencepiece"
    out = tmp_path / "hf"
    assert write_tokenizer(source, out) == [
        HF_TOKENIZER,
        HF_TOKENIZER_CONFIG,
        "special_tokens_map.json",
        SPM_MODEL,
    ]
    (out / SPM_MODEL).unlink()
    texts = (*STRINGS, *(r[k] for r in records[:20] for k in ("prompt", "chosen", "rejected")))
    assert_same_ids(out, source.path, texts)

    # Loading imports neither sentencepiece nor protobuf: stand-ins that fail on import shadow both.
    for name in ("sentencepiece", "google/protobuf"):
        (tmp_path / "stub" / name).mkdir(parents=True)
        (tmp_path / "stub" / name / "__init__.py").write_text(f"raise ImportError('{name} imported')\n")
    code = (
        "from transformers import AutoTokenizer; "
        f"print(AutoTokenizer.from_pretrained({str(out)!r})({STRINGS[2]!r})['input_ids'])"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "stub")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(source.path))
    assert done.stdout.strip() == str([sp.bos_id(), *sp.encode(STRINGS[2])])


def _spm(tmp_path: Path, **options) -> Path:
    import sentencepiece as spm

    texts = [*builtin.corpus(builtin.generate(800, 1)), "Ünïcödé café naïve ＦＵＬＬ ① ﬁ", "Ωμέγα Привет"]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=buf, num_threads=1, minloglevel=2,
                                   hard_vocab_limit=False, **options)  # fmt: skip
    path = tmp_path / "user.model"
    path.write_bytes(buf.getvalue())
    return path


@pytest.mark.parametrize(
    "options",
    [
        dict(
            model_type="unigram", vocab_size=400
        ),  # SentencePiece's defaults: NFKC, dummy prefix, no byte pieces
        dict(model_type="bpe", vocab_size=400, byte_fallback=True, user_defined_symbols=["<sep>"]),
        dict(model_type="bpe", vocab_size=300, pad_id=3, bos_id=-1, normalization_rule_name="nfkc_cf"),
    ],
    ids=["unigram-defaults", "bpe-bytes-user-symbol", "bpe-no-bos-casefold"],
)
def test_other_sentencepiece_models_export_to_the_same_ids(options, tmp_path):
    model = _spm(tmp_path, **options)
    out = tmp_path / "hf"
    write_tokenizer(classify(model, "test"), out)
    assert_same_ids(out, model, (*STRINGS, "a<sep>b <sep>"))


def test_a_hugging_face_folder_is_copied_as_it_is_and_specials_in_text(tmp_path):
    """A Hugging Face tokenizer folder (as training may use) is copied byte for byte. Text spelling a special piece
    is that piece, as in every Hugging Face tokenizer (SentencePiece spells it out): the one known difference."""
    from transformers import AutoTokenizer

    model = _spm(tmp_path, model_type="unigram", vocab_size=500, byte_fallback=True)
    first = tmp_path / "first"
    write_tokenizer(classify(model, "test"), first)
    second = tmp_path / "second"
    source = classify(first, "test")
    assert source is not None and source.kind == "hf"
    write_tokenizer(source, second)
    assert sorted(p.name for p in second.iterdir()) == sorted(p.name for p in first.iterdir())
    for p in first.iterdir():
        assert (second / p.name).read_bytes() == p.read_bytes()
    hf = AutoTokenizer.from_pretrained(str(second))
    assert hf("a</s>", add_special_tokens=False)["input_ids"][-1] == hf.eos_token_id


def test_refusals_are_one_line(tmp_path, capsys):
    word = _spm(tmp_path, model_type="word", vocab_size=300)
    with pytest.raises(ConvertError, match="a SentencePiece word model; only unigram and bpe"):
        spm_to_hf(word.read_bytes(), str(word))
    (tmp_path / "junk.model").write_bytes(b"\xff\x00not a model")
    with pytest.raises(ConvertError, match=r"junk\.model: not a SentencePiece model"):
        spm_to_hf((tmp_path / "junk.model").read_bytes(), str(tmp_path / "junk.model"))
    capsys.readouterr()
    rc = main(["convert", "mcore-to-hf", "--src", str(tmp_path / "none"), "--dst", str(tmp_path / "out"),
               "--tokenizer", str(tmp_path / "empty")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "empty: no tokenizer there" in err[0], err
