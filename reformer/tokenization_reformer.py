"""Tokenizers for Reformer checkpoints, on ``transformers``' tokenizer backends.

Padding, truncation, tensors, ``pad`` (and so the data collators), special-token handling, hub loading and
``save_pretrained`` are ``transformers``' own; this module supplies the two vocabularies, their conventions,
and the checks ``transformers`` leaves out (see ``_ReformerTokenizerMixin``). It imports only
``transformers``, ``sentencepiece`` and the standard library: after ``ReformerTokenizer.register_for_auto_class()``
``save_pretrained`` copies this file next to the tokenizer, for ``AutoTokenizer(..., trust_remote_code=True)``.

:class:`ReformerTokenizer`
    SentencePiece (``spiece.model``, as ``google/reformer-crime-and-punishment`` ships), on ``transformers``'
    ``SentencePieceBackend``. The ids are SentencePiece's own ``encode``, for unigram and BPE models. This is
    why the class exists: ``transformers`` 5's ``ReformerTokenizer`` (what ``AutoTokenizer`` picks for
    ``tokenizer_class: "ReformerTokenizer"``) rebuilds the vocabulary as a character-level BPE, which gives the
    same ids for SentencePiece BPE models and other ids (many more, mostly single-character, pieces) for
    unigram models. Conventions (``transformers`` 4.x and 5.x):

    * nothing is added to a sequence: no BOS, and no EOS unless ``add_eos_token=True``;
    * ``eos_token="</s>"``, ``unk_token="<unk>"``, no pad token by default (padding raises until one is set:
      ``tokenizer.pad_token = tokenizer.eos_token``);
    * special tokens written in the text (``"</s>"``, ``"<unk>"``, SentencePiece's control pieces such as
      ``"<s>"``) map to their ids; the text between them is encoded by SentencePiece, which drops whitespace
      just before a special token (``transformers`` 5 keeps it as an extra ``"▁"`` piece);
    * ``decode`` writes special tokens (``"<unk>"``, ``"</s>"``) unless ``skip_special_tokens=True``.

    A directory saved by ``transformers`` 5 holds ``tokenizer.json`` and no ``spiece.model``; the rebuilt BPE
    cannot be turned back into the SentencePiece model, so this class says so, and :func:`load_tokenizer`
    loads such a directory with ``transformers`` (with that file's ids).

:class:`ReformerByteTokenizer`
    Bytes, for the enwik8 character-level checkpoints (``google/reformer-enwik8``, vocabulary 258), which ship
    no tokenizer file; on ``transformers``' Python backend. Convention of trax/tensor2tensor's byte encoder and
    of the model card: id 0 is padding (``"<pad>"``), id 1 is EOS (``"</s>"``), a UTF-8 byte ``b`` is id
    ``b + 2``. A text is always encoded as its bytes (``"</s>"`` written in it is four bytes, so every text
    round-trips); nothing is appended unless ``add_eos_token=True``. Decoding joins the bytes and decodes them
    as UTF-8 with replacement (a multi-byte character cut by generation becomes U+FFFD). ``save_pretrained``
    also writes a byte-level ``tokenizer.json`` with the same ids, so ``transformers.AutoTokenizer`` loads a
    saved byte tokenizer (as ``TokenizersBackend``) without this package.

:func:`load_tokenizer` picks the class for a directory or hub id.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any

import sentencepiece as spm
from transformers.tokenization_python import PythonBackend
from transformers.tokenization_utils_base import AddedToken
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

__all__ = ["ReformerByteTokenizer", "ReformerTokenizer", "load_tokenizer"]

SPIECE_MODEL_FILE = "spiece.model"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
TOKENIZER_JSON_FILE = "tokenizer.json"
# the hub arguments load_tokenizer passes to transformers' file resolution
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_text(text: str) -> str:
    """Reject lone surrogates, which have no UTF-8 encoding (SentencePiece and UTF-8 would fail deep inside)."""
    found = _SURROGATE.search(text)
    if found:
        raise ValueError(
            f"text holds a lone surrogate {found.group()!r} at position {found.start()}, which is not a character "
            "and has no UTF-8 encoding; fix the text's decoding (e.g. bytes.decode('utf-8', errors='replace'))"
        )
    return text


def _check_model_max_length(value: Any) -> Any:
    if value is None:
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)  # configs written as 1e30
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(
            f"model_max_length must be a positive integer (transformers' int(1e30) means no limit); got {value!r}"
        )
    return value


def _special_tokens_pattern(add_eos_token: Any, saved: Any = None) -> str:
    """transformers' ``special_tokens_pattern`` for ``add_eos_token`` (when given) or a saved pattern."""
    if add_eos_token is not None and not isinstance(add_eos_token, bool):
        raise TypeError(f"add_eos_token must be a bool; got {type(add_eos_token).__name__}")
    if add_eos_token is None:
        pattern = saved or "none"
    else:
        pattern = "eos" if add_eos_token else "none"
    if pattern not in ("none", "eos"):
        raise ValueError(f"special_tokens_pattern must be 'none' or 'eos' for this tokenizer; got {pattern!r}")
    return pattern


