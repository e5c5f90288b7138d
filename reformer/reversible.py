"""The reversible layer stack: a pass over the layers, and the backward that recomputes instead of storing.

Each ``ReformerLayer`` computes ``Y1 = X1 + f(X2)`` (attention) and ``Y2 = X2 + g(Y1)`` (feed-forward). The forward
keeps only the two final streams, each layer's LSH buckets and the RNG states its dropout drew from; the backward
walks the layers in reverse, rebuilding each layer's inputs from its outputs:

    X2 = Y2 - g(Y1),   dY1' = dY1 + (dg/dY1)^T dY2,   X1 = Y1 - f(X2),   dX2 = dY2 + (df/dX2)^T dY1',   dX1 = dY1'

The parameters are explicit inputs of ``_ReversibleFunction`` whose gradients are *returned* (not accumulated by a
nested ``backward()`` as transformers does), so autograd, gradient hooks and ``DistributedDataParallel`` see ordinary
gradients. Dropout is replayed by restoring the recorded RNG states (not by reseeding the global RNG), and the
backward runs on the ops backend the forward used.

Where the modules are plain and the tensors large fp32 CPU ones, both halves of a layer's backward run in row
blocks without autograd around the layer (``ChunkReformerFeedForward.reverse_blocked`` and ``attention_reverse_blocked``
below, which differentiates the attention op alone through ``chunked_attention_with_grad``).
"""

from __future__ import annotations

import contextlib
from collections import namedtuple
from typing import Any

import torch
from torch import nn

import reformer_kernels
from reformer_kernels.cpu_linear import onednn_applicable, onednn_linear, weight_grad
from reformer_kernels.ops.chunked_attention import chunked_attention_with_grad
from reformer_kernels.scratch import scratch_scope

from .modules import projections
from .modules.fast_path import CPU_BLOCK_ROWS, eager_fast_paths, plain_modules, row_blocks

ReformerBackwardOutput = namedtuple(
    "ReformerBackwardOutput", ["attn_output", "hidden_states", "grad_attn_output", "grad_hidden_states"]
)


# ==================================================================================================
# RNG states for the dropout replay
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


class LayerRNG:
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


# ==================================================================================================
# one layer backward
# ==================================================================================================
def attention_reverse_fusable(attention: nn.Module, *tensors: torch.Tensor) -> bool:
    """Whether ``attention_reverse_blocked`` applies to ``attention`` (a ``ReformerAttention``): plain modules,
    bias-free projections, no dropout, autocast off, large fp32 CPU tensors of one shape (``Y1, X2, dY1, dY2``)."""
    self_attention = attention.self_attention
    layers = [*self_attention.projection_layers(), attention.output.dense]
    first = tensors[0]
    return (
        plain_modules(attention.layer_norm, *layers)
        and not (attention.training and (attention.output.dropout > 0 or self_attention.dropout > 0))
        and not torch.is_autocast_enabled(first.device.type)
        and onednn_applicable(first, layers[0].weight)
        and all(layer.bias is None for layer in layers)
        and all(p.dtype == torch.float32 for p in attention.parameters())
        and all(t.dtype == torch.float32 and t.is_contiguous() and t.shape == first.shape for t in tensors)
    )


