"""Fast PyTorch (CPU) implementation of the chunked attention op.

Same semantics as ``reference.py`` (the specification), organised for speed and memory:

* Rows are read through the visiting order with one ``index_select`` per block of chunks; no
  repeated/gathered copies of the whole sequence and no ``cat`` look-back copies. A block's key
  window is one contiguous run of visiting rows, and each chunk's window is an overlapping
  ``as_strided`` view of it, so ``bmm`` reads the neighbour chunks in place. Local attention
  (identity order) reads Q/K/V as plain views.
* Work proceeds in blocks of chunks whose score matrix (~1 MB) stays in cache; masking,
  softmax and the value product touch it while it is hot. Masks use the reference's replacement
  values (``torch.where``), so fully masked rows behave exactly as in the reference.
* A custom ``autograd.Function`` saves only the inputs, the output and the per-row logsumexp;
  backward recomputes the probabilities block by block. Gradients of rows that several hash
  rounds visit are summed with a gather over the inverse order (deterministic, no atomics).
* Everything is computed in fp32 (inputs are upcast per block) and cast back at the end.

Dropout is drawn per block from a generator seeded once per call; backward replays it.
"""

from __future__ import annotations

import math

import torch

from .reference import mask_values, normalize_keys

# Query rows per block: 2048 rows x a 128-key window of fp32 scores is 1 MB.
BLOCK_ROWS = 2048


