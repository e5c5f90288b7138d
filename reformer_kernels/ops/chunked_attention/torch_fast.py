"""Fast PyTorch (CPU) implementation of the chunked attention op.

Same semantics as ``reference.py`` (the specification), organised for speed and memory:

* Work proceeds in blocks of chunks, each block covering every (batch, head) pair, sized so its
  score matrix (~1 MB) stays in cache while masking, softmax and the value product touch it.
* Rows are read through the visiting order with one ``index_select`` per block and tensor; the
  whole sequence is never gathered, repeated or ``cat``-ed into look-back copies: only the
  block's own query rows and key/value windows are read.
* Masks use the reference's replacement values (``torch.where``), so fully masked rows behave
  exactly as in the reference. Local attention reuses one precomputed causal pattern.
* The softmax normalisation is folded into the ``[c, D]`` output instead of the ``[c, w]``
  probabilities (``o = (e @ v) * exp(max - lse)`` with ``e = exp(s - max)``).
* A custom ``autograd.Function`` saves only the inputs, the output and the per-row logsumexp;
  backward recomputes the probabilities block by block. Gradients of rows that several hash
  rounds visit are summed with a gather over the inverse order (deterministic, no atomics).
* Everything is computed in fp32 (fp64 stays fp64) and cast back at the end.

Dropout is drawn per block from a generator seeded once per call; backward replays it.
"""

from __future__ import annotations

import concurrent.futures
import math
import os
import threading

import torch

from .reference import mask_values, normalize_keys

# Query rows per block (all batch x head pairs together): 4096 rows x a 128-key window of fp32
# scores is 2 MB. Measured with intra-op threads (2 cores, L=16384, 2 heads x 64, chunk 64, fwd+bwd
# ms): local 41.9 / 41.0 / 45.9 and LSH 60.9 / 58.5 / 68.2 at 2048 / 4096 / 8192 rows.
BLOCK_ROWS = 4096


def _exp(x: torch.Tensor) -> torch.Tensor:
    """In-place ``exp`` of non-positive ``x``.

    Masked scores (-1e9, -1e5) make ``exp`` take its slow out-of-range path (~8x slower on this
    CPU); clamping at -87 keeps results normal floats (exp(-87) ~ 1.6e-38 instead of 0, far below
    any tolerance).
    """
    return x.clamp_(min=-87.0).exp_()


def _add_rows(buf: torch.Tensor, start: int, x: torch.Tensor) -> None:
    """``buf[:, (start + t) % N] += x[:, t]`` for ``buf [BH, N, D]``, as contiguous slice adds."""
    n = buf.shape[1]
    t = 0
    while t < x.shape[1]:
        row = (start + t) % n
        take = min(n - row, x.shape[1] - t)
        buf[:, row : row + take] += x[:, t : t + take]
        t += take


# How blocks run. None (default): all blocks on the calling thread, each op using torch's intra-op
# threads. n >= 1: n worker threads over contiguous groups of blocks, each running single-threaded
# ops (1: the calling thread alone, single-threaded).
WORKERS: int | None = None

