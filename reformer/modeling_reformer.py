"""The Reformer model stack, a drop-in for transformers' ``modeling_reformer.py``.

Same class names, state-dict keys, forward arguments and outputs as transformers; the numerics follow
transformers' implementation (its ``modeling_reformer.py`` is the specification), with the hot paths
delegated to the ops of ``reformer_kernels`` (``lsh_hash``, ``bucket_sort``, ``chunked_attention``,
``axial_word_embedding``), which run Triton kernels on CUDA and PyTorch elsewhere.

Read top-down: embeddings → attention (LSH, local) → layer → reversible stack → encoder → model → heads.

Deliberate differences from transformers 5.x (each is a transformers defect):
- A checkpoint without ``lm_head.decoder.bias`` (transformers 4.x files that kept only the tied
  ``lm_head.bias``, and 5.0-5.23 files) has ``lm_head.bias`` added to the logits, as trax and 4.x did;
  transformers 5.24 starts such a decoder bias at zero.
- Random LSH rotations with ``hash_seed`` set come from a private ``torch.Generator``; the global RNG is
  never reseeded. Dropout in the reversible backward is replayed by saving/restoring RNG *states*, and
  the state of the attention branch is taken after the rotations were drawn, so with ``hash_seed=None``
  the replayed dropout masks are exactly the forward ones (transformers' replay is off by the draw).
- The reversible stack is an autograd Function taking the layer parameters as inputs and returning
  their gradients, so it works under ``DistributedDataParallel``.
- Eval-time padding continues the position ids; axial position embeddings work for any number of axes.
- Cached decoding (``reformer.generation``): the cached buckets keep the round offset their prompt used
  (transformers re-derives it with a heuristic that can pick the wrong one after a padded prompt);
  left-padded batches with an ``attention_mask`` decode each row as if alone; ``use_cache=None`` builds no cache
  (transformers defaults to ``config.use_cache``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections import namedtuple
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from reformer_kernels import bucket_sort, chunked_attention, lsh_hash
from reformer_kernels.cpu_linear import linear, needs_grad, onednn_applicable, onednn_linear, row_blocks, weight_grad
from reformer_kernels.ops.axial_pos import axial_word_embedding
from reformer_kernels.ops.chunked_attention import chunked_attention_with_grad
from reformer_kernels.ops.lsh_hash import num_buckets_product, rotation_size
from reformer_kernels.scratch import scratch_empty, scratch_scope

from .checkpoint import atomic_write_directory, load_state_dict, save_state_dict
from .configuration_reformer import ReformerConfig
from .generation import (
    ReformerDynamicCache,
    _check_left_padded,
    cache_attention_inputs,
    local_attention_step,
    lsh_attention_step,
)
from .generation import generate as _generate
from .modeling_outputs import (
    MaskedLMOutput,
    QuestionAnsweringModelOutput,
    ReformerModelOutput,
    ReformerModelWithLMHeadOutput,
    SequenceClassifierOutput,
)

logger = logging.getLogger(__name__)

LSHSelfAttentionOutput = namedtuple("LSHSelfAttentionOutput", ["hidden_states", "attention_probs", "buckets"])
LocalSelfAttentionOutput = namedtuple("LocalSelfAttentionOutput", ["hidden_states", "attention_probs"])
AttentionOutput = namedtuple("AttentionOutput", ["hidden_states", "attention_probs", "buckets"])
ReformerOutput = namedtuple("ReformerOutput", ["hidden_states", "attn_output", "attention_probs", "buckets", "rng"])
ReformerBackwardOutput = namedtuple(
    "ReformerBackwardOutput", ["attn_output", "hidden_states", "grad_attn_output", "grad_hidden_states"]
)
ReformerEncoderOutput = namedtuple(
    "ReformerEncoderOutput", ["hidden_states", "all_hidden_states", "all_attentions", "past_buckets_states"]
)


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _gelu_fast(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


# the activations of transformers' ACT2FN that ReformerConfig.hidden_act may name
ACT2FN: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": _gelu_new,
    "gelu_fast": _gelu_fast,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "relu6": F.relu6,
    "leaky_relu": F.leaky_relu,
    "mish": F.mish,
    "linear": lambda x: x,
}


def _check_index_range(values: torch.Tensor, upper: int, what: str) -> None:
    """``0 <= values < upper``: a ValueError on CPU tensors; on other devices an async device assert (no host sync)."""
    if values.numel() == 0:
        return
    if values.device.type == "cpu":
        low, high = int(values.min()), int(values.max())
        if low < 0 or high >= upper:
            raise ValueError(f"{what} must be in [0, {upper}); got values in [{low}, {high}]")
    else:
        torch._assert_async(((values >= 0) & (values < upper)).all(), f"{what} must be in [0, {upper})")


# ==================================================================================================
# embeddings
# ==================================================================================================
class AxialPositionEmbeddings(nn.Module):
    """Axial position embeddings for any number of axes.

    Unlike transformers (whose training path ignores ``position_ids`` and uses ``0..L-1``), the given
    ``position_ids`` are looked up in training too; the default ids are the same.

    Parameters keep transformers' broadcast shapes (``weights.a`` is ``[1, .., n_a, .., 1, d_a]``);
    the lookup is the fused ``axial_word_embedding`` op on the ``[n_a, d_a]`` views. Training needs
    ``prod(axial_pos_shape) == sequence length``; eval needs ``prod >= sequence length``. Training-time
    dropout drops, per batch row, whole slices of equal axis-1 index (all channels), with transformers'
    RNG consumption (it applies ``dropout2d`` to the broadcast table transposed so that axis 1 is the
    channel dimension). With a single axis, transformers' 3-D ``dropout2d`` call drops channels per batch
    row; that is mirrored too.
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
        return [
            weight.view(size, dim)
            for weight, size, dim in zip(self.weights, self.axial_pos_shape, self.axial_pos_embds_dim)
        ]

    def check_inputs(self, seq_len: int, position_ids: torch.Tensor | None) -> None:
        if position_ids is not None:
            _check_index_range(
                position_ids,
                self.num_positions,
                "position_ids (axial position embeddings, prod(config.axial_pos_shape))",
            )
        if self.training and self.num_positions != seq_len:
            raise ValueError(
                f"In training, config.axial_pos_shape {list(self.axial_pos_shape)} must multiply to the sequence "
                "length; "
                f"prod = {self.num_positions} != sequence length {seq_len}. Pad the input to {self.num_positions} "
                "or change config.axial_pos_shape."
            )
        if not self.training and self.num_positions < seq_len:
            raise ValueError(
                f"config.axial_pos_shape {list(self.axial_pos_shape)} must multiply to at least the (padded) sequence "
                f"length; prod = {self.num_positions} < {seq_len}"
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
        _check_index_range(position_ids, self.embedding.num_embeddings, "position_ids (config.max_position_embeddings)")
        return F.dropout(self.embedding(position_ids), p=self.dropout, training=self.training)


class ReformerEmbeddings(nn.Module):
    """Word embeddings (with dropout) plus position embeddings."""

    def __init__(self, config: ReformerConfig):
        super().__init__()
        self.max_position_embeddings = config.max_position_embeddings
        self.dropout = config.hidden_dropout_prob
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = (
            AxialPositionEmbeddings(config) if config.axial_pos_embds else PositionEmbeddings(config)
        )

    def forward(
        self, input_ids=None, position_ids=None, inputs_embeds=None, start_idx_pos_encodings: int = 0
    ) -> torch.Tensor:
        if input_ids is not None:
            batch_size, seq_len = input_ids.shape
            device = input_ids.device
        else:
            batch_size, seq_len = inputs_embeds.shape[:2]
            device = inputs_embeds.device
        if position_ids is not None and position_ids.shape[-1] > self.max_position_embeddings:
            raise ValueError(
                f"sequence length {position_ids.shape[-1]} must be at most config.max_position_embeddings "
                f"{self.max_position_embeddings}"
            )
        if seq_len > self.max_position_embeddings:
            raise ValueError(
                f"sequence length {seq_len} must be at most config.max_position_embeddings "
                f"{self.max_position_embeddings}"
            )
        dropout_p = self.dropout if self.training else 0.0

        if isinstance(self.position_embeddings, AxialPositionEmbeddings):
            # one fused op (one kernel on CUDA): dropout(word rows) + axial rows with the dropout2d pattern
            axial = self.position_embeddings
            if position_ids is None and (start_idx_pos_encodings != 0 or inputs_embeds is not None):
                position_ids = _default_position_ids(batch_size, seq_len, start_idx_pos_encodings, device)
            axial.check_inputs(seq_len, position_ids)
            # position_ids None = the whole grid 0..L-1, whose backward needs no sort
            if inputs_embeds is None:
                _check_index_range(input_ids, self.word_embeddings.num_embeddings, "input_ids (config.vocab_size)")
                return axial_word_embedding(
                    input_ids, self.word_embeddings.weight, axial.tables(), position_ids, dropout_p=dropout_p
                )
            embeddings = F.dropout(inputs_embeds, p=dropout_p, training=self.training)
            return embeddings + axial_word_embedding(None, None, axial.tables(), position_ids, dropout_p=dropout_p)

        if position_ids is None:
            position_ids = _default_position_ids(batch_size, seq_len, start_idx_pos_encodings, device)
        if inputs_embeds is None:
            _check_index_range(input_ids, self.word_embeddings.num_embeddings, "input_ids (config.vocab_size)")
            inputs_embeds = self.word_embeddings(input_ids)
        embeddings = F.dropout(inputs_embeds, p=dropout_p, training=self.training)
        return embeddings + self.position_embeddings(position_ids)


def _default_position_ids(batch_size: int, seq_len: int, start: int, device: torch.device) -> torch.Tensor:
    return torch.arange(start, start + seq_len, device=device).unsqueeze(0).expand(batch_size, seq_len)  # [B, L]


# ==================================================================================================
# attention
# ==================================================================================================
# Rows per block of the blocked CPU paths (LayerNorm + projections, output projection, feed-forward and its
# reversible backward, final LayerNorm): a block's [rows, FF] intermediate stays in cache (2048 x 512 fp32 =
# 4 MB) instead of a [L, FF] tensor that is page-faulted in on every call (32 MB at L=16384). Measured on the
# feed-forward (L=16384, 256 -> 512 -> 256, LayerNorm and residual included, 2 threads): 27.2 ms unblocked;
# 22.9 / 21.7 / 21.4 / 21.4 ms with 512 / 1024 / 2048 / 4096-row blocks (1 thread: 34.5 / 34.7 / 34.2 ms for
# 1024-4096).
_CPU_BLOCK_ROWS = 2048


def _normalized_projections(
    rows: torch.Tensor,
    norm: nn.LayerNorm,
    layers: Sequence[nn.Linear],
    outs: Sequence[torch.Tensor],
    stats: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """``outs[i] = LayerNorm(rows) @ layers[i].weight^T`` for ``rows [N, hidden]`` (bias-free layers,
    ``outs`` ``[N, width]`` each), in blocks of rows: LayerNorm and one oneDNN product against the
    concatenated weights while the block is in cache. ``stats``: ``(mean, rstd)`` ``[N, 1]`` buffers that
    receive the LayerNorm statistics (for its backward)."""
    weights = torch.cat([layer.weight for layer in layers])  # [P * width, hidden]
    width = outs[0].shape[1]
    for block in row_blocks(rows.shape[0], _CPU_BLOCK_ROWS):
        normed, mean, rstd = torch.ops.aten.native_layer_norm(
            rows[block], [rows.shape[1]], norm.weight, norm.bias, norm.eps
        )  # [n, hidden]
        if stats is not None:
            stats[0][block], stats[1][block] = mean, rstd  # [n, 1] each
        projected = onednn_linear(normed, weights, None)  # [n, P * width]
        for i, out in enumerate(outs):
            out[block] = projected[:, i * width : (i + 1) * width]  # [n, width]


class EfficientAttentionMixin:
    """Head split/merge and the input projections shared by the LSH and local attention layers."""

    num_attention_heads: int
    attention_head_size: int
    all_head_size: int

    def _project_heads(
        self, hidden_states: torch.Tensor, layers: Sequence[nn.Linear], layer_norm: nn.LayerNorm | None = None
    ) -> list[torch.Tensor]:
        """``[B, H, L, D]`` projections of ``hidden_states [B, L, hidden]`` by each of ``layers``, after
        ``layer_norm`` when given.

        Without autograd on large fp32 CPU inputs this runs in blocks of rows: LayerNorm and one matrix
        multiply against the concatenated weights while the block is in cache (LayerNorm at L=16384,
        1 thread: 5.1 ms per layer over the whole sequence, 1.3 ms in blocks). Either way the results are
        ``[B, L, H, D]`` buffers viewed as ``[B, H, L, D]``, the layout the attention op reads directly.
        """
        weight = layers[0].weight
        if (
            layer_norm is None
            or needs_grad(hidden_states, *layer_norm.parameters(), *(p for layer in layers for p in layer.parameters()))
            or not onednn_applicable(hidden_states, weight)
            or any(layer.bias is not None or layer.weight.dtype != weight.dtype for layer in layers)
        ):
            if layer_norm is not None:
                hidden_states = layer_norm(hidden_states)
            return [self._split_heads(_linear(layer, hidden_states)) for layer in layers]
        rows = hidden_states.reshape(-1, hidden_states.shape[-1])  # [B*L, hidden]
        # scratch inside the in-place layer pass (_LayerStack): reused by the next layer, not fresh memory
        outs = [
            scratch_empty(f"projection.{i}", (rows.shape[0], self.all_head_size), rows.dtype, rows.device)
            for i in range(len(layers))
        ]  # [B*L, H*D] each
        _normalized_projections(rows, layer_norm, layers, outs)
        return [self._split_heads(out.view(*hidden_states.shape[:2], -1)) for out in outs]

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

    ``buckets`` (``[B, H, R, L]`` from an earlier call) skips hashing: the reversible backward replays
    the forward with the buckets it used. ``on_hashed`` is called right after the random rotations were
    drawn (the reversible layer records the RNG state there for the dropout replay).
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
        layer_norm: nn.LayerNorm | None = None,
        **kwargs: Any,
    ) -> LSHSelfAttentionOutput:
        """``layer_norm``: applied to ``hidden_states`` first (fused with the projections where possible)."""
        batch_size, seq_len = hidden_states.shape[:2]
        num_hashes = self.num_hashes if num_hashes is None else num_hashes
        if past_buckets_states is not None and len(past_buckets_states) > self.layer_idx:
            # one new token against the cache (attention_mask covers the cached positions and the new token)
            if seq_len != 1:
                raise ValueError(
                    f"with cached states (past_buckets_states) the input must be one new token per row; got {seq_len}"
                )
            if layer_norm is not None:
                hidden_states = layer_norm(hidden_states)
            out, step_buckets = lsh_attention_step(self, hidden_states, past_buckets_states, attention_mask, num_hashes)
            return LSHSelfAttentionOutput(out, None, step_buckets)
        dropout_p = self.dropout if self.training else 0.0
        query_key, value = self._project_heads(hidden_states, self.projection_layers(), layer_norm)  # [B, H, L, D] each
        op_inputs, buckets = self.op_inputs(query_key, value, attention_mask, num_hashes, buckets, on_hashed)
        out, probs = chunked_attention(**op_inputs, dropout_p=dropout_p, return_probs=output_attentions)
        if buckets is None:
            probs = self._full_attention_probs(probs)
        return LSHSelfAttentionOutput(self._merge_heads(out), probs, buckets)

    def projection_layers(self) -> list[nn.Linear]:
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

        With ``hash_seed`` set they come from a private generator seeded with it (transformers reseeds the
        global RNG instead, which yields the same numbers); otherwise from the global RNG.
        """
        shape = (self.num_attention_heads, self.attention_head_size, num_hashes, rotation_size(self.num_buckets))
        if self.hash_seed is None:
            return torch.randn(shape, device=device, dtype=dtype)
        generator = torch.Generator(device=device).manual_seed(self.hash_seed)
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)

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
        layer_norm: nn.LayerNorm | None = None,
        **kwargs: Any,
    ) -> LocalSelfAttentionOutput:
        """``layer_norm``: applied to ``hidden_states`` first (fused with the projections where possible)."""
        seq_len = hidden_states.shape[1]
        if past_buckets_states is not None and len(past_buckets_states) > self.layer_idx:
            # one new token against the cache (attention_mask covers the cached positions and the new token)
            if seq_len != 1:
                raise ValueError(
                    f"with cached states (past_buckets_states) the input must be one new token per row; got {seq_len}"
                )
            if layer_norm is not None:
                hidden_states = layer_norm(hidden_states)
            return LocalSelfAttentionOutput(
                local_attention_step(self, hidden_states, past_buckets_states, attention_mask), None
            )
        dropout_p = self.dropout if self.training else 0.0
        query, key, value = self._project_heads(
            hidden_states, self.projection_layers(), layer_norm
        )  # [B, H, L, D] each
        out, probs = chunked_attention(
            **self.op_inputs(query, key, value, attention_mask), dropout_p=dropout_p, return_probs=output_attentions
        )
        if seq_len <= self.chunk_length:
            probs = self._full_attention_probs(probs)
        return LocalSelfAttentionOutput(self._merge_heads(out), probs)

    def projection_layers(self) -> list[nn.Linear]:
        return [self.query, self.key, self.value]

    def op_inputs(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> dict[str, Any]:
        """The attention op's arguments for the projections."""
        seq_len = query.shape[2]
        inputs = dict(
            query=query, key=key, value=value, sorted_idx=None, causal=self.is_decoder, attention_mask=attention_mask
        )
        if seq_len <= self.chunk_length:
            return dict(inputs, chunk_length=seq_len, num_chunks_before=0, num_chunks_after=0)
        return dict(
            inputs,
            chunk_length=self.chunk_length,
            num_chunks_before=self.num_chunks_before,
            num_chunks_after=self.num_chunks_after,
        )


class ReformerSelfOutput(nn.Module):
    def __init__(self, config: ReformerConfig):
        super().__init__()
        self.dropout = config.hidden_dropout_prob
        self.dense = nn.Linear(config.num_attention_heads * config.attention_head_size, config.hidden_size, bias=False)

    def forward(
        self, hidden_states: torch.Tensor, residual: torch.Tensor | None = None, in_place: bool = False
    ) -> torch.Tensor:
        """The projection back to ``hidden_size``; plus ``residual`` when given, added into ``residual`` itself
        when ``in_place`` and the blocked CPU path applies (no autograd, no dropout, large fp32 input)."""
        if (
            residual is not None
            and in_place
            and not (self.training and self.dropout > 0)
            and not needs_grad(hidden_states, residual, self.dense.weight)
            and onednn_applicable(hidden_states, self.dense.weight)
            and residual.is_contiguous()
            and residual.dtype == torch.float32
        ):
            rows = hidden_states.reshape(-1, hidden_states.shape[-1])  # [N, H*D]
            residual_rows = residual.view(-1, residual.shape[-1])  # [N, hidden]
            for block in row_blocks(rows.shape[0], _CPU_BLOCK_ROWS):
                torch.add(
                    residual_rows[block],
                    onednn_linear(rows[block], self.dense.weight, self.dense.bias),
                    out=residual_rows[block],
                )  # [n, hidden]
            return residual
        out = F.dropout(_linear(self.dense, hidden_states), p=self.dropout, training=self.training)
        return out if residual is None else residual + out


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
        is_step = past_buckets_states is not None and len(past_buckets_states) > self.layer_id
        kwargs = (
            {"num_hashes": num_hashes, "buckets": buckets, "on_hashed": on_hashed}
            if isinstance(self.self_attention, LSHSelfAttention)
            else {}
        )
        if use_cache:
            # the cache keeps the normalised inputs
            hidden_states = self.layer_norm(hidden_states)
        else:
            # normalised inside the attention layer, fused with its projections
            kwargs["layer_norm"] = self.layer_norm
        outputs = self.self_attention(
            hidden_states,
            attention_mask=attention_mask,
            past_buckets_states=past_buckets_states,
            use_cache=use_cache,
            output_attentions=output_attentions,
            **kwargs,
        )
        buckets = getattr(outputs, "buckets", None)
        if use_cache and past_buckets_states is not None:
            # the attention inputs (and LSH buckets) of the prompt, or of the new token of a step
            cache_attention_inputs(
                self.self_attention,
                past_buckets_states,
                self.layer_id,
                hidden_states,
                buckets,
                attention_mask,
                orig_sequence_length,
                is_step,
            )
        return AttentionOutput(self.output(outputs.hidden_states, residual, in_place), outputs.attention_probs, buckets)

    def reverse_fusable(
        self,
        next_attn_output: torch.Tensor,
        hidden_states: torch.Tensor,
        grad_attn_output: torch.Tensor,
        grad_hidden_states: torch.Tensor,
    ) -> bool:
        """Whether ``reverse_blocked`` applies: no dropout, autocast off, bias-free projections, large fp32
        CPU tensors."""
        attention = self.self_attention
        layers = [*attention.projection_layers(), self.output.dense]
        tensors = (next_attn_output, hidden_states, grad_attn_output, grad_hidden_states)
        return (
            not (self.training and (self.output.dropout > 0 or attention.dropout > 0))
            and not torch.is_autocast_enabled(hidden_states.device.type)
            and onednn_applicable(hidden_states, layers[0].weight)
            and all(layer.bias is None for layer in layers)
            and all(p.dtype == torch.float32 for p in self.parameters())
            and all(t.dtype == torch.float32 and t.is_contiguous() and t.shape == hidden_states.shape for t in tensors)
        )

    @torch.no_grad()
    def reverse_blocked(
        self,
        next_attn_output: torch.Tensor,
        hidden_states: torch.Tensor,
        grad_attn_output: torch.Tensor,
        grad_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        buckets: torch.Tensor | None = None,
        in_place: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[nn.Parameter, torch.Tensor]]:
        """The reversible backward of ``Y1 = X1 + f(X2)``: from ``Y1, X2, dY1, dY2`` returns ``X1 = Y1 - f(X2)``,
        ``dY2 + (df/dX2)^T dY1`` and the gradients of ``f``'s parameters.

        LayerNorm with the input projections, and the output projection, run in blocks of rows through oneDNN
        (recompute and backward while a block is in cache; LayerNorm statistics kept per row). The attention op
        runs once over the sequence together with its input gradients (``chunked_attention_with_grad``: for one
        hash round a single pass over the blocks; the output projection's input gradient is known before the
        op). Weight gradients are summed over blocks in block order (deterministic). Same numbers as autograd
        over the unblocked graph up to fp32 summation order, without its ~20 fresh [B, L, hidden]-sized
        temporaries per layer.
        """
        attention, norm, output = self.self_attention, self.layer_norm, self.output.dense
        layers = attention.projection_layers()
        batch_size, seq_len, hidden = hidden_states.shape
        width = attention.all_head_size
        num_rows = batch_size * seq_len
        x2 = hidden_states.reshape(num_rows, hidden)  # [N, hidden]
        y1, grad_y1, grad_y2 = (
            t.reshape(num_rows, hidden) for t in (next_attn_output, grad_attn_output, grad_hidden_states)
        )  # [N, hidden] each
        # in_place: X1 overwrites Y1 and dX2 overwrites dY2, block by block (the caller owns both buffers)
        x1, grad_x2 = (
            (y1, grad_y2) if in_place else (torch.empty_like(y1), torch.empty_like(grad_y2))
        )  # [N, hidden] each

        # recompute: LayerNorm (statistics kept) and the projections, one [B, L, H * D] buffer per layer
        mean, rstd = (x2.new_empty(num_rows, 1) for _ in range(2))  # [N, 1] each
        projections = [x2.new_empty(num_rows, width) for _ in layers]  # [N, H * D] each
        _normalized_projections(x2, norm, layers, projections, (mean, rstd))
        heads = [attention._split_heads(p.view(batch_size, seq_len, width)) for p in projections]  # [B, H, L, D] each

        # the output projection's input gradient dY1 @ Wo (oneDNN computes a @ w^T: pass Wo^T)
        output_t = output.weight.t().contiguous()  # [width, hidden]
        grad_context = x2.new_empty(num_rows, width)  # [N, width]
        for block in row_blocks(num_rows, _CPU_BLOCK_ROWS):
            grad_context[block] = onednn_linear(grad_y1[block], output_t, None)  # [n, width]

        # the attention op and its input gradients (one pass over the blocks where the op can)
        if isinstance(attention, LSHSelfAttention):
            op_inputs = attention.op_inputs(*heads, attention_mask=attention_mask, buckets=buckets)[0]
        else:
            op_inputs = attention.op_inputs(*heads, attention_mask=attention_mask)
        grad_context = attention._split_heads(grad_context.view(batch_size, seq_len, width))  # [B, H, L, D]
        context, (grad_query, grad_key, grad_value) = chunked_attention_with_grad(
            **op_inputs, grad_out=grad_context
        )  # [B, H, L, D] each
        grad_heads = [grad_query, grad_value] if grad_key is None else [grad_query, grad_key, grad_value]
        grad_rows = [attention._merge_heads(g).reshape(num_rows, width) for g in grad_heads]  # [N, width] each
        context_rows = attention._merge_heads(context).reshape(num_rows, width)  # [N, width]
        del context, heads, grad_heads, grad_context

        # output projection: X1 = Y1 - context @ Wo^T and its weight gradient
        grads = {p: torch.zeros_like(p) for p in (norm.weight, norm.bias, output.weight)}
        for block in row_blocks(num_rows, _CPU_BLOCK_ROWS):
            torch.sub(y1[block], onednn_linear(context_rows[block], output.weight, None), out=x1[block])  # [n, hidden]
            grads[output.weight].add_(weight_grad(grad_y1[block], context_rows[block]))  # [hidden, width]
        del context_rows

        # projections and LayerNorm backward, LayerNorm recomputed per block
        weights_t = torch.cat([layer.weight for layer in layers]).t().contiguous()  # [hidden, P * width]
        grad_weights = weights_t.new_zeros(weights_t.shape[::-1])  # [P * width, hidden]
        for block in row_blocks(num_rows, _CPU_BLOCK_ROWS):
            normed = torch.ops.aten.native_layer_norm(x2[block], [hidden], norm.weight, norm.bias, norm.eps)[
                0
            ]  # [n, hidden]
            grad_projected = torch.cat([g[block] for g in grad_rows], dim=1)  # [n, P * width]
            grad_weights.add_(weight_grad(grad_projected, normed))
            grad_normed = onednn_linear(grad_projected, weights_t, None)  # [n, hidden]
            grad_x, grad_gamma, grad_beta = torch.ops.aten.native_layer_norm_backward(
                grad_normed, x2[block], [hidden], mean[block], rstd[block], norm.weight, norm.bias, [True, True, True]
            )  # [n, hidden], [hidden], [hidden]
            torch.add(grad_y2[block], grad_x, out=grad_x2[block])  # [n, hidden]
            grads[norm.weight].add_(grad_gamma)
            grads[norm.bias].add_(grad_beta)
        for i, layer in enumerate(layers):
            grads[layer.weight] = grad_weights[i * width : (i + 1) * width]  # [width, hidden]
        return x1.view_as(next_attn_output), grad_x2.view_as(grad_hidden_states), grads


# ==================================================================================================
# feed-forward
# ==================================================================================================
def _linear(layer: nn.Linear, x: torch.Tensor, relu: bool = False) -> torch.Tensor:
    """``layer(x)`` (then ReLU when ``relu``), through oneDNN on large CPU fp32 inputs (``cpu_linear.py``)."""
    return linear(x, layer.weight, layer.bias, relu)


class ReformerFeedForwardDense(nn.Module):
    def __init__(self, config: ReformerConfig):
        super().__init__()
        self.dropout = config.hidden_dropout_prob
        self.act_fn = ACT2FN[config.hidden_act]
        self.dense = nn.Linear(config.hidden_size, config.feed_forward_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # transformers' order: dense → dropout → activation
        if self.act_fn is F.relu and not (self.training and self.dropout > 0):
            # no dropout between them: the linear and the ReLU fuse
            return _linear(self.dense, hidden_states, relu=True)
        hidden_states = F.dropout(_linear(self.dense, hidden_states), p=self.dropout, training=self.training)
        if self.act_fn is F.relu:
            # in place on the fresh [B, L, FF] output (no backward of linear/dropout needs it): one
            # pass instead of read + write of a new tensor, 33 -> 27 ms per layer at L=16384, FF 512
            return F.relu_(hidden_states)
        return self.act_fn(hidden_states)


class ReformerFeedForwardOutput(nn.Module):
    def __init__(self, config: ReformerConfig):
        super().__init__()
        self.dropout = config.hidden_dropout_prob
        self.dense = nn.Linear(config.feed_forward_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.dropout(_linear(self.dense, hidden_states), p=self.dropout, training=self.training)


class ChunkReformerFeedForward(nn.Module):
    """LayerNorm → dense → dropout → act → dense → dropout (the ``g`` of the reversible layer), applied in
    chunks of ``chunk_size_feed_forward`` positions when that is > 0 (a last shorter chunk is allowed)."""

    def __init__(self, config: ReformerConfig):
        super().__init__()
        self.chunk_size_feed_forward = config.chunk_size_feed_forward
        self.seq_len_dim = 1
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dense = ReformerFeedForwardDense(config)
        self.output = ReformerFeedForwardOutput(config)

    def forward(
        self, attention_output: torch.Tensor, residual: torch.Tensor | None = None, in_place: bool = False
    ) -> torch.Tensor:
        """``g(attention_output)``, or ``residual + g(attention_output)`` when ``residual`` is given (added into
        ``residual`` itself when ``in_place`` and the blocked CPU path applies)."""
        if residual is not None and self._fusable(attention_output, residual):
            return self._forward_blocked(attention_output, residual, in_place)
        chunk = self.chunk_size_feed_forward
        if chunk <= 0 or attention_output.shape[self.seq_len_dim] <= chunk:
            out = self.forward_chunk(attention_output)
        else:
            out = torch.cat(
                [self.forward_chunk(part) for part in attention_output.split(chunk, dim=self.seq_len_dim)],
                dim=self.seq_len_dim,
            )
        return out if residual is None else residual + out

    def forward_chunk(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.output(self.dense(self.layer_norm(hidden_states)))

    def reverse_fusable(
        self,
        attn_output: torch.Tensor,
        hidden_states: torch.Tensor,
        grad_attn_output: torch.Tensor,
        grad_hidden_states: torch.Tensor,
    ) -> bool:
        """Whether ``reverse_blocked`` applies: ReLU, no dropout, autocast off, large fp32 CPU tensors."""
        tensors = (attn_output, hidden_states, grad_attn_output, grad_hidden_states)
        return (
            self.dense.act_fn is F.relu
            and not (self.training and self.dense.dropout > 0)
            and not torch.is_autocast_enabled(attn_output.device.type)
            and onednn_applicable(attn_output, self.dense.dense.weight)
            and all(p.dtype == torch.float32 for p in self.parameters())
            and all(t.dtype == torch.float32 and t.is_contiguous() and t.shape == attn_output.shape for t in tensors)
        )

    @torch.no_grad()
    def reverse_blocked(
        self,
        attn_output: torch.Tensor,
        hidden_states: torch.Tensor,
        grad_attn_output: torch.Tensor,
        grad_hidden_states: torch.Tensor,
        in_place: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[nn.Parameter, torch.Tensor]]:
        """The reversible backward of ``Y2 = X2 + g(Y1)`` in blocks of rows: from ``Y1, Y2, dY1, dY2`` returns
        ``X2 = Y2 - g(Y1)``, ``dY1 + (dg/dY1)^T dY2`` and the gradients of ``g``'s parameters.

        Each block recomputes LayerNorm (keeping its mean and 1/std), dense + ReLU and the output dense,
        then runs their backward while the block is in cache; the input gradients go through oneDNN and
        the weight gradients are summed over blocks in block order (deterministic). Same numbers as autograd
        over the unblocked graph up to fp32 summation order. Measured at L=16384, 256 -> 512 -> 256, 1 thread
        (CPU time per layer): 248 ms with autograd, 153 ms blocked (with the weight gradients through MKL).
        """
        norm, dense, output = self.layer_norm, self.dense.dense, self.output.dense
        hidden = attn_output.shape[-1]
        rows, y2_rows = attn_output.reshape(-1, hidden), hidden_states.reshape(-1, hidden)  # [N, H] each
        grad_y1_rows, grad_y2_rows = (
            grad_attn_output.reshape(-1, hidden),
            grad_hidden_states.reshape(-1, hidden),
        )  # [N, H] each
        # in_place: X2 overwrites Y2 and the new dY1 the old one, row block by row block (the caller owns
        # both buffers: _ReversibleFunction.backward works on private copies)
        x2, grad_y1 = (
            (y2_rows, grad_y1_rows) if in_place else (torch.empty_like(y2_rows), torch.empty_like(grad_y1_rows))
        )  # [N, H] each
        grads = {
            p: torch.zeros_like(p)
            for p in (norm.weight, norm.bias, dense.weight, dense.bias, output.weight, output.bias)
        }
        # oneDNN computes a @ w^T: the transposed weights turn it into dY @ W
        dense_t, output_t = dense.weight.t().contiguous(), output.weight.t().contiguous()  # [H, FF], [FF, H]
        for block in row_blocks(rows.shape[0], _CPU_BLOCK_ROWS):
            x = rows[block]  # [n, H]
            normed, mean, rstd = torch.ops.aten.native_layer_norm(
                x, [hidden], norm.weight, norm.bias, norm.eps
            )  # [n, H]
            act = onednn_linear(normed, dense.weight, dense.bias, relu=True)  # [n, FF]
            torch.sub(y2_rows[block], onednn_linear(act, output.weight, output.bias), out=x2[block])  # [n, H]
            grad_out = grad_y2_rows[block]  # [n, H]
            grads[output.weight].add_(weight_grad(grad_out, act))  # [H, FF]
            grads[output.bias].add_(grad_out.sum(0))
            grad_act = torch.ops.aten.threshold_backward(onednn_linear(grad_out, output_t, None), act, 0)  # [n, FF]
            grads[dense.weight].add_(weight_grad(grad_act, normed))  # [FF, H]
            grads[dense.bias].add_(grad_act.sum(0))
            grad_normed = onednn_linear(grad_act, dense_t, None)  # [n, H]
            grad_x, grad_gamma, grad_beta = torch.ops.aten.native_layer_norm_backward(
                grad_normed, x, [hidden], mean, rstd, norm.weight, norm.bias, [True, True, True]
            )  # [n, H], [H], [H]
            torch.add(grad_y1_rows[block], grad_x, out=grad_y1[block])  # [n, H]
            grads[norm.weight].add_(grad_gamma)
            grads[norm.bias].add_(grad_beta)
        return x2.view_as(hidden_states), grad_y1.view_as(grad_attn_output), grads

    def _fusable(self, attention_output: torch.Tensor, residual: torch.Tensor) -> bool:
        """Blocked oneDNN path: no gradient, no dropout, large fp32 CPU input (rows are independent, so
        blocking changes no result; ``chunk_size_feed_forward`` only bounds memory and is subsumed)."""
        weights = (self.dense.dense.weight, self.output.dense.weight)
        return (
            not (self.training and self.dense.dropout > 0)
            and not needs_grad(attention_output, residual, *self.parameters())
            and onednn_applicable(attention_output, weights[0])
            and weights[1].dtype == torch.float32
            and residual.is_contiguous()
            and residual.dtype == torch.float32
            and residual.shape == attention_output.shape
        )

    def _forward_blocked(
        self, attention_output: torch.Tensor, residual: torch.Tensor, in_place: bool = False
    ) -> torch.Tensor:
        """``residual + g(attention_output)`` in blocks of rows: LayerNorm, dense (+ ReLU), output dense and
        the residual added straight into the output rows, the block's intermediates staying in cache. (oneDNN's
        fused binary-add epilogue was measured slower here: 36.5 vs 34.5 ms per layer, 1 thread.)"""
        hidden = attention_output.shape[-1]
        rows = attention_output.reshape(-1, hidden)  # [N, H]
        residual_rows = residual.reshape(-1, hidden)  # [N, H]
        out = residual_rows if in_place else torch.empty_like(residual_rows)  # [N, H]
        fuse_relu = self.dense.act_fn is F.relu
        for block in row_blocks(rows.shape[0], _CPU_BLOCK_ROWS):
            h = self.layer_norm(rows[block])  # [n, H]
            h = onednn_linear(h, self.dense.dense.weight, self.dense.dense.bias, relu=fuse_relu)  # [n, FF]
            if not fuse_relu:
                h = self.dense.act_fn(h)
            h = onednn_linear(h, self.output.dense.weight, self.output.dense.bias)  # [n, H]
            torch.add(residual_rows[block], h, out=out[block])  # [n, H]
        return out.view_as(residual)


# ==================================================================================================
# reversible layer
# ==================================================================================================
class _RNGState:
    """The global RNG state (CPU, plus the CUDA device of the activations) at one point of the forward."""

    __slots__ = ("cpu", "cuda", "cuda_device")

    def __init__(self, device: torch.device):
        self.cpu = torch.get_rng_state()
        self.cuda_device = device if device.type == "cuda" else None
        self.cuda = torch.cuda.get_rng_state(device) if self.cuda_device is not None else None

    @contextlib.contextmanager
    def replay(self):
        """Run the block from this state; the global RNG is left as it was before the block."""
        devices = [self.cuda_device] if self.cuda_device is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.cuda_device)
            yield


class _LayerRNG:
    """The RNG states a layer's forward recorded: the backward replays ``f`` and ``g`` from them."""

    __slots__ = ("attention", "feed_forward", "device")

    def __init__(self, device: torch.device):
        self.device = device
        self.attention: _RNGState | None = None
        self.feed_forward: _RNGState | None = None

    def record_attention(self) -> None:
        self.attention = _RNGState(self.device)

    def record_feed_forward(self) -> None:
        self.feed_forward = _RNGState(self.device)


def _replay(state: _RNGState | None):
    return state.replay() if state is not None else contextlib.nullcontext()


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
        rng = _LayerRNG(hidden_states.device) if record_rng else None
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

    def backward_pass(
        self,
        next_attn_output: torch.Tensor,
        hidden_states: torch.Tensor,
        grad_attn_output: torch.Tensor,
        grad_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        buckets: torch.Tensor | None = None,
        rng: _LayerRNG | None = None,
        own_buffers: bool = False,
    ) -> tuple[ReformerBackwardOutput, dict[nn.Parameter, torch.Tensor | None]]:
        """From ``Y1, Y2, dY1, dY2`` reconstruct ``X1, X2`` and compute ``dX1, dX2`` and this layer's parameter
        gradients (returned, not accumulated):

            dY1' = dY1 + (dg/dY1)^T dY2,   dX2 = dY2 + (df/dX2)^T dY1',   dX1 = dY1'

        ``own_buffers``: the four input tensors are the caller's private buffers, which become the outputs
        (updated in place: fewer fresh [B, L, hidden] tensors, less heap fragmentation).
        """
        ff_params = [p for p in self.feed_forward.parameters() if p.requires_grad]
        attn_params = [p for p in self.attention.parameters() if p.requires_grad]
        param_grads: dict[nn.Parameter, torch.Tensor | None] = {}

        if self.feed_forward.reverse_fusable(next_attn_output, hidden_states, grad_attn_output, grad_hidden_states):
            # the same computation in blocks of rows, without autograd (no dropout to replay)
            hidden_states, grad_attn_output, ff_grads = self.feed_forward.reverse_blocked(
                next_attn_output, hidden_states, grad_attn_output, grad_hidden_states, in_place=own_buffers
            )
            param_grads.update((p, ff_grads[p]) for p in ff_params)
            next_attn_output = next_attn_output.detach()
        else:
            with torch.enable_grad():
                next_attn_output = next_attn_output.detach().requires_grad_(True)
                with _replay(rng.feed_forward if rng is not None else None):
                    ff_output = self.feed_forward(next_attn_output)
                grads = torch.autograd.grad(
                    ff_output, [next_attn_output, *ff_params], grad_hidden_states, allow_unused=True
                )
            param_grads.update(zip(ff_params, grads[1:]))
            grad_attn_output = grad_attn_output + grads[0] if grads[0] is not None else grad_attn_output
            with torch.no_grad():
                # X2 = Y2 - g(Y1)
                hidden_states = hidden_states - ff_output.detach()
            del ff_output, grads

        if self.attention.reverse_fusable(next_attn_output, hidden_states, grad_attn_output, grad_hidden_states):
            # the same computation in blocks of rows, autograd on the attention op only (no dropout to replay)
            prev_attn_output, grad_hidden_states, attn_grads = self.attention.reverse_blocked(
                next_attn_output.detach(),
                hidden_states,
                grad_attn_output,
                grad_hidden_states,
                attention_mask,
                buckets,
                in_place=own_buffers,
            )
            param_grads.update((p, attn_grads[p]) for p in attn_params)
            return ReformerBackwardOutput(
                prev_attn_output, hidden_states, grad_attn_output, grad_hidden_states
            ), param_grads

        with torch.enable_grad():
            hidden_states.requires_grad_(True)
            with _replay(rng.attention if rng is not None else None):
                attn_output = self.attention(
                    hidden_states, attention_mask=attention_mask, buckets=buckets
                ).hidden_states
            grads = torch.autograd.grad(attn_output, [hidden_states, *attn_params], grad_attn_output, allow_unused=True)
        param_grads.update(zip(attn_params, grads[1:]))
        if grads[0] is not None:
            grad_hidden_states = grad_hidden_states.add_(grads[0]) if own_buffers else grad_hidden_states + grads[0]
        with torch.no_grad():
            # X1 = Y1 - f(X2)
            prev_attn_output = (
                next_attn_output.detach().sub_(attn_output.detach())
                if own_buffers
                else next_attn_output.detach() - attn_output.detach()
            )
        return ReformerBackwardOutput(
            prev_attn_output, hidden_states.detach(), grad_attn_output, grad_hidden_states
        ), param_grads


# ==================================================================================================
# reversible stack
# ==================================================================================================
class _LayerStack:
    """One pass through the layers: the inputs every layer needs and what the forward leaves for the backward."""

    def __init__(
        self,
        layers,
        attention_mask,
        num_hashes,
        output_hidden_states,
        output_attentions,
        past_buckets_states=None,
        use_cache=False,
        orig_sequence_length=None,
        owns_input=False,
    ):
        self.layers = list(layers)
        self.attention_mask = attention_mask
        self.num_hashes = num_hashes
        self.output_hidden_states = output_hidden_states
        self.output_attentions = output_attentions
        self.past_buckets_states = past_buckets_states
        self.use_cache = use_cache
        self.orig_sequence_length = orig_sequence_length
        # the input is a fresh tensor nobody else holds (the in-place pass may use it as a stream buffer)
        self.owns_input = owns_input
        self.all_hidden_states: list[torch.Tensor] = []
        self.all_attentions: list[torch.Tensor | None] = []
        self.buckets: list[torch.Tensor | None] = []
        self.rng: list[_LayerRNG | None] = []

    def forward(
        self, attn_output: torch.Tensor, hidden_states: torch.Tensor, record_rng: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Without autograd and with no stream kept for the caller, large CPU streams are updated in place by
        # the blocked paths: no new [B, L, hidden] tensors per layer, and no freshly mapped memory to
        # page-fault in. They start as private copies (at the first layer both are the embeddings tensor).
        in_place = (
            not torch.is_grad_enabled()
            and not self.output_hidden_states
            and not self.use_cache
            and hidden_states.device.type == "cpu"
            and hidden_states.dtype == torch.float32
        )
        if in_place:
            # a tensor the encoder's caller handed over (ReformerModel's fresh embeddings) needs no copy
            if not (self.owns_input and hidden_states is attn_output and not hidden_states.requires_grad):
                hidden_states = hidden_states.clone()
            attn_output = attn_output.clone()
        # large temporaries (projections, attention outputs) are reused from layer to layer: nothing of a
        # layer but the two streams outlives it here (reformer_kernels.scratch)
        with scratch_scope() if in_place else contextlib.nullcontext():
            return self._forward_layers(attn_output, hidden_states, record_rng, in_place)

    def _forward_layers(
        self, attn_output, hidden_states, record_rng: bool, in_place: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        for layer in self.layers:
            if self.output_hidden_states:
                self.all_hidden_states.append(hidden_states)
            outputs = layer(
                attn_output,
                hidden_states,
                attention_mask=self.attention_mask,
                num_hashes=self.num_hashes,
                past_buckets_states=self.past_buckets_states,
                use_cache=self.use_cache,
                orig_sequence_length=self.orig_sequence_length,
                output_attentions=self.output_attentions,
                record_rng=record_rng,
                in_place=in_place,
            )
            attn_output, hidden_states = outputs.attn_output, outputs.hidden_states
            self.buckets.append(outputs.buckets)
            self.rng.append(outputs.rng)
            if self.output_attentions:
                self.all_attentions.append(outputs.attention_probs)
        if self.output_hidden_states:
            self.all_hidden_states.append(hidden_states)
        return attn_output, hidden_states


class _ReversibleFunction(torch.autograd.Function):
    """The layer stack with activations recomputed in backward instead of stored.

    Forward keeps only the two final streams, each layer's buckets and RNG states. Backward walks the
    layers in reverse, reconstructing each layer's inputs from its outputs. The parameters are explicit
    inputs whose gradients are *returned* (not accumulated by a nested ``backward()`` as transformers
    does), so autograd, gradient hooks and ``DistributedDataParallel`` see ordinary gradients.
    """

    @staticmethod
    def forward(ctx, attn_output: torch.Tensor, hidden_states: torch.Tensor, stack: _LayerStack, *params: nn.Parameter):
        device_type = hidden_states.device.type
        ctx.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        attn_output, hidden_states = stack.forward(attn_output, hidden_states, record_rng=True)
        ctx.stack = stack
        ctx.params = params
        ctx.save_for_backward(attn_output, hidden_states)
        return attn_output, hidden_states

    @staticmethod
    def backward(ctx, grad_attn_output: torch.Tensor, grad_hidden_states: torch.Tensor):
        attn_output, hidden_states = ctx.saved_tensors
        # private copies the layers update in place (the saved outputs and incoming gradients belong to
        # autograd; the gradients also arrive as strided halves of the final LayerNorm's input gradient)
        attn_output, hidden_states = attn_output.clone(), hidden_states.clone()
        grad_attn_output = grad_attn_output.clone(memory_format=torch.contiguous_format)
        grad_hidden_states = grad_hidden_states.clone(memory_format=torch.contiguous_format)
        stack: _LayerStack = ctx.stack
        device_type, autocast_enabled, autocast_dtype = ctx.autocast
        output = ReformerBackwardOutput(attn_output, hidden_states, grad_attn_output, grad_hidden_states)
        param_grads: dict[nn.Parameter, torch.Tensor | None] = {}
        with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_enabled):
            for layer, buckets, rng in zip(reversed(stack.layers), reversed(stack.buckets), reversed(stack.rng)):
                output, grads = layer.backward_pass(
                    output.attn_output,
                    output.hidden_states,
                    output.grad_attn_output,
                    output.grad_hidden_states,
                    attention_mask=stack.attention_mask,
                    buckets=buckets,
                    rng=rng,
                    own_buffers=True,
                )
                param_grads.update(grads)
        # every parameter gets a gradient (zeros if unused) so DDP's reducer sees all of them every step
        grads_out = [param_grads.get(p) if param_grads.get(p) is not None else torch.zeros_like(p) for p in ctx.params]
        grad_x1 = output.grad_attn_output if ctx.needs_input_grad[0] else None
        grad_x2 = output.grad_hidden_states if ctx.needs_input_grad[1] else None
        return (grad_x1, grad_x2, None, *grads_out)


# ==================================================================================================
# encoder
# ==================================================================================================
class ReformerEncoder(nn.Module):
    """Reversible layers over ``[X, X]`` and a LayerNorm over the concatenated ``2 * hidden_size`` streams.

    ``reversible = False`` runs the same layers with plain autograd (storing every activation); the
    default reversible path stores none. Both give the same gradients (tests compare them).
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
        """``_owns_input`` (ReformerModel's own call): ``hidden_states`` is a fresh tensor nobody else holds,
        which the CPU in-place pass may reuse as a stream buffer. ``_row_head`` (the LM head's call): a row-wise
        module applied after the final LayerNorm; the output's ``hidden_states`` are then its output."""
        if use_cache and past_buckets_states is None:
            past_buckets_states = ReformerDynamicCache()
        # a cached step runs plain autograd: the reversible backward would recompute without the cache
        is_step = past_buckets_states is not None and len(past_buckets_states) > 0
        stack = _LayerStack(
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
        params = [p for p in self.layers.parameters() if p.requires_grad]
        needs_grad = torch.is_grad_enabled() and (hidden_states.requires_grad or len(params) > 0)
        if self.reversible and needs_grad and not is_step:
            attn_output, hidden_states = _ReversibleFunction.apply(hidden_states, hidden_states, stack, *params)
        else:
            attn_output, hidden_states = stack.forward(hidden_states, hidden_states, record_rng=False)
        # no dropout between the final LayerNorm and the head: the head runs inside its row blocks (no
        # [B, L, 2 * hidden] tensor; at L=16384 a 32 MiB fresh mmap, page-faulted in on every call)
        fuse_head = _row_head is not None and not (self.training and self.dropout > 0)
        hidden_states = self._final_layer_norm(attn_output, hidden_states, _row_head if fuse_head else None)
        if not fuse_head:
            hidden_states = F.dropout(hidden_states, p=self.dropout, training=self.training)
            if _row_head is not None:
                hidden_states = _row_head(hidden_states)
        all_hidden_states, all_attentions = tuple(stack.all_hidden_states), tuple(stack.all_attentions)
        # the autograd graph keeps `stack` until backward: do not let it pin the returned extras too
        stack.all_hidden_states, stack.all_attentions = [], []
        return ReformerEncoderOutput(
            hidden_states, all_hidden_states, all_attentions, past_buckets_states if use_cache else None
        )

    def _final_layer_norm(
        self, attn_output: torch.Tensor, hidden_states: torch.Tensor, row_head: nn.Module | None = None
    ) -> torch.Tensor:
        """``LayerNorm(cat([Y1, Y2], -1))`` (then ``row_head`` of it); without autograd in blocks of rows, so the
        ``[B, L, 2 * hidden]`` concatenation is never built (at L=16384 the cat alone was a 32 MB temporary)."""
        if (
            needs_grad(attn_output, hidden_states, *self.layer_norm.parameters())
            or attn_output.shape[1] <= _CPU_BLOCK_ROWS
        ):
            out = self.layer_norm(torch.cat([attn_output, hidden_states], dim=-1))
            return out if row_head is None else row_head(out)
        out = None
        for block in row_blocks(attn_output.shape[1], _CPU_BLOCK_ROWS):
            rows = self.layer_norm(torch.cat([attn_output[:, block], hidden_states[:, block]], dim=-1))  # [B, n, 2H]
            if row_head is not None:
                rows = row_head(rows)  # [B, n, out]
            if out is None:
                out = rows.new_empty(attn_output.shape[0], attn_output.shape[1], rows.shape[-1])  # [B, L, 2H or out]
            out[:, block] = rows
        return out


# ==================================================================================================
# pre-trained model base: init, checkpoints
# ==================================================================================================
_IGNORED_CHECKPOINT_SUFFIXES = (
    # mask constants older transformers versions stored as persistent buffers
    "self_mask_value_float16",
    "self_mask_value_float32",
    "mask_value_float16",
    "mask_value_float32",
)


class ReformerPreTrainedModel(nn.Module):
    """Common base: config handling, transformers-style weight init, ``from_pretrained``/``save_pretrained``."""

    config_class = ReformerConfig
    base_model_prefix = "reformer"

    def __init__(self, config: ReformerConfig):
        super().__init__()
        if not isinstance(config, ReformerConfig):
            raise TypeError(f"config must be a ReformerConfig; got {type(config).__name__}")
        config.validate()
        self.config = config

    # -- init ---------------------------------------------------------------------------------------
    def post_init(self) -> None:
        self.apply(self._init_weights)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """transformers' init: normal(0, initializer_range) for linear/embedding weights, zero biases,
        unit LayerNorms, normal(0, axial_norm_std) for the axial factors, zero LM-head bias."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(mean=0.0, std=std)
            if module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
        elif isinstance(module, AxialPositionEmbeddings):
            for weight in module.weights:
                weight.normal_(mean=0.0, std=self.config.axial_norm_std)
        elif isinstance(module, ReformerOnlyLMHead):
            module.bias.zero_()

    # -- conveniences ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def num_parameters(self, only_trainable: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not only_trainable)

    @property
    def base_model(self) -> nn.Module:
        return getattr(self, self.base_model_prefix, self)

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

    # -- heads -------------------------------------------------------------------------------------
    def _reformer_outputs(self, kwargs: dict[str, Any], **reformer_inputs: Any) -> ReformerModelOutput:
        """A head's first step: reject unknown ``kwargs``, then run ``self.reformer`` (as a dataclass)."""
        self._check_forward_kwargs(kwargs)
        return self.reformer(**reformer_inputs, return_dict=True)

    def _head_output(self, output: Any, return_dict: bool | None) -> Any:
        """A head's ``output`` as it is, or as a tuple (``return_dict``, None: ``config.return_dict``)."""
        return_dict = self.config.return_dict if return_dict is None else return_dict
        return output if return_dict else output.to_tuple()

    # -- checkpoints -------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True) -> None:
        """Write ``config.json`` and ``model.safetensors`` (``pytorch_model.bin`` if ``safe_serialization=False``)
        atomically: on any failure the directory is left as it was."""
        self.config.architectures = [type(self).__name__]
        self.config.dtype = str(self.dtype).removeprefix("torch.")
        state_dict = self.state_dict()

        def write(directory: str) -> None:
            self.config.save_pretrained(directory)
            save_state_dict(state_dict, directory, safe_serialization=safe_serialization)

        atomic_write_directory(save_directory, write)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_path: str | os.PathLike,
        *,
        config: ReformerConfig | None = None,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        strict: bool = True,
        **config_overrides: Any,
    ):
        """Load a checkpoint directory written by transformers or by ``save_pretrained``.

        ``config_overrides`` replace fields of the stored config (unknown names raise ``TypeError``).
        ``dtype``: ``None``/``"auto"`` uses ``config.dtype`` (else the checkpoint's float dtype), or give one.
        ``strict``: missing or unexpected weights raise ``ValueError`` listing them; with ``strict=False``
        missing weights keep their fresh initialisation and unexpected ones are ignored (both logged).
        """
        path = os.fspath(pretrained_model_path)
        if config is None:
            config = ReformerConfig.from_pretrained(path)
        unknown = [name for name in config_overrides if not config.has_field(name)]
        if unknown:
            raise TypeError(
                f"{cls.__name__}.from_pretrained() got unknown config fields or arguments {sorted(unknown)}"
            )
        if config_overrides:
            config = ReformerConfig.from_dict(config.to_dict(), **config_overrides)
        state_dict = load_state_dict(path)

        if dtype is None or dtype == "auto":
            dtype = config.dtype
            if dtype is None:
                dtype = next((t.dtype for t in state_dict.values() if t.is_floating_point()), torch.float32)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating torch dtype, 'auto' or None; got {dtype!r}")

        model = cls(config)
        model.to(dtype)
        model._load_checkpoint_state_dict(state_dict, strict=strict, source=path)
        if device is not None:
            model.to(device)
        model.eval()
        return model

    def _normalize_checkpoint_keys(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        own_keys = set(self.state_dict())
        state_dict = {key: value for key, value in state_dict.items() if not key.endswith(_IGNORED_CHECKPOINT_SUFFIXES)}
        # legacy LayerNorm names
        state_dict = {
            key.replace(".gamma", ".weight").replace(".beta", ".bias") if ("layer_norm" in key) else key: value
            for key, value in state_dict.items()
        }
        # a base model's checkpoint in a headed model, or the reverse
        prefix = f"{self.base_model_prefix}."
        model_prefixed = any(key.startswith(prefix) for key in own_keys)
        checkpoint_prefixed = any(key.startswith(prefix) for key in state_dict)
        if model_prefixed and not checkpoint_prefixed:
            state_dict = {prefix + key: value for key, value in state_dict.items()}
        elif checkpoint_prefixed and not model_prefixed:
            state_dict = {key.removeprefix(prefix): value for key, value in state_dict.items()}
        # The LM-head bias across transformers versions: 4.x tied lm_head.decoder.bias to lm_head.bias (a file
        # holds either or both), 5.0-5.23 had no decoder bias (and never added lm_head.bias), 5.24 adds
        # lm_head.decoder.bias and keeps lm_head.bias unused. The logits' bias is decoder.bias; a file
        # without it gets lm_head.bias there (4.x semantics; zero in 5.0-5.23 files).
        for key in [k for k in state_dict if k.endswith("lm_head.bias")]:
            state_dict.setdefault(key.replace("lm_head.bias", "lm_head.decoder.bias"), state_dict[key])
        for key in [k for k in state_dict if k.endswith("lm_head.decoder.bias")]:
            state_dict.setdefault(key.replace("lm_head.decoder.bias", "lm_head.bias"), state_dict[key])
        return state_dict

    def _load_checkpoint_state_dict(
        self, state_dict: dict[str, torch.Tensor], strict: bool = True, source: str = "state dict"
    ) -> None:
        state_dict = self._normalize_checkpoint_keys(state_dict)
        own = self.state_dict()
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        mismatched = sorted(
            f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(own[key].shape)}"
            for key in set(own) & set(state_dict)
            if tuple(state_dict[key].shape) != tuple(own[key].shape)
        )
        if mismatched:
            raise ValueError(f"weights in {source} have the wrong shape for {type(self).__name__}: {mismatched}")
        if strict and (missing or unexpected):
            raise ValueError(
                f"weights in {source} do not match {type(self).__name__}: missing keys {missing}, unexpected keys "
                f"{unexpected} "
                "(pass strict=False to initialise missing weights and ignore unexpected ones)"
            )
        if missing or unexpected:
            logger.warning(
                "loading %s into %s: missing keys %s (freshly initialised), unexpected keys %s (ignored)",
                source,
                type(self).__name__,
                missing,
                unexpected,
            )
        self.load_state_dict({key: value for key, value in state_dict.items() if key in own}, strict=False)


# ==================================================================================================
# base model
# ==================================================================================================
class ReformerModel(ReformerPreTrainedModel):
    """Embeddings → reversible encoder → ``[B, L, 2 * hidden_size]`` (``last_hidden_state``)."""

    def __init__(self, config: ReformerConfig):
        super().__init__(config)
        self.embeddings = ReformerEmbeddings(config)
        self.encoder = ReformerEncoder(config)
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
        ``past_buckets_states`` holding every layer's attention inputs (and LSH buckets) for the given tokens.
        Passing it back with one new token per row runs a decoding step that attends only to the relevant
        chunk(s) and appends to the cache (when ``use_cache``). In a step, ``attention_mask`` (optional) covers
        the cached positions and the new token, ``[B, past + 1]``, and must be left-padded; the default
        ``position_ids`` are then the number of real cached tokens of each row (else the cache length).

        Unlike transformers, ``use_cache=None`` means False (not ``config.use_cache``): no cache is built
        unless asked for.

        ``_row_head`` (private, the LM heads' call): a row-wise module applied to the final rows, fused with the
        final LayerNorm where the blocked CPU path runs; ``last_hidden_state`` then holds its output.
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
            attention_mask, position_ids = self._check_cached_step(
                input_ids if input_ids is not None else inputs_embeds, step_mask, position_ids, past_buckets_states
            )
            start_idx_pos_encodings = past_buckets_states.get_start_idx()
        else:
            input_ids, attention_mask, position_ids, inputs_embeds = self._check_inputs(
                input_ids, attention_mask, position_ids, inputs_embeds, num_hashes
            )
            start_idx_pos_encodings = 0
        batch_size, seq_len = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        orig_sequence_length = seq_len

        least_common_mult_chunk_length = config.least_common_mult_chunk_length()
        must_pad = seq_len % least_common_mult_chunk_length != 0 and seq_len > config.min_chunk_length() and not is_step
        if must_pad:
            padding_length = least_common_mult_chunk_length - seq_len % least_common_mult_chunk_length
            if self.training:
                raise ValueError(
                    f"In training, the sequence length {seq_len} (input_ids) must be a multiple of the least common "
                    "multiple "
                    f"of the chunk lengths {least_common_mult_chunk_length} (config.lsh_attn_chunk_length / "
                    f"config.local_attn_chunk_length). Pad the input to {seq_len + padding_length}."
                )
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
        if is_step and use_cache:
            past_buckets_states.decode_steps += 1
        sequence_output = encoder_outputs.hidden_states
        if must_pad:
            sequence_output = sequence_output[:, :orig_sequence_length]
        hidden_states = encoder_outputs.all_hidden_states if output_hidden_states else None
        attentions = encoder_outputs.all_attentions if output_attentions else None
        output = ReformerModelOutput(
            last_hidden_state=sequence_output,
            past_buckets_states=encoder_outputs.past_buckets_states,
            hidden_states=hidden_states,
            attentions=attentions,
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
                    f"{expected}; "
                    f"got {tuple(getattr(attention_mask, 'shape', ()))}"
                )
            _check_left_padded(attention_mask)
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
                raise ValueError(
                    "input_ids must be a [batch_size, sequence_length] tensor; got "
                    f"{getattr(input_ids, 'shape', type(input_ids))}"
                )
            if input_ids.is_floating_point() or input_ids.dtype == torch.bool:
                raise TypeError(f"input_ids must be an integer tensor; got {input_ids.dtype}")
            shape = tuple(input_ids.shape)
        else:
            if (
                not isinstance(inputs_embeds, torch.Tensor)
                or inputs_embeds.dim() != 3
                or inputs_embeds.shape[-1] != self.config.hidden_size
            ):
                raise ValueError(
                    f"inputs_embeds must be a [batch_size, sequence_length, hidden_size={self.config.hidden_size}] "
                    "tensor; "
                    f"got {getattr(inputs_embeds, 'shape', type(inputs_embeds))}"
                )
            shape = tuple(inputs_embeds.shape[:2])
        if shape[1] == 0:
            raise ValueError("input_ids / inputs_embeds must have a non-empty sequence dimension")
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != shape:
                raise ValueError(
                    f"attention_mask must have the shape of input_ids {shape}; got "
                    f"{tuple(getattr(attention_mask, 'shape', ()))}"
                )
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

    def _pad_to_mult_of_chunk_length(self, input_ids, inputs_embeds, attention_mask, position_ids, padding_length):
        """Eval-time padding (transformers' rule): pad tokens, a zero attention mask over them, and position ids
        that continue the given ones (transformers' own position-id padding is broken)."""
        source = input_ids if input_ids is not None else inputs_embeds
        batch_size, seq_len = source.shape[:2]
        device = source.device
        logger.info(
            "input automatically padded from %d to %d to be a multiple of the chunk length",
            seq_len,
            seq_len + padding_length,
        )
        pad_token_id = self.config.pad_token_id if self.config.pad_token_id is not None else 0
        padded_ids = torch.full((batch_size, padding_length), pad_token_id, dtype=torch.long, device=device)
        if attention_mask is None:
            attention_mask = torch.ones(batch_size, seq_len, dtype=torch.bool, device=device)
        attention_mask = torch.cat([attention_mask, attention_mask.new_zeros(batch_size, padding_length)], dim=-1)
        if position_ids is not None:
            steps = torch.arange(1, padding_length + 1, dtype=position_ids.dtype, device=device)
            position_ids = torch.cat([position_ids, position_ids[:, -1:] + steps], dim=-1)
        if input_ids is not None:
            input_ids = torch.cat([input_ids, padded_ids.to(input_ids.dtype)], dim=-1)
        else:
            inputs_embeds = torch.cat(
                [inputs_embeds, self.embeddings.word_embeddings(padded_ids).to(inputs_embeds.dtype)], dim=-2
            )
        return input_ids, inputs_embeds, attention_mask, position_ids


# ==================================================================================================
# heads
# ==================================================================================================
class ReformerOnlyLMHead(nn.Module):
    """``logits = h @ decoder.weight^T + decoder.bias`` over ``2 * hidden_size`` features, in chunks of
    ``chunk_size_lm_head`` positions when that is > 0.

    ``bias`` is the parameter transformers (5.24) keeps beside ``decoder.bias`` and never adds; it is kept,
    frozen (no gradient, so DistributedDataParallel sees no unused parameter), for the same state-dict keys
    and parameter names. Loading a checkpoint that has no ``decoder.bias`` fills it from ``bias``."""

    def __init__(self, config: ReformerConfig):
        super().__init__()
        self.seq_len_dim = 1
        self.chunk_size_lm_head = config.chunk_size_lm_head
        self.decoder = nn.Linear(2 * config.hidden_size, config.vocab_size, bias=True)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size), requires_grad=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        chunk = self.chunk_size_lm_head
        if chunk <= 0 or hidden_states.shape[self.seq_len_dim] <= chunk:
            return self.forward_chunk(hidden_states)
        return torch.cat(
            [self.forward_chunk(part) for part in hidden_states.split(chunk, dim=self.seq_len_dim)],
            dim=self.seq_len_dim,
        )

    def forward_chunk(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return linear(hidden_states, self.decoder.weight, self.decoder.bias)


def _check_no_look_ahead(config: ReformerConfig, model_name: str) -> None:
    for kind in sorted(set(config.attn_layers)):
        after = getattr(config, f"{kind}_num_chunks_after")
        if after != 0:
            raise ValueError(f"{model_name} is causal: config.{kind}_num_chunks_after must be 0, got {after}")


class ReformerModelWithLMHead(ReformerPreTrainedModel):
    """Causal language model (``config.is_decoder`` must be True); the loss shifts labels by one."""

    def __init__(self, config: ReformerConfig):
        super().__init__(config)
        if not config.is_decoder:
            raise ValueError("ReformerModelWithLMHead needs config.is_decoder=True (causal attention)")
        _check_no_look_ahead(config, "ReformerModelWithLMHead")
        self.reformer = ReformerModel(config)
        self.lm_head = ReformerOnlyLMHead(config)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head.decoder

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 20,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        num_return_sequences: int = 1,
        num_hashes: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Continue ``input_ids [B, N]`` by up to ``max_new_tokens`` tokens with the bucket cache; returns the token
        ids ``[B * num_return_sequences, N + new]`` (prompt included).

        The prompt is run in one forward (``ReformerDynamicCache`` filled), then one cached step per token.
        Greedy (``do_sample=False``) or sampling with ``temperature`` / ``top_k`` (0 or None: off) / ``top_p``
        (1 or None: off), drawing from ``generator`` if given. A row stops at ``eos_token_id`` (an id or a list;
        None: ``config.eos_token_id``; ``[]``: never) and is then filled with ``pad_token_id`` (None:
        ``config.pad_token_id``); generation ends when every row has stopped. Rows of different lengths are
        given left-padded with ``attention_mask`` (0 = padding): each row yields the tokens it would alone.
        The model must be in eval mode.
        """
        return _generate(
            self,
            input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            num_return_sequences=num_return_sequences,
            num_hashes=num_hashes,
            generator=generator,
        )

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
        # all positions: the head runs fused with the final LayerNorm (row blocks, no [B, L, 2 * hidden] tensor)
        all_logits = isinstance(logits_to_keep, int) and logits_to_keep == 0
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
            _row_head=self.lm_head if all_logits else None,
        )
        if all_logits:
            logits = outputs.last_hidden_state
        else:
            hidden_states = outputs.last_hidden_state
            hidden_states = (
                hidden_states[:, -logits_to_keep:]
                if isinstance(logits_to_keep, int)
                else hidden_states[:, logits_to_keep]
            )
            logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            if tuple(labels.shape) != tuple(logits.shape[:2]):
                raise ValueError(f"labels must have shape {tuple(logits.shape[:2])}; got {tuple(labels.shape)}")
            # tokens < n predict token n; the last position has no target
            shift_labels = F.pad(labels, (0, 1), value=-100)[:, 1:]
            loss = _cross_entropy(
                logits.float().reshape(-1, self.config.vocab_size), shift_labels.reshape(-1), num_items_in_batch
            )
        output = ReformerModelWithLMHeadOutput(
            loss=loss,
            logits=logits,
            past_buckets_states=outputs.past_buckets_states,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return self._head_output(output, return_dict)


def _cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None, ignore_index: int = -100
) -> torch.Tensor:
    """Mean cross entropy over non-ignored targets, or the sum divided by ``num_items_in_batch`` (transformers)."""
    labels = labels.to(logits.device)
    if num_items_in_batch is None:
        return F.cross_entropy(logits, labels, ignore_index=ignore_index)
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


class ReformerForMaskedLM(ReformerPreTrainedModel):
    """Bidirectional masked language model (``config.is_decoder`` must be False)."""

    def __init__(self, config: ReformerConfig):
        super().__init__(config)
        if config.is_decoder:
            raise ValueError("ReformerForMaskedLM needs config.is_decoder=False (bidirectional attention)")
        self.reformer = ReformerModel(config)
        self.lm_head = ReformerOnlyLMHead(config)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head.decoder

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
        outputs = self._reformer_outputs(
            kwargs,
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            num_hashes=num_hashes,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            _row_head=self.lm_head,
        )
        logits = outputs.last_hidden_state  # the head ran fused with the final LayerNorm
        loss = None
        if labels is not None:
            if tuple(labels.shape) != tuple(logits.shape[:2]):
                raise ValueError(f"labels must have shape {tuple(logits.shape[:2])}; got {tuple(labels.shape)}")
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
        self.num_labels = config.num_labels
        self.reformer = ReformerModel(config)
        self.classifier = ReformerClassificationHead(config)
        if config.is_decoder:
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
                loss = (
                    F.mse_loss(logits.squeeze(), labels.squeeze())
                    if self.num_labels == 1
                    else F.mse_loss(logits, labels)
                )
            elif self.config.problem_type == "single_label_classification":
                loss = F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
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
        if config.num_labels != 2:
            raise ValueError(
                "ReformerForQuestionAnswering needs config.num_labels == 2 (start and end logits); got "
                f"{config.num_labels}"
            )
        self.num_labels = config.num_labels
        self.reformer = ReformerModel(config)
        self.qa_outputs = nn.Linear(2 * config.hidden_size, config.num_labels)
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
