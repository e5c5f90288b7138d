"""Tokenizers: ReformerTokenizer (SentencePiece) and ReformerByteTokenizer (enwik8 bytes).

SentencePiece models are trained here from generated text (no downloads). Oracles: SentencePiece's own
``encode``/``decode`` for ids and text, and transformers' ``ReformerTokenizer`` (5.x, a tokenizers-backed
BPE rebuilt from ``spiece.model``) for conventions, padding and BPE ids; for byte ids, the encode/decode
functions of the ``google/reformer-enwik8`` model card, restated below.
"""

from __future__ import annotations

import io
import json
import os
import random

import pytest
import sentencepiece as spm
import torch

from reformer.tokenization_reformer import (
    ReformerByteTokenizer,
    ReformerTokenizer,
    load_tokenizer,
)

SYLLABLES = ["ka", "ri", "mo", "ten", "sa", "lu", "dor", "pe", "qui", "zan", "ël", "ño", "über", "ha", "ne", "st", "ro"]


def make_corpus(n: int, seed: int) -> list[str]:
    """Generated sentences over a small word list (with accents, digits and punctuation)."""
    rng = random.Random(seed)
    vocab_rng = random.Random(1234)
    words = ["".join(vocab_rng.choice(SYLLABLES) for _ in range(vocab_rng.randint(1, 3))) for _ in range(300)]
    out = []
    for _ in range(n):
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(3, 15)))
        if rng.random() < 0.3:
            sentence = sentence.capitalize() + "."
        if rng.random() < 0.1:
            sentence += " 12,5 ok?"
        out.append(sentence)
    return out


# held-out text, plus cases SentencePiece normalises (extra spaces, NFKC) or cannot cover (unknown chars)
EVAL_TEXTS = make_corpus(120, seed=7) + [
    "  leading and  double   spaces ",
    "Héllo wörld! ﬁne",
    "xyz QQQ ¿?",
    "",
    "ka",
]
# transformers 5 adds a "▁" piece for trailing whitespace (see test_trailing_space_follows_sentencepiece)
HF_COMPARABLE_TEXTS = [t for t in EVAL_TEXTS if t == t.rstrip()]


def _train(model_type: str, directory: str) -> str:
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(make_corpus(1500, seed=0)),
        model_writer=buf,
        vocab_size=200,
        model_type=model_type,
        num_threads=1,
        minloglevel=2,
    )
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "spiece.model"), "wb") as handle:
        handle.write(buf.getvalue())
    return directory


@pytest.fixture(scope="module")
def spm_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("spm")
    return {mt: _train(mt, str(root / mt)) for mt in ("unigram", "bpe")}


@pytest.fixture(scope="module")
def hf_reformer_tokenizer():
    transformers = pytest.importorskip("transformers")
    return transformers.ReformerTokenizer