_POOLS: dict[tuple[int, int], concurrent.futures.ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _pool(workers: int) -> concurrent.futures.ThreadPoolExecutor:
    # keyed by process id too: a forked child (e.g. a DataLoader worker) has no pool threads
    key = (os.getpid(), workers)
    with _POOLS_LOCK:
        if key not in _POOLS:
            # each worker runs its ops on one intra-op thread (the setting is per thread)
            _POOLS[key] = concurrent.futures.ThreadPoolExecutor(
                workers, thread_name_prefix="chunked_attention", initializer=torch.set_num_threads, initargs=(1,))
        return _POOLS[key]


def _run_blocks(blocks: list[tuple[int, int]], work) -> list:
    """``[work(group) for group in groups]`` over contiguous groups of ``blocks``.

    By default (``WORKERS is None``) there is one group, run on the calling thread with torch's
    intra-op threads. Measured on the 2-core machine, L=16384, 2 heads x 64, chunk 64, forward (ms,
    best of 7): quiet, local 11.5 / LSH 17.6-20 intra-op vs 16.5 / 24.9 on two single-threaded
    workers; with two busy-looping processes beside it, 23.4 / 34.1 vs 25.6 / 45.4. (An earlier
    measurement on a heavily oversubscribed machine had found intra-op threads far slower, hence
    the worker mode, kept as ``WORKERS = n``.) Workers that each run single-threaded ops over their
    own blocks never wait on each other's OpenMP barriers; the GIL is released inside ops.
    """
    if WORKERS is None:
        return [work(blocks)]
    workers = min(WORKERS, len(blocks))
    size = -(-len(blocks) // max(1, workers))
    groups = [blocks[i : i + size] for i in range(0, len(blocks), size)]
    if len(groups) == 1:
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return [work(groups[0])]
        finally:
            torch.set_num_threads(previous)

    def run(group):
        # grad mode is thread-local: the workers compute plain tensors, as the calling Function does
        with torch.no_grad():
            return work(group)

    return list(_pool(len(groups)).map(run, groups))


class _Problem:
    """Shapes, the visiting order and the masking rules of one call, shared by forward and backward."""

    def __init__(self, query, sorted_idx, attention_mask, chunk_length, before, after, causal, shared_qk, dropout_p, seed):
        batch_size, num_heads, seq_len, head_dim = query.shape
        device = query.device
        self.bh = batch_size * num_heads
        self.seq_len = seq_len
        self.head_dim = head_dim
        self.c = chunk_length
        self.before = before
        self.after = after
        self.span = before + 1 + after
        self.window = chunk_length * self.span
        self.causal = causal
        self.shared_qk = shared_qk
        self.dropout_p = dropout_p
        self.seed = seed
        self.device = device
        self.mask_value, self.self_mask_value = mask_values(query.dtype)
        # fp32 compute for fp32 and lower precisions; fp64 stays fp64 (gradient checks)
        self.compute_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
        bh_index = torch.arange(self.bh, device=device).unsqueeze(1)  # [BH, 1]
        if sorted_idx is None:
            self.num_rows = seq_len
            self.sorted_idx = self.positions = self.src = self.dest = None  # identity order
        else:
            self.num_rows = sorted_idx.shape[-1]
            self.sorted_idx = sorted_idx.reshape(self.bh, self.num_rows).to(torch.int64)
            self.positions = self.sorted_idx % seq_len  # [BH, R*L]
            # flat rows: where visit t reads its token, and where its output row goes
            self.src = (self.positions + bh_index * seq_len).view(-1)  # [BH*R*L]
            self.dest = (self.sorted_idx + bh_index * self.num_rows).view(-1)  # [BH*R*L]
        self.num_rounds = self.num_rows // seq_len
        self.num_chunks = self.num_rows // chunk_length
        self.key_kept = None
        if attention_mask is not None:
            kept = attention_mask.to(torch.bool)[:, None, :].expand(-1, num_heads, -1)  # [B, H, L]
            self.key_kept = kept.reshape(self.bh, seq_len)
        per_block = max(1, min(self.num_chunks, BLOCK_ROWS // (chunk_length * self.bh)))
        self.blocks = [(i0, min(i0 + per_block, self.num_chunks)) for i0 in range(0, self.num_chunks, per_block)]
        self.local_future = None
        if causal and sorted_idx is None:
            # identity order, block away from the wrap: key j of a chunk's window is `j - before*c`
            # rows after the chunk start, query a is `a` rows after it
            o_k = torch.arange(self.window, device=device) - before * chunk_length
            self.local_future = o_k[None, :] > torch.arange(chunk_length, device=device)[:, None]  # [c, w]

    def generator(self, i0: int):
        """The dropout generator of the block starting at chunk ``i0`` (seeded per block: backward replays it)."""
        if self.dropout_p == 0.0:
            return None
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.seed + i0)
        return gen

    def dropout_mask(self, gen, shape):
        keep = 1.0 - self.dropout_p
        return torch.empty(shape, dtype=self.compute_dtype, device=self.device).bernoulli_(keep, generator=gen).div_(keep)

    def windows(self, i0: int, i1: int) -> torch.Tensor:
        """``[nb * w]`` visiting rows of each chunk's key window, wrapped circularly."""
        nb, c = i1 - i0, self.c
        run = torch.arange((i0 - self.before) * c, (i1 + self.after) * c, device=self.device) % self.num_rows
        return run.as_strided((nb, self.window), (c, 1)).reshape(-1)

    def wraps(self, i0: int, i1: int) -> bool:
        return i0 - self.before < 0 or i1 + self.after > self.num_chunks

    def rows(self, x: torch.Tensor, visits: torch.Tensor | slice) -> torch.Tensor:
        """Rows of ``x`` (flat ``[BH*L, D]``) for visiting rows ``visits`` of every (batch, head): ``[BH, n, D]``."""
        d = self.head_dim
        if self.src is None:
            x = x.view(self.bh, self.seq_len, d)
            out = x[:, visits] if isinstance(visits, slice) else x.index_select(1, visits)
        else:
            if isinstance(visits, slice):
                flat = self.src.view(self.bh, self.num_rows)[:, visits]
            else:
                flat = self.src.view(self.bh, self.num_rows).index_select(1, visits)
            out = x.index_select(0, flat.reshape(-1)).view(self.bh, -1, d)
        return out.to(self.compute_dtype)

    def out_rows(self, i0: int, i1: int) -> torch.Tensor | slice:
        """Where the block's output rows live in the flat ``[BH*R*L]`` output (a slice per head for identity order)."""
        c = self.c
        if self.dest is None:
            return slice(i0 * c, i1 * c)
        return self.dest.view(self.bh, self.num_rows)[:, i0 * c : i1 * c].reshape(-1)

    def load(self, rows_flat: torch.Tensor, index, width: int) -> torch.Tensor:
        """Per-row values (``[BH*R*L, width]``) of the block's queries: ``[BH*nb*c, width]``."""
        if isinstance(index, slice):
            return rows_flat.view(self.bh, self.num_rows, width)[:, index].reshape(-1, width)
        return rows_flat.view(-1, width).index_select(0, index)

    def store(self, rows_flat: torch.Tensor, index, values: torch.Tensor, width: int) -> None:
        if isinstance(index, slice):
            rows_flat.view(self.bh, self.num_rows, width)[:, index] = values.view(self.bh, -1, width)
        else:
            rows_flat.view(-1, width).index_copy_(0, index, values.view(-1, width))

    def inputs(self, q, k, v, i0: int, i1: int):
        """``q_blk [BH*nb, c, D]``, ``k_win``/``v_win [BH*nb, w, D]`` and the window's visiting rows."""
        nb, c, d = i1 - i0, self.c, self.head_dim
        win = self.windows(i0, i1)
        q_blk = self.rows(q, slice(i0 * c, i1 * c)).reshape(self.bh * nb, c, d)
        k_win = self.rows(k, win).view(self.bh * nb, self.window, d)
        v_win = self.rows(v, win).view(self.bh * nb, self.window, d)
        return q_blk, k_win, v_win, win

    def masks(self, i0: int, i1: int, win: torch.Tensor):
        """``(masked, self_masked)`` bool masks broadcastable to the block's ``[BH, nb, c, w]`` scores (or None)."""
        nb, c, w = i1 - i0, self.c, self.window
        if self.positions is None:
            q_pos = torch.arange(i0 * c, i1 * c, device=self.device).view(1, nb, c, 1)
            k_pos = win.view(1, nb, 1, w)
        else:
            q_pos = self.positions[:, i0 * c : i1 * c].reshape(self.bh, nb, c, 1)
            k_pos = self.positions.index_select(1, win).view(self.bh, nb, 1, w)
        masked = None
        if self.key_kept is not None:
            masked = ~self.key_kept.gather(1, k_pos.reshape(k_pos.shape[0], -1).expand(self.bh, -1)).view(self.bh, nb, 1, w)
        if self.causal:
            if self.local_future is not None and not self.wraps(i0, i1):
                future = self.local_future.view(1, 1, c, w)
            else:
                future = k_pos > q_pos  # [BH or 1, nb, c, w]
            masked = future if masked is None else masked | future
        self_masked = (k_pos == q_pos) if self.shared_qk else None
        return masked, self_masked

    def scores(self, q_blk, k_win, masks, nb: int) -> torch.Tensor:
        s = torch.bmm(q_blk, k_win.transpose(1, 2)).view(self.bh, nb, self.c, self.window)  # [BH, nb, c, w]
        masked, self_masked = masks
        if masked is not None:
            s = torch.where(masked, self.mask_value, s)
        if self_masked is not None:
            s = torch.where(self_masked, self.self_mask_value, s)
        return s


class _ChunkedAttention(torch.autograd.Function):
    """Core chunked attention on prepared keys: returns ``(out [BH, R*L, D], lse [BH, R*L])``.

    Rows of ``out``/``lse`` are in original order, round-major (row ``r * L + p``).
    """

    @staticmethod
    def forward(ctx, query, keys, value, problem: _Problem):
        pb = problem
        d = pb.head_dim
        q, k, v = (x.reshape(-1, d) for x in (query, keys, value))
        out = torch.empty(pb.bh * pb.num_rows, d, dtype=pb.compute_dtype, device=query.device)
        lse = torch.empty(pb.bh * pb.num_rows, 1, dtype=pb.compute_dtype, device=query.device)

        def work(blocks):
            # disjoint output rows per block: workers never write the same row
            for i0, i1 in blocks:
                _forward_block(pb, q, k, v, out, lse, i0, i1)

        _run_blocks(pb.blocks, work)
        out = out.view(pb.bh, pb.num_rows, d)
        lse = lse.view(pb.bh, pb.num_rows)
        ctx.problem = pb
        ctx.save_for_backward(query, keys, value, out, lse)
        return out.to(query.dtype), lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        query, keys, value, out, lse = ctx.saved_tensors
        pb = ctx.problem
        bh, d, n_rows = pb.bh, pb.head_dim, pb.num_rows
        q, k, v = (x.reshape(-1, d) for x in (query, keys, value))
        grad_out = torch.zeros_like(out) if grad_out is None else grad_out.to(pb.compute_dtype)  # [BH, R*L, D]
        grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse.to(pb.compute_dtype)  # [BH, R*L]
        grad_out = grad_out.reshape(-1, d)
        lse_flat = lse.reshape(-1, 1)
        # softmax backward: ds = p * (dp - delta) with delta_i = sum_d dO_id O_id - dlse_i
        # (a batched dot product: no [BH*R*L, D] temporary)
        delta = torch.bmm(grad_out.unsqueeze(1), out.reshape(-1, d).unsqueeze(2)).view(-1, 1) - grad_lse.reshape(-1, 1)  # [BH*R*L, 1]

        # gradients in visiting order, mapped back to original rows at the end. dQ rows are disjoint
        # per block; dK/dV windows overlap, so each worker sums its blocks' windows into its own run
        # of rows and the runs are added in block order (deterministic)
        dq_vis = torch.empty(bh, n_rows, d, dtype=pb.compute_dtype, device=query.device)
        dk_vis = torch.zeros(bh, n_rows, d, dtype=pb.compute_dtype, device=query.device)
        dv_vis = torch.zeros(bh, n_rows, d, dtype=pb.compute_dtype, device=query.device)

        def work(blocks):
            first, last = blocks[0][0], blocks[-1][1]
            run_rows = (last - first + pb.span - 1) * pb.c
            dk_run = torch.zeros(bh, run_rows, d, dtype=pb.compute_dtype, device=query.device)
            dv_run = torch.zeros(bh, run_rows, d, dtype=pb.compute_dtype, device=query.device)
            for i0, i1 in blocks:
                _backward_block(pb, q, k, v, grad_out, lse_flat, delta, dq_vis, dk_run, dv_run, first, i0, i1)
            return first, dk_run, dv_run

        for first, dk_run, dv_run in _run_blocks(pb.blocks, work):
            _add_rows(dk_vis, (first - pb.before) * pb.c, dk_run)
            _add_rows(dv_vis, (first - pb.before) * pb.c, dv_run)
            del dk_run, dv_run
        undo = None if pb.sorted_idx is None else _undo_rows(pb)
        grads = (_to_original(pb, g, x, undo) for g, x in ((dq_vis, query), (dk_vis, keys), (dv_vis, value)))
        return (*grads, None)


def _forward_block(pb: _Problem, q, k, v, out, lse, i0: int, i1: int) -> None:
    """Attention of the chunks ``[i0, i1)`` of every (batch, head): writes their rows of ``out``/``lse``."""
    nb, d = i1 - i0, pb.head_dim
    q_blk, k_win, v_win, win = pb.inputs(q, k, v, i0, i1)
    s = pb.scores(q_blk, k_win, pb.masks(i0, i1, win), nb)  # [BH, nb, c, w]
    b_max = s.amax(dim=-1, keepdim=True)  # [BH, nb, c, 1]
    e = _exp(s.sub_(b_max))  # [BH, nb, c, w]
    b_lse = b_max + e.sum(dim=-1, keepdim=True).log_()  # [BH, nb, c, 1]
    gen = pb.generator(i0)
    if gen is not None:
        e = e * pb.dropout_mask(gen, e.shape)
    # normalise by exp(max - lse) with the rounded lse, not by 1/sum: a fully masked row
    # (all -1e9) then has lse == -1e9 and probabilities 1, exactly as the reference
    o = torch.bmm(e.view(-1, pb.c, pb.window), v_win)  # [BH*nb, c, D]
    o = o.mul_(torch.exp(b_max - b_lse).view(-1, pb.c, 1))  # [BH*nb, c, D]
    index = pb.out_rows(i0, i1)
    pb.store(out, index, o, d)
    pb.store(lse, index, b_lse, 1)


def _backward_block(pb: _Problem, q, k, v, grad_out, lse_flat, delta, dq_vis, dk_run, dv_run, first: int, i0: int, i1: int) -> None:
    """Gradients of the chunks ``[i0, i1)``: their dQ rows, and their windows' dK/dV added into the
    worker's runs, which start at visiting chunk ``first - before``."""
    bh, d, c, w, nb = pb.bh, pb.head_dim, pb.c, pb.window, i1 - i0
    q_blk, k_win, v_win, win = pb.inputs(q, k, v, i0, i1)
    masks = pb.masks(i0, i1, win)
    s = pb.scores(q_blk, k_win, masks, nb)  # [BH, nb, c, w]
    index = pb.out_rows(i0, i1)
    p = _exp(s.sub_(pb.load(lse_flat, index, 1).view(bh, nb, c, 1)))  # [BH, nb, c, w]
    b_do = pb.load(grad_out, index, d).view(bh * nb, c, d)  # [BH*nb, c, D]
    dp = torch.bmm(b_do, v_win.transpose(1, 2)).view(bh, nb, c, w)  # [BH, nb, c, w]
    p_used = p
    gen = pb.generator(i0)
    if gen is not None:
        drop = pb.dropout_mask(gen, p.shape)
        p_used = p * drop
        dp.mul_(drop)
    dv_win = torch.bmm(p_used.view(-1, c, w).transpose(1, 2), b_do)  # [BH*nb, w, D]
    ds = dp.sub_(pb.load(delta, index, 1).view(bh, nb, c, 1)).mul_(p)  # [BH, nb, c, w]
    # replaced scores are constants: no gradient flows through them
    for mask in masks:
        if mask is not None:
            ds = ds.masked_fill_(mask, 0.0)
    ds = ds.view(-1, c, w)
    dq_vis[:, i0 * c : i1 * c] = torch.bmm(ds, k_win).view(bh, nb * c, d)
    dk_win = torch.bmm(ds.transpose(1, 2), q_blk)  # [BH*nb, w, D]
    # window slot o of chunk j holds visiting chunk j - before + o: run chunk j - first + o
    for run, g_win in ((dk_run, dk_win), (dv_run, dv_win)):
        g_win = g_win.view(bh, nb, pb.span, c, d)
        for o in range(pb.span):
            start = (i0 - first + o) * c
            run[:, start : start + nb * c] += g_win[:, :, o].reshape(bh, nb * c, d)


def _undo_rows(pb: _Problem) -> torch.Tensor:
    """Flat rows ``bh * R*L + undo[bh, s]``: where original row ``s`` sits in visiting order."""
    undo = torch.empty_like(pb.sorted_idx)
    undo.scatter_(1, pb.sorted_idx, torch.arange(pb.num_rows, device=undo.device).expand_as(undo))
    return (undo + torch.arange(pb.bh, device=undo.device).unsqueeze(1) * pb.num_rows).view(-1)


def _to_original(pb: _Problem, grad_vis: torch.Tensor, like: torch.Tensor, undo: torch.Tensor | None) -> torch.Tensor:
    """Sum visiting-order rows back onto original positions: ``[BH, R*L, D] -> like``."""
    if undo is not None:
        grad_vis = grad_vis.view(-1, pb.head_dim).index_select(0, undo)  # [BH*R*L, D]
        if pb.num_rounds > 1:
            grad_vis = grad_vis.view(pb.bh, pb.num_rounds, pb.seq_len, pb.head_dim).sum(1)
    return grad_vis.view(like.shape).to(like.dtype)


def chunked_attention_fast(
    query: torch.Tensor,
    key: torch.Tensor | None,
    value: torch.Tensor,
    sorted_idx: torch.Tensor | None,
    chunk_length: int,
    num_chunks_before: int,
    num_chunks_after: int,
    causal: bool,
    attention_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Same contract as ``chunked_attention_reference`` (without ``return_probs``); returns ``out``."""
    batch_size, num_heads, seq_len, head_dim = query.shape
    shared_qk = key is None
    keys = normalize_keys(query) if shared_qk else key / math.sqrt(head_dim)
    seed = int(torch.randint(0, 2**62, (1,)).item()) if dropout_p > 0.0 else 0
    problem = _Problem(query, sorted_idx, attention_mask, chunk_length, num_chunks_before, num_chunks_after, causal, shared_qk, float(dropout_p), seed)
    out, lse = _ChunkedAttention.apply(query.contiguous(), keys.contiguous(), value.contiguous(), problem)
    if problem.num_rounds == 1:
        return out.view(batch_size, num_heads, seq_len, head_dim)
    # combine hash rounds with weights softmax_r(lse_r), as the reference does
    out = out.view(batch_size, num_heads, problem.num_rounds, seq_len, head_dim)
    lse = lse.view(batch_size, num_heads, problem.num_rounds, seq_len, 1)
    weights = torch.exp(lse - torch.logsumexp(lse, dim=-3, keepdim=True)).to(out.dtype)  # [B, H, R, L, 1]
    return torch.sum(out * weights, dim=2)