@torch.no_grad()
def attention_reverse_blocked(
    attention: nn.Module,
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
    (recompute and backward while a block is in cache; LayerNorm statistics kept per row). The attention op runs
    once over the sequence together with its input gradients (for one hash round a single pass over the blocks;
    the output projection's input gradient is known before the op). Weight gradients are summed over blocks in
    block order (deterministic). ``in_place``: ``X1`` overwrites ``Y1`` and ``dX2`` overwrites ``dY2``.
    """
    self_attention, norm, output = attention.self_attention, attention.layer_norm, attention.output.dense
    layers = self_attention.projection_layers()
    batch_size, seq_len, hidden = hidden_states.shape
    width = self_attention.all_head_size
    num_rows = batch_size * seq_len
    x2 = hidden_states.reshape(num_rows, hidden)  # [N, hidden]
    y1, grad_y1, grad_y2 = (
        t.reshape(num_rows, hidden) for t in (next_attn_output, grad_attn_output, grad_hidden_states)
    )
    x1, grad_x2 = (y1, grad_y2) if in_place else (torch.empty_like(y1), torch.empty_like(grad_y2))  # [N, hidden] each

    # recompute: LayerNorm (statistics kept) and the projections
    projected, stats = projections.recompute(x2, norm, layers)  # [N, H * D] each
    heads = [self_attention._split_heads(p.view(batch_size, seq_len, width)) for p in projected]  # [B, H, L, D] each

    # the output projection's input gradient dY1 @ Wo (oneDNN computes a @ w^T: pass Wo^T)
    output_t = output.weight.t().contiguous()  # [width, hidden]
    grad_context = x2.new_empty(num_rows, width)  # [N, width]
    for block in row_blocks(num_rows, CPU_BLOCK_ROWS):
        grad_context[block] = onednn_linear(grad_y1[block], output_t, None)  # [n, width]

    # the attention op and its input gradients (one pass over the blocks where the op can)
    op_inputs, _ = self_attention.op_inputs(*heads, attention_mask=attention_mask, buckets=buckets)
    grad_context = self_attention._split_heads(grad_context.view(batch_size, seq_len, width))  # [B, H, L, D]
    context, op_grads = chunked_attention_with_grad(**op_inputs, grad_out=grad_context)  # [B, H, L, D] each
    grad_heads = [g for g in op_grads if g is not None]  # query(_key), [key], value
    grad_rows = [self_attention._merge_heads(g).reshape(num_rows, width) for g in grad_heads]  # [N, width] each
    context_rows = self_attention._merge_heads(context).reshape(num_rows, width)  # [N, width]
    del context, heads, grad_heads, grad_context

    # output projection: X1 = Y1 - context @ Wo^T and its weight gradient
    grad_output_weight = torch.zeros_like(output.weight)
    for block in row_blocks(num_rows, CPU_BLOCK_ROWS):
        torch.sub(y1[block], onednn_linear(context_rows[block], output.weight, None), out=x1[block])  # [n, hidden]
        grad_output_weight.add_(weight_grad(grad_y1[block], context_rows[block]))  # [hidden, width]
    del context_rows

    grads = projections.backward_blocked(x2, norm, layers, grad_rows, stats, grad_x2, grad_y2)
    grads[output.weight] = grad_output_weight
    return x1.view_as(next_attn_output), grad_x2.view_as(grad_hidden_states), grads


def layer_backward(
    layer: nn.Module,
    next_attn_output: torch.Tensor,
    hidden_states: torch.Tensor,
    grad_attn_output: torch.Tensor,
    grad_hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    buckets: torch.Tensor | None = None,
    rng: LayerRNG | None = None,
    own_buffers: bool = False,
) -> tuple[ReformerBackwardOutput, dict[nn.Parameter, torch.Tensor | None]]:
    """From ``Y1, Y2, dY1, dY2`` of ``layer`` (a ``ReformerLayer``) reconstruct ``X1, X2`` and compute ``dX1, dX2``
    and the layer's parameter gradients (returned, not accumulated). ``own_buffers``: the four input tensors are
    the caller's private buffers, which become the outputs (updated in place)."""
    attention, feed_forward = layer.attention, layer.feed_forward
    ff_params = [p for p in feed_forward.parameters() if p.requires_grad]
    attn_params = [p for p in attention.parameters() if p.requires_grad]
    param_grads: dict[nn.Parameter, torch.Tensor | None] = {}

    if feed_forward.reverse_fusable(next_attn_output, hidden_states, grad_attn_output, grad_hidden_states):
        # the same computation in blocks of rows, without autograd; its dropout masks are drawn again from the
        # RNG state the forward's g drew them from
        with _replay(rng.feed_forward if rng is not None else None):
            hidden_states, grad_attn_output, ff_grads = feed_forward.reverse_blocked(
                next_attn_output, hidden_states, grad_attn_output, grad_hidden_states, in_place=own_buffers
            )
        param_grads.update((p, ff_grads[p]) for p in ff_params)
        next_attn_output = next_attn_output.detach()
    else:
        with torch.enable_grad():
            next_attn_output = next_attn_output.detach().requires_grad_(True)
            with _replay(rng.feed_forward if rng is not None else None):
                ff_output = feed_forward(next_attn_output)
            grads = torch.autograd.grad(
                ff_output, [next_attn_output, *ff_params], grad_hidden_states, allow_unused=True
            )
        param_grads.update(zip(ff_params, grads[1:]))
        grad_attn_output = grad_attn_output + grads[0] if grads[0] is not None else grad_attn_output
        with torch.no_grad():
            # X2 = Y2 - g(Y1)
            hidden_states = hidden_states - ff_output.detach()
        del ff_output, grads

    if attention_reverse_fusable(attention, next_attn_output, hidden_states, grad_attn_output, grad_hidden_states):
        # the same computation in blocks of rows, autograd on the attention op only (no dropout to replay)
        prev_attn_output, grad_hidden_states, attn_grads = attention_reverse_blocked(
            attention,
            next_attn_output.detach(),
            hidden_states,
            grad_attn_output,
            grad_hidden_states,
            attention_mask,
            buckets,
            in_place=own_buffers,
        )
        param_grads.update((p, attn_grads[p]) for p in attn_params)
        output = ReformerBackwardOutput(prev_attn_output, hidden_states, grad_attn_output, grad_hidden_states)
        return output, param_grads

    with torch.enable_grad():
        hidden_states.requires_grad_(True)
        with _replay(rng.attention if rng is not None else None):
            attn_output = attention(hidden_states, attention_mask=attention_mask, buckets=buckets).hidden_states
        grads = torch.autograd.grad(attn_output, [hidden_states, *attn_params], grad_attn_output, allow_unused=True)
    param_grads.update(zip(attn_params, grads[1:]))
    if grads[0] is not None:
        grad_hidden_states = grad_hidden_states.add_(grads[0]) if own_buffers else grad_hidden_states + grads[0]
    with torch.no_grad():
        # X1 = Y1 - f(X2)
        next_attn_output = next_attn_output.detach()
        attn_output = attn_output.detach()
        prev_attn_output = next_attn_output.sub_(attn_output) if own_buffers else next_attn_output - attn_output
    output = ReformerBackwardOutput(prev_attn_output, hidden_states.detach(), grad_attn_output, grad_hidden_states)
    return output, param_grads


# ==================================================================================================
# the layer stack
# ==================================================================================================
class LayerStack:
    """One pass through the layers: the inputs every layer needs and what the forward leaves for the backward."""

    def __init__(
        self,
        layers,
        attention_mask: torch.Tensor | None,
        num_hashes: int | None,
        output_hidden_states: bool,
        output_attentions: bool,
        past_buckets_states: Any = None,
        use_cache: bool = False,
        orig_sequence_length: int | None = None,
        owns_input: bool = False,
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
        self.backend = reformer_kernels.get_backend()
        self.all_hidden_states: list[torch.Tensor] = []
        self.all_attentions: list[torch.Tensor | None] = []
        self.buckets: list[torch.Tensor | None] = []
        self.rng: list[LayerRNG | None] = []

    def forward(
        self, attn_output: torch.Tensor, hidden_states: torch.Tensor, record_rng: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Without autograd and with no stream kept for the caller, large CPU streams are updated in place by
        # the blocked paths: no new [B, L, hidden] tensors per layer, and no freshly mapped memory to
        # page-fault in. They start as private copies (at the first layer both are the embeddings tensor).
        in_place = (
            eager_fast_paths()
            and not torch.is_grad_enabled()
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

    def _forward_layers(self, attn_output, hidden_states, record_rng: bool, in_place: bool):
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


class ReversibleFunction(torch.autograd.Function):
    """The layer stack with activations recomputed in backward instead of stored (see the module docstring)."""

    @staticmethod
    def forward(ctx, attn_output: torch.Tensor, hidden_states: torch.Tensor, stack: LayerStack, *params: nn.Parameter):
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
        stack: LayerStack = ctx.stack
        device_type, autocast_enabled, autocast_dtype = ctx.autocast
        output = ReformerBackwardOutput(attn_output, hidden_states, grad_attn_output, grad_hidden_states)
        param_grads: dict[nn.Parameter, torch.Tensor | None] = {}
        # recompute with the backend (hence the kernels and their dropout streams) the forward ran on
        with (
            torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_enabled),
            reformer_kernels.backend(stack.backend),
        ):
            for layer, buckets, rng in zip(reversed(stack.layers), reversed(stack.buckets), reversed(stack.rng)):
                output, grads = layer_backward(
                    layer,
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


__all__ = ["LayerRNG", "LayerStack", "ReformerBackwardOutput", "ReversibleFunction", "layer_backward"]
