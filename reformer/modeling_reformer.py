"""The Reformer model stack, a drop-in for transformers' ``modeling_reformer.py``.

The classes are transformers-native (``PreTrainedModel``; the LM head also ``GenerationMixin``) with the same names,
state-dict keys, forward arguments and outputs as transformers; the numerics follow transformers' implementation (its
``modeling_reformer.py`` is the specification). The hot paths are the ops of ``reformer_kernels`` (``lsh_hash``,
``bucket_sort``, ``chunked_attention``, ``axial_word_embedding``: Triton kernels on CUDA, PyTorch elsewhere); CPU
execution strategies (row blocks, in-place streams, the blocked reversible backward) live in ``reformer.modules`` and
``reformer.reversible``, behind one predicate: they stand in for modules only when those are plain torch modules.

Read top-down: embeddings → attention (LSH, local) → layer → encoder → pre-trained base → model → heads.

Deliberate differences from transformers 5.x (each a transformers defect; the README lists them):
- A checkpoint without ``lm_head.decoder.bias`` (4.x files that kept only the tied ``lm_head.bias``, and 5.0-5.23
  files) has ``lm_head.bias`` added to the logits, as trax and 4.x did; transformers 5.24 starts it at zero.
- Random LSH rotations with ``hash_seed`` set come from a private ``torch.Generator``; the global RNG is never
  reseeded. Dropout in the reversible backward is replayed from recorded RNG *states*.
- The reversible stack returns its parameter gradients (``reformer.reversible``), so it works under DDP.
- Padding to a multiple of the chunk lengths (in training too) continues the position ids, clamped into the
  tables; training runs at any length up to prod(axial_pos_shape); axial embeddings work for any number of axes.
- Cached decoding (``reformer.generation``): left-padded batches decode each row as if alone; ``use_cache=None`` in
  ``forward`` builds no cache (transformers defaults to ``config.use_cache``).
"""

from __future__ import annotations

import logging
import math
from collections import namedtuple
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import MaskedLMOutput, QuestionAnsweringModelOutput, SequenceClassifierOutput
from transformers.models.reformer.modeling_reformer import ReformerModelOutput, ReformerModelWithLMHeadOutput

from reformer_kernels import bucket_sort, chunked_attention, lsh_hash
from reformer_kernels.ops.axial_pos import axial_position_row, axial_word_embedding
from reformer_kernels.ops.axial_pos.reference import gather_rows
from reformer_kernels.ops.lsh_hash import num_buckets_product, random_rotations, rotation_size
from reformer_kernels.validation import check_index_range, check_values

from . import checkpoint
from .configuration_reformer import ReformerConfig, as_reformer_config
from .generation import (
    ReformerDynamicCache,
    check_left_padded,
    hash_for_cache,
    local_decode_step,
    lsh_decode_step,
    prefill_buckets,
    prefill_left_padded,
)
from .modules import (
    ChunkReformerFeedForward,
    ReformerOnlyLMHead,
    final_layer_norm,
    plain_modules,
    projections,
    unhooked,
)
from .reversible import LayerRNG, LayerStack, ReversibleFunction, layer_backward

logger = logging.getLogger(__name__)

LSHSelfAttentionOutput = namedtuple("LSHSelfAttentionOutput", ["hidden_states", "attention_probs", "buckets"])
LocalSelfAttentionOutput = namedtuple("LocalSelfAttentionOutput", ["hidden_states", "attention_probs"])
AttentionOutput = namedtuple("AttentionOutput", ["hidden_states", "attention_probs", "buckets"])
ReformerOutput = namedtuple("ReformerOutput", ["hidden_states", "attn_output", "attention_probs", "buckets", "rng"])
ReformerEncoderOutput = namedtuple(
    "ReformerEncoderOutput", ["hidden_states", "all_hidden_states", "all_attentions", "past_buckets_states"]
)


# ==================================================================================================
# embeddings
# ==================================================================================================
class AxialPositionEmbeddings(nn.Module):
    """Axial position embeddings for any number of axes.

    Unlike transformers (whose training path ignores ``position_ids`` and uses ``0..L-1``), the given
    ``position_ids`` are looked up in training too; the default ids are the same.

    Parameters keep transformers' broadcast shapes (``weights.a`` is ``[1, .., n_a, .., 1, d_a]``); the lookup is the
    fused ``axial_word_embedding`` op on the ``[n_a, d_a]`` views. Any length up to ``prod(axial_pos_shape)`` works in
    training and eval (transformers trains only at ``L == prod``): the positions are looked up exactly as in eval.

    Training-time dropout is transformers' full-grid pattern restricted to the positions used. transformers applies
    ``dropout2d`` to the broadcast table of the whole grid, transposed so that axis 1 is the channel dimension: per
    batch row, one multiplier (``0`` or ``1 / (1 - p)``) per axis-1 index, applied to every position with that index
    and all its channels. Here the same ``[B, n_1]`` multipliers are drawn (same RNG consumption, whatever the length),
    and position ``p`` takes the multiplier of its axis-1 digit, on both backends: at ``L == prod`` this is
    transformers' dropout, and a sub-length (or any ``position_ids``) sees the entries of that same full-grid draw. With
    a single axis, transformers' 3-D ``dropout2d`` call drops channels per batch row; that is mirrored too.
    """

    def __init__(self, config: ReformerConfig):
        super().__init__()
        self.axial_pos_shape = tuple(config.axial_pos_shape)
        self.axial_pos_embds_dim = tuple(config.axial_pos_embds_dim)
        self.dropout = config.hidden_dropout_prob
        self.num_positions = math.prod(self.axial_pos_shape)
        self.weights = nn.ParameterList()
        for axis, dim in enumerate(self.axial_pos_embds_dim):
            shape = [1] * len(self.axial_pos_shape)
            shape[axis] = self.axial_pos_shape[axis]
            self.weights.append(nn.Parameter(torch.ones(*shape, dim)))

    def tables(self) -> list[torch.Tensor]:
        """The factor tables as ``[n_a, d_a]`` views of the parameters."""
        sizes = zip(self.weights, self.axial_pos_shape, self.axial_pos_embds_dim)
        return [weight.view(size, dim) for weight, size, dim in sizes]

    def check_inputs(self, seq_len: int, position_ids: torch.Tensor | None) -> None:
        """Given ``position_ids`` must lie in ``[0, prod(axial_pos_shape))``; the default ids ``0..L-1`` need ``L <=
        prod`` (training and eval alike)."""
        if position_ids is not None:
            check_index_range(
                position_ids,
                self.num_positions,
                "position_ids (axial position embeddings, prod(config.axial_pos_shape))",
            )
        elif self.num_positions < seq_len:
            raise ValueError(
                f"config.axial_pos_shape {list(self.axial_pos_shape)} must multiply to at least the sequence length; "
                f"prod = {self.num_positions} < {seq_len}"
            )

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        self.check_inputs(position_ids.shape[1], position_ids)
        dropout_p = self.dropout if self.training else 0.0
        return axial_word_embedding(None, None, self.tables(), position_ids, dropout_p=dropout_p)  # [B, L, hidden]


class PositionEmbeddings(nn.Module):
    """Learned position embeddings ``[max_position_embeddings, hidden_size]`` (``axial_pos_embds=False``)."""

    def __init__(self, config: ReformerConfig):
        super().__init__()
        self.dropout = config.hidden_dropout_prob
        self.embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        check_index_range(position_ids, self.embedding.num_embeddings, "position_ids (config.max_position_embeddings)")
        return F.dropout(self.embedding(position_ids), p=self.dropout, training=self.training)


