"""The pytest-benchmark suites of reformer-kernels (``test_bench_*.py``; not installed).

They use ``reformer.bench.harness`` (the model presets, the implementations compared and the timing and
memory measurement), which the ``reformer-bench`` CLI (``reformer.bench.cli``) uses too.
"""
