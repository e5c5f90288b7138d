"""Benchmarks of reformer-kernels: pytest-benchmark suites (``test_bench_*.py``) and the ``reformer-bench`` CLI.

``harness.py`` holds what both use: the model presets, the three model implementations compared
(this package's model, transformers' Reformer on the same weights, dense attention on the same
weights), timing and peak-memory measurement.
"""
