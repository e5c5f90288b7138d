"""Memory footprint of the fused Triton chunked attention against the reference path.

The fused op reads Q/K/V rows through the sorted index and keeps scores in registers, so beyond
its inputs and outputs it allocates only:

- forward: the fp32 logsumexp per visiting row ``[B, H, R*L]`` (saved for the backward), the
  per-round outputs ``[B, H, R*L, D]`` in the input dtype (only when R > 1, freed after the round
  combine) and the combined fp32 logsumexp ``[B, H, L]``;
- backward: ``dout . out`` per position ``[B, H, L]`` and per-slot fp32 gradient buffers
  ``[B, H, R*L, D]`` for dQ (shared with the key-role gradient in shared-QK mode) and dV, summed
  over rounds.

Nothing scales with the window ``c * (before + 1 + after)``; the reference materialises the score
matrix ``[B, H, R*L/c, c, window]`` and gathered copies of Q/K/V.

Measured on CPU (interpreter) from the profiler's allocation events: for the fused op the *sum of
all allocations* during the call (an upper bound of its peak), for the reference the peak of live
bytes; on CUDA from the allocator's peak.
"""

from __future__ import annotations

import gc

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import reformer_kernels
from reformer_kernels import chunked_attention
from reformer_kernels.ops.chunked_attention import chunked_attention_reference

B, H, L, D, R, CHUNK = 1, 2, 96, 32, 4, 16
FP32 = 4


def _measure(fn, device):
    """(upper bound of the extra bytes live at once during ``fn()``, result)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start, result
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    assert events, "the profiler recorded no allocation"
    return sum(max(e.nbytes(), 0) for e in events), result


def _peak_cpu(fn):
    """Peak of live bytes (allocations minus frees, in time order) during ``fn()``, CPU only."""
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    ):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def _inputs(device, layout):
    if layout == "heads-view":
        # the model's layout: [B, L, H, D] buffers viewed as [B, H, L, D]; read in place, not copied
        query = torch.randn(B, L, H, D, device=device).transpose(1, 2).requires_grad_()
        value = torch.randn(B, L, H, D, device=device).transpose(1, 2).requires_grad_()
    else:
        query = torch.randn(B, H, L, D, device=device, requires_grad=True)
        value = torch.randn(B, H, L, D, device=device, requires_grad=True)
    sorted_idx = (
        torch.stack([torch.randperm(L) + r * L for _ in range(B * H) for r in range(R)]).view(B, H, R * L).to(device)
    )
    return query, value, sorted_idx


@pytest.mark.parametrize(
    "before,after,layout",
    [(1, 0, "contiguous"), (2, 1, "contiguous"), (1, 0, "heads-view")],
    ids=["window32", "window64", "window32-heads-view"],
)
def test_fused_attention_allocates_only_per_row_buffers(before, after, layout, device):
    query, value, sorted_idx = _inputs(device, layout)

    def fused():
        with reformer_kernels.backend("triton"):
            return chunked_attention(query, None, value, sorted_idx, CHUNK, before, after, True)[0]

    fused()  # compile / warm up outside the measurement
    forward_bytes, out = _measure(fused, device)
    rows = B * H * R * L
    out_bytes, lse_bytes, rounds_bytes = out.numel() * FP32, rows * FP32, rows * D * FP32
    extra = forward_bytes - out_bytes - lse_bytes - rounds_bytes
    # what is left is the combined logsumexp [B, H, L] (+ allocator rounding): O(B*H*R*L), not O(window)
    assert 0 <= extra <= rows * FP32, f"forward allocated {forward_bytes} B: {extra} B beyond out/lse/per-round outputs"

    grad_out = torch.randn_like(out)  # same layout as out (and query)
    backward_bytes, grads = _measure(lambda: torch.autograd.grad(out, (query, value), grad_out), device)
    grad_bytes = sum(g.numel() * FP32 for g in grads)
    slot_buffers = 2 * rows * D * FP32  # fp32 per-slot dQ and dV
    extra = backward_bytes - grad_bytes - slot_buffers
    assert 0 <= extra <= rows * FP32, (
        f"backward allocated {backward_bytes} B: {extra} B beyond grads and per-slot buffers"
    )

    if device == "cpu":

        def reference():
            return chunked_attention_reference(query, None, value, sorted_idx, CHUNK, before, after, True)[0]

        reference_peak = _peak_cpu(reference)
        window = CHUNK * (before + 1 + after)
        # the reference holds at least the fp32 score matrix [B, H, R*L/c, c, window]
        assert reference_peak >= rows * window * FP32
        assert forward_bytes < reference_peak
        print(
            f"\n[footprint B{B}-H{H}-L{L}-D{D}-R{R}-c{CHUNK}-w{window}-{layout}] fused forward allocates "
            f"{forward_bytes} B "
            f"(out {out_bytes}, lse {lse_bytes}, per-round outputs {rounds_bytes}), backward {backward_bytes} B; "
            f"reference forward peak {reference_peak} B"
        )
