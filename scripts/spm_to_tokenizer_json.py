#!/usr/bin/env python3
"""Turns a SentencePiece model (Nemotron's nemotron_2_256k.model) into a HF `tokenizer.json` that
encodes whole strings exactly as SentencePiece does, and writes SentencePiece's own encodings of
a fidelity corpus so that `arbiter convert` can check the two agree id for id.

    python3 scripts/spm_to_tokenizer_json.py --model X.model --corpus convert/src/fidelity_corpus.json --out DIR

writes DIR/tokenizer.json and DIR/sentencepiece_reference.json; with --reference-only, only the
reference, which needs just the PyPI package `sentencepiece` (tokenizer.json also needs `protobuf`
and `tokenizers`). `arbiter convert` builds tokenizer.json itself, in Rust, the same way
(convert/src/sentencepiece.rs; the tests compare the two files), and runs this script with
--reference-only to check it against SentencePiece (see docs/convert.md).

Why not transformers' LlamaConverter (what NeMo's Nemotron-to-HF script uses): NeMo-Aligner feeds
the reward model `SentencePieceProcessor.encode(whole templated string)`. SentencePiece adds its
dummy prefix once, to the whole string, *before* it matches user-defined symbols such as
`<extra_id_0>`; so a conversation starts with a lone "▁" piece and the text right after a marker
gets no "▁". The converters in transformers either prepend "▁" after every marker (legacy
normalizer with markers matched first) or never before a leading marker (Metaspace "first"). Here
the dummy prefix is a normalizer step over the whole string and the user-defined symbols are
added tokens matched *after* normalization (`normalized: true`), which is SentencePiece's order.
Control symbols (<s>, </s>) stay plain vocabulary entries: SentencePiece never matches them in text.
"""
import argparse
import hashlib
import json
import os
import sys

import sentencepiece as spm

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
BPE_TYPE, UNIGRAM_TYPE = 2, 1
NEVER = -1e9  # a Unigram score no segmentation of text will take

# NeMo-Aligner's templates (examples/nlp/data/steerlm/common.py), written out here on purpose:
# the Rust side renders with its own code, and the check compares both the text and the ids.
SYSTEM_PROMPT = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
SYSTEM_PROMPT_TEMPLATE = "<extra_id_0>System\n{value}\n"
USER_TURN_TEMPLATE = "<extra_id_1>User\n{value}\n"
ASSISTANT_TURN_TEMPLATE = "<extra_id_1>Assistant\n{value}\n"
LABEL_PREFIX = "<extra_id_2>"


def render(messages):
    """The reward model's training text for a conversation (process_to_regression_format.py)."""
    system = SYSTEM_PROMPT
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    text = SYSTEM_PROMPT_TEMPLATE.format(value=system)
    for m in messages:
        template = USER_TURN_TEMPLATE if m["role"] == "user" else ASSISTANT_TURN_TEMPLATE
        text += template.format(value=m["content"])
    return text + LABEL_PREFIX


def bpe_merges(proto):
    """Merges that make HF's BPE pick what SentencePiece's BPE picks: SentencePiece merges the
    adjacent pair whose concatenation is the highest-scoring piece, so every split of a normal
    piece into two known pieces becomes a merge ranked by that piece's score."""
    vocab = {p.piece: i for i, p in enumerate(proto.pieces) if p.type == NORMAL}
    merges = []
    for i, p in enumerate(proto.pieces):
        if p.type != NORMAL or len(p.piece) < 2:
            continue
        for k in range(1, len(p.piece)):
            left, right = p.piece[:k], p.piece[k:]
            if left in vocab and right in vocab:
                merges.append((-p.score, i, vocab[left], vocab[right], left, right))
    merges.sort()
    return [(m[4], m[5]) for m in merges]


