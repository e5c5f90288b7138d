"""Swap the hot paths of transformers' Reformer for this package's ops, Liger-Kernel style.

    import reformer_kernels
    reformer_kernels.patch_transformers()          # every transformers Reformer model
    reformer_kernels.patch_transformers(model)     # or one model instance

LSH attention, local attention and the axial position embeddings then run through
``lsh_hash`` / ``bucket_sort`` / ``chunked_attention`` / ``axial_position_embedding`` (Triton
kernels for CUDA tensors, the PyTorch path otherwise). Outputs are unchanged: hashing draws its
rotations exactly as transformers does (including its reseeding of the global RNG when
``config.hash_seed`` is set), so buckets are identical. Calls the ops cannot serve fall back to
transformers' own code: decoding steps with a cache, ``output_attentions=True`` and axial
dropout in training. transformers is imported only when this function is called.
"""

from __future__ import annotations

import math
import types

import torch

from .ops import axial_position_embedding, bucket_sort, chunked_attention, lsh_hash
from .ops.lsh_hash import bucket_factors, num_buckets_product

_ORIGINAL_FORWARDS: dict[type, object] = {}


def _split_heads(x: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    batch_size, seq_len, _ = x.shape
    return x.view(batch_size, seq_len, num_heads, head_dim).transpose(1, 2)  # [B, H, L, D]


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    batch_size, num_heads, seq_len, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch_size, seq_len, num_heads * head_dim)  # [B, L, H*D]


def _lsh_forward(
    self,
    hidden_states,
    attention_mask=None,
    num_hashes=None,
    buckets=None,
    past_buckets_states=None,
    use_cache=False,
    output_attentions=False,
    **kwargs,
):
    from transformers.models.reformer.modeling_reformer import LSHSelfAttentionOutput

    exists_cache = past_buckets_states is not None and len(past_buckets_states) > self.layer_idx
    if exists_cache or output_attentions:
        return _ORIGINAL_FORWARDS[type(self)](
            self,
            hidden_states,
            attention_mask=attention_mask,
            num_hashes=num_hashes,
            buckets=buckets,
            past_buckets_states=past_buckets_states,
            use_cache=use_cache,
            output_attentions=output_attentions,
            **kwargs,
        )
    batch_size, seq_len, _ = hidden_states.shape
    num_hashes = num_hashes if num_hashes is not None else self.num_hashes
    query_key = _split_heads(self.query_key(hidden_states), self.num_attention_heads, self.attention_head_size)
    value = _split_heads(self.value(hidden_states), self.num_attention_heads, self.attention_head_size)
    dropout_p = self.dropout if self.training else 0.0

    if seq_len <= self.chunk_length:
        out, _ = chunked_attention(
            query_key, None, value, None, seq_len, 0, 0, self.is_decoder, attention_mask, dropout_p
        )
        return LSHSelfAttentionOutput(hidden_states=_merge_heads(out), attention_probs=(), buckets=None)

    if self.num_buckets is None:
        self._set_num_buckets(seq_len)
    if buckets is None:
        if self.hash_seed is not None:
            torch.manual_seed(self.hash_seed)  # transformers' own behaviour, kept so that buckets are identical
        rotations = torch.randn(
            (
                self.num_attention_heads,
                self.attention_head_size,
                num_hashes,
                sum(bucket_factors(self.num_buckets)) // 2,
            ),
            device=query_key.device,
            dtype=query_key.dtype,
        )
        buckets = lsh_hash(query_key.detach(), rotations, self.num_buckets, attention_mask)
    flat_buckets = buckets.reshape(batch_size, self.num_attention_heads, num_hashes * seq_len)
    num_bins = num_hashes * (num_buckets_product(self.num_buckets) + 1)
    sorted_idx, _ = bucket_sort(flat_buckets, num_bins)
    out, _ = chunked_attention(
        query_key,
        None,
        value,
        sorted_idx,
        self.chunk_length,
        self.num_chunks_before,
        self.num_chunks_after,
        self.is_decoder,
        attention_mask,
        dropout_p,
    )
    buckets = flat_buckets.long().view(batch_size, self.num_attention_heads, num_hashes, seq_len)
    return LSHSelfAttentionOutput(hidden_states=_merge_heads(out), attention_probs=(), buckets=buckets)