@pytest.fixture(autouse=True)
def offline_hub(tmp_path, monkeypatch):
    """No test reaches the network: the Hugging Face cache is an empty folder of the test's own, offline."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hf_home" / "hub"
    cache.mkdir(parents=True)
    for name, value in (("HF_HOME", str(cache.parent)), ("HF_HUB_CACHE", str(cache)), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(name, value)
    # huggingface_hub reads these variables once, at import
    monkeypatch.setattr(constants, "HF_HOME", str(cache.parent))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def _sp(directory: str) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=os.path.join(directory, "spiece.model"))


# ---------------------------------------------------------------------------------------------- ids
@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_ids_equal_sentencepiece(spm_dirs, model_type):
    sp = _sp(spm_dirs[model_type])
    tok = ReformerTokenizer.from_pretrained(spm_dirs[model_type])
    expected = [sp.encode(t) for t in EVAL_TEXTS]
    # convention: nothing appended, so the ids are exactly SentencePiece's
    assert [tok.encode(t) for t in EVAL_TEXTS] == expected
    assert tok(EVAL_TEXTS)["input_ids"] == expected
    assert tok(EVAL_TEXTS[0])["input_ids"] == expected[0]
    assert tok.tokenize(EVAL_TEXTS[0]) == sp.encode(EVAL_TEXTS[0], out_type=str)
    # unknown characters really occur in the evaluation set
    assert any(sp.unk_id() in ids for ids in expected)


def test_bpe_ids_equal_transformers(spm_dirs, hf_reformer_tokenizer):
    tok = ReformerTokenizer.from_pretrained(spm_dirs["bpe"])
    hf = hf_reformer_tokenizer.from_pretrained(spm_dirs["bpe"])
    texts = HF_COMPARABLE_TEXTS
    assert len(texts) >= len(EVAL_TEXTS) - 1
    assert [tok.encode(t) for t in texts] == [hf.encode(t) for t in texts]
    # special tokens written in the text map to their ids in both
    for text in ["kari mo</s> ten", "sa</s>", "</s>ka", "<s>ka ri<unk>mo"]:
        assert tok.encode(text) == hf.encode(text), text
    assert tok.encode("sa</s>")[-1] == tok.eos_token_id


def test_trailing_space_follows_sentencepiece(spm_dirs, hf_reformer_tokenizer):
    """SentencePiece drops whitespace at the end of a text and before a special token written in it;
    transformers 5 keeps it as an extra "▁" piece (documented difference). We follow SentencePiece."""
    sp = _sp(spm_dirs["bpe"])
    tok = ReformerTokenizer.from_pretrained(spm_dirs["bpe"])
    hf = hf_reformer_tokenizer.from_pretrained(spm_dirs["bpe"])
    space = sp.piece_to_id("\u2581")
    assert tok.encode("ka ") == sp.encode("ka ") == sp.encode("ka")
    assert hf.encode("ka ") == sp.encode("ka") + [space]
    text = "ka </s> mo"
    assert tok.encode(text) == sp.encode("ka ") + [sp.eos_id()] + sp.encode(" mo")
    assert hf.encode(text) == sp.encode("ka ") + [space, sp.eos_id()] + sp.encode(" mo")


def test_transformers_unigram_disagrees_with_sentencepiece(spm_dirs, hf_reformer_tokenizer):
    """The claim for the README: transformers 5.x rebuilds a unigram spiece.model as a BPE and does
    not reproduce SentencePiece's segmentation. If this starts failing, transformers changed: update
    the README and the module docstring."""
    sp = _sp(spm_dirs["unigram"])
    hf = hf_reformer_tokenizer.from_pretrained(spm_dirs["unigram"])
    texts = [t for t in EVAL_TEXTS if t.strip()]
    ours = [sp.encode(t) for t in texts]
    theirs = [hf.encode(t) for t in texts]
    mismatches = sum(a != b for a, b in zip(ours, theirs))
    ratio = sum(map(len, theirs)) / sum(map(len, ours))
    assert mismatches > 0.9 * len(texts), (mismatches, len(texts))
    assert ratio > 1.5, ratio
    # our tokenizer is not affected
    tok = ReformerTokenizer.from_pretrained(spm_dirs["unigram"])
    assert [tok.encode(t) for t in texts] == ours


# ---------------------------------------------------------------------------------------------- conventions
@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_conventions_match_transformers(spm_dirs, hf_reformer_tokenizer, model_type):
    sp = _sp(spm_dirs[model_type])
    tok = ReformerTokenizer.from_pretrained(spm_dirs[model_type])
    hf = hf_reformer_tokenizer.from_pretrained(spm_dirs[model_type])
    assert (tok.eos_token, tok.unk_token, tok.pad_token) == ("</s>", "<unk>", None)
    assert (tok.eos_token, tok.unk_token, tok.pad_token) == (hf.eos_token, hf.unk_token, hf.pad_token)
    assert (tok.eos_token_id, tok.unk_token_id, tok.pad_token_id) == (sp.eos_id(), sp.unk_id(), None)
    assert (tok.eos_token_id, tok.unk_token_id, tok.pad_token_id) == (hf.eos_token_id, hf.unk_token_id, hf.pad_token_id)
    assert tok.vocab_size == len(tok) == sp.get_piece_size() == hf.vocab_size
    assert sorted(tok.all_special_ids) == sorted(hf.all_special_ids)
    assert tok.convert_ids_to_tokens([0, 1, 2, 3, 4]) == hf.convert_ids_to_tokens([0, 1, 2, 3, 4])
    assert tok.convert_tokens_to_ids(["<s>", "</s>", "no-such-piece"]) == [1, 2, sp.unk_id()]
    assert tok.convert_tokens_to_ids("</s>") == 2
    assert tok.convert_ids_to_tokens(2) == "</s>"
    # no EOS is appended by default; add_eos_token appends it, also after truncation, as transformers 5
    # (ids are compared with transformers only for BPE; for unigram its ids differ, see above)
    same_ids = model_type == "bpe"
    for text in EVAL_TEXTS[:5]:
        assert tok.encode(text) == sp.encode(text)
        assert hf.encode(text)[-1] != sp.eos_id()
        assert not same_ids or tok.encode(text) == hf.encode(text)
    tok.add_eos_token = True
    hf.add_eos_token = True
    for text in EVAL_TEXTS[:5]:
        assert tok.encode(text) == sp.encode(text) + [sp.eos_id()]
        assert hf.encode(text)[-1] == sp.eos_id()
        assert tok.encode(text, add_special_tokens=False) == sp.encode(text)
        assert tok.encode(text, max_length=4, truncation=True) == sp.encode(text)[:3] + [sp.eos_id()]
        if same_ids:
            assert tok.encode(text) == hf.encode(text)
            assert tok.encode(text, max_length=4, truncation=True) == hf.encode(text, max_length=4, truncation=True)


def test_pad_token_not_in_vocab_is_added_after_it(spm_dirs, hf_reformer_tokenizer):
    tok = ReformerTokenizer.from_pretrained(spm_dirs["bpe"], pad_token="<pad>")
    hf = hf_reformer_tokenizer.from_pretrained(spm_dirs["bpe"], pad_token="<pad>")
    assert tok.pad_token_id == hf.pad_token_id == tok.vocab_size
    assert len(tok) == len(hf) == tok.vocab_size + 1
    out = tok(["ka ri mo", "ka"], padding=True)
    assert out["input_ids"][1][-1] == tok.vocab_size
    assert tok.decode(out["input_ids"][1]) == "ka<pad><pad>"
    assert tok.decode(out["input_ids"][1], skip_special_tokens=True) == "ka"


# ---------------------------------------------------------------------------------------------- decode
@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_decode_round_trip(spm_dirs, model_type):
    sp = _sp(spm_dirs[model_type])
    tok = ReformerTokenizer.from_pretrained(spm_dirs[model_type])
    unk = sp.unk_id()
    for text in EVAL_TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids, skip_special_tokens=True) == sp.decode([i for i in ids if i != unk])
        if unk not in ids:
            assert tok.decode(ids) == sp.decode(ids)
    # text the model covers (no unknown characters) and that normalisation leaves alone comes back exactly
    clean = [t for t in make_corpus(60, seed=11) if unk not in sp.encode(t)]
    assert len(clean) >= 40
    assert [tok.decode(tok.encode(t)) for t in clean] == clean
    assert tok.decode(torch.tensor(tok.encode(clean[0]))) == clean[0]
    tok.pad_token = tok.eos_token
    for side in ("right", "left"):
        batch = tok(clean[:6], padding=True, padding_side=side, return_tensors="pt")
        assert tok.batch_decode(batch["input_ids"], skip_special_tokens=True) == clean[:6]
        assert tok.batch_decode(batch["input_ids"].numpy(), skip_special_tokens=True) == clean[:6]


def test_decode_matches_transformers_bpe(spm_dirs, hf_reformer_tokenizer):
    tok = ReformerTokenizer.from_pretrained(spm_dirs["bpe"])
    hf = hf_reformer_tokenizer.from_pretrained(spm_dirs["bpe"])
    rng = random.Random(0)
    # sequences SentencePiece's encoder produces, with special ids inserted at random places (random id
    # soup like ["▁", "▁samo"] is decoded differently: SentencePiece strips every leading space)
    cases = []
    for text in make_corpus(150, seed=5):
        ids = tok.encode(text)
        for _ in range(rng.randint(0, 3)):
            ids.insert(rng.randint(0, len(ids)), rng.choice(tok.all_special_ids))
        cases.append(ids)
    cases += [[2] + tok.encode("ka ri"), tok.encode("ka ri") + [2, 0, 2] + tok.encode("mo zan")]
    for ids in cases:
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), (ids, skip)
    assert tok.decode(cases[-1]) == "ka ri</s><unk></s> mo zan"


# ---------------------------------------------------------------------------------------------- padding
PAD_CASES = [
    dict(padding=True),
    dict(padding="longest", padding_side="left"),
    dict(padding="max_length", max_length=40),
    dict(padding="max_length", max_length=40, padding_side="left"),
    dict(padding=True, truncation=True, max_length=7),
    dict(padding=True, pad_to_multiple_of=8),
    dict(padding="max_length", max_length=20, pad_to_multiple_of=16, padding_side="left"),
    dict(max_length=5),
]


@pytest.mark.parametrize("kwargs", PAD_CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_padding_truncation_match_transformers(spm_dirs, hf_reformer_tokenizer, kwargs):
    tok = ReformerTokenizer.from_pretrained(spm_dirs["bpe"])
    hf = hf_reformer_tokenizer.from_pretrained(spm_dirs["bpe"])
    tok.pad_token = tok.eos_token
    hf.pad_token = hf.eos_token
    texts = EVAL_TEXTS[:7]
    ours = tok(texts, **kwargs)
    theirs = hf(texts, **kwargs)
    assert ours["input_ids"] == theirs["input_ids"]
    assert ours["attention_mask"] == theirs["attention_mask"]
    if kwargs.get("padding"):
        ours_pt = tok(texts, return_tensors="pt", **kwargs)
        theirs_pt = hf(texts, return_tensors="pt", **kwargs)
        for key in ("input_ids", "attention_mask"):
            assert ours_pt[key].dtype == torch.long
            assert torch.equal(ours_pt[key], theirs_pt[key])


def test_padding_semantics(spm_dirs):
    tok = ReformerTokenizer.from_pretrained(spm_dirs["unigram"], pad_token="</s>")
    texts = ["ka ri mo zan pe", "ka", "dor lu"]
    raw = [tok.encode(t) for t in texts]
    longest = max(map(len, raw))
    pad = tok.pad_token_id
    right = tok(texts, padding=True, return_tensors="pt")
    left = tok(texts, padding=True, padding_side="left", return_tensors="pt")
    assert right["input_ids"].shape == left["input_ids"].shape == (3, longest)
    for i, ids in enumerate(raw):
        n = longest - len(ids)
        assert right["input_ids"][i].tolist() == ids + [pad] * n
        assert left["input_ids"][i].tolist() == [pad] * n + ids
        assert right["attention_mask"][i].tolist() == [1] * len(ids) + [0] * n
        assert left["attention_mask"][i].tolist() == [0] * n + [1] * len(ids)
    # the tokenizer-wide side works too (generation sets it once)
    tok.padding_side = "left"
    assert torch.equal(tok(texts, padding=True, return_tensors="pt")["input_ids"], left["input_ids"])
    # a single text with tensors is a batch of one; numpy works the same
    single = tok("ka ri", return_tensors="pt")
    assert single["input_ids"].shape == (1, len(tok.encode("ka ri")))
    assert tok.encode("ka ri", return_tensors="pt").tolist() == [tok.encode("ka ri")]
    assert tok(texts, padding=True, return_tensors="np")["input_ids"].tolist() == left["input_ids"].tolist()
    # truncation keeps the left end when truncation_side="left"
    tok.truncation_side = "left"
    assert tok.encode(texts[0], max_length=3) == raw[0][-3:]
    assert tok(texts, return_attention_mask=False).keys() == {"input_ids"}
    # pad() on already-encoded ids, as a data collator does
    padded = tok.pad({"input_ids": raw}, padding="max_length", max_length=12, padding_side="right")
    assert padded["input_ids"] == [ids + [pad] * (12 - len(ids)) for ids in raw]
    assert tok.pad({"input_ids": raw[1]}, padding="max_length", max_length=4)["attention_mask"] == [0] * (
        4 - len(raw[1])
    ) + [1] * len(raw[1])


def test_padding_errors(spm_dirs):
    """Argument errors: transformers' own checks (their messages), and ours where transformers is silent."""
    tok = ReformerTokenizer.from_pretrained(spm_dirs["bpe"])
    with pytest.raises(ValueError, match="pad_token"):
        tok(["ka", "ka ri"], padding=True)
    with pytest.raises(ValueError, match="padding=True"):
        tok(["ka", "ka ri mo"], return_tensors="pt")
    tok.pad_token = tok.eos_token
    for bad in ("yes", "max", 1, 0.5):
        with pytest.raises(ValueError, match="PaddingStrategy"):
            tok(["ka"], padding=bad)
    for bad in ("yes", 3):
        with pytest.raises(ValueError, match="TruncationStrategy"):
            tok(["ka"], truncation=bad)
    with pytest.raises(ValueError, match="TensorType"):
        tok(["ka"], return_tensors="tf")
    with pytest.raises(ValueError, match="Input must be a string"):
        tok(123)
    with pytest.raises(ValueError, match="Input must be a string"):
        tok(["ka", None])
    # transformers pads nothing or reports nothing for these; we raise
    with pytest.raises(ValueError, match="max_length"):
        tok(["ka"], max_length=0)
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        tok(["ka"], padding=True, pad_to_multiple_of=-2)
    with pytest.raises(ValueError, match="padding_side"):
        tok(["ka"], padding=True, padding_side="top")
    tok.padding_side = "middle"
    with pytest.raises(ValueError, match="padding_side"):
        tok(["ka"])
    tok.padding_side = "right"
    for bad in ([tok.vocab_size + 5], [-1]):
        with pytest.raises(ValueError, match="out of range"):
            tok.decode(bad)
    with pytest.raises(TypeError, match="token_ids"):
        tok.decode([3, 1.5])
    with pytest.raises(TypeError, match="token_ids"):
        tok.batch_decode(torch.zeros(2, 3, 4, dtype=torch.long))


