"""Tokenizers for Reformer checkpoints, without importing ``transformers``.

Two tokenizers share one base class (:class:`ReformerTokenizerBase`) that holds the batching logic:
truncation, padding (right or left), ``pad_to_multiple_of``, the attention mask, tensors, decoding of
batches, the special tokens and the JSON files ``save_pretrained`` writes.

:class:`ReformerTokenizer`
    SentencePiece, for checkpoints that ship ``spiece.model`` (``google/reformer-crime-and-punishment``).
    The ids are SentencePiece's own ``encode``. Conventions mirrored from ``transformers``'
    ``ReformerTokenizer`` (4.x slow and 5.x):

    * nothing is added to a sequence: no BOS and **no EOS is appended** (``add_eos_token=True`` turns
      EOS appending on, as ``transformers`` 5 allows);
    * ``eos_token="</s>"``, ``unk_token="<unk>"``; there is **no pad token** by default, so
      ``pad_token`` and ``pad_token_id`` are ``None`` and asking for padding raises ``ValueError`` until
      one is set (``tokenizer.pad_token = tokenizer.eos_token``, or ``pad_token=...`` at load time);
    * special tokens written in the text (``"</s>"``, ``"<unk>"``, SentencePiece control pieces such as
      ``"<s>"``) map to their ids; the text between them is encoded by SentencePiece piece by piece;
    * ``decode`` writes special tokens literally (``"<unk>"``, ``"</s>"``) unless
      ``skip_special_tokens=True``.

    ``transformers`` 5.x does *not* use SentencePiece for encoding: it rebuilds the vocabulary as a
    character-level BPE (``tokenizers``' ``BPE`` with merges generated from the vocabulary). For
    SentencePiece BPE models this gives the same ids; for unigram models it does not (it splits into
    many more, mostly single-character, pieces). This class calls SentencePiece, so it agrees with
    SentencePiece and with ``transformers`` 4.x for both model types. Two further differences with
    ``transformers`` 5.x: it writes an extra ``"▁"`` piece for a space right before a special token
    written in the text (``"ka </s>"``), where SentencePiece (and this class) drops it; and it saves
    ``tokenizer.json`` instead of ``spiece.model``, which this class cannot read.

:class:`ReformerByteTokenizer`
    Bytes, for the enwik8 character-level checkpoints (``google/reformer-enwik8``, vocabulary 258),
    which ship no tokenizer file. Convention of trax/tensor2tensor's byte encoder and of the model
    card: id ``0`` is padding, id ``1`` is EOS, a UTF-8 byte ``b`` is id ``b + 2``. Nothing is appended
    when encoding. Decoding joins the bytes and decodes them as UTF-8 (invalid sequences, e.g. a
    multi-byte character cut by generation, become U+FFFD); the model card's
    ``"".join(chr(x - 2) for x in ids if x > 1)`` equals ``decode(ids, skip_special_tokens=True)`` on
    ASCII text but reads every byte as Latin-1, so non-ASCII text comes back as mojibake there.
"""

from __future__ import annotations

import json
import operator
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any

import torch

__all__ = [
    "BatchEncoding",
    "ReformerByteTokenizer",
    "ReformerTokenizer",
    "ReformerTokenizerBase",
    "load_tokenizer",
]

SPIECE_MODEL_FILE = "spiece.model"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
# transformers' "no limit" value for model_max_length (int(1e30)); kept so saved configs read the same.
VERY_LARGE_INTEGER = int(1e30)

_SPECIAL_TOKEN_NAMES = ("eos_token", "unk_token", "pad_token")
_PADDING_STRATEGIES = ("longest", "max_length", "do_not_pad")
_TRUNCATION_STRATEGIES = ("longest_first", "only_first", "do_not_truncate")
_SIDES = ("left", "right")
_TENSOR_TYPES = ("pt", "np")


class BatchEncoding(dict):
    """The output of a tokenizer call: a dict (``input_ids``, ``attention_mask``) with attribute access."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: str | torch.device) -> BatchEncoding:
        """Move every tensor to ``device`` (in place); lists are left as they are."""
        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                self[key] = value.to(device)
        return self


def _token_content(value: Any, field: str) -> str | None:
    """A special token from a config file: a string, ``None`` or transformers' AddedToken dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{field} must be a string, null or an AddedToken dict with 'content'; got {value!r}")