class _ReformerTokenizerMixin:
    """What both tokenizers add to transformers' backends: ``add_eos_token``, and checks transformers does not make.

    ``add_eos_token`` switches transformers' ``special_tokens_pattern`` between ``"none"`` and ``"eos"``. The
    pattern is put back into ``init_kwargs`` (the backend takes it out) so that ``save_pretrained`` writes it:
    transformers leaves ``add_eos_token`` itself out of the saved config.
    """

    def _prepare_kwargs(self, add_eos_token: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        kwargs["special_tokens_pattern"] = _special_tokens_pattern(add_eos_token, kwargs.get("special_tokens_pattern"))
        kwargs["model_max_length"] = _check_model_max_length(kwargs.get("model_max_length"))
        return kwargs

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> tuple[str, ...]:
        """transformers' ``save_pretrained``, written atomically when this package is installed
        (``reformer.checkpoint.atomic_save``: each file replaced with ``os.replace``, the directory never removed)."""
        try:
            from reformer.checkpoint import atomic_save
        except ImportError:  # this file loaded as remote code without the package
            atomic_save = None
        if atomic_save is None or kwargs.get("push_to_hub"):
            return super().save_pretrained(save_directory, *args, **kwargs)
        written: list[tuple[str, tuple[str, ...]]] = []
        parent_save = super().save_pretrained

        def write(staging: str) -> None:
            written.append((staging, parent_save(staging, *args, **kwargs)))

        atomic_save(save_directory, write)
        staging, files = written[0]
        return tuple(os.path.join(os.fspath(save_directory), os.path.relpath(f, staging)) for f in files)

    def _keep_pattern(self) -> None:
        self.init_kwargs["special_tokens_pattern"] = self.special_tokens_pattern

    @property
    def add_eos_token(self) -> bool:
        return self.special_tokens_pattern == "eos"

    @add_eos_token.setter
    def add_eos_token(self, value: bool) -> None:
        self.special_tokens_pattern = _special_tokens_pattern(value)

    # Where transformers is silent: an empty batch fails in pad() with a message about encodings, a
    # max_length of 0 or a negative pad_to_multiple_of pads nothing, an unknown padding_side is reported only
    # when a row needs padding, and a float id is truncated by int().
    def _encode_plus(self, text: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(text, (list, tuple)) and len(text) == 0 and not kwargs.get("is_split_into_words"):
            raise ValueError(
                "text is an empty batch: there is no sequence to encode and no length for a tensor "
                f"(return_tensors={kwargs.get('return_tensors')!r}); pass at least one text"
            )
        return super()._encode_plus(text, *args, **kwargs)

    def pad(
        self,
        encoded_inputs: Any,
        padding: Any = True,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        **kwargs: Any,
    ) -> Any:
        for name, value in (("max_length", max_length), ("pad_to_multiple_of", pad_to_multiple_of)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive int or None; got {value!r}")
        side = self.padding_side if padding_side is None else padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right'; got {side!r}")
        return super().pad(encoded_inputs, padding, max_length, pad_to_multiple_of, padding_side, **kwargs)

    def _decode(self, token_ids: Any, *args: Any, **kwargs: Any) -> str:
        for index in [token_ids] if isinstance(token_ids, int) else token_ids:
            if isinstance(index, bool) or not isinstance(index, int):
                raise TypeError(
                    "token_ids must be ints (one sequence, or a batch of sequences); "
                    f"got {type(index).__name__} {index!r}"
                )
        return super()._decode(token_ids, *args, **kwargs)


# ====================================================================== SentencePiece
class ReformerTokenizer(_ReformerTokenizerMixin, SentencePieceBackend):
    """SentencePiece tokenizer of the Reformer checkpoints (``spiece.model``); ids are SentencePiece's own.

    ``ReformerTokenizer.from_pretrained(directory_or_hub_id)``, or ``ReformerTokenizer(path_to_spiece_model)``.
    See the module docstring for the conventions.
    """

    vocab_files_names = {"vocab_file": SPIECE_MODEL_FILE}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str | os.PathLike | None = None,
        eos_token: str | AddedToken | None = "</s>",
        unk_token: str | AddedToken | None = "<unk>",
        add_eos_token: bool | None = None,
        **kwargs: Any,
    ) -> None:
        if vocab_file is None or not os.path.isfile(vocab_file):
            raise ValueError(_missing_spiece_message(vocab_file, kwargs))
        vocab_file = os.fspath(vocab_file)
        model = spm.SentencePieceProcessor()
        try:
            model.Load(vocab_file)
        except (RuntimeError, OSError) as error:
            raise ValueError(f"{vocab_file} is not a valid SentencePiece model: {error}") from None
        # SentencePiece's control pieces ("<s>", "</s>") are special tokens, as in transformers 5
        extra = kwargs.pop("extra_special_tokens", None)
        extra = kwargs.pop("additional_special_tokens", None) if extra is None else extra
        extra = [] if extra is None else extra
        if isinstance(extra, (list, tuple)):
            control = [model.id_to_piece(i) for i in range(model.get_piece_size()) if model.is_control(i)]
            extra = list(extra) + [piece for piece in control if piece not in {str(t) for t in extra}]
        # legacy=False would make the backend drop SentencePiece's dummy prefix, changing the ids
        kwargs["legacy"] = True
        super().__init__(
            vocab_file=vocab_file,
            eos_token=eos_token,
            unk_token=unk_token,
            extra_special_tokens=extra,
            **self._prepare_kwargs(add_eos_token, kwargs),
        )
        self._keep_pattern()

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        # pieces of SentencePiece's ids (not its surface strings), so that the ids are exactly sp.encode's:
        # an unknown character becomes the unk piece
        return [self.sp_model.id_to_piece(i) for i in self.sp_model.encode(_check_text(text))]

    def _convert_id_to_token(self, index: int) -> str:
        if not 0 <= index < self.vocab_size:
            raise ValueError(f"id {index} is out of range for this tokenizer (ids are 0..{len(self) - 1})")
        return self.sp_model.id_to_piece(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """SentencePiece's decoding of each run of pieces; special and added tokens are written as they are."""
        literal = set(self.all_special_tokens)
        literal.update(t for t, i in self._added_tokens_encoder.items() if i >= self.vocab_size)
        parts: list[str] = []
        run: list[str] = []
        for token in [*tokens, None]:
            if token is not None and token not in literal:
                run.append(token)
                continue
            if run:
                text = self.sp_model.decode_pieces(run)
                # SentencePiece drops the space of a leading "▁"; after a special token it is text
                parts.append(" " + text if parts and run[0].startswith("\u2581") else text)
                run = []
            if token is not None:
                parts.append(token)
        return "".join(parts)


def _missing_spiece_message(vocab_file: Any, kwargs: dict[str, Any]) -> str:
    where = kwargs.get("name_or_path")
    if not where:
        what = "None" if vocab_file is None else f"{os.fspath(vocab_file)!r}, which is not a file"
        return (
            f"ReformerTokenizer needs vocab_file, the path of a SentencePiece model ({SPIECE_MODEL_FILE}); got {what}"
        )
    message = f"ReformerTokenizer needs {SPIECE_MODEL_FILE} (the SentencePiece model), which {where!r} does not hold"
    if not os.path.isdir(where):
        message += " (as a hub id: the repository has no such file, or, offline, the local cache has none)"
    if kwargs.get("tokenizer_file"):
        message += (
            f". It holds {TOKENIZER_JSON_FILE}, which transformers 5 saves: a BPE rebuilt from the SentencePiece "
            "model, which cannot be turned back into it (for unigram models its ids differ from SentencePiece's). "
            f"Load that directory with load_tokenizer() or transformers.AutoTokenizer, or save the tokenizer again "
            f"from the original {SPIECE_MODEL_FILE}"
        )
    return message


# ====================================================================== bytes
class ReformerByteTokenizer(_ReformerTokenizerMixin, PythonBackend):
    """Byte-level tokenizer of the enwik8 Reformer checkpoints: id = UTF-8 byte + 2; 0 = ``<pad>``, 1 = ``</s>``.

    ``vocab_size`` is 258. The token of a byte id is the Latin-1 character of the byte (``chr(id - 2)``).
    """

    vocab_files_names: dict[str, str] = {}
    model_input_names = ["input_ids", "attention_mask"]
    num_reserved_ids = 2

    def __init__(
        self,
        pad_token: str | AddedToken | None = "<pad>",
        eos_token: str | AddedToken | None = "</s>",
        add_eos_token: bool | None = None,
        **kwargs: Any,
    ) -> None:
        # the reserved ids hold these tokens whatever pad_token and eos_token name
        self._added_tokens_decoder = {
            0: AddedToken("<pad>", special=True, normalized=False),
            1: AddedToken("</s>", special=True, normalized=False),
        }
        # text is always its bytes: special tokens written in it are not looked for
        kwargs.setdefault("split_special_tokens", True)
        super().__init__(pad_token=pad_token, eos_token=eos_token, **self._prepare_kwargs(add_eos_token, kwargs))
        self._keep_pattern()

    @property
    def vocab_size(self) -> int:
        return 256 + self.num_reserved_ids

    def get_vocab(self) -> dict[str, int]:
        vocab = {"<pad>": 0, "</s>": 1}
        vocab.update((chr(b), b + self.num_reserved_ids) for b in range(256))
        vocab.update(self._added_tokens_encoder)
        return vocab

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return [chr(b) for b in _check_text(text).encode("utf-8")]

    def _convert_token_to_id(self, token: str) -> int:
        if len(token) != 1 or ord(token) > 255:
            raise ValueError(f"token {token!r} is not in the byte vocabulary (one character U+0000..U+00FF)")
        return ord(token) + self.num_reserved_ids

    def _convert_id_to_token(self, index: int) -> str:
        if not self.num_reserved_ids <= index < self.vocab_size:
            raise ValueError(f"id {index} is out of range for this tokenizer (ids are 0..{len(self) - 1})")
        return chr(index - self.num_reserved_ids)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Bytes joined and decoded as UTF-8 (with replacement); special and added tokens written as they are."""
        parts: list[str] = []
        run = bytearray()
        for token in tokens:
            if len(token) == 1 and ord(token) < 256:
                run.append(ord(token))
                continue
            parts.append(run.decode("utf-8", errors="replace"))
            run.clear()
            parts.append(token)
        parts.append(run.decode("utf-8", errors="replace"))
        return "".join(parts)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        """The vocabulary is fixed; writes a byte-level ``tokenizer.json`` with the same ids for AutoTokenizer."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        byte_char = bytes_to_unicode()
        vocab = {byte_char[b]: b + self.num_reserved_ids for b in range(256)}
        vocab.update({"<pad>": 0, "</s>": 1})
        backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = decoders.ByteLevel()
        # added tokens (the reserved two, then e.g. a mask token) in id order: tokenizers numbers new ones from 258
        for token in dict(sorted(self._added_tokens_decoder.items())).values():
            (backend.add_special_tokens if token.special else backend.add_tokens)([token])
        if self.add_eos_token:
            eos = (str(self.eos_token), self.eos_token_id)
            backend.post_processor = processors.TemplateProcessing(
                single=f"$A {eos[0]}", pair=f"$A {eos[0]} $B {eos[0]}", special_tokens=[eos]
            )
        path = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + TOKENIZER_JSON_FILE)
        backend.save(path)
        return (path,)


def load_tokenizer(name_or_path: str | os.PathLike, **kwargs: Any) -> Any:
    """The tokenizer saved in a directory or hub repository.

    :class:`ReformerByteTokenizer` when its ``tokenizer_config.json`` names that class;
    :class:`ReformerTokenizer` when it holds ``spiece.model``; ``transformers.AutoTokenizer``'s tokenizer
    when it holds only ``tokenizer.json`` (saved by transformers 5: its ids are that file's, which for
    SentencePiece unigram models are not SentencePiece's). Keyword arguments go to ``from_pretrained``.
    """
    from transformers import AutoTokenizer
    from transformers.utils import cached_file

    hub = {key: kwargs[key] for key in _HUB_KWARGS if key in kwargs}

    def find(filename: str) -> str | None:
        return cached_file(name_or_path, filename, _raise_exceptions_for_missing_entries=False, **hub)

    config_file = find(TOKENIZER_CONFIG_FILE)
    tokenizer_class = None
    if config_file is not None:
        with open(config_file, encoding="utf-8") as handle:
            tokenizer_class = json.load(handle).get("tokenizer_class")
    if tokenizer_class == ReformerByteTokenizer.__name__:
        return ReformerByteTokenizer.from_pretrained(name_or_path, **kwargs)
    if find(SPIECE_MODEL_FILE) is not None:
        return ReformerTokenizer.from_pretrained(name_or_path, **kwargs)
    if find(TOKENIZER_JSON_FILE) is not None:
        return AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    where = os.fspath(name_or_path)
    where = (
        f"{where!r}"
        if os.path.isdir(where)
        else f"{where!r} (a hub id: in the repository or, offline, in the local cache)"
    )
    raise FileNotFoundError(
        f"no tokenizer in {where}: expected {SPIECE_MODEL_FILE} (ReformerTokenizer), "
        f"{TOKENIZER_JSON_FILE} (saved by transformers 5) or a {TOKENIZER_CONFIG_FILE} naming ReformerByteTokenizer "
        f"(found {TOKENIZER_CONFIG_FILE}: {config_file is not None}, tokenizer_class: {tokenizer_class!r}). "
        "Byte-level checkpoints ship no tokenizer file: build ReformerByteTokenizer() directly"
    )