# ---------------------------------------------------------------------------------------------- bad input (#13)
@pytest.mark.parametrize("kind", ["sentencepiece", "bytes"])
def test_empty_batch_is_an_error(spm_dirs, kind):
    tok = ReformerTokenizer.from_pretrained(spm_dirs["bpe"], pad_token="</s>") if kind == "sentencepiece" else None
    tok = tok or ReformerByteTokenizer()
    for kwargs in (dict(return_tensors="pt"), dict(padding=True, return_tensors="pt"), {}):
        with pytest.raises(ValueError, match="text is an empty batch"):
            tok([], **kwargs)
    assert tok(["ka"], return_tensors="pt")["input_ids"].shape == (1, len(tok.encode("ka")))


@pytest.mark.parametrize("kind", ["sentencepiece", "bytes"])
def test_lone_surrogate_is_an_error(spm_dirs, kind):
    tok = ReformerTokenizer.from_pretrained(spm_dirs["bpe"]) if kind == "sentencepiece" else ReformerByteTokenizer()
    for call in (tok, tok.encode, tok.tokenize, lambda t: tok(["ka", t])):
        with pytest.raises(ValueError, match=r"text holds a lone surrogate '\\udc80' at position 3"):
            call("ka \udc80 ri")
    # a character outside the BMP (a surrogate pair in UTF-16, one character here) is fine
    text = "ka \U0001f680"
    assert tok.encode(text) == (
        _sp(spm_dirs["bpe"]).encode(text) if kind == "sentencepiece" else [b + 2 for b in text.encode()]
    )