def _atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and ``os.replace``."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp makes the file private (0600); give it the usual mode (or keep the replaced file's)
        os.chmod(tmp, os.stat(path).st_mode & 0o777 if os.path.exists(path) else 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object; got {type(data).__name__}")
    return data


def _as_id_list(ids: Any, what: str) -> list[int]:
    """One sequence of ids (list/tuple of ints, 1-D tensor or array) as a list of Python ints."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() > 1:
            raise ValueError(f"{what} must be one sequence of ids (1-D); got a tensor of shape {tuple(ids.shape)}")
        if ids.is_floating_point() or ids.is_complex():
            raise TypeError(f"{what} must hold integer ids; got a tensor of dtype {ids.dtype}")
        return [int(i) for i in ids.reshape(-1).tolist()]
    if hasattr(ids, "tolist") and not isinstance(ids, (list, tuple)):
        ids = ids.tolist()
    if isinstance(ids, int) and not isinstance(ids, bool):
        return [ids]
    if not isinstance(ids, (list, tuple)):
        raise TypeError(f"{what} must be a list of ints or a 1-D tensor; got {type(ids).__name__}")
    out = []
    for i in ids:
        if isinstance(i, (bool, float)) or not hasattr(i, "__index__"):
            raise TypeError(f"{what} must hold ints; got {type(i).__name__} ({i!r})")
        # operator.index also accepts numpy / torch integer scalars
        out.append(operator.index(i))
    return out


class ReformerTokenizerBase:
    """Shared batching, padding, truncation, decoding and saving for the Reformer tokenizers.

    Subclasses provide the vocabulary: ``vocab_size``, ``_encode_text``, ``_decode_run``,
    ``_base_token_to_id``, ``_base_id_to_token``, ``_save_vocabulary`` and ``_load_kwargs``.
    """

    model_input_names = ["input_ids", "attention_mask"]
    tokenizer_class_name = "ReformerTokenizerBase"

    def __init__(
        self,
        *,
        eos_token: str | None = None,
        unk_token: str | None = None,
        pad_token: str | None = None,
        additional_special_tokens: Sequence[str] | None = None,
        model_max_length: int | None = None,
        padding_side: str = "right",
        truncation_side: str = "right",
        add_eos_token: bool = False,
    ) -> None:
        # tokens that are not in the base vocabulary get ids after it, as transformers' added tokens do
        self._added_tokens: dict[str, int] = {}
        self._special: dict[str, str | None] = {name: None for name in _SPECIAL_TOKEN_NAMES}
        self.eos_token = eos_token
        self.unk_token = unk_token
        self.pad_token = pad_token
        if additional_special_tokens is None:
            additional_special_tokens = []
        if isinstance(additional_special_tokens, str) or not all(isinstance(t, str) for t in additional_special_tokens):
            raise TypeError(f"additional_special_tokens must be a list of strings; got {additional_special_tokens!r}")
        self.additional_special_tokens = list(additional_special_tokens)
        for token in self.additional_special_tokens:
            self._register(token, "additional_special_tokens")
        if model_max_length is None:
            model_max_length = VERY_LARGE_INTEGER
        if isinstance(model_max_length, bool) or not isinstance(model_max_length, int) or model_max_length <= 0:
            raise ValueError(f"model_max_length must be a positive int; got {model_max_length!r}")
        self.model_max_length = model_max_length
        self.padding_side = padding_side
        self.truncation_side = truncation_side
        if not isinstance(add_eos_token, bool):
            raise TypeError(f"add_eos_token must be a bool; got {type(add_eos_token).__name__}")
        self.add_eos_token = add_eos_token

    # ------------------------------------------------------------------ vocabulary (subclass hooks)
    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary (tokens added at load time are not counted; see ``len()``)."""
        raise NotImplementedError

    def _encode_text(self, text: Any) -> list[int]:
        raise NotImplementedError

    def _decode_run(self, ids: list[int], first: bool) -> str:
        """Text of a run of non-special base ids; ``first`` says whether the run starts the output."""
        raise NotImplementedError

    def _base_token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    def _base_id_to_token(self, index: int) -> str:
        raise NotImplementedError

    def _save_vocabulary(self, directory: str) -> list[str]:
        raise NotImplementedError

    # ------------------------------------------------------------------ special tokens
    def _register(self, token: str | None, field: str) -> None:
        if token is None:
            return
        if not isinstance(token, str) or not token:
            raise TypeError(f"{field} must be a non-empty string or None; got {token!r}")
        if self._base_token_to_id(token) is None and token not in self._added_tokens:
            self._added_tokens[token] = self.vocab_size + len(self._added_tokens)

    def _set_special(self, name: str, token: str | None) -> None:
        self._register(token, name)
        self._special[name] = token

    eos_token = property(lambda self: self._special["eos_token"], lambda self, v: self._set_special("eos_token", v))
    unk_token = property(lambda self: self._special["unk_token"], lambda self, v: self._set_special("unk_token", v))
    pad_token = property(lambda self: self._special["pad_token"], lambda self, v: self._set_special("pad_token", v))

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self.convert_tokens_to_ids(self.eos_token)

    @property
    def unk_token_id(self) -> int | None:
        return None if self.unk_token is None else self.convert_tokens_to_ids(self.unk_token)

    @property
    def pad_token_id(self) -> int | None:
        return None if self.pad_token is None else self.convert_tokens_to_ids(self.pad_token)

    @property
    def special_tokens_map(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: v for k, v in self._special.items() if v is not None}
        if self.additional_special_tokens:
            out["additional_special_tokens"] = list(self.additional_special_tokens)
        return out

    def _extra_special_tokens(self) -> list[str]:
        """Special tokens of the vocabulary itself (SentencePiece control pieces); none by default."""
        return []

    @property
    def all_special_tokens(self) -> list[str]:
        tokens = [t for t in self._special.values() if t is not None]
        tokens += self.additional_special_tokens + self._extra_special_tokens()
        return list(dict.fromkeys(tokens))

    @property
    def all_special_ids(self) -> list[int]:
        return [self.convert_tokens_to_ids(t) for t in self.all_special_tokens]

    def __len__(self) -> int:
        return self.vocab_size + len(self._added_tokens)

    def get_vocab(self) -> dict[str, int]:
        vocab = {self._base_id_to_token(i): i for i in range(self.vocab_size)}
        vocab.update(self._added_tokens)
        return vocab

    # ------------------------------------------------------------------ tokens <-> ids
    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> int | list[int]:
        """Id of a token (or ids of a list); an unknown token maps to ``unk_token_id`` or raises."""
        if isinstance(tokens, str):
            return self._token_to_id(tokens)
        return [self._token_to_id(t) for t in tokens]

    def _token_to_id(self, token: str) -> int:
        if not isinstance(token, str):
            raise TypeError(f"tokens must be strings; got {type(token).__name__} ({token!r})")
        if token in self._added_tokens:
            return self._added_tokens[token]
        index = self._base_token_to_id(token)
        if index is not None:
            return index
        if self.unk_token is not None:
            return self.convert_tokens_to_ids(self.unk_token)
        raise ValueError(f"token {token!r} is not in the vocabulary and this tokenizer has no unk_token")

    def convert_ids_to_tokens(
        self, ids: int | Sequence[int] | torch.Tensor, skip_special_tokens: bool = False
    ) -> str | list[str]:
        if isinstance(ids, int) and not isinstance(ids, bool):
            return self._id_to_token(ids)
        special = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._id_to_token(i) for i in _as_id_list(ids, "ids") if i not in special]

    def _id_to_token(self, index: int) -> str:
        if 0 <= index < self.vocab_size:
            return self._base_id_to_token(index)
        for token, token_id in self._added_tokens.items():
            if token_id == index:
                return token
        raise ValueError(f"id {index} is out of range for this tokenizer (ids are 0..{len(self) - 1})")

    # ------------------------------------------------------------------ argument checks
    @property
    def padding_side(self) -> str:
        return self._padding_side

    @padding_side.setter
    def padding_side(self, value: str) -> None:
        if value not in _SIDES:
            raise ValueError(f"padding_side must be 'left' or 'right'; got {value!r}")
        self._padding_side = value

    @property
    def truncation_side(self) -> str:
        return self._truncation_side

    @truncation_side.setter
    def truncation_side(self, value: str) -> None:
        if value not in _SIDES:
            raise ValueError(f"truncation_side must be 'left' or 'right'; got {value!r}")
        self._truncation_side = value

    @staticmethod
    def _padding_strategy(padding: Any) -> str:
        if padding is True:
            return "longest"
        if padding is False or padding is None:
            return "do_not_pad"
        if isinstance(padding, str) and padding in _PADDING_STRATEGIES:
            return padding
        raise ValueError(f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad'; got {padding!r}")

    @staticmethod
    def _truncation_strategy(truncation: Any) -> str:
        if truncation is True:
            return "longest_first"
        if truncation is False or truncation is None:
            return "do_not_truncate"
        if isinstance(truncation, str) and truncation in _TRUNCATION_STRATEGIES:
            return truncation
        raise ValueError(
            "truncation must be True, False, 'longest_first', 'only_first' or 'do_not_truncate' "
            f"(pairs of sequences are not supported); got {truncation!r}"
        )

    def _require_pad_token(self) -> None:
        if self.pad_token is None:
            raise ValueError(
                "Asking to pad but the tokenizer has no pad_token; set one, e.g. "
                "`tokenizer.pad_token = tokenizer.eos_token`, or pass pad_token=... when loading"
            )

    @staticmethod
    def _check_positive(value: Any, name: str) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ValueError(f"{name} must be a positive int or None; got {value!r}")

    @staticmethod
    def _check_tensor_type(return_tensors: Any) -> None:
        if return_tensors is not None and return_tensors not in _TENSOR_TYPES:
            raise ValueError(f"return_tensors must be 'pt', 'np' or None; got {return_tensors!r}")

    # ------------------------------------------------------------------ encoding
    def __call__(
        self,
        text: Any,
        *,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_tensors: str | None = None,
        return_attention_mask: bool = True,
    ) -> BatchEncoding:
        """Tokenize one text or a batch.

        A single text gives flat lists (``input_ids: list[int]``), or tensors of shape ``[1, L]`` with
        ``return_tensors``; a list of texts gives lists of lists, or ``[B, L]`` tensors (which need equal
        lengths, i.e. padding). ``truncation`` defaults to truncating when ``max_length`` is given and
        no padding is asked for, as in transformers.
        """
        batched = self._is_batch(text)
        texts = list(text) if batched else [text]
        padding_strategy = self._padding_strategy(padding)
        truncation_strategy = self._truncation_strategy(truncation)
        if truncation is None and max_length is not None and padding_strategy == "do_not_pad":
            truncation_strategy = "longest_first"
        self._check_positive(max_length, "max_length")
        self._check_positive(pad_to_multiple_of, "pad_to_multiple_of")
        self._check_tensor_type(return_tensors)
        if padding_side is not None and padding_side not in _SIDES:
            raise ValueError(f"padding_side must be 'left', 'right' or None; got {padding_side!r}")
        if padding_strategy != "do_not_pad":
            self._require_pad_token()

        limit = max_length if max_length is not None else self.model_max_length
        add_eos = add_special_tokens and self.add_eos_token
        if add_eos and self.eos_token is None:
            raise ValueError("add_eos_token is True but the tokenizer has no eos_token")
        rows = []
        for item in texts:
            ids = self._encode_text(item)
            if truncation_strategy != "do_not_truncate":
                ids = self._truncate(ids, limit - int(add_eos))
            if add_eos:
                ids = ids + [self.eos_token_id]
            rows.append(ids)
        return self._pad_rows(
            rows,
            None,
            padding_strategy,
            max_length,
            pad_to_multiple_of,
            padding_side,
            return_tensors,
            return_attention_mask,
            not batched,
        )

    def _is_batch(self, text: Any) -> bool:
        if isinstance(text, (list, tuple)):
            for item in text:
                if not self._is_text(item):
                    raise TypeError(
                        f"text must be a string or a list of strings; got a list holding {type(item).__name__}"
                    )
            return True
        if self._is_text(text):
            return False
        raise TypeError(f"text must be a string or a list of strings; got {type(text).__name__}")

    def _is_text(self, item: Any) -> bool:
        return isinstance(item, str)

    def _truncate(self, ids: list[int], limit: int) -> list[int]:
        if limit < 0:
            raise ValueError(f"max_length={limit + 1} leaves no room for the EOS token that add_eos_token appends")
        if len(ids) <= limit:
            return ids
        return ids[:limit] if self.truncation_side == "right" else ids[len(ids) - limit :]

    def encode(
        self,
        text: str,
        *,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_tensors: str | None = None,
    ) -> list[int] | Any:
        """Ids of one text: a list, or a ``[1, L]`` tensor with ``return_tensors``."""
        if not self._is_text(text):
            raise TypeError(f"text must be a single string for encode(); got {type(text).__name__} (use __call__)")
        return self(
            text,
            add_special_tokens=add_special_tokens,
            padding=padding,
            truncation=truncation,
            max_length=max_length,
            pad_to_multiple_of=pad_to_multiple_of,
            padding_side=padding_side,
            return_tensors=return_tensors,
            return_attention_mask=False,
        )["input_ids"]

    def pad(
        self,
        encoded_inputs: dict[str, Any],
        *,
        padding: bool | str = True,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_tensors: str | None = None,
        return_attention_mask: bool = True,
    ) -> BatchEncoding:
        """Pad already-encoded ``input_ids`` (one sequence or a batch; ``attention_mask`` is kept, or
        made when absent) as ``__call__`` does: ``padding=True``/``"longest"`` pads to the longest
        sequence, ``"max_length"`` to ``max_length`` (else ``model_max_length``); the target is rounded
        up to ``pad_to_multiple_of``; padding goes on ``padding_side`` (default: the tokenizer's).
        """
        if not isinstance(encoded_inputs, dict) or "input_ids" not in encoded_inputs:
            raise ValueError("encoded_inputs must be a dict with an 'input_ids' entry")
        sequences = encoded_inputs["input_ids"]
        if isinstance(sequences, torch.Tensor) or hasattr(sequences, "tolist"):
            sequences = sequences.tolist()
        if not isinstance(sequences, (list, tuple)):
            raise TypeError(f"input_ids must be a list or a tensor; got {type(sequences).__name__}")
        single = len(sequences) > 0 and not isinstance(sequences[0], (list, tuple))
        rows = [_as_id_list(ids, "input_ids") for ids in ([sequences] if single else sequences)]
        masks = encoded_inputs.get("attention_mask")
        if masks is not None:
            if isinstance(masks, torch.Tensor) or hasattr(masks, "tolist"):
                masks = masks.tolist()
            masks = [list(masks)] if single else [list(m) for m in masks]
            if [len(m) for m in masks] != [len(r) for r in rows]:
                raise ValueError("attention_mask must have the same lengths as input_ids")
        return self._pad_rows(
            rows,
            masks,
            self._padding_strategy(padding),
            max_length,
            pad_to_multiple_of,
            padding_side,
            return_tensors,
            return_attention_mask,
            single,
        )

    def _pad_rows(
        self,
        rows: list[list[int]],
        masks: list[list[int]] | None,
        strategy: str,
        max_length: int | None,
        pad_to_multiple_of: int | None,
        padding_side: str | None,
        return_tensors: str | None,
        return_attention_mask: bool,
        single: bool,
    ) -> BatchEncoding:
        self._check_positive(max_length, "max_length")
        self._check_positive(pad_to_multiple_of, "pad_to_multiple_of")
        self._check_tensor_type(return_tensors)
        if padding_side is not None and padding_side not in _SIDES:
            raise ValueError(f"padding_side must be 'left', 'right' or None; got {padding_side!r}")
        side = self.padding_side if padding_side is None else padding_side
        if masks is None:
            masks = [[1] * len(r) for r in rows]
        if strategy != "do_not_pad":
            self._require_pad_token()
            if strategy == "longest":
                target = max((len(r) for r in rows), default=0)
            else:
                target = max_length if max_length is not None else self.model_max_length
                if target >= VERY_LARGE_INTEGER:
                    raise ValueError("padding='max_length' needs max_length (the tokenizer has no model_max_length)")
            if pad_to_multiple_of is not None and target % pad_to_multiple_of:
                target += pad_to_multiple_of - target % pad_to_multiple_of
            pad_id = self.pad_token_id
            padded_rows, padded_masks = [], []
            for ids, mask in zip(rows, masks):
                n = max(target - len(ids), 0)
                if side == "right":
                    padded_rows.append(ids + [pad_id] * n)
                    padded_masks.append(mask + [0] * n)
                else:
                    padded_rows.append([pad_id] * n + ids)
                    padded_masks.append([0] * n + mask)
            rows, masks = padded_rows, padded_masks
        out = BatchEncoding(input_ids=self._to_output(rows, "input_ids", return_tensors, single))
        if return_attention_mask:
            out["attention_mask"] = self._to_output(masks, "attention_mask", return_tensors, single)
        return out

    @staticmethod
    def _to_output(rows: list[list[int]], key: str, return_tensors: str | None, single: bool) -> Any:
        if return_tensors is None:
            return rows[0] if single else rows
        lengths = {len(r) for r in rows}
        if len(lengths) > 1:
            raise ValueError(
                f"cannot make a tensor of {key} with sequences of different lengths {sorted(lengths)}; "
                "use padding=True (or padding='max_length')"
            )
        if return_tensors == "pt":
            return torch.tensor(rows, dtype=torch.long).reshape(len(rows), -1)
        import numpy as np

        return np.asarray(rows, dtype=np.int64).reshape(len(rows), -1)

    # ------------------------------------------------------------------ decoding
    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        """Text of one sequence of ids (list, 1-D tensor or array).

        Special tokens are written literally (``"</s>"``) unless ``skip_special_tokens``.
        """
        id_list = _as_id_list(ids, "ids")
        n = len(self)
        for i in id_list:
            if not 0 <= i < n:
                raise ValueError(f"id {i} is out of range for this tokenizer (ids are 0..{n - 1})")
        special = set(self.all_special_ids) | set(self._added_tokens.values())
        if skip_special_tokens:
            return self._decode_run([i for i in id_list if i not in special], first=True)
        parts, run = [], []
        for i in id_list:
            if i in special:
                if run:
                    parts.append(self._decode_run(run, first=not parts))
                    run = []
                parts.append(self._id_to_token(i))
            else:
                run.append(i)
        if run:
            parts.append(self._decode_run(run, first=not parts))
        return "".join(parts)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False) -> list[str]:
        """``decode`` of each row of a batch (list of lists or a 2-D tensor/array)."""
        if isinstance(sequences, torch.Tensor) or hasattr(sequences, "tolist"):
            if getattr(sequences, "ndim", 2) != 2:
                raise ValueError(f"sequences must be 2-D [batch, length]; got shape {tuple(sequences.shape)}")
            sequences = sequences.tolist()
        if not isinstance(sequences, (list, tuple)):
            raise TypeError(f"sequences must be a list of id lists or a 2-D tensor; got {type(sequences).__name__}")
        return [self.decode(seq, skip_special_tokens=skip_special_tokens) for seq in sequences]

    # ------------------------------------------------------------------ saving / loading
    def _config_dict(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "tokenizer_class": self.tokenizer_class_name,
            "model_max_length": self.model_max_length,
            "padding_side": self.padding_side,
            "truncation_side": self.truncation_side,
            "additional_special_tokens": list(self.additional_special_tokens),
        }
        config.update(self._special)
        if self.add_eos_token:
            config["add_eos_token"] = True
        return config

    def save_pretrained(self, save_directory: str | os.PathLike) -> tuple[str, ...]:
        """Write the vocabulary file(s), ``tokenizer_config.json`` and ``special_tokens_map.json``.

        Every file is written to a temporary file and renamed into place, so a crash never leaves a
        half-written file. Returns the paths written.
        """
        directory = os.fspath(save_directory)
        if os.path.isfile(directory):
            raise ValueError(f"save_directory {directory!r} is a file, not a directory")
        os.makedirs(directory, exist_ok=True)
        written = self._save_vocabulary(directory)
        for name, payload in (
            (TOKENIZER_CONFIG_FILE, self._config_dict()),
            (SPECIAL_TOKENS_MAP_FILE, self.special_tokens_map),
        ):
            path = os.path.join(directory, name)
            _atomic_write(path, (json.dumps(payload, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
            written.append(path)
        return tuple(written)

    @classmethod
    def _kwargs_from_directory(cls, directory: str) -> dict[str, Any]:
        """Settings from ``tokenizer_config.json`` then ``special_tokens_map.json`` (which wins)."""
        kwargs: dict[str, Any] = {}
        for name in (TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE):
            path = os.path.join(directory, name)
            if not os.path.isfile(path):
                continue
            data = _read_json(path)
            for key in _SPECIAL_TOKEN_NAMES:
                if key in data:
                    kwargs[key] = _token_content(data[key], f"{key} in {path}")
            extra = data.get("additional_special_tokens", data.get("extra_special_tokens"))
            if extra is not None:
                if isinstance(extra, dict):
                    extra = list(extra.values())
                if not isinstance(extra, list):
                    raise ValueError(f"additional_special_tokens in {path} must be a list; got {extra!r}")
                kwargs["additional_special_tokens"] = [
                    _token_content(t, f"additional_special_tokens in {path}") for t in extra
                ]
            for key in ("model_max_length", "padding_side", "truncation_side", "add_eos_token"):
                if key in data and data[key] is not None:
                    kwargs[key] = data[key]
        if isinstance(kwargs.get("model_max_length"), float):
            kwargs["model_max_length"] = int(kwargs["model_max_length"])
        return kwargs


# ====================================================================== SentencePiece
class ReformerTokenizer(ReformerTokenizerBase):
    """SentencePiece tokenizer of the Reformer checkpoints (``spiece.model``).

    See the module docstring for the conventions (no EOS appended, no pad token by default).
    Build it with ``ReformerTokenizer(path_to_spiece_model)``, ``ReformerTokenizer(model_proto=bytes)``
    or ``ReformerTokenizer.from_pretrained(directory)``.
    """

    vocab_files_names = {"vocab_file": SPIECE_MODEL_FILE}
    tokenizer_class_name = "ReformerTokenizer"

    def __init__(
        self,
        vocab_file: str | os.PathLike | None = None,
        *,
        model_proto: bytes | None = None,
        eos_token: str | None = "</s>",
        unk_token: str | None = "<unk>",
        pad_token: str | None = None,
        additional_special_tokens: Sequence[str] | None = None,
        model_max_length: int | None = None,
        padding_side: str = "right",
        truncation_side: str = "right",
        add_eos_token: bool = False,
    ) -> None:
        import sentencepiece as spm

        if (vocab_file is None) == (model_proto is None):
            raise ValueError("give exactly one of vocab_file (path to spiece.model) and model_proto (its bytes)")
        if vocab_file is not None:
            path = os.fspath(vocab_file)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"SentencePiece model file not found: {path}")
            with open(path, "rb") as handle:
                model_proto = handle.read()
            source = path
        else:
            if not isinstance(model_proto, (bytes, bytearray)):
                raise TypeError(f"model_proto must be bytes; got {type(model_proto).__name__}")
            model_proto = bytes(model_proto)
            source = "model_proto"
        self.vocab_file = vocab_file if vocab_file is None else os.fspath(vocab_file)
        self.sp_model = spm.SentencePieceProcessor()
        try:
            self.sp_model.LoadFromSerializedProto(model_proto)
        except (RuntimeError, OSError) as error:
            raise ValueError(f"{source} is not a valid SentencePiece model: {error}") from None
        if self.sp_model.get_piece_size() == 0:
            raise ValueError(f"{source} is not a valid SentencePiece model (empty vocabulary)")
        self._model_proto = model_proto
        self._control_pieces = [
            self.sp_model.id_to_piece(i) for i in range(self.sp_model.get_piece_size()) if self.sp_model.is_control(i)
        ]
        super().__init__(
            eos_token=eos_token,
            unk_token=unk_token,
            pad_token=pad_token,
            additional_special_tokens=additional_special_tokens,
            model_max_length=model_max_length,
            padding_side=padding_side,
            truncation_side=truncation_side,
            add_eos_token=add_eos_token,
        )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any) -> ReformerTokenizer:
        """Load from a directory holding ``spiece.model`` (+ ``tokenizer_config.json`` /
        ``special_tokens_map.json`` when present), or from a path to the ``.model`` file itself.
        Keyword arguments override the files (e.g. ``pad_token="</s>"``)."""
        path = os.fspath(path)
        if os.path.isfile(path):
            return cls(path, **kwargs)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"no tokenizer directory or SentencePiece model file at {path!r}")
        model_file = os.path.join(path, SPIECE_MODEL_FILE)
        if not os.path.isfile(model_file):
            hint = ""
            if os.path.isfile(os.path.join(path, "tokenizer.json")):
                hint = (
                    " It holds tokenizer.json (the format transformers 5 saves), which is not a SentencePiece"
                    " model; save the tokenizer from the original spiece.model instead."
                )
            raise FileNotFoundError(f"{SPIECE_MODEL_FILE} not found in {path!r}.{hint}")
        settings = cls._kwargs_from_directory(path)
        settings.update(kwargs)
        return cls(model_file, **settings)

    @property
    def vocab_size(self) -> int:
        return self.sp_model.get_piece_size()

    def _extra_special_tokens(self) -> list[str]:
        return list(self._control_pieces)

    def _base_token_to_id(self, token: str) -> int | None:
        index = self.sp_model.piece_to_id(token)
        # piece_to_id answers unk_id for a piece it does not know
        if index == self.sp_model.unk_id() and self.sp_model.id_to_piece(index) != token:
            return None
        return index

    def _base_id_to_token(self, index: int) -> str:
        return self.sp_model.id_to_piece(index)

    def _split_on_special_tokens(self, text: str) -> list[str]:
        """Split text at the special tokens written in it (longest match first); the tokens are kept."""
        tokens = tuple(sorted(self.all_special_tokens, key=len, reverse=True))
        if getattr(self, "_split_cache", (None,))[0] != tokens:
            self._split_cache = (tokens, re.compile("(" + "|".join(map(re.escape, tokens)) + ")"))
        if not tokens:
            return [text]
        return self._split_cache[1].split(text)

    def _encode_text(self, text: str) -> list[int]:
        ids: list[int] = []
        # re.split with a capturing group alternates text, token, text, ...
        for k, piece in enumerate(self._split_on_special_tokens(text)):
            if k % 2:
                ids.append(self.convert_tokens_to_ids(piece))
            elif piece:
                ids.extend(self.sp_model.encode(piece))
        return ids

    def tokenize(self, text: str) -> list[str]:
        """Pieces of ``text`` (as ``convert_ids_to_tokens(encode(text, add_special_tokens=False))``)."""
        return self.convert_ids_to_tokens(self.encode(text, add_special_tokens=False))

    def _decode_run(self, ids: list[int], first: bool) -> str:
        text = self.sp_model.decode(ids)
        # SentencePiece drops the space of a leading "▁"; inside a sequence (after a special token) it is text
        if not first and ids and self.sp_model.id_to_piece(ids[0]).startswith("\u2581"):
            text = " " + text
        return text

    def _save_vocabulary(self, directory: str) -> list[str]:
        path = os.path.join(directory, SPIECE_MODEL_FILE)
        _atomic_write(path, self._model_proto)
        return [path]