def _plan(num_rows: int, chunk_length: int):
    """Chunk blocks ``[(first_chunk, last_chunk_exclusive)]`` over the ``num_rows`` visits."""
    num_chunks = num_rows // chunk_length
    per_block = max(1, min(num_chunks, BLOCK_ROWS // chunk_length))
    return [(i0, min(i0 + per_block, num_chunks)) for i0 in range(0, num_chunks, per_block)]


def _exp(x: torch.Tensor) -> torch.Tensor:
    """In-place ``exp`` of non-positive ``x``.

    Masked scores (-1e9, -1e5) make ``exp`` take its slow out-of-range path (~8x slower on this
    CPU); clamping at -87 keeps results normal floats (exp(-87) ~ 1.6e-38 instead of 0, far below
    any tolerance).
    """
    return x.clamp_(min=-87.0).exp_()


class _Problem:
    """Shapes, the visiting order and the masking rules of one call, shared by forward and backward."""

    def __init__(self, query, sorted_idx, attention_mask, chunk_length, before, after, causal, shared_qk, dropout_p, seed):
        batch_size, num_heads, seq_len, head_dim = query.shape
        self.bh = batch_size * num_heads
        self.num_heads = num_heads
        self.seq_len = seq_len
        self.head_dim = head_dim
        self.c = chunk_length
        self.before = before
        self.after = after
        self.window = chunk_length * (before + 1 + after)
        self.causal = causal
        self.shared_qk = shared_qk
        self.dropout_p = dropout_p
        self.seed = seed
        self.mask_value, self.self_mask_value = mask_values(query.dtype)
        device = query.device
        if sorted_idx is None:
            self.num_rows = seq_len
            self.sorted_idx = None
            self.positions = None  # identity order
        else:
            self.num_rows = sorted_idx.shape[-1]
            self.sorted_idx = sorted_idx.reshape(self.bh, self.num_rows).to(torch.int64)
            self.positions = self.sorted_idx % seq_len  # [BH, R*L]
        self.num_rounds = self.num_rows // seq_len
        self.num_chunks = self.num_rows // chunk_length
        self.key_kept = None
        if attention_mask is not None:
            kept = attention_mask.to(torch.bool)[:, None, :].expand(-1, num_heads, -1)  # [B, H, L]
            self.key_kept = kept.reshape(self.bh, seq_len)
        self.blocks = _plan(self.num_rows, chunk_length)
        self.device = device
        # fp32 compute for fp32 and lower precisions; fp64 stays fp64 (gradient checks)
        self.compute_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32

    def rows(self, i0: int, i1: int, before: int, after: int) -> torch.Tensor:
        """Visiting rows of chunks ``[i0 - before, i1 + after)``, wrapped circularly."""
        start, stop = (i0 - before) * self.c, (i1 + after) * self.c
        return torch.arange(start, stop, device=self.device) % self.num_rows

    def generator(self):
        if self.dropout_p == 0.0:
            return None
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.seed)
        return gen

    def read(self, x: torch.Tensor, bh: int, i0: int, i1: int, window: bool) -> torch.Tensor:
        """Rows of ``x [BH, L, D]`` for chunks ``[i0, i1)``: ``[nb, c, D]`` or their key windows ``[nb, w, D]``."""
        before, after = (self.before, self.after) if window else (0, 0)
        nb, c, d = i1 - i0, self.c, self.head_dim
        start, stop = (i0 - before) * c, (i1 + after) * c
        if self.positions is None and start >= 0 and stop <= self.num_rows:
            run = x[bh, start:stop]  # [ext, D] view
        else:
            rows = self.rows(i0, i1, before, after)
            if self.positions is not None:
                rows = self.positions[bh, rows]
            run = x[bh].index_select(0, rows)  # [ext, D]
        run = run.to(self.compute_dtype)
        if not window or (before == 0 and after == 0):
            return run.reshape(nb, c if not window else self.window, d)
        # overlapping windows: chunk j sees rows [j*c, j*c + w) of the run
        return run.as_strided((nb, self.window, d), (c * d, d, 1), run.storage_offset())

    def replaced(self, bh: int, i0: int, i1: int):
        """``(masked, self_masked)`` bool ``[nb, c, w]`` (or None) for the block's scores."""
        nb, c = i1 - i0, self.c
        q_rows = self.rows(i0, i1, 0, 0)
        k_rows = self.rows(i0, i1, self.before, self.after)
        if self.positions is not None:
            q_pos, k_ext = self.positions[bh, q_rows], self.positions[bh, k_rows]
        else:
            q_pos, k_ext = q_rows, k_rows
        q_pos = q_pos.view(nb, c, 1)  # [nb, c, 1]
        k_pos = k_ext.as_strided((nb, 1, self.window), (c, 1, 1))  # [nb, 1, w]
        masked = None
        if self.key_kept is not None:
            masked = ~self.key_kept[bh, k_ext].as_strided((nb, 1, self.window), (c, 1, 1))  # [nb, 1, w]
        if self.causal:
            future = k_pos > q_pos  # [nb, c, w]
            masked = future if masked is None else masked | future
        self_masked = (k_pos == q_pos) if self.shared_qk else None  # [nb, c, w]
        return masked, self_masked

    def scores(self, q_blk, k_win, masks):
        s = torch.bmm(q_blk, k_win.transpose(1, 2))  # [nb, c, w]
        masked, self_masked = masks
        if masked is not None:
            s = torch.where(masked, self.mask_value, s)
        if self_masked is not None:
            s = torch.where(self_masked, self.self_mask_value, s)
        return s

    def dropout_mask(self, gen, shape):
        keep = 1.0 - self.dropout_p
        return torch.empty(shape, dtype=self.compute_dtype, device=self.device).bernoulli_(keep, generator=gen).div_(keep)

    def write_index(self, bh: int, i0: int, i1: int) -> torch.Tensor:
        """Flat destination rows ``bh * R*L + sorted_idx[t]`` of the block's visits."""
        rows = self.rows(i0, i1, 0, 0)
        dest = rows if self.sorted_idx is None else self.sorted_idx[bh, rows]
        return dest + bh * self.num_rows


class _ChunkedAttention(torch.autograd.Function):
    """Core chunked attention on prepared keys: returns ``(out [BH, R*L, D], lse [BH, R*L])``.

    Rows of ``out``/``lse`` are in original order, round-major (row ``r * L + p``).
    """

    @staticmethod
    def forward(ctx, query, keys, value, problem: _Problem):
        pb = problem
        bh, d = pb.bh, pb.head_dim
        q = query.reshape(bh, pb.seq_len, d)
        k = keys.reshape(bh, pb.seq_len, d)
        v = value.reshape(bh, pb.seq_len, d)
        out = torch.empty(bh * pb.num_rows, d, dtype=pb.compute_dtype, device=query.device)
        lse = torch.empty(bh * pb.num_rows, dtype=pb.compute_dtype, device=query.device)
        gen = pb.generator()
        for i in range(bh):
            for i0, i1 in pb.blocks:
                q_blk = pb.read(q, i, i0, i1, window=False)  # [nb, c, D]
                k_win = pb.read(k, i, i0, i1, window=True)  # [nb, w, D]
                v_win = pb.read(v, i, i0, i1, window=True)  # [nb, w, D]
                s = pb.scores(q_blk, k_win, pb.replaced(i, i0, i1))  # [nb, c, w]
                b_max = s.amax(dim=-1, keepdim=True)  # [nb, c, 1]
                p = _exp(s.sub_(b_max))  # [nb, c, w]
                b_lse = b_max + p.sum(dim=-1, keepdim=True).log_()  # [nb, c, 1]
                # normalise by exp(max - lse) with the rounded lse, not by 1/sum: a fully masked row
                # (all -1e9) then has lse == -1e9 and probabilities 1, exactly as the reference
                p = p.mul_(torch.exp(b_max - b_lse))  # [nb, c, w]
                if gen is not None:
                    p = p * pb.dropout_mask(gen, p.shape)
                o = torch.bmm(p, v_win)  # [nb, c, D]
                dest = pb.write_index(i, i0, i1)
                if pb.sorted_idx is None:
                    out[dest[0] : dest[-1] + 1] = o.view(-1, d)
                else:
                    out.index_copy_(0, dest, o.view(-1, d))
                lse.index_copy_(0, dest, b_lse.view(-1))
        out = out.view(bh, pb.num_rows, d)
        lse = lse.view(bh, pb.num_rows)
        ctx.problem = pb
        ctx.save_for_backward(query, keys, value, out, lse)
        return out.to(query.dtype), lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        query, keys, value, out, lse = ctx.saved_tensors
        pb = ctx.problem
        bh, d, n_rows = pb.bh, pb.head_dim, pb.num_rows
        q = query.reshape(bh, pb.seq_len, d)
        k = keys.reshape(bh, pb.seq_len, d)
        v = value.reshape(bh, pb.seq_len, d)
        grad_out = torch.zeros_like(out) if grad_out is None else grad_out.to(pb.compute_dtype)  # [BH, R*L, D]
        grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse.to(pb.compute_dtype)  # [BH, R*L]
        # softmax backward: delta_i = sum_d dO_id O_id, in original row order
        delta = (grad_out * out).sum(-1) - grad_lse  # [BH, R*L]

        # gradients in visiting order, summed over overlapping windows; mapped back at the end
        dq_vis = torch.empty(bh, n_rows, d, dtype=pb.compute_dtype, device=query.device)
        dk_vis = torch.zeros(bh, n_rows, d, dtype=pb.compute_dtype, device=query.device)
        dv_vis = torch.zeros(bh, n_rows, d, dtype=pb.compute_dtype, device=query.device)
        go_flat, lse_flat, delta_flat = grad_out.reshape(-1, d), lse.reshape(-1), delta.reshape(-1)
        gen = pb.generator()
        span = pb.before + 1 + pb.after
        for i in range(bh):
            for i0, i1 in pb.blocks:
                nb, c = i1 - i0, pb.c
                q_blk = pb.read(q, i, i0, i1, window=False)  # [nb, c, D]
                k_win = pb.read(k, i, i0, i1, window=True)  # [nb, w, D]
                v_win = pb.read(v, i, i0, i1, window=True)  # [nb, w, D]
                masks = pb.replaced(i, i0, i1)
                s = pb.scores(q_blk, k_win, masks)  # [nb, c, w]
                src = pb.write_index(i, i0, i1)
                p = _exp(s.sub_(lse_flat[src].view(nb, c, 1)))  # [nb, c, w]
                b_do = go_flat.index_select(0, src).view(nb, c, d)  # [nb, c, D]
                dp = torch.bmm(b_do, v_win.transpose(1, 2))  # [nb, c, w]
                if gen is not None:
                    drop = pb.dropout_mask(gen, p.shape)
                    dv_win = torch.bmm((p * drop).transpose(1, 2), b_do)  # [nb, w, D]
                    dp.mul_(drop)
                else:
                    dv_win = torch.bmm(p.transpose(1, 2), b_do)  # [nb, w, D]
                ds = dp.sub_(delta_flat[src].view(nb, c, 1)).mul_(p)  # [nb, c, w]
                # replaced scores are constants: no gradient flows through them
                for m in masks:
                    if m is not None:
                        ds = ds.masked_fill(m, 0.0)
                dq_vis[i, i0 * c : i1 * c] = torch.bmm(ds, k_win).view(-1, d)
                dk_win = torch.bmm(ds.transpose(1, 2), q_blk)  # [nb, w, D]
                # window slot o of chunk j holds visiting chunk j - before + o: add each slot in place
                for grad_vis, g_win in ((dk_vis, dk_win), (dv_vis, dv_win)):
                    g_win = g_win.view(nb, span, c, d)
                    for o in range(span):
                        _add_rows(grad_vis[i], (i0 - pb.before + o) * c, g_win[:, o].reshape(-1, d))
        undo = None if pb.sorted_idx is None else _undo_rows(pb)
        grads = (_to_original(pb, g, x, undo) for g, x in ((dq_vis, query), (dk_vis, keys), (dv_vis, value)))
        return (*grads, None)


def _add_rows(buf: torch.Tensor, start: int, x: torch.Tensor) -> None:
    """``buf[(start + t) % N] += x[t]`` for ``buf [N, D]``, as contiguous slice adds (deterministic)."""
    n = buf.shape[0]
    t = 0
    while t < x.shape[0]:
        row = (start + t) % n
        take = min(n - row, x.shape[0] - t)
        buf[row : row + take] += x[t : t + take]
        t += take


def _undo_rows(pb: _Problem) -> torch.Tensor:
    """Flat rows ``bh * R*L + undo[bh, s]``: where original row ``s`` sits in visiting order."""
    undo = torch.empty_like(pb.sorted_idx)
    undo.scatter_(1, pb.sorted_idx, torch.arange(pb.num_rows, device=undo.device).expand_as(undo))
    return (undo + torch.arange(pb.bh, device=undo.device).unsqueeze(1) * pb.num_rows).view(-1)


def _to_original(pb: _Problem, grad_vis: torch.Tensor, like: torch.Tensor, undo: torch.Tensor | None) -> torch.Tensor:
    """Sum visiting-order rows back onto original positions: ``[BH, R*L, D] -> like``."""
    if undo is not None:
        grad_vis = grad_vis.view(-1, pb.head_dim).index_select(0, undo)  # [BH*R*L, D]
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
    weights = torch.exp(lse - torch.logsumexp(lse, dim=2, keepdim=True)).to(out.dtype)  # [B, H, R, L, 1]
    return torch.sum(out * weights, dim=2)
