"""Fast PyTorch (CPU) implementation of the chunked attention op.

Same semantics as ``reference.py`` (the specification), organised for speed and memory:

* Work proceeds in blocks of about ``BLOCK_ROWS`` query rows: a run of chunks of one (batch, head)
  sequence, or several whole sequences when sequences are short.
* The key window of chunk ``i`` is visiting chunks ``[i - before, i + after]``, so a block reads
  the run of visiting rows ``[(i0 - before) c, (i1 + after) c)`` once (one ``index_select``; for
  local attention away from the wrap no copy at all) and its overlapping windows are
  ``as_strided`` views of that run. ``bmm`` takes such overlapping batches at full speed.
* Inputs are read in their own memory layout (``[B, H, L, D]`` or the model's ``[B, L, H, D]``
  viewed as ``[B, H, L, D]``) and the output is returned in the query's layout: no ``contiguous``
  copies, and the model's head merge stays a view.
* Keys are prepared inside the blocks, row by row with the reference's operations: shared QK
  normalises the block's run of query rows (one read for queries and keys), separate keys are
  divided by ``sqrt(D)``. No ``[B, H, L, D]`` key tensor, and no autograd chain over one.
* Masked scores get the reference's replacement values, so fully masked rows behave exactly as in
  the reference. Padding and causal masks are applied as vectorised arithmetic ``s * keep + fill``
  (exact for finite scores; a bool compare plus ``masked_fill_`` is ~5x slower per element here);
  local attention reuses one precomputed pattern. The shared-QK self mask is the diagonal of each
  chunk's own slot (positions are unique within a hash round, checked once per call); only
  windows that cross a round boundary compare positions.
* The softmax is ``torch.softmax`` (one fused pass per row, cache resident) plus the row maxima of
  the scores and of the probabilities, which give the logsumexp ``lse = max - log(max p)`` and the
  factor ``f = exp(max - lse) / max p`` (1 up to rounding) that turns ``softmax`` into the
  reference's ``exp(s - lse)``. ``f`` matters for a fully masked row: ``lse`` rounds to the mask
  value, the reference's probabilities are all 1 and the row returns the sum of its values.
* Hash rounds are combined inside the op (weights ``softmax_r(lse_r)``), one gathered round at a
  time, without ``[B, H, R, L, D]`` temporaries.
* The registered op's autograd formula saves the inputs, the output and one scale per visiting row
  (``f`` times the round weight); backward recomputes the probabilities block by block with the
  same softmax, so it needs no logsumexp. In visiting order the incoming gradient of a row is
  ``scale * dOut[position]`` and the softmax backward's ``delta`` is ``scale * (dOut . Out)[position]``
  (the round-combine backward folded in). Blocks add their dQ rows and their windows' dK/dV
  straight into the original-order gradients (``index_add_``, sequential: deterministic, no
  atomics; rows that several rounds visit accumulate).
* Per-block scratch tensors live in per-call workspace buffers (no fresh 2 MB allocation per block).
* ``chunked_attention_fast_with_grad`` (one hash round, no dropout) serves a backward that recomputes the op
  (the reversible layers): each block's probabilities give its output rows and, with ``delta`` from those
  rows, its gradients, so the scores are computed once instead of once per pass.
* Everything is computed in fp32 (fp64 stays fp64) and cast back at the end.

Dropout is drawn per block from a generator seeded once per call; backward replays it.
"""

from __future__ import annotations

import concurrent.futures
import functools
import math
import os
import threading

import torch

from ...scratch import scratch_active, scratch_empty
from .._dispatch import call
from .reference import key_scale, mask_values

# the eps of reference.normalize_keys
_KEY_EPS = 1e-6

# Query rows per block: 4096 rows x a 128-key window of fp32 scores is 2 MB (the L2 of one core).
BLOCK_ROWS = 4096