def _local_forward(
    self,
    hidden_states,
    attention_mask=None,
    past_buckets_states=None,
    use_cache=False,
    output_attentions=False,
    **kwargs,
):
    from transformers.models.reformer.modeling_reformer import LocalSelfAttentionOutput

    exists_cache = past_buckets_states is not None and len(past_buckets_states) > self.layer_idx
    if exists_cache or output_attentions:
        return _ORIGINAL_FORWARDS[type(self)](
            self,
            hidden_states,
            attention_mask=attention_mask,
            past_buckets_states=past_buckets_states,
            use_cache=use_cache,
            output_attentions=output_attentions,
            **kwargs,
        )
    seq_len = hidden_states.shape[1]
    heads = (self.num_attention_heads, self.attention_head_size)
    query = _split_heads(self.query(hidden_states), *heads)
    key = _split_heads(self.key(hidden_states), *heads)
    value = _split_heads(self.value(hidden_states), *heads)
    dropout_p = self.dropout if self.training else 0.0
    if seq_len <= self.chunk_length:
        window = (seq_len, 0, 0)
    else:
        window = (self.chunk_length, self.num_chunks_before, self.num_chunks_after)
    out, _ = chunked_attention(query, key, value, None, *window, self.is_decoder, attention_mask, dropout_p)
    return LocalSelfAttentionOutput(hidden_states=_merge_heads(out), attention_probs=())


def _axial_forward(self, position_ids):
    batch_size, seq_len = position_ids.shape
    grid_size = math.prod(self.axial_pos_shape)
    if self.training:
        if self.dropout > 0:
            return _ORIGINAL_FORWARDS[type(self)](self, position_ids)
        if grid_size != seq_len:
            raise ValueError(
                f"If training, make sure that config.axial_pos_shape factors: {self.axial_pos_shape} "
                f"multiply to sequence length {seq_len}"
            )
        # transformers ignores position_ids in training: the whole grid in order
        position_ids = torch.arange(seq_len, device=position_ids.device).expand(batch_size, seq_len)
    elif grid_size < seq_len:
        raise ValueError(
            f"Make sure that config.axial_pos_shape factors: {self.axial_pos_shape} multiply at least "
            f"to the sequence length {seq_len}"
        )
    tables = [weight.reshape(weight.shape[axis], weight.shape[-1]) for axis, weight in enumerate(self.weights)]
    return axial_position_embedding(position_ids, tables)


def _replacements():
    from transformers.models.reformer import modeling_reformer as hf

    return {
        hf.LSHSelfAttention: _lsh_forward,
        hf.LocalSelfAttention: _local_forward,
        hf.AxialPositionEmbeddings: _axial_forward,
    }


def patch_transformers(model: torch.nn.Module | None = None) -> None:
    """Route transformers' Reformer hot paths through this package's ops.

    With ``model=None`` the transformers classes are patched (every instance, present and
    future); with a model only that instance's modules are.
    """
    replacements = _replacements()
    for cls in replacements:
        _ORIGINAL_FORWARDS.setdefault(cls, cls.forward)
    if model is None:
        for cls, forward in replacements.items():
            cls.forward = forward
        return
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or None; got {type(model).__name__}")
    patched = 0
    for module in model.modules():
        forward = replacements.get(type(module))
        if forward is not None:
            module.forward = types.MethodType(forward, module)
            patched += 1
    if patched == 0:
        raise ValueError("model contains no transformers Reformer attention or axial-embedding module to patch")


def unpatch_transformers(model: torch.nn.Module | None = None) -> None:
    """Undo ``patch_transformers`` (for the classes, or for one model instance)."""
    if model is None:
        for cls, forward in _ORIGINAL_FORWARDS.items():
            cls.forward = forward
        return
    for module in model.modules():
        if type(module) in _ORIGINAL_FORWARDS and "forward" in module.__dict__:
            del module.forward