# ====================================================================== bytes
class ReformerByteTokenizer(ReformerTokenizerBase):
    """Byte-level tokenizer of the enwik8 Reformer checkpoints: id = UTF-8 byte + 2.

    Ids 0 and 1 are reserved: 0 is ``pad_token`` (``"<pad>"``), 1 is ``eos_token`` (``"</s>"``), as in
    trax/tensor2tensor's byte encoder; ``vocab_size`` is 258. Tokens of byte ids are the Latin-1
    characters of the byte (``chr(id - 2)``). Accepts ``str`` (encoded as UTF-8) or ``bytes``.
    """

    tokenizer_class_name = "ReformerByteTokenizer"
    num_reserved_ids = 2

    def __init__(
        self,
        *,
        pad_token: str | None = "<pad>",
        eos_token: str | None = "</s>",
        additional_special_tokens: Sequence[str] | None = None,
        model_max_length: int | None = None,
        padding_side: str = "right",
        truncation_side: str = "right",
        add_eos_token: bool = False,
    ) -> None:
        self._reserved = ["<pad>", "</s>"]
        super().__init__(
            eos_token=eos_token,
            unk_token=None,
            pad_token=pad_token,
            additional_special_tokens=additional_special_tokens,
            model_max_length=model_max_length,
            padding_side=padding_side,
            truncation_side=truncation_side,
            add_eos_token=add_eos_token,
        )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any) -> ReformerByteTokenizer:
        """Load from a directory (its ``tokenizer_config.json`` / ``special_tokens_map.json`` if any;
        a checkpoint directory without them gives the defaults)."""
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"tokenizer directory not found: {path!r}")
        settings = cls._kwargs_from_directory(path)
        settings.pop("unk_token", None)
        settings.update(kwargs)
        return cls(**settings)

    @property
    def vocab_size(self) -> int:
        return 256 + self.num_reserved_ids

    def _is_text(self, item: Any) -> bool:
        return isinstance(item, (str, bytes, bytearray))

    def _encode_text(self, text: str | bytes) -> list[int]:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return [b + self.num_reserved_ids for b in data]

    def _decode_run(self, ids: list[int], first: bool) -> str:
        return bytes(i - self.num_reserved_ids for i in ids).decode("utf-8", errors="replace")

    def _base_token_to_id(self, token: str) -> int | None:
        if token in self._reserved:
            return self._reserved.index(token)
        if len(token) == 1 and ord(token) < 256:
            return ord(token) + self.num_reserved_ids
        return None

    def _base_id_to_token(self, index: int) -> str:
        if index < self.num_reserved_ids:
            return self._reserved[index]
        return chr(index - self.num_reserved_ids)

    def _save_vocabulary(self, directory: str) -> list[str]:
        # the vocabulary is fixed; tokenizer_config.json (written by the base class) is enough
        return []