def test_model_max_length_must_be_finite(spm_dirs, tmp_path):
    model_file = os.path.join(spm_dirs["bpe"], "spiece.model")
    for bad in (float("inf"), float("nan"), -3, 0, "64"):
        with pytest.raises(ValueError, match="model_max_length"):
            ReformerTokenizer(model_file, model_max_length=bad)
        with pytest.raises(ValueError, match="model_max_length"):
            ReformerByteTokenizer(model_max_length=bad)
    # non-finite values in a saved config (Python's json writes and reads Infinity and NaN)
    for value in (float("inf"), float("nan")):
        d = tmp_path / str(value)
        d.mkdir()
        (d / "spiece.model").write_bytes(open(model_file, "rb").read())
        (d / "tokenizer_config.json").write_text(json.dumps({"model_max_length": value}))
        with pytest.raises(ValueError, match="model_max_length"):
            ReformerTokenizer.from_pretrained(d)
        config = {"tokenizer_class": "ReformerByteTokenizer", "model_max_length": value}
        (d / "tokenizer_config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match="model_max_length"):
            load_tokenizer(d)
    # an integral float (older configs write 1e30) is the integer
    assert ReformerTokenizer(model_file, model_max_length=1e30).model_max_length == int(1e30)


# ---------------------------------------------------------------------------------------------- data collators
@pytest.mark.parametrize("kind", ["sentencepiece", "bytes"])
@pytest.mark.parametrize("mlm", [True, False])
def test_data_collator_for_language_modeling(spm_dirs, kind, mlm):
    from transformers import DataCollatorForLanguageModeling

    if kind == "sentencepiece":
        tok = ReformerTokenizer.from_pretrained(spm_dirs["unigram"], pad_token="<pad>", mask_token="<mask>")
    else:
        tok = ReformerByteTokenizer(mask_token="<mask>")
    assert (tok.pad_token_id, tok.mask_token_id) == (
        (tok.vocab_size, tok.vocab_size + 1) if kind != "bytes" else (0, 258)
    )
    texts = [t for t in EVAL_TEXTS[:12] if t]
    examples = [tok(t) for t in texts]
    collator = DataCollatorForLanguageModeling(tok, mlm=mlm, mlm_probability=0.5, pad_to_multiple_of=8, seed=0)
    batch = collator(examples)
    raw = [tok.encode(t) for t in texts]
    longest = -(-max(map(len, raw)) // 8) * 8
    assert batch["input_ids"].shape == batch["labels"].shape == (len(texts), longest)
    for row, ids in enumerate(raw):
        n = len(ids)
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (longest - n)
        labels = batch["labels"][row].tolist()
        inputs = batch["input_ids"][row].tolist()
        assert inputs[n:] == [tok.pad_token_id] * (longest - n) and labels[n:] == [-100] * (longest - n)
        if not mlm:
            assert inputs[:n] == labels[:n] == ids
            continue
        # a label is the original id where the input was chosen for masking, -100 elsewhere
        chosen = [i for i in range(n) if labels[i] != -100]
        assert [labels[i] for i in chosen] == [ids[i] for i in chosen]
        assert all(inputs[i] == ids[i] for i in range(n) if i not in chosen)
    if mlm:
        chosen = (batch["labels"] != -100).sum().item()
        masked = (batch["input_ids"] == tok.mask_token_id).sum().item()
        total = sum(map(len, raw))
        assert 0.3 * total < chosen < 0.7 * total and 0.6 * chosen < masked <= chosen


# ---------------------------------------------------------------------------------------------- save / load
def test_save_load_round_trip(spm_dirs, hf_reformer_tokenizer, tmp_path):
    tok = ReformerTokenizer.from_pretrained(
        spm_dirs["bpe"], pad_token="</s>", padding_side="left", model_max_length=64, additional_special_tokens=["<s>"]
    )
    out = tmp_path / "saved"
    written = tok.save_pretrained(out)
    assert {"spiece.model", "tokenizer_config.json"} <= set(os.listdir(out))
    assert set(os.listdir(out)) <= {os.path.basename(p) for p in written}
    with open(out / "spiece.model", "rb") as f, open(os.path.join(spm_dirs["bpe"], "spiece.model"), "rb") as g:
        assert f.read() == g.read()
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "ReformerTokenizer" and config["pad_token"] == "</s>"

    for loaded in (ReformerTokenizer.from_pretrained(out), load_tokenizer(out)):
        assert isinstance(loaded, ReformerTokenizer)
        assert loaded.special_tokens_map == tok.special_tokens_map
        assert sorted(loaded.all_special_ids) == sorted(tok.all_special_ids) == [0, 1, 2]
        assert (loaded.pad_token_id, loaded.padding_side, loaded.model_max_length) == (2, "left", 64)
        assert not loaded.add_eos_token
        batch = loaded(EVAL_TEXTS[:4], padding=True, return_tensors="pt")
        assert torch.equal(batch["input_ids"], tok(EVAL_TEXTS[:4], padding=True, return_tensors="pt")["input_ids"])
    # saving again over the same directory works, atomically: each file replaced in place, the directory and
    # files that are not the tokenizer's kept, returned paths in the target, no staging directory left
    (out / "README.md").write_text("notes")
    directory_inode = os.stat(out).st_ino
    written = tok.save_pretrained(out)
    assert all(os.path.dirname(p) == str(out) for p in written)
    assert os.stat(out).st_ino == directory_inode and (out / "README.md").read_text() == "notes"
    assert not [name for name in os.listdir(out) if name.startswith(".")]
    assert ReformerTokenizer.from_pretrained(out).encode("ka ri") == tok.encode("ka ri")
    # transformers reads what we write (its own class, a BPE rebuilt from spiece.model: same ids for BPE models)
    hf = hf_reformer_tokenizer.from_pretrained(str(out))
    assert (hf.pad_token, hf.pad_token_id, hf.padding_side, hf.model_max_length) == ("</s>", 2, "left", 64)
    assert [hf.encode(t) for t in HF_COMPARABLE_TEXTS] == [tok.encode(t) for t in HF_COMPARABLE_TEXTS]


@pytest.mark.parametrize("kind", ["sentencepiece", "bytes"])
def test_add_eos_token_is_saved(spm_dirs, tmp_path, kind):
    tok = ReformerTokenizer.from_pretrained(spm_dirs["unigram"]) if kind == "sentencepiece" else ReformerByteTokenizer()
    plain = tok.encode("ka ri")
    tok.add_eos_token = True
    assert tok.encode("ka ri") == plain + [tok.eos_token_id]
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.add_eos_token and loaded.encode("ka ri") == plain + [tok.eos_token_id]
    assert load_tokenizer(tmp_path, add_eos_token=False).encode("ka ri") == plain
    with pytest.raises(TypeError, match="add_eos_token"):
        tok.add_eos_token = 1


def test_load_transformers4_style_files(spm_dirs, tmp_path):
    """transformers 4.x writes AddedToken dicts and a special_tokens_map.json (which wins over
    tokenizer_config.json); keyword arguments win over both."""
    unk = {"__type": "AddedToken", "content": "<unk>", "lstrip": False, "normalized": True, "rstrip": False}
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "spiece.model").write_bytes(open(os.path.join(spm_dirs["unigram"], "spiece.model"), "rb").read())
    (d / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": 524288, "pad_token": "<unk>", "unk_token": unk})
    )
    (d / "special_tokens_map.json").write_text(json.dumps({"eos_token": "</s>", "pad_token": {"content": "</s>"}}))
    tok = ReformerTokenizer.from_pretrained(d)
    assert (tok.model_max_length, tok.unk_token, tok.pad_token, tok.pad_token_id) == (524288, "<unk>", "</s>", 2)
    assert ReformerTokenizer.from_pretrained(d, pad_token="<s>").pad_token_id == 1
    # a path to the model file itself also works
    assert ReformerTokenizer.from_pretrained(d / "spiece.model").encode("ka ri") == tok.encode("ka ri")


def test_load_errors(spm_dirs, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"needs spiece\.model .* does not hold$"):
        ReformerTokenizer.from_pretrained(empty)
    with pytest.raises(ValueError, match="needs vocab_file.*got None"):
        ReformerTokenizer()
    with pytest.raises(ValueError, match="needs vocab_file.*no-such.model', which is not a file"):
        ReformerTokenizer(tmp_path / "no-such.model")
    with pytest.raises(FileNotFoundError, match=r"spiece\.model.*tokenizer\.json.*ReformerByteTokenizer"):
        load_tokenizer(empty)
    with pytest.raises(OSError, match="no-such-dir"):
        ReformerTokenizer.from_pretrained(tmp_path / "no-such-dir")
    # a file that is not a SentencePiece model
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "spiece.model").write_bytes(b"this is not a sentencepiece model")
    for load in (ReformerTokenizer.from_pretrained, load_tokenizer):
        with pytest.raises(ValueError, match="spiece.model is not a valid SentencePiece model"):
            load(bad)
    (bad / "vocab.json").write_text("{}")
    with pytest.raises(ValueError, match="vocab.json is not a valid SentencePiece model"):
        ReformerTokenizer.from_pretrained(bad / "vocab.json")
    # a config naming another class, without a vocabulary file
    other = tmp_path / "other"
    other.mkdir()
    (other / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer"}))
    with pytest.raises(FileNotFoundError, match="'BertTokenizer'"):
        load_tokenizer(other)


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_transformers5_directory(spm_dirs, hf_reformer_tokenizer, tmp_path, model_type):
    """A directory transformers 5 saved holds tokenizer.json and no spiece.model: ReformerTokenizer says so,
    load_tokenizer loads it with transformers (whose ids it then has, for unigram models not SentencePiece's)."""
    hf = hf_reformer_tokenizer.from_pretrained(spm_dirs[model_type])
    hf.save_pretrained(str(tmp_path))
    assert "tokenizer.json" in os.listdir(tmp_path) and "spiece.model" not in os.listdir(tmp_path)
    with pytest.raises(ValueError, match=r"needs spiece\.model.*holds tokenizer\.json.*load_tokenizer"):
        ReformerTokenizer.from_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    texts = [t for t in EVAL_TEXTS if t.strip()]
    assert [loaded.encode(t) for t in texts] == [hf.encode(t) for t in texts]
    assert loaded.decode(loaded.encode("ka ri mo")) == "ka ri mo"
    assert (loaded.eos_token, loaded.unk_token) == ("</s>", "<unk>")


def test_autotokenizer(spm_dirs, hf_reformer_tokenizer, tmp_path, monkeypatch):
    """AutoTokenizer reads tokenizer_class "ReformerTokenizer" as transformers' own class (a BPE rebuilt from
    spiece.model: other ids for unigram models). With ReformerTokenizer.register_for_auto_class(), saving also
    writes this module and an auto_map, and AutoTokenizer(trust_remote_code=True) gives SentencePiece's ids."""
    import sys

    import transformers.dynamic_module_utils as dynamic_modules
    from transformers import AutoTokenizer

    # remote code is copied into HF_MODULES_CACHE, imported from sys.path; keep both to this test
    monkeypatch.setattr(dynamic_modules, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(ReformerTokenizer, "_auto_class", None)
    sp = _sp(spm_dirs["unigram"])
    texts = [t for t in EVAL_TEXTS if t.strip()][:30]
    tok = ReformerTokenizer.from_pretrained(spm_dirs["unigram"])
    tok.save_pretrained(tmp_path / "plain")
    auto = AutoTokenizer.from_pretrained(tmp_path / "plain")
    assert type(auto) is hf_reformer_tokenizer
    assert [auto.encode(t) for t in texts] != [sp.encode(t) for t in texts]

    ReformerTokenizer.register_for_auto_class()
    tok.save_pretrained(tmp_path / "with_code")
    assert "tokenization_reformer.py" in os.listdir(tmp_path / "with_code")
    auto = AutoTokenizer.from_pretrained(tmp_path / "with_code", trust_remote_code=True)
    assert type(auto).__name__ == "ReformerTokenizer" and type(auto) is not hf_reformer_tokenizer
    assert [auto.encode(t) for t in texts] == [sp.encode(t) for t in texts]
    # without trust_remote_code, transformers' own class again
    assert type(AutoTokenizer.from_pretrained(tmp_path / "with_code")) is hf_reformer_tokenizer


# ---------------------------------------------------------------------------------------------- hub cache
def _hub_repo(cache, repo_id: str, files: dict[str, bytes]) -> None:
    """A repository as huggingface_hub caches it: snapshots/<commit>/<files> and refs/main naming the commit."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "snapshots" / commit).mkdir(parents=True)
    for name, data in files.items():
        (repo / "snapshots" / commit / name).write_bytes(data)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def _directory_files(directory) -> dict[str, bytes]:
    return {name: open(os.path.join(directory, name), "rb").read() for name in os.listdir(directory)}


def test_load_by_hub_id_offline(spm_dirs, offline_hub, tmp_path):
    from transformers import AutoTokenizer

    sp = _sp(spm_dirs["unigram"])
    _hub_repo(offline_hub, "org/reformer-spm", {"spiece.model": _directory_files(spm_dirs["unigram"])["spiece.model"]})
    ReformerByteTokenizer(padding_side="left").save_pretrained(tmp_path / "bytes")
    # AutoTokenizer reads the model's config.json first (a model repository has one)
    files = {**_directory_files(tmp_path / "bytes"), "config.json": b'{"model_type": "reformer"}'}
    _hub_repo(offline_hub, "org/reformer-bytes", files)
    texts = EVAL_TEXTS[:20]
    for loaded in (ReformerTokenizer.from_pretrained("org/reformer-spm"), load_tokenizer("org/reformer-spm")):
        assert isinstance(loaded, ReformerTokenizer)
        assert [loaded.encode(t) for t in texts] == [sp.encode(t) for t in texts]
    byte_texts = ["naïve café", "</s> is text here"]
    for loaded in (load_tokenizer("org/reformer-bytes"), AutoTokenizer.from_pretrained("org/reformer-bytes")):
        assert loaded.padding_side == "left" and loaded.pad_token_id == 0
        assert [loaded.encode(t) for t in byte_texts] == [[b + 2 for b in t.encode()] for t in byte_texts]
    assert isinstance(load_tokenizer("org/reformer-bytes"), ReformerByteTokenizer)
    with pytest.raises(ValueError, match=r"needs spiece\.model.*'org/not-in-the-cache'.*offline"):
        ReformerTokenizer.from_pretrained("org/not-in-the-cache")
    with pytest.raises(FileNotFoundError, match="org/not-in-the-cache"):
        load_tokenizer("org/not-in-the-cache")


# ---------------------------------------------------------------------------------------------- bytes
def model_card_encode(list_of_strings, pad_token_id=0):
    """The google/reformer-enwik8 model card's encoder (restated): byte + 2, right padding with 0."""
    max_length = max(len(s.encode()) for s in list_of_strings)
    attention_masks = torch.zeros((len(list_of_strings), max_length), dtype=torch.long)
    input_ids = torch.full((len(list_of_strings), max_length), pad_token_id, dtype=torch.long)
    for idx, string in enumerate(list_of_strings):
        data = string.encode()
        input_ids[idx, : len(data)] = torch.tensor([x + 2 for x in data])
        attention_masks[idx, : len(data)] = 1
    return input_ids, attention_masks


def model_card_decode(outputs_ids):
    """The model card's decoder (restated): ids < 2 dropped, every other id read as chr(id - 2)."""
    return ["".join(chr(x - 2) if x > 1 else "" for x in row) for row in outputs_ids.tolist()]


def test_byte_tokenizer_matches_model_card():
    tok = ReformerByteTokenizer()
    assert (tok.vocab_size, tok.pad_token_id, tok.eos_token_id, tok.unk_token) == (258, 0, 1, None)
    texts = ["In 1965, Brooks left IBM to found the Department of", "this is cool", "[[Category:Test]]\n"]
    ids, mask = model_card_encode(texts)
    ours = tok(texts, padding=True, return_tensors="pt")
    assert torch.equal(ours["input_ids"], ids) and torch.equal(ours["attention_mask"], mask)
    assert tok.encode("AZ") == [ord("A") + 2, ord("Z") + 2]
    # with EOS and padding ids in the output, skip_special_tokens gives the model card's text (ASCII)
    generated = torch.cat([ids, torch.ones(len(texts), 2, dtype=torch.long)], dim=1)
    assert tok.batch_decode(generated, skip_special_tokens=True) == model_card_decode(generated) == texts
    assert tok.decode([ord("a") + 2, 1, 0]) == "a</s><pad>"


def test_byte_tokenizer_utf8_round_trip():
    tok = ReformerByteTokenizer()
    texts = ["naïve café — 東京 🚀", "plain", "Ünïcödé\tand\nnewlines", ""]
    for text in texts:
        ids = tok.encode(text)
        assert ids == [b + 2 for b in text.encode("utf-8")]
        assert len(ids) == len(text.encode("utf-8"))
        assert tok.decode(ids) == text
    # the model card's chr()-decoding garbles non-ASCII text; ours does not
    ids = torch.tensor([tok.encode(texts[0])])
    assert model_card_decode(ids)[0] != texts[0]
    assert tok.batch_decode(ids)[0] == texts[0]
    # special tokens written in the text are bytes like any text, so every text round-trips
    assert tok.encode("a</s><pad>") == [b + 2 for b in b"a</s><pad>"]
    assert tok.decode(tok.encode("a</s><pad>")) == "a</s><pad>"
    # left padding, and a multi-byte character cut by truncation decodes to U+FFFD
    batch = tok(texts, padding=True, padding_side="left", return_tensors="pt")
    assert tok.batch_decode(batch["input_ids"], skip_special_tokens=True) == texts
    assert batch["attention_mask"].sum(1).tolist() == [len(t.encode()) for t in texts]
    assert tok.decode(tok.encode("東京", max_length=4)) == "東\ufffd"
    tok.add_eos_token = True
    assert tok.encode("ab") == [ord("a") + 2, ord("b") + 2, 1]


def test_byte_tokenizer_save_load_and_errors(tmp_path):
    tok = ReformerByteTokenizer(padding_side="left", model_max_length=65536)
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, ReformerByteTokenizer)
    assert (loaded.padding_side, loaded.model_max_length, loaded.pad_token_id) == ("left", 65536, 0)
    assert loaded.encode("héllo") == tok.encode("héllo")
    assert ReformerByteTokenizer.from_pretrained(tmp_path).special_tokens_map == tok.special_tokens_map
    # a checkpoint directory without tokenizer files gives the defaults
    (tmp_path / "bare").mkdir()
    assert ReformerByteTokenizer.from_pretrained(tmp_path / "bare").encode("ab") == [99, 100]
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([300])
    with pytest.raises(TypeError, match="token_ids"):
        tok.decode([1.5])
    with pytest.raises(ValueError, match="byte vocabulary"):
        tok.convert_tokens_to_ids(["ab"])
    with pytest.raises(ValueError, match="Input must be a string"):
        tok(["ok", 3])
    with pytest.raises(ValueError, match="PaddingStrategy"):
        tok(["a", "bb"], padding="shortest")
    with pytest.raises(OSError, match="missing-dir"):
        ReformerByteTokenizer.from_pretrained(tmp_path / "missing-dir")


def test_byte_tokenizer_autotokenizer(tmp_path):
    """save_pretrained writes a byte-level tokenizer.json: transformers' AutoTokenizer loads the directory
    (as TokenizersBackend, without this package) with the same ids, padding and decoding."""
    from transformers import AutoTokenizer

    texts = ["naïve café — 東京 🚀", "</s> and <pad> are text", "x"]
    for add_eos in (False, True):
        tok = ReformerByteTokenizer(padding_side="left", add_eos_token=add_eos, mask_token="<mask>")
        tok.save_pretrained(tmp_path / str(add_eos))
        auto = AutoTokenizer.from_pretrained(tmp_path / str(add_eos))
        assert not isinstance(auto, ReformerByteTokenizer)
        assert (auto.pad_token_id, auto.eos_token_id, auto.mask_token_id, len(auto)) == (0, 1, 258, 259)
        ours, theirs = tok(texts, padding=True, return_tensors="pt"), auto(texts, padding=True, return_tensors="pt")
        assert torch.equal(ours["input_ids"], theirs["input_ids"])
        assert torch.equal(ours["attention_mask"], theirs["attention_mask"])
        ids = ours["input_ids"].tolist() + [[ord("a") + 2, 0xE6 + 2, 0xB1 + 2, 1, 258, 0]]
        for skip in (False, True):
            assert auto.batch_decode(ids, skip_special_tokens=skip) == tok.batch_decode(ids, skip_special_tokens=skip)