class _Rows:
    """Row access to a ``[B, H, L, D]`` input in its own memory layout.

    ``flat`` is the ``[B*H*L, D]`` storage; row ``(bh, p)`` is ``flat[base[bh] + p * step]``.
    Inputs that are neither contiguous nor a transposed ``[B, L, H, D]`` buffer are copied first.
    """

    def __init__(self, x: torch.Tensor):
        batch_size, num_heads, _, head_dim = x.shape
        if not (x.is_contiguous() or x.transpose(1, 2).is_contiguous()):
            x = x.contiguous()
        s_b, s_h, s_l, _ = x.stride()
        self.x = x
        self.flat = x.as_strided((x.numel() // head_dim, head_dim), (head_dim, 1))
        b = torch.arange(batch_size, device=x.device).repeat_interleave(num_heads)
        h = torch.arange(num_heads, device=x.device).repeat(batch_size)
        self.base = (b * (s_b // head_dim) + h * (s_h // head_dim)).unsqueeze(1)  # [BH, 1]
        self.step = s_l // head_dim
        self.num_heads = num_heads

    def seq(self, bh: int) -> torch.Tensor:
        """``[L, D]`` view of one (batch, head) sequence."""
        return self.x[bh // self.num_heads, bh % self.num_heads]

    def gather(self, positions: torch.Tensor, bh0: int, ws: _Workspace, name: str) -> torch.Tensor:
        """Rows at ``positions [nbh, n]`` of the sequences ``bh0, bh0 + 1, ...``: ``[nbh, n, D]``."""
        src = (self.base[bh0 : bh0 + positions.shape[0]] + positions * self.step).reshape(-1)
        if self.flat.dtype != ws.dtype:
            return self.flat.index_select(0, src).view(*positions.shape, -1)
        out = ws(name, src.numel(), self.flat.shape[1])
        return torch.index_select(self.flat, 0, src, out=out).view(*positions.shape, -1)

    def add(self, positions: torch.Tensor, bh0: int, values: torch.Tensor) -> None:
        """``row += values`` for the rows at ``positions [nbh, n]`` (``values [nbh, n, D]``), in index order."""
        src = (self.base[bh0 : bh0 + positions.shape[0]] + positions * self.step).reshape(-1)
        # index_add_ on CPU adds the rows one after another: deterministic, repeated rows accumulate
        self.flat.index_add_(0, src, values.reshape(src.numel(), -1))


def _seq(x: torch.Tensor, bh: int, num_heads: int) -> torch.Tensor:
    """``[N, D]`` rows of sequence ``bh`` of a ``[BH, N, D]`` buffer or a ``[B, H, L, D]`` tensor."""
    return x[bh] if x.dim() == 3 else x[bh // num_heads, bh % num_heads]


def _add_chunks(dst: torch.Tensor, first: int, x: torch.Tensor) -> None:
    """``dst[(first + t) % n] += x[t]`` for chunks ``dst [n, c, D]``, ``x [k, c, D]``, as slice adds."""
    n = dst.shape[0]
    t = 0
    while t < x.shape[0]:
        j = (first + t) % n
        take = min(n - j, x.shape[0] - t)
        dst[j : j + take] += x[t : t + take]
        t += take


class _Workspace:
    """Scratch buffers of one call, reused by every block.

    A fresh 2 MB tensor per block is a fresh ``mmap`` whose pages fault on first touch, every
    time; blocks reuse the first ``numel`` elements of one buffer per name instead.
    """

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.dtype, self.device = dtype, device
        self.buffers: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, *shape: int) -> torch.Tensor:
        numel = math.prod(shape)
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < numel:
            buf = self.buffers[name] = torch.empty(numel, dtype=self.dtype, device=self.device)
        return buf[:numel].view(shape)


# How blocks run. None (default): all blocks on the calling thread, each op using torch's intra-op
# threads. n >= 1: n worker threads over groups of whole sequences, each running single-threaded
# ops (1: the calling thread alone, single-threaded). Measured on the 2 shared cores (load ~2,
# L=16384, 2 heads x 64, chunk 64, ms fwd / fwd+bwd): local 12.4 / 43.1 intra-op vs 17.9 / 54.2 on
# two workers, LSH R=4 57.9 / 185.3 vs 57.6 / 191.0. On a heavily oversubscribed machine intra-op
# threads can be far slower (every small op's OpenMP barrier waits for a descheduled thread):
# there the workers win.
WORKERS: int | None = None

_POOLS: dict[tuple[int, int], concurrent.futures.ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _pool(workers: int) -> concurrent.futures.ThreadPoolExecutor:
    # keyed by process id too: a forked child (e.g. a DataLoader worker) has no pool threads
    key = (os.getpid(), workers)
    with _POOLS_LOCK:
        if key not in _POOLS:
            # each worker runs its ops on one intra-op thread (the OpenMP setting is per thread)
            _POOLS[key] = concurrent.futures.ThreadPoolExecutor(
                workers, thread_name_prefix="chunked_attention", initializer=torch.set_num_threads, initargs=(1,)
            )
        return _POOLS[key]


def _run_blocks(pb: _Problem, work) -> None:
    """``work(numbered blocks, workspace)`` over groups of whole sequences, in parallel when there are several.

    Sequences write disjoint rows (outputs, and dQ/dK/dV in backward), so workers never touch the
    same row and every row sees the same operations in the same order as on one thread: results
    are identical for any number of workers. Workers run single-threaded ops with no OpenMP
    barrier between them, which keeps them fast when the cores are shared (one descheduled
    intra-op thread stalls every barrier of every small op).
    """
    numbered = list(enumerate(pb.blocks))
    if WORKERS is None:
        work(numbered, _Workspace(pb.compute_dtype, pb.device))
        return
    workers = min(WORKERS, len({blk[0] for blk in pb.blocks}))
    if workers <= 1:
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            work(numbered, _Workspace(pb.compute_dtype, pb.device))
        finally:
            torch.set_num_threads(previous)
        return
    # contiguous groups of sequences with near-equal block counts
    groups: list[list] = [[] for _ in range(workers)]
    per_group = -(-len(numbered) // workers)
    g = 0
    for i, (number, blk) in enumerate(numbered):
        if len(groups[g]) >= per_group and blk[0] != numbered[i - 1][1][0] and g + 1 < workers:
            g += 1
        groups[g].append((number, blk))

    def run(group):
        # grad mode is thread-local: the workers compute plain tensors, as the calling Function does
        with torch.no_grad():
            work(group, _Workspace(pb.compute_dtype, pb.device))

    for future in [_pool(workers).submit(run, group) for group in groups if group]:
        future.result()


class _Problem:
    """Shapes, the visiting order, the blocks and the masking rules of one call (forward and backward)."""

    def __init__(
        self, query, sorted_idx, attention_mask, chunk_length, before, after, causal, shared_qk, dropout_p, seed
    ):
        batch_size, num_heads, seq_len, head_dim = query.shape
        device = query.device
        self.batch_size, self.num_heads = batch_size, num_heads
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
        # fp32 compute for fp32 and lower precisions; fp64 stays fp64 (gradient checks)
        self.compute_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
        # the replacement values of the scores' dtype, fp32 for fp16 / bf16 inputs as in the kernels: with
        # fp16's -1e4 in fp32 a fully masked row would average its values instead of summing them
        self.mask_value, self.self_mask_value = mask_values(self.compute_dtype)
        self.identity = sorted_idx is None
        if self.identity:
            self.num_rows = seq_len
            self.positions = torch.arange(seq_len, device=device).expand(self.bh, seq_len)  # [BH, L]
            self.sorted_idx = None
            self.rounds_ok = True
        else:
            self.num_rows = sorted_idx.shape[-1]
            self.sorted_idx = sorted_idx.reshape(self.bh, self.num_rows).to(torch.int64)  # [BH, R*L]
            self.positions = self.sorted_idx % seq_len  # [BH, R*L]
            # round r visits exactly rows [r L, (r + 1) L): positions are then unique within a round
            # and a window inside one round holds a query's own position only on its diagonal
            row_round = torch.arange(self.num_rows, device=device) // seq_len
            self.rounds_ok = bool((self.sorted_idx // seq_len == row_round).all())
        self.num_rounds = self.num_rows // seq_len
        self.num_chunks = self.num_rows // chunk_length  # per sequence
        self.key_kept = None
        if attention_mask is not None:
            kept = attention_mask.to(torch.bool)[:, None, :].expand(-1, num_heads, -1)  # [B, H, L]
            self.key_kept = kept.reshape(self.bh, seq_len)
        self.mask_tensor = torch.tensor(self.mask_value, dtype=self.compute_dtype, device=device)
        self.key_rs = None  # shared QK: 1 / rms of each query row [BH, L], set by the forward
        self.key_factor = None  # and the rows' power-of-two rescaling [BH, L] (None: no row overflowed)
        self.local_keep = self.local_fill = None
        if causal and self.identity:
            # identity order away from the wrap: key j of a chunk's window is `j - before*c` rows
            # after the chunk start, query a is `a` rows after it
            o_k = torch.arange(self.window, device=device) - before * chunk_length
            future = o_k[None, :] > torch.arange(chunk_length, device=device)[:, None]  # [c, w]
            self.local_keep = (~future).to(self.compute_dtype)  # [c, w]
            self.local_fill = future.to(self.compute_dtype) * self.mask_value  # [c, w]
        self.blocks = self._blocks()

    @functools.cached_property
    def undo(self) -> torch.Tensor | None:
        """``undo[bh, r*L + p]``: the visiting row of original row ``p`` in round ``r`` ``[BH, R*L]`` (None for the
        identity order); the forward's round combine needs it, the backward does not."""
        if self.identity:
            return None
        # a permutation of [0, R*L) per row: the op checked it (validation.check_permutation)
        undo = torch.empty_like(self.sorted_idx)
        undo.scatter_(1, self.sorted_idx, torch.arange(self.num_rows, device=self.device).expand_as(undo))
        return undo

    def _blocks(self) -> list[tuple[int, int, int, int]]:
        """``(bh0, bh1, i0, i1)``: chunks ``[i0, i1)`` of sequences ``[bh0, bh1)``, ~``BLOCK_ROWS`` query rows each."""
        n = self.num_chunks
        per_block = max(1, BLOCK_ROWS // self.c)
        if n >= per_block:
            # near-equal runs of chunks of one sequence
            count = -(-n // per_block)
            bounds = [n * j // count for j in range(count + 1)]
            return [(bh, bh + 1, i0, i1) for bh in range(self.bh) for i0, i1 in zip(bounds[:-1], bounds[1:])]
        seqs = max(1, per_block // n)
        return [(h0, min(h0 + seqs, self.bh), 0, n) for h0 in range(0, self.bh, seqs)]

    def generator(self, block: int):
        """The dropout generator of block number ``block`` (seeded per block: backward replays it)."""
        if self.dropout_p == 0.0:
            return None
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.seed + block)
        return gen

    def dropout_mask(self, gen, shape):
        keep = 1.0 - self.dropout_p
        return (
            torch.empty(shape, dtype=self.compute_dtype, device=self.device).bernoulli_(keep, generator=gen).div_(keep)
        )

    def is_view(self, blk) -> bool:
        """Identity order, one sequence, run inside it: the block's rows are views of the inputs."""
        h0, h1, i0, i1 = blk
        return self.identity and h1 == h0 + 1 and i0 >= self.before and i1 + self.after <= self.num_chunks

    def run_positions(self, blk) -> torch.Tensor:
        """Positions of the block's run of visiting rows ``[(i0 - before) c, (i1 + after) c)`` (wrapped):
        ``[nbh, run]``."""
        h0, h1, i0, i1 = blk
        rows = torch.arange((i0 - self.before) * self.c, (i1 + self.after) * self.c, device=self.device) % self.num_rows
        return self.positions[h0:h1].index_select(1, rows)

    def windows(self, run: torch.Tensor, nb: int) -> torch.Tensor:
        """Overlapping windows ``[nbh * nb, w, ...]`` of runs ``[nbh, run, ...]`` (a view for one sequence)."""
        size = (run.shape[0], nb, self.window, *run.shape[2:])
        stride = (run.stride(0), self.c * run.stride(1), *run.stride()[1:])
        return run.as_strided(size, stride, run.storage_offset()).flatten(0, 1)

    def inputs(self, rows_q: _Rows, rows_k: _Rows, rows_v: _Rows, blk, ws: _Workspace):
        """``q_blk [G, c, D]``, ``k_win``/``v_win [G, w, D]`` (``G = nbh * nb``) and the run positions (or None)."""
        h0, h1, i0, i1 = blk
        nb, c, d, dt = i1 - i0, self.c, self.head_dim, self.compute_dtype
        start, stop = (i0 - self.before) * c, (i1 + self.after) * c
        own = slice(self.before * c, self.before * c + nb * c)  # the block's query rows within its run
        if self.is_view(blk):
            pos = None
            v_run = rows_v.seq(h0)[start:stop].unsqueeze(0)  # [1, run, D]
            if rows_k is None:
                q_run = rows_q.seq(h0)[start:stop].unsqueeze(0)  # [1, run, D]
            else:
                q_blk = rows_q.seq(h0)[i0 * c : i1 * c].unsqueeze(0)  # [1, nb*c, D]
                k_run = rows_k.seq(h0)[start:stop].unsqueeze(0)  # [1, run, D]
        else:
            pos = self.run_positions(blk)  # [nbh, run]
            v_run = rows_v.gather(pos, h0, ws, "v")  # [nbh, run, D]
            if rows_k is None:
                q_run = rows_q.gather(pos, h0, ws, "q")  # [nbh, run, D]
            else:
                q_blk = rows_q.gather(pos[:, own], h0, ws, "q")  # [nbh, nb*c, D]
                k_run = rows_k.gather(pos, h0, ws, "k")  # [nbh, run, D]
        v_run = v_run.to(dt)
        if rows_k is None:
            # shared QK: the run's queries are its keys before normalisation (one read for both);
            # same operations as normalize_keys, row by row
            q_run = q_run.to(dt)
            q_blk = q_run[:, own]  # [nbh, nb*c, D]
            rs = self.key_rs[h0:h1, start:stop] if pos is None else self.key_rs[h0:h1].gather(1, pos)  # [nbh, run]
            k_run = torch.mul(q_run, rs.unsqueeze(-1), out=ws("k", *q_run.shape)).div_(math.sqrt(d))  # [nbh, run, D]
        else:
            # separate keys are scaled by 1 / sqrt(D) here, as the reference does before the product
            q_blk = q_blk.to(dt)
            if pos is None and k_run.dtype == dt:  # a view of the input
                k_run = torch.div(k_run, math.sqrt(d), out=ws("k", *k_run.shape))
            else:  # a gathered or converted copy
                k_run = k_run.to(dt).div_(math.sqrt(d))
        q_blk = q_blk.reshape(-1, c, d)  # [G, c, D] (a view for one sequence)
        return q_blk, self.windows(k_run, nb), self.windows(v_run, nb), pos

    def masks(self, blk, pos: torch.Tensor | None, ws: _Workspace) -> _Masks:
        """The block's masks, broadcastable to its ``[nbh, nb, c, w]`` scores."""
        h0, h1, i0, i1 = blk
        nbh, nb, c, w = h1 - h0, i1 - i0, self.c, self.window
        masks = _Masks(self)
        inside = i0 >= self.before and i1 + self.after <= self.num_chunks
        kept = None
        if self.key_kept is not None:
            kept = (
                self.key_kept[h0, (i0 - self.before) * c : (i1 + self.after) * c].unsqueeze(0)
                if pos is None
                else self.key_kept[h0:h1].gather(1, pos)
            )
            kept = self.windows(kept.to(self.compute_dtype), nb).view(nbh, nb, 1, w)  # [nbh, nb, 1, w]
        keep = None
        if self.causal:
            if self.local_keep is not None and inside:
                keep = self.local_keep  # [c, w]
            else:
                k_pos = self.windows(pos, nb).view(nbh, nb, 1, w)
                q_pos = pos[:, self.before * c : self.before * c + nb * c].reshape(nbh, nb, c, 1)
                keep = ws("keep", nbh, nb, c, w)
                if self.seq_len < 2**24:
                    # 1 where k <= q, else 0, as float arithmetic (a bool compare and a masked fill
                    # are ~5x slower than vectorised arithmetic here); positions are exact below 2^24
                    dt = self.compute_dtype
                    torch.sub(q_pos.to(dt) + 1, k_pos.to(dt), out=keep).clamp_(0.0, 1.0)
                else:
                    keep.copy_(k_pos <= q_pos)
        if kept is not None:
            keep = kept if keep is None else torch.mul(keep, kept, out=ws("keep", nbh, nb, c, w))
        if keep is not None:
            masks.keep = keep
            if keep is self.local_keep:
                masks.fill = self.local_fill
            else:
                # mask_value where keep == 0, else 0 (exact: m + 1 * -m == 0)
                masks.fill = torch.add(self.mask_tensor, keep, alpha=-self.mask_value, out=ws("fill", *keep.shape))
        if self.shared_qk:
            if pos is not None:
                k_pos = self.windows(pos, nb).view(nbh, nb, 1, w)
                q_pos = pos[:, self.before * c : self.before * c + nb * c].reshape(nbh, nb, c, 1)
            edges = self.edge_chunks(i0, i1)
            if edges is None:
                masks.same = k_pos == q_pos  # [nbh, nb, c, w]
            elif edges:
                # the query's own position elsewhere in windows that reach into another round
                masks.edges = [j - i0 for j in edges]  # chunks of the block
                e = torch.tensor(masks.edges, device=self.device)
                masks.same = k_pos.index_select(1, e) == q_pos.index_select(1, e)  # [nbh, ne, c, w]
        return masks

    def edge_chunks(self, i0: int, i1: int) -> list[int] | None:
        """Chunks of ``[i0, i1)`` whose window crosses a round boundary (None: compare every window)."""
        if not self.rounds_ok:
            return None
        per_round = self.seq_len // self.c
        return [j for j in range(i0, i1) if j % per_round < self.before or j % per_round + self.after >= per_round]


class _Masks:
    """Masks of one block: ``keep``/``fill`` (key padding and causal, as arithmetic: ``s * keep + fill``)
    and the shared-QK self mask (``same`` comparisons where needed, else the chunk diagonal)."""

    def __init__(self, pb: _Problem):
        self.pb = pb
        self.keep = self.fill = self.same = self.edges = None

    def apply(self, s: torch.Tensor, zero: bool = False) -> None:
        """Replace masked scores of ``s [nbh, nb, c, w]`` in place (with 0 when ``zero``: score gradients)."""
        pb = self.pb
        if self.keep is not None:
            if zero:
                s.mul_(self.keep)
            else:
                # s * 1 + 0 == s and s * 0 + m == m exactly: a vectorised masked fill
                torch.addcmul(self.fill, s, self.keep, out=s)
        if not pb.shared_qk:
            return
        value = 0.0 if zero else pb.self_mask_value
        if self.same is not None:
            if self.edges is None:
                s.masked_fill_(self.same, value)
            else:
                for t, chunk in enumerate(self.edges):
                    s[:, chunk].masked_fill_(self.same[:, t], value)
        if pb.rounds_ok:
            # own position: query a of a chunk is key `before*c + a` of its window
            g, c, w = s.shape[0] * s.shape[1], pb.c, pb.window
            diag = s.as_strided((g, c), (c * w, w + 1), s.storage_offset() + pb.before * c)  # [G, c]
            diag.fill_(value)


def _scores(pb: _Problem, q_blk, k_win, masks: _Masks, ws: _Workspace, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """``(p, max)``: masked scores' softmax ``[nbh, nb, c, w]`` and row maxima ``[nbh, nb, c, 1]``."""
    s = torch.bmm(q_blk, k_win.transpose(1, 2), out=ws("s", *q_blk.shape[:2], pb.window)).view(shape)
    masks.apply(s)
    b_max = s.amax(dim=-1, keepdim=True)
    # one fused, row-local pass (max, exp, sum, scale) instead of separate passes over the block
    p = torch.ops.aten._softmax.out(s, -1, False, out=ws("p", *shape))
    return p, b_max


def _output_like(like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An output with ``like``'s memory layout: a scratch buffer inside a ``scratch_scope`` (the caller
    consumes it before its next call; see ``reformer_kernels.scratch``), else ``empty_like``."""
    if scratch_active() and (like.is_contiguous() or like.transpose(1, 2).is_contiguous()):
        buffer = scratch_empty("chunked_attention.out", (like.numel(),), dtype, like.device)
        return buffer.as_strided(like.shape, like.stride())
    return torch.empty_like(like, dtype=dtype)


def attention_forward(
    query: torch.Tensor, keys: torch.Tensor | None, value: torch.Tensor, pb: _Problem
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, scale)``: the output in the query's layout and the compute dtype, hash rounds combined, and the
    backward's scale per visiting row ``[BH, R*L]``. ``keys`` None: shared QK, the keys are the queries normalised
    as ``normalize_keys`` does, inside the blocks. No autograd (the registered op's backward is
    ``attention_backward``)."""
    bh, n_rows, dt = pb.bh, pb.num_rows, pb.compute_dtype
    rows_q, rows_k, rows_v = _Rows(query), (None if keys is None else _Rows(keys)), _Rows(value)
    if keys is None:
        pb.key_rs = _key_rs(pb, rows_q)  # [BH, L]
    like = rows_q.x
    out = _forward_out(pb, like)  # the query's layout, or visiting order [BH, R*L, D]
    lse = torch.empty(bh, n_rows, dtype=dt, device=pb.device)
    scale = torch.empty(bh, n_rows, dtype=dt, device=pb.device)

    def work(blocks, ws):
        for number, blk in blocks:
            _forward_block(pb, rows_q, rows_k, rows_v, out, lse, scale, number, blk, ws)

    _run_blocks(pb, work)
    if not pb.identity:
        out, scale = _combine_rounds(pb, out, lse, scale, like)
    return out, scale


def attention_backward(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    keys: torch.Tensor | None,
    value: torch.Tensor,
    out: torch.Tensor,
    scale: torch.Tensor,
    pb: _Problem,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(dq, dk or None, dv)`` in the inputs' dtypes and layouts from ``attention_forward``'s ``out`` and ``scale``:
    the probabilities are recomputed block by block (no logsumexp needed)."""
    bh, dt = pb.bh, pb.compute_dtype
    rows_q, rows_k, rows_v = _Rows(query), (None if keys is None else _Rows(keys)), _Rows(value)
    if keys is None and pb.key_rs is None:
        pb.key_rs = _key_rs(pb, rows_q)  # [BH, L]
    grad = _Rows(grad_out.to(dt))
    # softmax backward: ds = p (dp - delta), delta = dO . O - dlse; with the round combine folded
    # in (dO_r = w_r dOut, dlse_r = w_r (dOut . O_r - dOut . Out)): delta_r = w_r (dOut . Out)
    g_dot = torch.linalg.vecdot(grad.x, out.to(dt)).reshape(bh, pb.seq_len)  # [BH, L]
    delta = scale * g_dot.gather(1, pb.positions)  # [BH, R*L]
    dq, dk, dv = _zero_grads(pb, rows_q, rows_k, rows_v)  # [B, H, L, D] each
    grads = (_Rows(dq), _Rows(dk), _Rows(dv))

    def work(blocks, ws):
        for number, blk in blocks:
            _backward_block(pb, rows_q, rows_k, rows_v, grad, scale, delta, grads, number, blk, ws)

    _run_blocks(pb, work)
    dq, dk = _key_grads(pb, query, dq, dk)
    return dq.to(query.dtype), (None if keys is None else dk.to(keys.dtype)), dv.to(value.dtype)


def _forward_out(pb: _Problem, like: torch.Tensor) -> torch.Tensor:
    """The forward's output buffer: identity order writes original rows straight into the result (``like``'s
    layout); a visiting order writes ``[BH, R*L, D]`` rows that ``_combine_rounds`` puts back in order."""
    if pb.identity:
        return _output_like(like, pb.compute_dtype)
    return scratch_empty("chunked_attention.visiting", (pb.bh, pb.num_rows, pb.head_dim), pb.compute_dtype, pb.device)


def _zero_grads(
    pb: _Problem, rows_q: _Rows, rows_k: _Rows | None, rows_v: _Rows
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``dq, dk, dv`` zeros in original order and the inputs' layouts (``dk`` like the query for shared QK):
    blocks add their rows into them (rows that several hash rounds visit accumulate)."""
    dt = pb.compute_dtype
    return (
        torch.zeros_like(rows_q.x, dtype=dt),
        torch.zeros_like(rows_q.x if rows_k is None else rows_k.x, dtype=dt),
        torch.zeros_like(rows_v.x, dtype=dt),
    )


def _key_rs(pb: _Problem, rows_q: _Rows) -> torch.Tensor:
    """Shared QK: 1 / rms of each query row, exactly as normalize_keys computes it: ``[BH, L]``.

    Over the query's storage rows in blocks of ``BLOCK_ROWS`` (same values bit for bit): the square of the
    whole ``[B, H, L, D]`` query is a fresh tensor, 32 MB at L=65536, page-faulted in on every call (see
    benchmarks/README.md); blocks of storage rows keep the block count independent of batch and heads."""
    flat = rows_q.flat  # [B*H*L, D] in the query's memory layout
    rs_flat = torch.empty(flat.shape[0], dtype=pb.compute_dtype, device=pb.device)  # [B*H*L]
    for start in range(0, flat.shape[0], BLOCK_ROWS):
        rows = flat[start : start + BLOCK_ROWS].to(pb.compute_dtype)  # [n, D]
        torch.rsqrt(torch.mean(rows * rows, dim=-1) + _KEY_EPS, out=rs_flat[start : start + BLOCK_ROWS])  # [n]
    factor_flat = None
    # A row whose mean(x^2) overflowed has 1/rms == 0 exactly (rsqrt(inf); a finite variance gives > 0). Such
    # rows are rare: on CPU one vectorised check, and only then the rows again through reference.key_scale
    # (the same bits for the other rows, rescaled ones where it overflowed); other devices always (no sync).
    if flat.device.type != "cpu" or torch.compiler.is_compiling() or bool((rs_flat == 0).any()):
        factor_flat = torch.ones_like(rs_flat)  # [B*H*L]
        for start in range(0, flat.shape[0], BLOCK_ROWS):
            rows = flat[start : start + BLOCK_ROWS].to(pb.compute_dtype)  # [n, D]
            factor, scale = key_scale(rows, _KEY_EPS)  # [n, 1] each (factor None: all 1)
            if factor is not None:
                factor_flat[start : start + BLOCK_ROWS] = factor.squeeze(-1)
                # f * s: exact (f is a power of two)
                rs_flat[start : start + BLOCK_ROWS] = (factor * scale).squeeze(-1)  # [n]
    # storage row of (b, h, p) -> [B, H, L], then [BH, L]
    d = pb.head_dim
    s_b, s_h, s_l, _ = rows_q.x.stride()

    def per_sequence(flat_values: torch.Tensor) -> torch.Tensor:
        return flat_values.as_strided(
            (pb.batch_size, pb.num_heads, pb.seq_len), (s_b // d, s_h // d, s_l // d)
        ).reshape(pb.bh, pb.seq_len)

    pb.key_factor = None if factor_flat is None else per_sequence(factor_flat)
    return per_sequence(rs_flat)


def _key_grads(
    pb: _Problem, query: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(dq, dk)`` from the gradients of the prepared keys: shared QK folds them into ``dq`` (dk None)."""
    d = pb.head_dim
    if not pb.shared_qk:
        # keys enter as key / sqrt(D)
        return dq, dk.div_(math.sqrt(d))
    # through the key normalisation k = q * r / sqrt(D), r = (mean(q^2) + eps)^(-1/2):
    # dq += dk * r / sqrt(D) - q * (dk . q) * r^3 / (D sqrt(D))
    q = query.to(pb.compute_dtype)
    r = pb.key_rs.view(q.shape[:-1]).unsqueeze(-1)  # [B, H, L, 1]
    if pb.key_factor is None:
        dot = torch.linalg.vecdot(dk, q).unsqueeze(-1)  # [B, H, L, 1]
        dq += dk.mul_(r / math.sqrt(d))
        dq -= q * (dot * r**3 / (d * math.sqrt(d)))
        return dq, None
    # rows rescaled by f (reference.key_scale): q r = (q f)(r / f), and dk . q would overflow where dk . (q f)
    # does not: dq -= q r^3 (dk . q) = f * (q f)(r / f)^3 (dk . (q f))
    f = pb.key_factor.view(q.shape[:-1]).unsqueeze(-1)  # [B, H, L, 1]
    q_f, r_f = q * f, r / f  # [B, H, L, D], [B, H, L, 1]
    dot = torch.linalg.vecdot(dk, q_f).unsqueeze(-1)  # [B, H, L, 1]
    dq += dk.mul_(r / math.sqrt(d))
    dq -= q_f * (dot * r_f**3 * f / (d * math.sqrt(d)))
    return dq, None


def _lse_and_factor(p: torch.Tensor, b_max: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lse, f)`` of a block's softmax ``p`` and score maxima ``b_max`` (``[..., 1]`` each).

    lse = max + log(sum exp(s - max)) and 1 / sum = max(p); f = exp(max - lse) * sum turns p into the
    reference's exp(s - lse) (f = 1 up to rounding; a fully masked row has lse == max, f = w).
    """
    p_max = p.amax(dim=-1, keepdim=True)  # [..., 1]
    b_lse = b_max - p_max.log()  # [..., 1]
    return b_lse, (b_max - b_lse).exp_().div_(p_max)


def _forward_block(pb: _Problem, rows_q, rows_k, rows_v, out, lse, scale, number: int, blk, ws: _Workspace) -> None:
    """Attention of the block's chunks: writes their rows of ``out`` (``lse`` and ``scale`` in visiting order)."""
    h0, h1, i0, i1 = blk
    nbh, nb, c, w = h1 - h0, i1 - i0, pb.c, pb.window
    q_blk, k_win, v_win, pos = pb.inputs(rows_q, rows_k, rows_v, blk, ws)
    p, b_max = _scores(
        pb, q_blk, k_win, pb.masks(blk, pos, ws), ws, (nbh, nb, c, w)
    )  # [nbh, nb, c, w], [nbh, nb, c, 1]
    b_lse, f = _lse_and_factor(p, b_max)  # [nbh, nb, c, 1] each
    gen = pb.generator(number)
    if gen is not None:
        p = p.mul_(pb.dropout_mask(gen, p.shape))
    o = torch.bmm(p.view(-1, c, w), v_win, out=ws("o", nbh * nb, c, pb.head_dim)).view(
        nbh, nb * c, -1
    )  # [nbh, nb*c, D]
    f = f.view(nbh, nb * c, 1)
    rows = slice(i0 * c, i1 * c)
    lse[h0:h1, rows] = b_lse.view(nbh, nb * c)
    scale[h0:h1, rows] = f.view(nbh, nb * c)
    for j in range(nbh):
        torch.mul(o[j], f[j], out=_seq(out, h0 + j, pb.num_heads)[rows])


def _combine_rounds(pb: _Problem, out_vis, lse_vis, f_vis, like):
    """Visiting-order rows -> ``out`` in ``like``'s layout, hash rounds combined with weights ``softmax_r(lse_r)``.

    Also returns the backward's per-visiting-row scale ``f * w``.
    """
    bh, n_l, d = pb.bh, pb.seq_len, pb.head_dim
    undo = pb.undo  # [BH, R*L], round-major original rows
    flat = out_vis.view(-1, d)
    out = _output_like(like, out_vis.dtype)
    out_rows = _Rows(out)
    # memory row of (bh, p) in the output layout
    target = (out_rows.base + torch.arange(n_l, device=pb.device) * out_rows.step).view(-1)  # [BH*L]
    order = torch.empty_like(target).scatter_(
        0, target, torch.arange(bh * n_l, device=pb.device)
    )  # memory row -> bh*L + p
    undo_flat = (undo + torch.arange(bh, device=pb.device).unsqueeze(1) * pb.num_rows).view(bh, pb.num_rounds, n_l)
    if pb.num_rounds == 1:
        # one round: the rows in original order
        torch.index_select(flat, 0, undo_flat.view(-1).index_select(0, order), out=out_rows.flat)
        return out, f_vis
    lse = lse_vis.gather(1, undo).view(bh, pb.num_rounds, n_l)  # [BH, R, L]
    weights = torch.exp(lse - torch.logsumexp(lse, dim=1, keepdim=True))  # [BH, R, L]
    rows = torch.empty(bh * n_l, d, dtype=out_vis.dtype, device=pb.device)
    for r in range(pb.num_rounds):
        torch.index_select(flat, 0, undo_flat[:, r].reshape(-1).index_select(0, order), out=rows)
        w_r = weights[:, r].reshape(-1, 1).index_select(0, order)  # [BH*L, 1] in memory order
        if r == 0:
            torch.mul(rows, w_r, out=out_rows.flat)
        else:
            out_rows.flat.addcmul_(rows, w_r)
    # weight of each visiting row: round r, position p
    w_vis = weights.view(bh, pb.num_rows).gather(1, pb.sorted_idx)  # [BH, R*L]
    return out, f_vis * w_vis


def _backward_block(
    pb: _Problem, rows_q, rows_k, rows_v, grad: _Rows, scale, delta, grads, number: int, blk, ws: _Workspace
) -> None:
    """Gradients of the block's chunks: their dQ rows and their windows' dK/dV, added into ``grads``."""
    h0, h1, i0, i1 = blk
    nbh, nb, c, w, d = h1 - h0, i1 - i0, pb.c, pb.window, pb.head_dim
    q_blk, k_win, v_win, pos = pb.inputs(rows_q, rows_k, rows_v, blk, ws)
    masks = pb.masks(blk, pos, ws)
    p, _ = _scores(pb, q_blk, k_win, masks, ws, (nbh, nb, c, w))  # [nbh, nb, c, w]
    rows = slice(i0 * c, i1 * c)
    # incoming gradient of each visiting row: scale * dOut[position] (scale = f * round weight)
    b_do = torch.mul(
        _grad_rows(pb, grad, pos, blk, ws), scale[h0:h1, rows].unsqueeze(-1), out=ws("do", nbh, nb * c, d)
    )  # [nbh, nb*c, D]
    _backward_tail(
        pb, q_blk, k_win, v_win, pos, masks, p, b_do, delta[h0:h1, rows].view(nbh, nb, c, 1), grads, number, blk, ws
    )


def _grad_rows(pb: _Problem, grad: _Rows, pos: torch.Tensor | None, blk, ws: _Workspace) -> torch.Tensor:
    """``dOut`` at the block's query rows, in visiting order: ``[nbh, nb*c, D]``."""
    h0, h1, i0, i1 = blk
    c = pb.c
    if pos is None:
        return grad.seq(h0)[i0 * c : i1 * c].unsqueeze(0)  # [1, nb*c, D]
    return grad.gather(pos[:, pb.before * c : pb.before * c + (i1 - i0) * c], h0, ws, "g")  # [nbh, nb*c, D]


def _backward_tail(
    pb: _Problem, q_blk, k_win, v_win, pos, masks: _Masks, p, b_do, delta, grads, number: int, blk, ws: _Workspace
) -> None:
    """From the block's probabilities ``p [nbh, nb, c, w]``, incoming row gradients ``b_do [nbh, nb*c, D]`` and
    ``delta [nbh, nb, c, 1]``: its dQ rows and its windows' dK/dV, added into ``grads``."""
    h0, h1, i0, i1 = blk
    nbh, nb, c, w, d = h1 - h0, i1 - i0, pb.c, pb.window, pb.head_dim
    rows = slice(i0 * c, i1 * c)
    b_do = b_do.view(-1, c, d)  # [G, c, D]
    dp = torch.bmm(b_do, v_win.transpose(1, 2), out=ws("dp", nbh * nb, c, w)).view(nbh, nb, c, w)  # [nbh, nb, c, w]
    p_used = p
    gen = pb.generator(number)
    if gen is not None:
        drop = pb.dropout_mask(gen, p.shape)
        p_used = p * drop
        dp.mul_(drop)
    dv_win = torch.bmm(p_used.view(-1, c, w).transpose(1, 2), b_do, out=ws("dv", nbh * nb, w, d))  # [G, w, D]
    ds = dp.sub_(delta).mul_(p)  # [nbh, nb, c, w]
    # replaced scores are constants: no gradient flows through them
    masks.apply(ds, zero=True)
    ds = ds.view(-1, c, w)
    dq_blk = torch.bmm(ds, k_win, out=ws("dq", nbh * nb, c, d)).view(nbh, nb * c, d)  # [nbh, nb*c, D]
    dk_win = torch.bmm(ds.transpose(1, 2), q_blk, out=ws("dk", nbh * nb, w, d))  # [G, w, D]
    dk_win, dv_win = (g.view(nbh, nb, pb.span, c, d) for g in (dk_win, dv_win))
    # window slot o of chunk i holds visiting chunk i - before + o
    if pos is None:
        # identity order inside one sequence: the results' rows are views
        grads[0].seq(h0)[rows] += dq_blk[0]
        for rows_g, g_win in ((grads[1], dk_win), (grads[2], dv_win)):
            dst = rows_g.seq(h0).view(pb.num_chunks, c, d)
            for o in range(pb.span):
                _add_chunks(dst, i0 - pb.before + o, g_win[0, :, o])
        return
    grads[0].add(pos[:, pb.before * c : pb.before * c + nb * c], h0, dq_blk)
    for rows_g, g_win in ((grads[1], dk_win), (grads[2], dv_win)):
        # sum the slots into the block's run of rows (run chunk i - i0 + o), then add the run
        run = ws("run", nbh, nb + pb.span - 1, c, d).zero_()  # [nbh, run chunks, c, D]
        for o in range(pb.span):
            run[:, o : o + nb] += g_win[:, :, o]
        rows_g.add(pos, h0, run.view(nbh, -1, d))


def _forward_backward_block(
    pb: _Problem, rows_q, rows_k, rows_v, grad: _Rows, out, grads, number: int, blk, ws: _Workspace
) -> None:
    """One hash round: the block's output rows (written into ``out``) and, from the same probabilities, its
    gradients (``delta`` = dOut . Out of its own rows; no second pass over the scores)."""
    h0, h1, i0, i1 = blk
    nbh, nb, c, w, d = h1 - h0, i1 - i0, pb.c, pb.window, pb.head_dim
    q_blk, k_win, v_win, pos = pb.inputs(rows_q, rows_k, rows_v, blk, ws)
    masks = pb.masks(blk, pos, ws)
    p, b_max = _scores(pb, q_blk, k_win, masks, ws, (nbh, nb, c, w))  # [nbh, nb, c, w], [nbh, nb, c, 1]
    f = _lse_and_factor(p, b_max)[1].view(nbh, nb * c, 1)  # [nbh, nb*c, 1]
    o = torch.bmm(p.view(-1, c, w), v_win, out=ws("o", nbh * nb, c, d)).view(nbh, nb * c, d).mul_(f)  # [nbh, nb*c, D]
    rows = slice(i0 * c, i1 * c)
    for j in range(nbh):
        _seq(out, h0 + j, pb.num_heads)[rows] = o[j]
    g_rows = _grad_rows(pb, grad, pos, blk, ws)  # [nbh, nb*c, D]
    delta = torch.linalg.vecdot(g_rows, o).unsqueeze(-1).mul_(f)  # [nbh, nb*c, 1]
    b_do = torch.mul(g_rows, f, out=ws("do", nbh, nb * c, d))  # [nbh, nb*c, D]
    _backward_tail(pb, q_blk, k_win, v_win, pos, masks, p, b_do, delta.view(nbh, nb, c, 1), grads, number, blk, ws)


def chunked_attention_fast_with_grad(
    query: torch.Tensor,
    key: torch.Tensor | None,
    value: torch.Tensor,
    sorted_idx: torch.Tensor | None,
    chunk_length: int,
    num_chunks_before: int,
    num_chunks_after: int,
    causal: bool,
    attention_mask: torch.Tensor | None,
    grad_out: torch.Tensor,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]:
    """``(out, (dq, dk or None, dv))`` for one hash round without dropout, in one pass over the blocks: each
    block's probabilities serve its output rows and their gradients (a row's ``delta = dOut . Out`` needs only
    its own round). The backward of a recomputation (the reversible layers) saves the second pass over the
    scores. Same numbers as ``attention_forward`` + ``attention_backward``."""
    shared_qk = key is None
    pb = _Problem(
        query, sorted_idx, attention_mask, chunk_length, num_chunks_before, num_chunks_after, causal, shared_qk, 0.0, 0
    )
    if pb.num_rounds != 1:
        raise ValueError(f"chunked_attention_fast_with_grad takes one hash round; sorted_idx has {pb.num_rounds}")
    dt = pb.compute_dtype
    rows_q, rows_k, rows_v = _Rows(query), (None if key is None else _Rows(key)), _Rows(value)
    if shared_qk:
        pb.key_rs = _key_rs(pb, rows_q)  # [BH, L]
    grad = _Rows(grad_out.to(dt))
    like = rows_q.x
    out = _forward_out(pb, like)  # the query's layout, or visiting order [BH, L, D]
    dq, dk, dv = _zero_grads(pb, rows_q, rows_k, rows_v)  # [B, H, L, D] each
    grads = (_Rows(dq), _Rows(dk), _Rows(dv))

    def work(blocks, ws):
        for number, blk in blocks:
            _forward_backward_block(pb, rows_q, rows_k, rows_v, grad, out, grads, number, blk, ws)

    _run_blocks(pb, work)
    if not pb.identity:
        out = _combine_rounds(pb, out, None, None, like)[0]
    dq, dk = _key_grads(pb, query, dq, dk)
    return out.to(query.dtype), (dq.to(query.dtype), None if dk is None else dk.to(key.dtype), dv.to(value.dtype))


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
    """Same contract as ``chunked_attention_reference`` (without ``return_probs``); returns ``out``
    in the query's memory layout. Differentiable: the registered op ``reformer_kernels::chunked_attention_fwd``
    (its backward ``chunked_attention_bwd`` replays the dropout from the same seed)."""
    # one draw from torch's default generator per call (torch.manual_seed reproduces the dropout)
    seed = torch.randint(0, 2**62, (1,)) if dropout_p > 0.0 else None
    from . import _fwd_impl  # the package registers the operator

    out, _ = call(
        torch.ops.reformer_kernels.chunked_attention_fwd,
        _fwd_impl,
        query,
        key,
        value,
        sorted_idx,
        attention_mask,
        chunk_length,
        num_chunks_before,
        num_chunks_after,
        causal,
        float(dropout_p),
        seed,
    )
    return out.to(query.dtype)


def problem(
    query: torch.Tensor,
    key: torch.Tensor | None,
    sorted_idx: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    chunk_length: int,
    num_chunks_before: int,
    num_chunks_after: int,
    causal: bool,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
) -> _Problem:
    """The ``_Problem`` of one call of the registered ops (``seed``: the int64 ``[1]`` dropout seed or None)."""
    seed_value = int(seed.item()) if seed is not None and dropout_p > 0.0 else 0
    return _Problem(
        query,
        sorted_idx,
        attention_mask,
        chunk_length,
        num_chunks_before,
        num_chunks_after,
        causal,
        key is None,
        float(dropout_p),
        seed_value,
    )
