"""The whole model on the Triton backend (interpreter on CPU): equal to the torch backend with a
3-axis axial embedding in train and eval, and no host synchronisation in the forward."""

from __future__ import annotations

import os
import sys

import pytest
import torch

import reformer
import reformer_kernels

pytestmark = pytest.mark.skipif(not reformer_kernels.triton_available(), reason="Triton is not installed")

CONFIG = dict(
    vocab_size=37,
    hidden_size=32,
    num_attention_heads=2,
    attention_head_size=16,
    feed_forward_size=40,
    attn_layers=["local", "lsh", "local"],
    num_hashes=2,
    num_buckets=[2, 4],
    lsh_attn_chunk_length=16,
    local_attn_chunk_length=16,
    lsh_num_chunks_before=1,
    local_num_chunks_before=1,
    axial_pos_shape=[2, 4, 8],
    axial_pos_embds_dim=[8, 8, 16],
    max_position_embeddings=64,
    hash_seed=5,
    hidden_dropout_prob=0.0,
    local_attention_probs_dropout_prob=0.0,
    lsh_attention_probs_dropout_prob=0.0,
    is_decoder=True,
    pad_token_id=0,
    eos_token_id=2,
)


def _model(device):
    torch.manual_seed(0)
    model = reformer.ReformerModelWithLMHead(reformer.ReformerConfig(**CONFIG)).to(device)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layer_norm" in name or "position_embeddings" in name or name.endswith("lm_head.decoder.bias"):
                param.normal_(mean=1.0 if name.endswith("layer_norm.weight") else 0.0, std=0.5)
    return model


def _run(model, ids, backend, train):
    model.train(train)
    model.zero_grad()
    with reformer_kernels.backend(backend):
        out = model(ids, labels=ids)
        out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


@pytest.mark.parametrize(
    "train,length", [(True, 64), (False, 64), (False, 40)], ids=["train-L64", "eval-L64", "eval-L40-padded"]
)
def test_three_axis_model_triton_equals_torch(device, train, length):
    model = _model(device)
    ids = torch.randint(3, 37, (2, length), generator=torch.Generator().manual_seed(1)).to(device)
    logits_torch, grads_torch = _run(model, ids, "torch", train)
    logits_triton, grads_triton = _run(model, ids, "triton", train)
    assert (logits_triton - logits_torch).abs().max().item() <= 1e-4
    assert grads_torch.keys() == grads_triton.keys() and len(grads_torch) == len(
        [p for p in model.parameters() if p.requires_grad]
    )
    for name, want in grads_torch.items():
        got = grads_triton[name]
        assert (got - want).norm() <= 1e-4 * want.norm() + 1e-7, name


# Reading a tensor's value on the host is a synchronisation point on CUDA. These are the only
# places the Triton-path forward may do it, each on CPU tensors only: id-range and permutation validation (their
# CUDA branches are torch._assert_async) and the dropout seed, drawn from the CPU generator.
_ALLOWED_HOST_READS = {
    ("validation.py", "check_index_range"),
    ("validation.py", "check_permutation"),
    ("fused.py", "_check_ids"),
    ("triton.py", "bucket_sort_triton"),
    ("triton.py", "_draw_seed"),
}
_SYNCING_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy")


def test_triton_forward_has_no_host_synchronisation(device, monkeypatch):
    if device == "cuda":
        pytest.skip("covered by test_triton_forward_has_no_cuda_sync on CUDA")
    model = _model(device).eval()
    ids = torch.randint(3, 37, (2, 64), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    reads: list[tuple[str, str, str]] = []
    allowed: list[tuple[str, str]] = []

    def guard(method_name):
        original = getattr(torch.Tensor, method_name)

        def checked(self, *args, **kwargs):
            frame = sys._getframe(1)
            while frame is not None and "/torch/" in frame.f_code.co_filename:
                frame = frame.f_back  # skip torch-internal frames
            site = (os.path.basename(frame.f_code.co_filename), frame.f_code.co_name) if frame else ("?", "?")
            if site not in _ALLOWED_HOST_READS or self.device.type != "cpu":
                reads.append((*site, method_name))
            else:
                allowed.append(site)
            return original(self, *args, **kwargs)

        return checked

    with torch.no_grad(), reformer_kernels.backend("triton"):
        model(ids, attention_mask=mask)  # warm-up: kernels compiled/traced outside the guard
        for method_name in _SYNCING_METHODS:
            monkeypatch.setattr(torch.Tensor, method_name, guard(method_name))
        model(ids, attention_mask=mask)
        model(ids[:, :40])  # eval padding path
        monkeypatch.undo()
    assert reads == [], f"host reads of tensor values in the Triton forward: {sorted(set(reads))}"
    assert ("validation.py", "check_index_range") in allowed  # the guard was live


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_forward_has_no_cuda_sync():
    model = _model("cuda").eval()
    ids = torch.randint(3, 37, (2, 64), device="cuda")
    with torch.no_grad(), reformer_kernels.backend("triton"):
        model(ids)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            model(ids)
        finally:
            torch.cuda.set_sync_debug_mode("default")