def convert(model_path):
    # Imported here: --reference-only needs SentencePiece alone.
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers

    proto = sp_pb2.ModelProto()
    with open(model_path, "rb") as f:
        proto.ParseFromString(f.read())
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    unk_id = next((i for i, p in enumerate(proto.pieces) if p.type == UNKNOWN), None)
    if trainer.model_type == BPE_TYPE:
        vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
        model = models.BPE(vocab=vocab, merges=bpe_merges(proto), unk_token=proto.pieces[unk_id].piece
                           if unk_id is not None else None, byte_fallback=trainer.byte_fallback, fuse_unk=True)
    elif trainer.model_type == UNIGRAM_TYPE:
        # SentencePiece's Viterbi only picks normal pieces; control, user-defined, byte and unused
        # pieces keep their ids but must never be chosen to spell text (e.g. "<s>" written in text).
        model = models.Unigram([(p.piece, p.score if p.type == NORMAL else NEVER) for p in proto.pieces],
                               unk_id=unk_id, byte_fallback=trainer.byte_fallback)
    else:
        sys.exit(f"{model_path}: SentencePiece model_type {trainer.model_type} is neither BPE nor Unigram")
    tok = Tokenizer(model)

    # SentencePiece's normalizer, in its order: character map, whitespace clean-up, dummy
    # prefix, spaces escaped as "▁".
    steps = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend(" "))
    steps.append(normalizers.Replace(" ", "▁"))
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = None

    dec = [decoders.Replace("▁", " ")]
    if trainer.byte_fallback:
        dec.append(decoders.ByteFallback())
    dec.append(decoders.Fuse())
    if norm.add_dummy_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)

    # User-defined symbols are matched in text, after normalization, like SentencePiece does.
    user_defined = [p.piece for p in proto.pieces if p.type == USER_DEFINED]
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in user_defined])
    return tok, proto


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="the SentencePiece .model file")
    ap.add_argument("--corpus", required=True, help="the fidelity corpus (convert/src/fidelity_corpus.json)")
    ap.add_argument("--out", required=True, help="folder for tokenizer.json and sentencepiece_reference.json")
    ap.add_argument("--reference-only", action="store_true",
                    help="write only sentencepiece_reference.json (arbiter convert builds tokenizer.json itself)")
    args = ap.parse_args()

    sp = spm.SentencePieceProcessor(model_file=args.model)
    if not args.reference_only:
        tok, proto = convert(args.model)
        for i, p in enumerate(proto.pieces):
            if p.type == USER_DEFINED and tok.token_to_id(p.piece) != i:
                sys.exit(f"{args.model}: user-defined piece {p.piece!r} would get id {tok.token_to_id(p.piece)}, "
                         f"not {i}")

    with open(args.corpus, encoding="utf-8") as f:
        corpus = json.load(f)
    with open(args.model, "rb") as f:
        sha256 = hashlib.sha256(f.read()).hexdigest()
    reference = {
        "generator": "scripts/spm_to_tokenizer_json.py",
        "sentencepiece": spm.__version__,
        "model_sha256": sha256,
        "pieces": sp.get_piece_size(),
        "texts": [{"name": t["name"], "text": t["text"], "ids": sp.encode(t["text"])} for t in corpus["texts"]],
        "chats": [],
    }
    for c in corpus["chats"]:
        text = render(c["messages"])
        reference["chats"].append({"name": c["name"], "messages": c["messages"], "text": text, "ids": sp.encode(text)})

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sentencepiece_reference.json"), "w", encoding="utf-8") as f:
        json.dump(reference, f, ensure_ascii=False, indent=1)
        f.write("\n")
    if args.reference_only:
        print(f"wrote {args.out}/sentencepiece_reference.json ({sp.get_piece_size()} pieces)")
        return
    tok.save(os.path.join(args.out, "tokenizer.json"))
    print(f"wrote {args.out}/tokenizer.json ({len(proto.pieces)} pieces, "
          f"{'BPE' if proto.trainer_spec.model_type == BPE_TYPE else 'Unigram'}, "
          f"add_dummy_prefix={proto.normalizer_spec.add_dummy_prefix}) and sentencepiece_reference.json")


if __name__ == "__main__":
    main()
