"""arbiter convert's tokenizer step with real SentencePiece: the script reproduces the committed
fixture files; `arbiter convert` builds tokenizer.json in Rust and checks it with SentencePiece
(through the script, --reference-only); BPE and Unigram models, with and without the dummy prefix,
with and without a character map, convert to the ids SentencePiece gives on the fidelity corpus
(whitespace runs, leading spaces, digits, CJK, emoji, combining marks, byte-fallback-only
characters, the <extra_id_N> markers) and to the same tokenizer.json as the Python converter.

Run by scripts/test.sh: ARBITER_BIN=target/debug/arbiter .venv/bin/python -m pytest tests/convert
"""
import json
import os
import subprocess
import sys

import pytest
import sentencepiece as spm

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RELEASED = os.path.join(ROOT, "tests", "fixtures", "released", "nemotron-tiny")
SCRIPT = os.path.join(ROOT, "scripts", "spm_to_tokenizer_json.py")
CORPUS = os.path.join(ROOT, "convert", "src", "fidelity_corpus.json")
ARBITER = os.environ.get("ARBITER_BIN", os.path.join(ROOT, "target", "debug", "arbiter"))


def load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def convert(tmp_path, *extra, python=True, env=None):
    out = tmp_path / "model"
    args = [ARBITER, "convert", "--input", RELEASED, "--output", str(out), *extra]
    if python:
        args += ["--python", sys.executable]
    return subprocess.run(args, capture_output=True, text=True, env=env), out


def python_converter(tmp_path, model):
    """tokenizer.json as scripts/spm_to_tokenizer_json.py writes it."""
    out = tmp_path / "script"
    subprocess.run([sys.executable, SCRIPT, "--model", model, "--corpus", CORPUS, "--out", str(out)], check=True,
                   capture_output=True)
    return load(out / "tokenizer.json")


def test_the_script_reproduces_the_committed_fixture(tmp_path):
    subprocess.run([sys.executable, SCRIPT, "--model", os.path.join(RELEASED, "tiny_nemotron.model"),
                    "--corpus", CORPUS, "--out", str(tmp_path)], check=True, capture_output=True)
    committed = os.path.join(RELEASED, "tokenizer")
    assert load(tmp_path / "tokenizer.json") == load(os.path.join(committed, "tokenizer.json"))
    ours, theirs = load(tmp_path / "sentencepiece_reference.json"), load(os.path.join(committed, "sentencepiece_reference.json"))
    for key in ["model_sha256", "pieces", "texts", "chats"]:
        assert ours[key] == theirs[key], key


def test_arbiter_convert_checks_its_tokenizer_with_sentencepiece(tmp_path):
    r, out = convert(tmp_path)
    assert r.returncode == 0, r.stderr
    assert "tokenizer.json matches SentencePiece on all 29 corpus entries" in r.stderr
    assert load(out / "tokenizer.json") == load(os.path.join(RELEASED, "tokenizer", "tokenizer.json"))
    assert not (out / ".tokenizer-work").exists()


def test_without_python_flag_a_python3_with_sentencepiece_on_path_checks_it(tmp_path):
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    assert os.path.exists(os.path.join(os.path.dirname(sys.executable), "python3"))
    r, _ = convert(tmp_path, python=False, env=env)
    assert r.returncode == 0, r.stderr
    assert "tokenizer.json matches SentencePiece on all 29 corpus entries" in r.stderr


def train(tmp_path, name, **kw):
    args = dict(input=os.path.join(ROOT, "engine", "src", "demo_corpus.txt"), model_prefix=str(tmp_path / name),
                vocab_size=400, byte_fallback=True, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
                user_defined_symbols=[f"<extra_id_{i}>" for i in range(10)], num_threads=1, minloglevel=2)
    args.update(kw)
    spm.SentencePieceTrainer.train(**args)
    return str(tmp_path / f"{name}.model")


IDENTITY = dict(normalization_rule_name="identity", remove_extra_whitespaces=False)


@pytest.mark.parametrize("name,kw", [
    ("bpe", dict(model_type="bpe", **IDENTITY)),
    ("bpe-no-dummy-prefix", dict(model_type="bpe", add_dummy_prefix=False, **IDENTITY)),
    ("unigram", dict(model_type="unigram", **IDENTITY)),
    ("unigram-no-dummy-prefix", dict(model_type="unigram", add_dummy_prefix=False, **IDENTITY)),
    ("bpe-nfkc", dict(model_type="bpe", normalization_rule_name="nmt_nfkc")),
    ("unigram-nfkc-no-dummy-prefix", dict(model_type="unigram", normalization_rule_name="nmt_nfkc",
                                          add_dummy_prefix=False)),
    ("unigram-split-digits", dict(model_type="unigram", split_digits=True)),
])
def test_sentencepiece_models_convert_to_sentencepiece_ids(tmp_path, name, kw):
    model = train(tmp_path, name, **kw)
    r, out = convert(tmp_path, "--tokenizer-model", model)
    assert r.returncode == 0, r.stderr
    assert "matches SentencePiece on all 29 corpus entries" in r.stderr
    assert load(out / "tokenizer.json") == python_converter(tmp_path, model)


def test_unverified_with_a_character_map_says_where_it_may_differ(tmp_path):
    model = train(tmp_path, "nfkc", model_type="bpe", normalization_rule_name="nmt_nfkc")
    empty = tmp_path / "empty-path"
    empty.mkdir()
    r, out = convert(tmp_path, "--tokenizer-model", model, python=False, env=dict(os.environ, PATH=str(empty)))
    assert r.returncode == 0, r.stderr
    assert "tokenizer not verified against SentencePiece: cannot run python3" in r.stderr, r.stderr
    assert "normalizer has a character map" in r.stderr
    assert (out / "tokenizer.json").exists()


def test_a_mismatching_tokenizer_is_refused_with_the_first_difference(tmp_path):
    # nmt_nfkc with whitespace runs kept: tokenizers' Precompiled normalizer treats "\r\n" as one
    # grapheme, SentencePiece as two characters. The check of arbiter's own tokenizer.json must
    # catch it and say where.
    model = train(tmp_path, "nfkc-keep-ws", model_type="bpe", normalization_rule_name="nmt_nfkc",
                  remove_extra_whitespaces=False)
    r, out = convert(tmp_path, "--tokenizer-model", model)
    assert r.returncode == 2
    assert 'tokenizer fidelity check failed on "whitespace runs"' in r.stderr, r.stderr
    assert "first difference at token" in r.stderr
    assert not (out / "config.json").exists()