def load_tokenizer(path: str | os.PathLike, **kwargs: Any) -> ReformerTokenizer | ReformerByteTokenizer:
    """The tokenizer saved in ``path``: :class:`ReformerTokenizer` when it holds ``spiece.model``,
    :class:`ReformerByteTokenizer` when its ``tokenizer_config.json`` names that class."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory not found: {path!r}")
    if os.path.isfile(os.path.join(path, SPIECE_MODEL_FILE)):
        return ReformerTokenizer.from_pretrained(path, **kwargs)
    config_path = os.path.join(path, TOKENIZER_CONFIG_FILE)
    if os.path.isfile(config_path):
        name = _read_json(config_path).get("tokenizer_class")
        if name == ReformerByteTokenizer.tokenizer_class_name:
            return ReformerByteTokenizer.from_pretrained(path, **kwargs)
        raise ValueError(
            f"{config_path} names tokenizer_class={name!r}, but {SPIECE_MODEL_FILE} is missing from {path!r}; "
            f"expected {SPIECE_MODEL_FILE} (ReformerTokenizer) or tokenizer_class 'ReformerByteTokenizer'"
        )
    raise FileNotFoundError(
        f"no tokenizer in {path!r}: expected {SPIECE_MODEL_FILE} (SentencePiece) or a {TOKENIZER_CONFIG_FILE} "
        "naming ReformerByteTokenizer (for byte-level checkpoints, build ReformerByteTokenizer() directly)"
    )
