"""The backend switch: context-local choice, process default, environment variable, kernel support.

Without a GPU the kernels run under the Triton interpreter (``tests/conftest.py``).
"""

import importlib
import os
import subprocess
import sys

import pytest
import torch

import reformer_kernels
from reformer_kernels import bucket_sort


def test_backend_switch(monkeypatch):
    assert reformer_kernels.get_backend() in ("auto", "torch", "triton")
    with reformer_kernels.backend("torch"):
        assert reformer_kernels.get_backend() == "torch"
        with reformer_kernels.backend("triton"):
            assert reformer_kernels.get_backend() == "triton"
        assert reformer_kernels.get_backend() == "torch"
    reformer_kernels.set_backend("TORCH")
    assert reformer_kernels.get_backend() == "torch"
    with pytest.raises(ValueError, match="backend name"):
        reformer_kernels.set_backend("cuda")
    with pytest.raises(TypeError, match="backend name"):
        reformer_kernels.set_backend(3)


def test_auto_backend_uses_torch_for_cpu_tensors(monkeypatch):
    from reformer_kernels.backend import use_triton

    reformer_kernels.set_backend("auto")
    assert use_triton(torch.zeros(1)) is False
    reformer_kernels.set_backend("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        use_triton(torch.zeros(1))


def test_backend_env_var_is_validated():
    code = "import reformer_kernels; print(reformer_kernels.get_backend())"
    assert _run_python(code, "torch").stdout.strip() == "torch"
    result = _run_python(code, "gpu")
    assert result.returncode != 0 and "REFORMER_BACKEND" in result.stderr


def test_auto_backend_falls_back_when_the_kernel_does_not_support_the_call():
    from reformer_kernels.backend import triton_available, use_triton

    class CudaLike:
        is_cuda = True

    reformer_kernels.set_backend("auto")
    assert use_triton(CudaLike(), unsupported=lambda: "no reason needed here") is False
    assert use_triton(CudaLike(), unsupported=lambda: None) is triton_available()
    reformer_kernels.set_backend("torch")
    assert use_triton(CudaLike(), unsupported=lambda: None) is False


def test_triton_backend_raises_the_kernels_reason():
    """README: on backend ``triton`` a call the kernel does not support is a ValueError that says why."""
    from reformer_kernels.backend import triton_available, use_triton

    class CudaLike:
        is_cuda = True

    if not triton_available():
        pytest.skip("needs Triton")
    with reformer_kernels.backend("triton"), pytest.raises(ValueError, match="backend 'triton': head_dim too large"):
        use_triton(CudaLike(), unsupported=lambda: "head_dim too large")


def _run_python(code: str, backend_env: str | None) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter importing this checkout, with ``REFORMER_BACKEND`` set (or unset: None)."""
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": os.pathsep.join(sys.path)}
    if backend_env is not None:
        env["REFORMER_BACKEND"] = backend_env
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


@pytest.mark.parametrize("value, expected", [(None, "auto"), ("", "auto"), ("  ", "auto"), (" Triton ", "triton")])
def test_backend_env_var_unset_or_empty_means_auto(value, expected, monkeypatch):
    """``REFORMER_BACKEND=`` (empty) is the same as unset: auto (it used to be an import error)."""
    backend_module = importlib.import_module("reformer_kernels.backend")

    if value is None:
        monkeypatch.delenv("REFORMER_BACKEND", raising=False)
    else:
        monkeypatch.setenv("REFORMER_BACKEND", value)
    assert backend_module._default_from_environment() == expected


def test_backend_choice_is_context_local_across_threads():
    """A thread inside ``with backend("torch")`` keeps running torch while another thread switches to
    triton inside its own block (the switch used to be one process-global variable), and
    ``set_backend`` changes only the default of contexts that made no choice."""
    import threading

    barrier = threading.Barrier(2, timeout=30)
    seen: dict[str, list[str]] = {"torch": [], "triton": []}

    def worker(name: str) -> None:
        with reformer_kernels.backend(name):
            barrier.wait()  # both threads are inside their blocks
            seen[name].append(reformer_kernels.get_backend())
            barrier.wait()  # both have read their choice while the other block is open
            reformer_kernels.set_backend("auto")  # the process default: does not change this block
            seen[name].append(reformer_kernels.get_backend())

    reformer_kernels.set_backend("torch")
    threads = [threading.Thread(target=worker, args=(name,)) for name in ("torch", "triton")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen == {"torch": ["torch", "torch"], "triton": ["triton", "triton"]}
    # no block here: the process default set by the threads
    assert reformer_kernels.get_backend() == "auto"
    # a thread that chose nothing runs the process default, not another thread's block
    reformer_kernels.set_backend("torch")
    result: list[str] = []
    with reformer_kernels.backend("triton"):
        thread = threading.Thread(target=lambda: result.append(reformer_kernels.get_backend()))
        thread.start()
        thread.join()
    assert result == ["torch"]


def test_ops_dispatch_on_the_context_local_backend(monkeypatch):
    """The op itself (not only ``get_backend``) follows its thread's block: a bucket sort inside
    ``with backend("torch")`` does not run the Triton kernel while another thread's block selects it."""
    import threading

    sort_op = importlib.import_module("reformer_kernels.ops.bucket_sort")
    sort_triton = importlib.import_module("reformer_kernels.ops.bucket_sort.triton")
    barrier = threading.Barrier(2, timeout=30)
    calls: list[str] = []

    def fake_triton_sort(buckets, num_bins, check=True):
        calls.append(threading.current_thread().name)
        return sort_op.bucket_sort_reference(buckets, num_bins)

    monkeypatch.setattr(sort_triton, "bucket_sort_triton", fake_triton_sort)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors may go to Triton on backend triton
    ids = torch.randint(0, 4, (1, 1, 8))

    def worker(name: str) -> None:
        with reformer_kernels.backend(name):
            barrier.wait()
            bucket_sort(ids, 4)
            barrier.wait()

    threads = [threading.Thread(target=worker, args=(name,), name=name) for name in ("torch", "triton")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls == ["triton"]