class ReformerEmbeddings(nn.Module):
    """Word embeddings (with dropout) plus position embeddings."""

    def __init__(self, config: ReformerConfig):
        super().__init__()
        self.max_position_embeddings = config.max_position_embeddings
        self.dropout = config.hidden_dropout_prob
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        axial = config.axial_pos_embds
        self.position_embeddings = AxialPositionEmbeddings(config) if axial else PositionEmbeddings(config)

    def forward(
        self, input_ids=None, position_ids=None, inputs_embeds=None, start_idx_pos_encodings: int = 0
    ) -> torch.Tensor:
        source = input_ids if input_ids is not None else inputs_embeds
        batch_size, seq_len = source.shape[:2]
        # given position_ids are range-checked by the lookup instead: ReformerModel's padding may make the sequence
        # longer than the tables, its (masked) padded positions clamped into range
        if position_ids is None and seq_len > self.max_position_embeddings:
            raise ValueError(
                f"sequence length {seq_len} must be at most config.max_position_embeddings "
                f"{self.max_position_embeddings}"
            )
        if input_ids is not None:
            check_index_range(input_ids, self.word_embeddings.num_embeddings, "input_ids (config.vocab_size)")
        dropout_p = self.dropout if self.training else 0.0
        fused_word = inputs_embeds is None and plain_modules(self.word_embeddings)
        axial = self.position_embeddings
        fused_axial = isinstance(axial, AxialPositionEmbeddings) and unhooked(axial)
        if (
            fused_word
            and fused_axial
            and position_ids is None
            and seq_len == 1
            and dropout_p == 0
            and source.device.type == "cpu"
            and start_idx_pos_encodings < axial.num_positions
        ):
            # a CPU decoding step: its one position is a host integer, its axial rows are selected directly
            position = axial_position_row(axial.tables(), start_idx_pos_encodings)  # [hidden]
            return gather_rows(self.word_embeddings.weight, input_ids) + position  # [B, 1, hidden]
        # the fused op takes position_ids None as the whole grid 0..L-1 (whose backward needs no sort)
        if position_ids is None and not (fused_axial and fused_word and start_idx_pos_encodings == 0):
            position_ids = _default_position_ids(batch_size, seq_len, start_idx_pos_encodings, source.device)

        if fused_axial:
            axial.check_inputs(seq_len, position_ids)
            if fused_word:
                # one fused op (one kernel on CUDA): dropout(word rows) + axial rows with the dropout2d pattern
                word_weight = self.word_embeddings.weight
                return axial_word_embedding(input_ids, word_weight, axial.tables(), position_ids, dropout_p=dropout_p)
            positions = axial_word_embedding(None, None, axial.tables(), position_ids, dropout_p=dropout_p)
        else:
            positions = self.position_embeddings(position_ids)
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        return F.dropout(inputs_embeds, p=dropout_p, training=self.training) + positions


def _default_position_ids(batch_size: int, seq_len: int, start: int, device: torch.device) -> torch.Tensor:
    return torch.arange(start, start + seq_len, device=device).unsqueeze(0).expand(batch_size, seq_len)  # [B, L]


# ==================================================================================================
# attention
# ==================================================================================================
class EfficientAttentionMixin:
    """Head split/merge and the input projections shared by the LSH and local attention layers."""

    num_attention_heads: int
    attention_head_size: int
    all_head_size: int

    def _project_heads(self, hidden_states: torch.Tensor, layer_norm: nn.Module | None) -> list[torch.Tensor]:
        """``[B, H, L, D]`` views of each projection of ``layer_norm(hidden_states)`` (``reformer.modules.projections``:
        the modules called, or LayerNorm and the products in CPU row blocks where that is invisible)."""
        return [self._split_heads(p) for p in projections.project(hidden_states, layer_norm, self.projection_layers())]

    def _step_projections(self, hidden_states: torch.Tensor, layer_norm: nn.Module | None) -> list[torch.Tensor]:
        """The new token's projections ``[B, H, 1, D]`` for a cached step (``projections.project_step``: the plain
        modules' own operations, else the modules called)."""
        shape = (hidden_states.shape[0], self.num_attention_heads, 1, self.attention_head_size)
        # one position: [B, 1, H * D] is already laid out as [B, H, 1, D]
        return [p.reshape(shape) for p in projections.project_step(hidden_states, layer_norm, self.projection_layers())]

    def _merge_step_heads(self, x: torch.Tensor) -> torch.Tensor:
        """A step's ``[B, H, 1, D]`` output → ``[B, 1, H * D]`` (``_merge_heads`` of one position)."""
        return x.reshape(x.shape[0], 1, self.all_head_size)

    @staticmethod
    def _check_step(hidden_states: torch.Tensor) -> None:
        if hidden_states.shape[1] != 1:
            raise ValueError(
                "with cached states (past_buckets_states) the input must be one new token per row; got "
                f"{hidden_states.shape[1]}"
            )

    @staticmethod
    def _prompt_real(attention_mask: torch.Tensor | None, orig_len: int) -> torch.Tensor | None:
        """The prompt's padding for the cache (``[B, L]`` bool, the eval padding to a chunk multiple trimmed)."""
        return None if attention_mask is None else attention_mask[:, :orig_len].bool()

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, L, H * D]`` → ``[B, H, L, D]`` (a view)."""
        batch_size, seq_len = x.shape[:2]
        return x.view(batch_size, seq_len, self.num_attention_heads, self.attention_head_size).transpose(1, 2)

    def _merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, H, L, D]`` → ``[B, L, H * D]``."""
        batch_size, _, seq_len, _ = x.shape
        return x.transpose(1, 2).reshape(batch_size, seq_len, self.num_attention_heads * self.attention_head_size)

    @staticmethod
    def _full_attention_probs(probs: torch.Tensor | None) -> torch.Tensor | None:
        # one chunk spanning the sequence: [B, H, 1, L, L] → transformers' [B, H, L, L]
        return None if probs is None else probs.squeeze(2)


