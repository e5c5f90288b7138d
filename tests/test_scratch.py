"""reformer_kernels.scratch: buffers reused inside a scope, fresh outside, scopes restored."""

from __future__ import annotations

import threading

import torch

from reformer_kernels.scratch import scratch_active, scratch_empty, scratch_scope


def test_fresh_outside_a_scope():
    assert not scratch_active()
    a = scratch_empty("x", (4, 3), torch.float32, torch.device("cpu"))
    b = scratch_empty("x", (4, 3), torch.float32, torch.device("cpu"))
    assert a.data_ptr() != b.data_ptr()


def test_reused_inside_a_scope_per_slot_shape_and_dtype():
    with scratch_scope():
        assert scratch_active()
        a = scratch_empty("x", (4, 3), torch.float32, "cpu")
        assert scratch_empty("x", (4, 3), torch.float32, "cpu").data_ptr() == a.data_ptr()
        others = [
            scratch_empty("y", (4, 3), torch.float32, "cpu"),
            scratch_empty("x", (3, 4), torch.float32, "cpu"),
            scratch_empty("x", (4, 3), torch.float64, "cpu"),
        ]
        assert len({a.data_ptr(), *(t.data_ptr() for t in others)}) == 4
        with scratch_scope():
            # a nested scope has its own buffers, and the outer ones come back after it
            assert scratch_empty("x", (4, 3), torch.float32, "cpu").data_ptr() != a.data_ptr()
        assert scratch_empty("x", (4, 3), torch.float32, "cpu").data_ptr() == a.data_ptr()
    assert not scratch_active()


def test_scopes_are_per_thread():
    seen = []
    with scratch_scope():
        thread = threading.Thread(target=lambda: seen.append(scratch_active()))
        thread.start()
        thread.join()
    assert seen == [False]