class LSHSelfAttention(nn.Module, EfficientAttentionMixin):
    """Shared-QK attention within LSH buckets (full shared-QK attention when L <= chunk length).

    ``buckets`` (``[B, H, R, L]`` from an earlier call) skips hashing: the reversible backward replays the forward
    with the buckets it used. ``on_hashed`` is called right after the random rotations were drawn (the reversible
    layer records the RNG state there for the dropout replay).
    """

    def __init__(self, config: ReformerConfig, layer_idx: int | None = None):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.chunk_length = config.lsh_attn_chunk_length
        self.num_hashes = config.num_hashes
        self.num_chunks_before = config.lsh_num_chunks_before
        self.num_chunks_after = config.lsh_num_chunks_after
        self.hash_seed = config.hash_seed
        self.is_decoder = config.is_decoder
        self.max_position_embeddings = config.max_position_embeddings
        self.dropout = config.lsh_attention_probs_dropout_prob
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.attention_head_size
        self.all_head_size = self.num_attention_heads * self.attention_head_size
        self.hidden_size = config.hidden_size
        self.query_key = nn.Linear(self.hidden_size, self.all_head_size, bias=False)
        self.value = nn.Linear(self.hidden_size, self.all_head_size, bias=False)
        # seeded rotations, drawn once (draw_rotations); not parameters or buffers: never saved, rebuilt on demand
        self._seeded_rotations: dict[tuple, torch.Tensor] = {}

    @property
    def num_buckets(self):
        # shared through the config: the automatic rule writes config.num_buckets once
        return self.config.num_buckets

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        num_hashes: int | None = None,
        buckets: torch.Tensor | None = None,
        past_buckets_states: Any = None,
        use_cache: bool = False,
        output_attentions: bool = False,
        on_hashed: Callable[[], None] | None = None,
        layer_norm: nn.Module | None = None,
        orig_sequence_length: int | None = None,
        **kwargs: Any,
    ) -> LSHSelfAttentionOutput:
        """``layer_norm``: applied to ``hidden_states`` first (fused with the projections where possible).

        With ``use_cache``, the prompt's projections (and buckets) go into ``past_buckets_states``; once the cache
        holds this layer, the input is one new token per row, attended against the cache (``reformer.cache``).
        """
        num_hashes = self.num_hashes if num_hashes is None else num_hashes
        if past_buckets_states is not None and len(past_buckets_states) > self.layer_idx:
            self._check_step(hidden_states)
            query_key, value = self._step_projections(hidden_states, layer_norm)  # [B, H, 1, D] each
            out = lsh_decode_step(
                past_buckets_states,
                self.layer_idx,
                query_key,
                value,
                hash_fn=lambda vectors: hash_for_cache(self, vectors, num_hashes, None),
                num_buckets=lambda: num_buckets_product(self.num_buckets),
                num_hashes=num_hashes,
                chunk_length=self.chunk_length,
                num_chunks_before=self.num_chunks_before,
                num_chunks_after=self.num_chunks_after,
                append=use_cache,
            )  # [B, H, 1, D]
            return LSHSelfAttentionOutput(self._merge_step_heads(out), None, None)
        dropout_p = self.dropout if self.training else 0.0
        query_key, value = self._project_heads(hidden_states, layer_norm)  # [B, H, L, D] each
        op_inputs, buckets = self.op_inputs(query_key, value, attention_mask, num_hashes, buckets, on_hashed)
        out, probs = chunked_attention(**op_inputs, dropout_p=dropout_p, return_probs=output_attentions)
        if buckets is None:
            probs = self._full_attention_probs(probs)
        if use_cache and past_buckets_states is not None:
            orig_len = hidden_states.shape[1] if orig_sequence_length is None else orig_sequence_length
            cached_buckets = None if buckets is None else prefill_buckets(self, buckets, attention_mask, orig_len)
            past_buckets_states.prefill(
                self.layer_idx,
                query_key[:, :, :orig_len],
                value[:, :, :orig_len],
                cached_buckets,
                self._prompt_real(attention_mask, orig_len),
            )
        return LSHSelfAttentionOutput(self._merge_heads(out), probs, buckets)

    def projection_layers(self) -> list[nn.Module]:
        return [self.query_key, self.value]

    def op_inputs(
        self,
        query_key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        num_hashes: int | None = None,
        buckets: torch.Tensor | None = None,
        on_hashed: Callable[[], None] | None = None,
    ) -> tuple[dict[str, Any], torch.Tensor | None]:
        """The attention op's arguments for the projections and the buckets ``[B, H, R, L]`` they were sorted by
        (None for full attention). Hashes ``query_key`` unless ``buckets`` are given."""
        batch_size, _, seq_len, _ = query_key.shape
        num_hashes = self.num_hashes if num_hashes is None else num_hashes
        inputs = dict(query=query_key, key=None, value=value, causal=self.is_decoder, attention_mask=attention_mask)
        if seq_len <= self.chunk_length:
            # full shared-QK attention: one chunk spanning the sequence (self-mask and key norm still apply)
            return dict(inputs, sorted_idx=None, chunk_length=seq_len, num_chunks_before=0, num_chunks_after=0), None

        if self.num_buckets is None:
            self._set_num_buckets(seq_len)
        if buckets is None:
            buckets = self.hash_vectors(query_key, num_hashes, attention_mask)  # [B, H, R*L]
            if on_hashed is not None:
                on_hashed()
        else:
            num_hashes = buckets.shape[2]
            buckets = buckets.reshape(batch_size, self.num_attention_heads, num_hashes * seq_len)
        # ids are < R * (prod(num_buckets) + 1): the extra bucket per round holds padding
        sorted_idx, _ = bucket_sort(buckets, num_hashes * (num_buckets_product(self.num_buckets) + 1))
        inputs.update(
            sorted_idx=sorted_idx,
            chunk_length=self.chunk_length,
            num_chunks_before=self.num_chunks_before,
            num_chunks_after=self.num_chunks_after,
        )
        return inputs, buckets.reshape(batch_size, self.num_attention_heads, num_hashes, seq_len)

    def draw_rotations(self, num_hashes: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Random rotations ``[H, D, R, sum(num_buckets) / 2]``, drawn exactly as transformers draws them.

        With ``hash_seed`` set they come from a private generator seeded with it (transformers reseeds the global RNG
        instead, which yields the same numbers) and, being the same every time, are drawn once per device, dtype and
        shape (a decoding step then hashes without drawing); otherwise from the global RNG, fresh each call.
        """
        shape = (self.num_attention_heads, self.attention_head_size, num_hashes, rotation_size(self.num_buckets))
        if self.hash_seed is None:
            return torch.randn(shape, device=device, dtype=dtype)
        if torch.compiler.is_compiling():
            # a registered op draws them (a Generator cannot be traced); the cache is eager-only state
            return random_rotations(shape, self.hash_seed, device, dtype)
        key = (self.hash_seed, shape, torch.device(device), dtype)
        rotations = self._seeded_rotations.get(key)
        if rotations is None:
            rotations = self._seeded_rotations[key] = random_rotations(shape, self.hash_seed, device, dtype)
        return rotations

    def hash_vectors(
        self,
        vectors: torch.Tensor,
        num_hashes: int,
        attention_mask: torch.Tensor | None = None,
        increase_num_buckets: bool = False,
    ) -> torch.Tensor:
        """Bucket ids ``[B, H, R * L]`` (offset per round, extra bucket for padding) of ``vectors [B, H, L, D]``."""
        rotations = self.draw_rotations(num_hashes, vectors.device, vectors.dtype)
        return lsh_hash(vectors, rotations, self.num_buckets, attention_mask, increase_num_buckets)

    def _set_num_buckets(self, sequence_length: int) -> None:
        """transformers' rule: about 2 * L / chunk buckets, a power of two, factorized when too many."""
        num_buckets_pow_2 = (2 * (sequence_length // self.chunk_length)).bit_length() - 1
        num_buckets: int | list[int] = 2**num_buckets_pow_2
        num_buckets_limit = 2 * max(int((self.max_position_embeddings // self.chunk_length) ** 0.5), self.chunk_length)
        if num_buckets > num_buckets_limit:
            num_buckets = [2 ** (num_buckets_pow_2 // 2), 2 ** (num_buckets_pow_2 - num_buckets_pow_2 // 2)]
        if not torch.compiler.is_compiling():  # (Dynamo cannot trace logging calls)
            logger.warning("config.num_buckets is not set. Setting config.num_buckets to %s...", num_buckets)
        self.config.num_buckets = num_buckets


class LocalSelfAttention(nn.Module, EfficientAttentionMixin):
    """Attention within fixed chunks plus neighbouring chunks (full attention when L <= chunk length)."""

    def __init__(self, config: ReformerConfig, layer_idx: int | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_attention_heads = config.num_attention_heads
        self.chunk_length = config.local_attn_chunk_length
        self.num_chunks_before = config.local_num_chunks_before
        self.num_chunks_after = config.local_num_chunks_after
        self.is_decoder = config.is_decoder
        self.pad_token_id = config.pad_token_id
        self.attention_head_size = config.attention_head_size
        self.all_head_size = self.num_attention_heads * self.attention_head_size
        self.hidden_size = config.hidden_size
        self.dropout = config.local_attention_probs_dropout_prob
        self.query = nn.Linear(self.hidden_size, self.all_head_size, bias=False)
        self.key = nn.Linear(self.hidden_size, self.all_head_size, bias=False)
        self.value = nn.Linear(self.hidden_size, self.all_head_size, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_buckets_states: Any = None,
        use_cache: bool = False,
        output_attentions: bool = False,
        layer_norm: nn.Module | None = None,
        orig_sequence_length: int | None = None,
        **kwargs: Any,
    ) -> LocalSelfAttentionOutput:
        """``layer_norm``: applied to ``hidden_states`` first (fused with the projections where possible). With
        ``use_cache`` as in ``LSHSelfAttention.forward``."""
        seq_len = hidden_states.shape[1]
        if past_buckets_states is not None and len(past_buckets_states) > self.layer_idx:
            self._check_step(hidden_states)
            query, key, value = self._step_projections(hidden_states, layer_norm)  # [B, H, 1, D] each
            out = local_decode_step(
                past_buckets_states,
                self.layer_idx,
                query,
                key,
                value,
                self.chunk_length,
                self.num_chunks_before,
                append=use_cache,
            )  # [B, H, 1, D]
            return LocalSelfAttentionOutput(self._merge_step_heads(out), None)
        dropout_p = self.dropout if self.training else 0.0
        query, key, value = self._project_heads(hidden_states, layer_norm)  # [B, H, L, D] each
        op_inputs, _ = self.op_inputs(query, key, value, attention_mask)
        out, probs = chunked_attention(**op_inputs, dropout_p=dropout_p, return_probs=output_attentions)
        if seq_len <= self.chunk_length:
            probs = self._full_attention_probs(probs)
        if use_cache and past_buckets_states is not None:
            orig_len = seq_len if orig_sequence_length is None else orig_sequence_length
            real = self._prompt_real(attention_mask, orig_len)
            past_buckets_states.prefill(self.layer_idx, key[:, :, :orig_len], value[:, :, :orig_len], None, real)
        return LocalSelfAttentionOutput(self._merge_heads(out), probs)

    def projection_layers(self) -> list[nn.Module]:
        return [self.query, self.key, self.value]

    def op_inputs(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[dict[str, Any], None]:
        """The attention op's arguments for the projections (and no buckets)."""
        seq_len = query.shape[2]
        inputs = dict(
            query=query, key=key, value=value, sorted_idx=None, causal=self.is_decoder, attention_mask=attention_mask
        )
        if seq_len <= self.chunk_length:
            return dict(inputs, chunk_length=seq_len, num_chunks_before=0, num_chunks_after=0), None
        before, after = self.num_chunks_before, self.num_chunks_after
        return dict(inputs, chunk_length=self.chunk_length, num_chunks_before=before, num_chunks_after=after), None


class ReformerSelfOutput(nn.Module):
    def __init__(self, config: ReformerConfig):
        super().__init__()
        self.dropout = config.hidden_dropout_prob
        self.dense = nn.Linear(config.num_attention_heads * config.attention_head_size, config.hidden_size, bias=False)

    def forward(
        self, hidden_states: torch.Tensor, residual: torch.Tensor | None = None, in_place: bool = False
    ) -> torch.Tensor:
        """The projection back to ``hidden_size``; plus ``residual`` when given (added into ``residual`` itself when
        ``in_place`` and the blocked CPU path applies)."""
        return projections.project_out(self.dense, hidden_states, self.dropout, self.training, residual, in_place)


class ReformerAttention(nn.Module):
    """LayerNorm → LSH or local self-attention → output projection (the ``f`` of the reversible layer)."""

    def __init__(self, config: ReformerConfig, layer_id: int = 0):
        super().__init__()
        self.layer_id = layer_id
        self.attn_layers = list(config.attn_layers)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        if self.attn_layers[layer_id] == "lsh":
            self.self_attention = LSHSelfAttention(config, layer_idx=layer_id)
        else:
            self.self_attention = LocalSelfAttention(config, layer_idx=layer_id)
        self.output = ReformerSelfOutput(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        num_hashes: int | None = None,
        past_buckets_states: Any = None,
        use_cache: bool = False,
        orig_sequence_length: int | None = None,
        output_attentions: bool = False,
        buckets: torch.Tensor | None = None,
        on_hashed: Callable[[], None] | None = None,
        residual: torch.Tensor | None = None,
        in_place: bool = False,
    ) -> AttentionOutput:
        """``f(hidden_states)``, or ``residual + f(hidden_states)`` when ``residual`` is given (the layer's
        ``Y1 = X1 + f(X2)``; with ``in_place``, added into ``residual`` where the blocked CPU path applies)."""
        is_lsh = isinstance(self.self_attention, LSHSelfAttention)
        kwargs = {"num_hashes": num_hashes, "buckets": buckets, "on_hashed": on_hashed} if is_lsh else {}
        # normalised inside the attention layer, fused with its projections where that is invisible
        outputs = self.self_attention(
            hidden_states,
            attention_mask=attention_mask,
            past_buckets_states=past_buckets_states,
            use_cache=use_cache,
            output_attentions=output_attentions,
            layer_norm=self.layer_norm,
            orig_sequence_length=orig_sequence_length,
            **kwargs,
        )
        buckets = getattr(outputs, "buckets", None)
        return AttentionOutput(self.output(outputs.hidden_states, residual, in_place), outputs.attention_probs, buckets)


# ==================================================================================================
# reversible layer and encoder
# ==================================================================================================
class ReformerLayer(nn.Module):
    """One reversible block: ``Y1 = X1 + f(X2)`` (attention), ``Y2 = X2 + g(Y1)`` (feed-forward)."""

    def __init__(self, config: ReformerConfig, layer_id: int = 0):
        super().__init__()
        self.attention = ReformerAttention(config, layer_id)
        self.feed_forward = ChunkReformerFeedForward(config)

    def forward(
        self,
        prev_attn_output: torch.Tensor,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        num_hashes: int | None = None,
        past_buckets_states: Any = None,
        use_cache: bool = False,
        orig_sequence_length: int | None = None,
        output_attentions: bool = False,
        record_rng: bool = False,
        in_place: bool = False,
    ) -> ReformerOutput:
        """``record_rng``: keep the RNG states the backward needs to replay dropout (returned as ``rng``).
        ``in_place``: the two streams may be updated in place (the caller owns them and keeps no copy)."""
        rng = LayerRNG(hidden_states.device) if record_rng else None
        if rng is not None:
            # re-recorded after hashing when LSH draws its rotations from the global RNG
            rng.record_attention()
        attn_outputs = self.attention(
            hidden_states,
            attention_mask=attention_mask,
            num_hashes=num_hashes,
            past_buckets_states=past_buckets_states,
            use_cache=use_cache,
            orig_sequence_length=orig_sequence_length,
            output_attentions=output_attentions,
            on_hashed=rng.record_attention if rng is not None else None,
            residual=prev_attn_output,
            in_place=in_place,
        )
        attn_output = attn_outputs.hidden_states
        if rng is not None:
            rng.record_feed_forward()
        hidden_states = self.feed_forward(attn_output, residual=hidden_states, in_place=in_place)
        return ReformerOutput(hidden_states, attn_output, attn_outputs.attention_probs, attn_outputs.buckets, rng)

    def backward_pass(self, next_attn_output, hidden_states, grad_attn_output, grad_hidden_states, **kwargs):
        """The layer's reversible backward (``reformer.reversible.layer_backward``)."""
        return layer_backward(self, next_attn_output, hidden_states, grad_attn_output, grad_hidden_states, **kwargs)


class ReformerEncoder(nn.Module):
    """Reversible layers over ``[X, X]`` and a LayerNorm over the concatenated ``2 * hidden_size`` streams.

    ``reversible = False`` runs the same layers with plain autograd (storing every activation); the default
    reversible path stores none. Both give the same gradients (tests compare them).
    """

    def __init__(self, config: ReformerConfig):
        super().__init__()
        self.dropout = config.hidden_dropout_prob
        self.layers = nn.ModuleList([ReformerLayer(config, i) for i in range(config.num_hidden_layers)])
        self.layer_norm = nn.LayerNorm(2 * config.hidden_size, eps=config.layer_norm_eps)
        self.reversible = True

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        num_hashes: int | None = None,
        past_buckets_states: Any = None,
        use_cache: bool = False,
        orig_sequence_length: int | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        _owns_input: bool = False,
        _row_head: nn.Module | None = None,
    ) -> ReformerEncoderOutput:
        """``_owns_input`` (ReformerModel's own call): ``hidden_states`` is a fresh tensor nobody else holds, which the
        CPU in-place pass may reuse as a stream buffer. ``_row_head`` (the LM heads' call): a row-wise module applied
        after the final LayerNorm; the output's ``hidden_states`` are then its output."""
        if use_cache and past_buckets_states is None:
            past_buckets_states = ReformerDynamicCache()
        # a cached step runs plain autograd: the reversible backward would recompute without the cache
        is_step = past_buckets_states is not None and len(past_buckets_states) > 0
        stack = LayerStack(
            self.layers,
            attention_mask,
            num_hashes,
            output_hidden_states,
            output_attentions,
            past_buckets_states,
            use_cache,
            orig_sequence_length,
            owns_input=_owns_input,
        )
        # the parameters are listed only where the reversible function may run (a walk over every module: not per
        # decoding step); under torch.compile the layers run in the graph with plain autograd (the reversible
        # Function's backward recomputes with autograd.grad and RNG-state replay, which Dynamo cannot trace)
        reversible = self.reversible and not is_step and torch.is_grad_enabled() and not torch.compiler.is_compiling()
        params = [p for p in self.layers.parameters() if p.requires_grad] if reversible else []
        if reversible and (hidden_states.requires_grad or len(params) > 0):
            attn_output, hidden_states = ReversibleFunction.apply(hidden_states, hidden_states, stack, *params)
        else:
            attn_output, hidden_states = stack.forward(hidden_states, hidden_states, record_rng=False)
        # no dropout between the final LayerNorm and the head: the head runs inside the final LayerNorm's row blocks
        fuse_head = _row_head is not None and not (self.training and self.dropout > 0)
        hidden_states = final_layer_norm(self.layer_norm, attn_output, hidden_states, _row_head if fuse_head else None)
        if not fuse_head:
            hidden_states = F.dropout(hidden_states, p=self.dropout, training=self.training)
            if _row_head is not None:
                hidden_states = _row_head(hidden_states)
        all_hidden_states, all_attentions = tuple(stack.all_hidden_states), tuple(stack.all_attentions)
        # the autograd graph keeps `stack` until backward: do not let it pin the returned extras too
        stack.all_hidden_states, stack.all_attentions = [], []
        cache = past_buckets_states if use_cache else None
        return ReformerEncoderOutput(hidden_states, all_hidden_states, all_attentions, cache)


# ==================================================================================================
# pre-trained model base: init, checkpoints
# ==================================================================================================
class ReformerPreTrainedModel(PreTrainedModel):
    """Common base: transformers' ``PreTrainedModel`` (loading, saving, hub, Trainer, PEFT), transformers' weight
    init, this package's stricter checkpoint loading and atomic saving."""

    config_class = ReformerConfig
    config: ReformerConfig
    base_model_prefix = "reformer"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _no_split_modules = ["ReformerLayer"]
    # mask constants older transformers versions stored as persistent buffers
    _keys_to_ignore_on_load_unexpected = [r"mask_value_float(16|32)$"]

    def __init__(self, config: ReformerConfig, *args: Any, **kwargs: Any):
        config = as_reformer_config(config)
        config.validate()
        super().__init__(config, *args, **kwargs)

    def _initialize_weights(self, module: nn.Module, is_custom_code: bool = False) -> None:
        # transformers treats classes outside its package as remote code and skips a module whose direct parameters
        # carry no init flags (its guard against in-place init): AxialPositionEmbeddings holds none directly (its
        # factors sit in a ParameterList) and would keep torch.ones. Our _init_weights uses transformers' flag-aware
        # init functions, so the library-model path is the right one.
        super()._initialize_weights(module, is_custom_code=False)

    def _init_weights(self, module: nn.Module) -> None:
        """transformers' init: normal(0, initializer_range) for linear/embedding weights, zero biases, unit
        LayerNorms, normal(0, axial_norm_std) for the axial factors."""
        super()._init_weights(module)
        if isinstance(module, AxialPositionEmbeddings):
            for weight in module.weights:
                init.normal_(weight, std=self.config.axial_norm_std)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.base_model.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.base_model.embeddings.word_embeddings = value

    # loss keyword arguments transformers' Trainer passes to any forward that takes **kwargs; like
    # transformers, the heads whose loss does not use them ignore them
    _IGNORED_FORWARD_KWARGS = frozenset({"num_items_in_batch"})

    def _check_forward_kwargs(self, kwargs: dict[str, Any]) -> None:
        unexpected = sorted(set(kwargs) - self._IGNORED_FORWARD_KWARGS)
        if unexpected:
            raise TypeError(f"{type(self).__name__}.forward() got unexpected keyword arguments {unexpected}")

    def _reformer_outputs(self, kwargs: dict[str, Any], **reformer_inputs: Any) -> ReformerModelOutput:
        """A head's first step: reject unknown ``kwargs``, then run ``self.reformer`` (as a dataclass)."""
        self._check_forward_kwargs(kwargs)
        return self.reformer(**reformer_inputs, return_dict=True)

    def _head_output(self, output: Any, return_dict: bool | None) -> Any:
        """A head's ``output`` as it is, or as a tuple (``return_dict``, None: ``config.return_dict``)."""
        return_dict = self.config.return_dict if return_dict is None else return_dict
        return output if return_dict else output.to_tuple()

    # -- checkpoints -------------------------------------------------------------------------------
    def save_pretrained(self, save_directory, *args: Any, **kwargs: Any) -> None:
        """transformers' ``save_pretrained`` (safetensors, ``max_shard_size``, ...), written atomically: each file goes
        to a temporary file in the target directory and replaces the old one with ``os.replace``, so a concurrent
        reader or a crash at any point sees a loadable checkpoint (``reformer.checkpoint.atomic_save``)."""
        if kwargs.get("push_to_hub"):
            return super().save_pretrained(save_directory, *args, **kwargs)
        parent_save = super().save_pretrained
        checkpoint.atomic_save(save_directory, lambda staging: parent_save(staging, *args, **kwargs))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args: Any, strict: bool = True, **kwargs: Any):
        """transformers' ``from_pretrained`` (hub ids and the offline cache, ``dtype``/``torch_dtype``, ``device_map``,
        ``local_files_only``, ``revision``, sharded safetensors, ``.bin`` with ``weights_only=True``) plus:

        - a local checkpoint is checked first (``reformer.checkpoint.check_checkpoint_files``: config.json a JSON
          object, indexes with a ``weight_map`` whose shards stay inside the directory);
        - the LM-head bias rules across transformers versions: a file without ``lm_head.decoder.bias`` gets
          ``lm_head.bias`` there (4.x semantics), a file without ``lm_head.bias`` gets ``lm_head.decoder.bias``;
        - ``strict=True`` (default): weights of the base model (``ReformerModel``) missing from the checkpoint or
          unexpected in it, and weights of the wrong shape, raise a ``ValueError`` listing them. Task-head weights are
          as in transformers: a head the checkpoint lacks is initialised, one the model lacks is ignored (warned).
          ``strict=False`` (or ``ignore_mismatched_sizes=True`` for shapes) initialises and ignores instead.
        """
        checkpoint.check_checkpoint_files(pretrained_model_name_or_path, kwargs.get("subfolder", ""))
        output_loading_info = kwargs.pop("output_loading_info", False)
        ignore_mismatched = kwargs.pop("ignore_mismatched_sizes", False)
        model, info = super().from_pretrained(
            pretrained_model_name_or_path,
            *model_args,
            output_loading_info=True,
            ignore_mismatched_sizes=True,
            **kwargs,
        )
        info["missing_keys"] = set(info["missing_keys"]) - model._fill_lm_head_bias(set(info["missing_keys"]))
        if isinstance(getattr(model, "lm_head", None), ReformerOnlyLMHead):
            model.lm_head.bias.requires_grad_(False)  # the loader hands over fresh parameters
        if strict:
            problems = []
            for what in ("missing_keys", "unexpected_keys"):
                keys = sorted(k for k in info[what] if model._is_base_model_key(k))
                if keys:
                    problems.append(f"{what.replace('_', ' ')} {keys}")
            if not ignore_mismatched and info["mismatched_keys"]:
                shapes = sorted(
                    f"{key}: checkpoint {tuple(stored)} vs model {tuple(own)}"
                    for key, stored, own in info["mismatched_keys"]
                )
                problems.append(f"wrong shapes {shapes}")
            if problems:
                raise ValueError(
                    f"weights in {pretrained_model_name_or_path} do not match {cls.__name__}: {'; '.join(problems)} "
                    "(pass strict=False to initialise missing weights and ignore unexpected ones)"
                )
        return (model, info) if output_loading_info else model

    def _is_base_model_key(self, key: str) -> bool:
        """Whether a state-dict key (in this model's naming) belongs to the base ``ReformerModel``."""
        base = self.base_model
        prefix = "" if base is self else f"{self.base_model_prefix}."
        if not key.startswith(prefix):
            return False
        return key[len(prefix) :].split(".")[0] in dict(base.named_children())

    @torch.no_grad()
    def _fill_lm_head_bias(self, missing: set[str]) -> set[str]:
        """The LM-head bias across transformers versions: 4.x tied ``lm_head.decoder.bias`` to ``lm_head.bias`` (a
        file holds either or both), 5.0-5.23 had no decoder bias, 5.24 adds ``lm_head.decoder.bias`` and keeps
        ``lm_head.bias`` unused. Fills whichever of the two the checkpoint lacked from the other; returns those keys."""
        head = getattr(self, "lm_head", None)
        if not isinstance(head, ReformerOnlyLMHead):
            return set()
        filled = set()
        pairs = (("lm_head.decoder.bias", head.decoder.bias, head.bias), ("lm_head.bias", head.bias, head.decoder.bias))
        for key, target, source in pairs:
            other = "lm_head.bias" if key == "lm_head.decoder.bias" else "lm_head.decoder.bias"
            if key in missing and other not in missing:
                target.copy_(source)
                filled.add(key)
        return filled


# ==================================================================================================
# base model
# ==================================================================================================
class ReformerModel(ReformerPreTrainedModel):
    """Embeddings → reversible encoder → ``[B, L, 2 * hidden_size]`` (``last_hidden_state``)."""

    def __init__(self, config: ReformerConfig):
        super().__init__(config)
        self.embeddings = ReformerEmbeddings(self.config)
        self.encoder = ReformerEncoder(self.config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        num_hashes: int | None = None,
        past_buckets_states: Any = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        _row_head: nn.Module | None = None,
        **kwargs: Any,
    ) -> ReformerModelOutput | tuple:
        """Cached decoding (see ``reformer.generation``): ``use_cache=True`` returns a ``ReformerDynamicCache`` in
        ``past_buckets_states`` holding every layer's attention inputs (and LSH buckets) for the given tokens. Passing
        it back with one new token per row runs a decoding step that attends only to the relevant chunk(s) and
        appends to the cache (when ``use_cache``). In a step, ``attention_mask`` (optional) covers the cached positions
        and the new token, ``[B, past + 1]``, and must be left-padded; the default ``position_ids`` are then the number
        of real cached tokens of each row (else the cache length).

        Unlike transformers, ``use_cache=None`` means False (not ``config.use_cache``): no cache is built unless asked.

        ``_row_head`` (private, the LM heads' call): a row-wise module applied to the final rows, fused with the final
        LayerNorm where the blocked CPU path runs; ``last_hidden_state`` then holds its output.
        """
        self._check_forward_kwargs(kwargs)
        config = self.config
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = config.return_dict if return_dict is None else return_dict
        use_cache = bool(use_cache)
        if past_buckets_states is not None and not isinstance(past_buckets_states, ReformerDynamicCache):
            raise TypeError(
                "past_buckets_states must be a ReformerDynamicCache (returned with use_cache=True); got "
                f"{type(past_buckets_states).__name__}"
            )
        is_step = past_buckets_states is not None and len(past_buckets_states) > 0

        if is_step:
            if self.training:
                raise ValueError("past_buckets_states (cached decoding) is for inference: call model.eval() first")
            step_mask = attention_mask
            input_ids, _, position_ids, inputs_embeds = self._check_inputs(
                input_ids, None, position_ids, inputs_embeds, num_hashes
            )
            source = input_ids if input_ids is not None else inputs_embeds
            attention_mask, position_ids = self._check_cached_step(source, step_mask, position_ids, past_buckets_states)
            start_idx_pos_encodings = past_buckets_states.get_start_idx()
        else:
            input_ids, attention_mask, position_ids, inputs_embeds = self._check_inputs(
                input_ids, attention_mask, position_ids, inputs_embeds, num_hashes
            )
            if use_cache and attention_mask is not None:
                # the cache's rows are left-padded (decoding appends on the right)
                check_left_padded(attention_mask)
            start_idx_pos_encodings = 0
        batch_size, seq_len = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        orig_sequence_length = seq_len

        least_common_mult_chunk_length = config.least_common_mult_chunk_length()
        must_pad = seq_len % least_common_mult_chunk_length != 0 and seq_len > config.min_chunk_length() and not is_step
        if must_pad:
            # training too (transformers raises there): the padded positions are masked and the outputs trimmed, so
            # logits, loss and gradients are those of the same batch padded by hand (zero mask, -100 labels)
            padding_length = least_common_mult_chunk_length - seq_len % least_common_mult_chunk_length
            input_ids, inputs_embeds, attention_mask, position_ids = self._pad_to_mult_of_chunk_length(
                input_ids, inputs_embeds, attention_mask, position_ids, padding_length
            )

        embedding_output = self.embeddings(
            input_ids=input_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            start_idx_pos_encodings=start_idx_pos_encodings,
        )
        encoder_outputs = self.encoder(
            embedding_output,
            attention_mask=attention_mask,
            num_hashes=num_hashes,
            past_buckets_states=past_buckets_states,
            use_cache=use_cache,
            orig_sequence_length=orig_sequence_length,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            _owns_input=True,
            _row_head=_row_head,
        )
        sequence_output = encoder_outputs.hidden_states
        if must_pad:
            sequence_output = sequence_output[:, :orig_sequence_length]
        output = ReformerModelOutput(
            last_hidden_state=sequence_output,
            past_buckets_states=encoder_outputs.past_buckets_states,
            hidden_states=encoder_outputs.all_hidden_states if output_hidden_states else None,
            attentions=encoder_outputs.all_attentions if output_attentions else None,
        )
        return output if return_dict else output.to_tuple()

    def _check_cached_step(self, source, attention_mask, position_ids, cache):
        """A decoding step: one token per row of the cached batch; the mask spans the cache and the new token."""
        batch_size, seq_len = source.shape[:2]
        if seq_len != 1:
            raise ValueError(
                "with a non-empty past_buckets_states, input_ids / inputs_embeds must hold one new token per row; "
                f"got length {seq_len}"
            )
        if cache.batch_size != batch_size:
            raise ValueError(
                f"input_ids has batch size {batch_size} but past_buckets_states caches {cache.batch_size} rows"
            )
        expected = (batch_size, cache.get_seq_length() + 1)
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != expected:
                raise ValueError(
                    "attention_mask in a cached step must cover the cached positions and the new token, shape "
                    f"{expected}; got {tuple(getattr(attention_mask, 'shape', ()))}"
                )
            if attention_mask.device.type == "cpu":
                check_left_padded(attention_mask)
            else:
                # no host synchronisation in a step: the new token must be real
                torch._assert_async(attention_mask[:, -1].bool().all(), "attention_mask: the new token must be 1")
            if position_ids is None:
                # positions start at the first real token of each row
                position_ids = attention_mask.long().sum(-1, keepdim=True) - 1
        return attention_mask, position_ids

    def _check_inputs(self, input_ids, attention_mask, position_ids, inputs_embeds, num_hashes):
        """Shape and type checks (free) before anything runs; value checks happen where the values are used."""
        if input_ids is not None and inputs_embeds is not None:
            raise ValueError("You cannot specify both input_ids and inputs_embeds at the same time")
        if input_ids is None and inputs_embeds is None:
            raise ValueError("You have to specify either input_ids or inputs_embeds")
        if input_ids is not None:
            if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
                got = getattr(input_ids, "shape", type(input_ids))
                raise ValueError(f"input_ids must be a [batch_size, sequence_length] tensor; got {got}")
            if input_ids.is_floating_point() or input_ids.dtype == torch.bool:
                raise TypeError(f"input_ids must be an integer tensor; got {input_ids.dtype}")
            shape = tuple(input_ids.shape)
        else:
            hidden = self.config.hidden_size
            if (
                not isinstance(inputs_embeds, torch.Tensor)
                or inputs_embeds.dim() != 3
                or inputs_embeds.shape[-1] != hidden
            ):
                got = getattr(inputs_embeds, "shape", type(inputs_embeds))
                raise ValueError(
                    f"inputs_embeds must be a [batch_size, sequence_length, hidden_size={hidden}] tensor; got {got}"
                )
            shape = tuple(inputs_embeds.shape[:2])
        if shape[1] == 0:
            raise ValueError("input_ids / inputs_embeds must have a non-empty sequence dimension")
        capacity = self._num_positions()
        if shape[1] > capacity:
            fields = f"config.max_position_embeddings = {self.config.max_position_embeddings}"
            if self.config.axial_pos_embds:
                axial_pos_shape = list(self.config.axial_pos_shape)
                fields += f", prod(config.axial_pos_shape {axial_pos_shape}) = {math.prod(axial_pos_shape)}"
            raise ValueError(
                f"sequence length {shape[1]} exceeds the {capacity} positions the model can embed ({fields})"
            )
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != shape:
                got = tuple(getattr(attention_mask, "shape", ()))
                raise ValueError(f"attention_mask must have the shape of input_ids {shape}; got {got}")
        if position_ids is not None:
            if not isinstance(position_ids, torch.Tensor) or position_ids.is_floating_point():
                raise TypeError("position_ids must be an integer tensor")
            if position_ids.dim() == 1:
                position_ids = position_ids.unsqueeze(0)
            if (
                position_ids.dim() != 2
                or position_ids.shape[1] != shape[1]
                or position_ids.shape[0] not in (1, shape[0])
            ):
                raise ValueError(
                    f"position_ids must have shape {shape} (or [1, {shape[1]}]); got {tuple(position_ids.shape)}"
                )
            position_ids = position_ids.expand(shape)
        if num_hashes is not None and (
            not isinstance(num_hashes, int) or isinstance(num_hashes, bool) or num_hashes < 1
        ):
            raise ValueError(f"num_hashes must be None or a positive int; got {num_hashes!r}")
        return input_ids, attention_mask, position_ids, inputs_embeds

    def _num_positions(self) -> int:
        """How many positions the embeddings hold: ``max_position_embeddings``, and ``prod(axial_pos_shape)``."""
        config = self.config
        if config.axial_pos_embds:
            return min(config.max_position_embeddings, math.prod(config.axial_pos_shape))
        return config.max_position_embeddings

    def _pad_to_mult_of_chunk_length(self, input_ids, inputs_embeds, attention_mask, position_ids, padding_length):
        """Padding to a multiple of the chunk lengths (transformers' rule, in training too): pad tokens, a zero
        attention mask over them, and position ids that continue the given ones (transformers' own position-id padding
        is broken). Padded positions past the last embedded one are clamped to it: masked positions change no output at
        a real position, so only the real length must fit the tables."""
        source = input_ids if input_ids is not None else inputs_embeds
        batch_size, seq_len = source.shape[:2]
        device = source.device
        if not torch.compiler.is_compiling():  # (Dynamo cannot trace logging calls)
            logger.info(
                "input padded from %d to %d to a multiple of the chunk length", seq_len, seq_len + padding_length
            )
        pad_token_id = self.config.pad_token_id if self.config.pad_token_id is not None else 0
        padded_ids = torch.full((batch_size, padding_length), pad_token_id, dtype=torch.long, device=device)
        if attention_mask is None:
            attention_mask = torch.ones(batch_size, seq_len, dtype=torch.bool, device=device)
        attention_mask = torch.cat([attention_mask, attention_mask.new_zeros(batch_size, padding_length)], dim=-1)
        capacity = self._num_positions()
        if position_ids is None and seq_len + padding_length > capacity:
            position_ids = _default_position_ids(batch_size, seq_len, 0, device)
        if position_ids is not None:
            steps = torch.arange(1, padding_length + 1, dtype=position_ids.dtype, device=device)
            padded_positions = (position_ids[:, -1:] + steps).clamp_(max=capacity - 1)  # [B, padding_length]
            position_ids = torch.cat([position_ids, padded_positions], dim=-1)
        if input_ids is not None:
            input_ids = torch.cat([input_ids, padded_ids.to(input_ids.dtype)], dim=-1)
        else:
            padding_embeds = self.embeddings.word_embeddings(padded_ids).to(inputs_embeds.dtype)
            inputs_embeds = torch.cat([inputs_embeds, padding_embeds], dim=-2)
        return input_ids, inputs_embeds, attention_mask, position_ids


# ==================================================================================================
# heads
# ==================================================================================================
def _check_no_look_ahead(config: ReformerConfig, model_name: str) -> None:
    for kind in sorted(set(config.attn_layers)):
        after = getattr(config, f"{kind}_num_chunks_after")
        if after != 0:
            raise ValueError(f"{model_name} is causal: config.{kind}_num_chunks_after must be 0, got {after}")


def _check_labels(labels: torch.Tensor, expected_shape: tuple[int, ...], num_classes: int) -> None:
    """Token / class labels: an integer tensor of ``expected_shape`` holding ids in ``[0, num_classes)`` or -100."""
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
        got = getattr(labels, "dtype", type(labels).__name__)
        raise ValueError(f"labels must be an integer tensor of class ids (or -100); got {got}")
    if tuple(labels.shape) != tuple(expected_shape):
        raise ValueError(f"labels must have shape {tuple(expected_shape)}; got {tuple(labels.shape)}")
    if labels.numel():
        valid = (labels == -100) | ((labels >= 0) & (labels < num_classes))
        check_values(
            valid,
            f"labels must be in [0, {num_classes}) or -100 (ignored)",
            lambda: f"got {sorted(set(labels[~valid].tolist()))[:8]}",
        )


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Mean cross entropy over non-ignored targets, or the sum divided by ``num_items_in_batch`` (transformers)."""
    labels = labels.to(logits.device)
    if num_items_in_batch is None:
        return F.cross_entropy(logits, labels, ignore_index=-100)
    loss = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


class ReformerModelWithLMHead(ReformerPreTrainedModel, GenerationMixin):
    """Causal language model (``config.is_decoder`` must be True); the loss shifts labels by one.

    ``generate`` is transformers' ``GenerationMixin.generate`` (greedy, sampling, beam search, streamers, ...) over this
    package's bucket cache: the prompt is prefilled in one forward (left-padded rows grouped by length, so that each
    row gets the tokens it would get alone), then one cached step per token.
    """

    def __init__(self, config: ReformerConfig):
        super().__init__(config)
        if not self.config.is_decoder:
            raise ValueError("ReformerModelWithLMHead needs config.is_decoder=True (causal attention)")
        _check_no_look_ahead(self.config, "ReformerModelWithLMHead")
        self.reformer = ReformerModel(self.config)
        self.lm_head = ReformerOnlyLMHead(self.config)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head.decoder

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head.decoder = new_embeddings

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        num_hashes: int | None = None,
        past_buckets_states: Any = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        labels: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        num_items_in_batch: torch.Tensor | int | None = None,
        **kwargs: Any,
    ) -> ReformerModelWithLMHeadOutput | tuple:
        if isinstance(logits_to_keep, int) and logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be >= 0; got {logits_to_keep}")
        # all positions: the head runs fused with the final LayerNorm where that is invisible (no hooks on the
        # base model or encoder, whose outputs would otherwise be logits)
        all_logits = isinstance(logits_to_keep, int) and logits_to_keep == 0
        fuse_head = all_logits and unhooked(self.reformer, self.reformer.encoder)
        outputs = self._reformer_outputs(
            kwargs,
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            num_hashes=num_hashes,
            past_buckets_states=past_buckets_states,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            _row_head=self.lm_head if fuse_head else None,
        )
        hidden_states = outputs.last_hidden_state
        if fuse_head:
            logits = hidden_states
        elif all_logits:
            logits = self.lm_head(hidden_states)
        elif isinstance(logits_to_keep, int):
            logits = self.lm_head(hidden_states[:, -logits_to_keep:])
        else:
            logits = self.lm_head(hidden_states[:, logits_to_keep])

        loss = None
        if labels is not None:
            _check_labels(labels, logits.shape[:2], self.config.vocab_size)
            # tokens < n predict token n; the last position has no target
            shift_labels = F.pad(labels, (0, 1), value=-100)[:, 1:]
            flat_logits = logits.float().reshape(-1, self.config.vocab_size)
            loss = _cross_entropy(flat_logits, shift_labels.reshape(-1), num_items_in_batch)
        output = ReformerModelWithLMHeadOutput(
            loss=loss,
            logits=logits,
            past_buckets_states=outputs.past_buckets_states,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return self._head_output(output, return_dict)

    # -- generation (GenerationMixin) ----------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self, inputs: torch.Tensor | None = None, *args: Any, generator: torch.Generator | None = None, **kwargs
    ):
        """transformers' ``generate``; in addition ``generator`` (a ``torch.Generator``): every random draw of the call
        (sampling, and LSH rotations when ``hash_seed`` is unset) comes from it, and the global RNG is left untouched.
        The model must be in eval mode (the bucket cache is for inference)."""
        if self.training:
            raise ValueError("generate needs the model in eval mode (model.eval()): the bucket cache is for inference")
        vocab_size = self.config.vocab_size
        for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
            value = kwargs.get(name)
            ids = value.tolist() if isinstance(value, torch.Tensor) else value
            ids = ids if isinstance(ids, (list, tuple)) else [ids]
            if any(
                i is not None and (isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab_size)
                for i in ids
            ):
                # transformers would generate on, never meeting an id the model cannot produce
                raise ValueError(f"{name} must be token ids in [0, config.vocab_size={vocab_size}); got {value!r}")
        if generator is None:
            return super().generate(inputs, *args, **kwargs)
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator; got {type(generator).__name__}")
        device = generator.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            if device.type == "cuda":
                torch.cuda.set_rng_state(generator.get_state(), device)
            else:
                torch.set_rng_state(generator.get_state())
            output = super().generate(inputs, *args, **kwargs)
            generator.set_state(torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state())
        return output

    def _validate_generated_length(self, generation_config, input_ids_length, has_default_max_length):
        super()._validate_generated_length(generation_config, input_ids_length, has_default_max_length)
        capacity = self.config.max_position_embeddings
        if self.config.axial_pos_embds:
            capacity = min(capacity, math.prod(self.config.axial_pos_shape))
        if generation_config.max_length > capacity:
            raise ValueError(
                f"max_length={generation_config.max_length} (prompt of {input_ids_length} positions + max_new_tokens="
                f"{generation_config.max_new_tokens}) exceeds the {capacity} positions the model can embed "
                "(config.max_position_embeddings / prod(config.axial_pos_shape))"
            )

    def _prepare_position_ids_for_generation(self, inputs_tensor, model_kwargs):
        # positions come from the attention mask inside forward (each row counted from its first real token)
        return None

    def prepare_inputs_for_generation(
        self, input_ids, past_buckets_states=None, attention_mask=None, use_cache=None, num_hashes=None, **kwargs
    ) -> dict[str, Any]:
        """The prompt, then one new token per row against the cache; unlike transformers the attention mask is
        passed on, so left-padded rows decode as if alone."""
        if past_buckets_states is not None and len(past_buckets_states) > 0:
            # a step: the mask only gives each row its position (no host read of it, so no synchronisation)
            input_ids = input_ids[:, -1:]
        elif attention_mask is not None and bool(attention_mask.bool().all()):
            attention_mask = None  # the prompt: nothing is padded, the plain path
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "past_buckets_states": past_buckets_states,
            "use_cache": use_cache,
            "num_hashes": num_hashes,
            "logits_to_keep": 1,
        }

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False, num_new_tokens=1):
        # the cache travels under transformers' Reformer name
        model_kwargs["past_buckets_states"] = outputs.past_buckets_states
        return super()._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder, num_new_tokens)

    def _prefill(self, input_ids, generation_config, model_kwargs, is_first_iteration: bool = True):
        """A left-padded prompt longer than a chunk is prefilled per row length (LSH and local chunking depend on
        the row's own length), then merged into one cache; otherwise transformers' prefill (one forward)."""
        attention_mask = model_kwargs.get("attention_mask")
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
            shape = tuple(attention_mask.shape)
            raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}; got {shape}")
        if (
            model_kwargs.get("past_buckets_states") is not None
            or attention_mask is None
            or bool(attention_mask.bool().all())
        ):
            return super()._prefill(input_ids, generation_config, model_kwargs, is_first_iteration)
        check_left_padded(attention_mask)
        logits, cache = prefill_left_padded(self, input_ids, attention_mask.bool(), model_kwargs.get("num_hashes"))
        return ReformerModelWithLMHeadOutput(logits=logits.unsqueeze(1), past_buckets_states=cache)


class ReformerForMaskedLM(ReformerPreTrainedModel):
    """Bidirectional masked language model (``config.is_decoder`` must be False)."""

    def __init__(self, config: ReformerConfig):
        super().__init__(config)
        if self.config.is_decoder:
            raise ValueError("ReformerForMaskedLM needs config.is_decoder=False (bidirectional attention)")
        self.reformer = ReformerModel(self.config)
        self.lm_head = ReformerOnlyLMHead(self.config)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head.decoder

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head.decoder = new_embeddings

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        num_hashes: int | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> MaskedLMOutput | tuple:
        fuse_head = unhooked(self.reformer, self.reformer.encoder)
        outputs = self._reformer_outputs(
            kwargs,
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            num_hashes=num_hashes,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            _row_head=self.lm_head if fuse_head else None,
        )
        logits = outputs.last_hidden_state if fuse_head else self.lm_head(outputs.last_hidden_state)
        loss = None
        if labels is not None:
            _check_labels(labels, logits.shape[:2], self.config.vocab_size)
            loss = F.cross_entropy(logits.reshape(-1, self.config.vocab_size), labels.reshape(-1), ignore_index=-100)
        output = MaskedLMOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
        return self._head_output(output, return_dict)


class ReformerClassificationHead(nn.Module):
    """First token → dropout → dense → tanh → dropout → out_proj."""

    def __init__(self, config: ReformerConfig):
        super().__init__()
        self.dense = nn.Linear(2 * config.hidden_size, config.hidden_size)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        hidden_states = self.dropout(hidden_states[:, 0, :])
        hidden_states = self.dropout(torch.tanh(self.dense(hidden_states)))
        return self.out_proj(hidden_states)


class ReformerForSequenceClassification(ReformerPreTrainedModel):
    """Sequence classification/regression from the first position (``config.num_labels`` outputs)."""

    def __init__(self, config: ReformerConfig):
        super().__init__(config)
        self.num_labels = self.config.num_labels
        self.reformer = ReformerModel(self.config)
        self.classifier = ReformerClassificationHead(self.config)
        if self.config.is_decoder:
            logger.warning("You might want to disable causal masking for sequence classification")
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        num_hashes: int | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutput | tuple:
        outputs = self._reformer_outputs(
            kwargs,
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            num_hashes=num_hashes,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
        logits = self.classifier(outputs.last_hidden_state)
        loss = None
        if labels is not None:
            if self.config.problem_type is None:
                if self.num_labels == 1:
                    self.config.problem_type = "regression"
                elif self.num_labels > 1 and labels.dtype in (torch.long, torch.int):
                    self.config.problem_type = "single_label_classification"
                else:
                    self.config.problem_type = "multi_label_classification"
            if self.config.problem_type == "regression":
                if self.num_labels == 1:
                    loss = F.mse_loss(logits.squeeze(), labels.squeeze())
                else:
                    loss = F.mse_loss(logits, labels)
            elif self.config.problem_type == "single_label_classification":
                flat_labels = labels.view(-1)
                _check_labels(flat_labels, (logits.shape[0],), self.num_labels)
                loss = F.cross_entropy(logits.view(-1, self.num_labels), flat_labels)
            else:
                loss = F.binary_cross_entropy_with_logits(logits, labels)
        output = SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
        return self._head_output(output, return_dict)


class ReformerForQuestionAnswering(ReformerPreTrainedModel):
    """Span extraction: start/end logits from a linear layer over ``2 * hidden_size`` (``num_labels`` = 2)."""

    def __init__(self, config: ReformerConfig):
        super().__init__(config)
        if self.config.num_labels != 2:
            raise ValueError(
                "ReformerForQuestionAnswering needs config.num_labels == 2 (start and end logits); got "
                f"{self.config.num_labels}"
            )
        self.num_labels = self.config.num_labels
        self.reformer = ReformerModel(self.config)
        self.qa_outputs = nn.Linear(2 * self.config.hidden_size, self.config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        num_hashes: int | None = None,
        start_positions: torch.Tensor | None = None,
        end_positions: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> QuestionAnsweringModelOutput | tuple:
        outputs = self._reformer_outputs(
            kwargs,
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            num_hashes=num_hashes,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
        logits = self.qa_outputs(outputs.last_hidden_state)
        start_logits, end_logits = (part.squeeze(-1).contiguous() for part in logits.split(1, dim=-1))
        total_loss = None
        if start_positions is not None and end_positions is not None:
            if start_positions.dim() > 1:
                start_positions = start_positions.squeeze(-1)
            if end_positions.dim() > 1:
                end_positions = end_positions.squeeze(-1)
            # positions outside the sequence are clamped to an ignored index (transformers)
            ignored_index = start_logits.size(1)
            start_positions = start_positions.clamp(0, ignored_index)
            end_positions = end_positions.clamp(0, ignored_index)
            start_loss = F.cross_entropy(start_logits, start_positions, ignore_index=ignored_index)
            end_loss = F.cross_entropy(end_logits, end_positions, ignore_index=ignored_index)
            total_loss = (start_loss + end_loss) / 2
        output = QuestionAnsweringModelOutput(
            loss=total_loss,
            start_logits=start_logits,
            end_logits=end_logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return self._head_output(output, return_dict)


__all__ = [
    "ReformerAttention",
    "ReformerForMaskedLM",
    "ReformerForQuestionAnswering",
    "ReformerForSequenceClassification",
    "ReformerLayer",
    "ReformerModel",
    "ReformerModelWithLMHead",
    "ReformerPreTrainedModel",
]
