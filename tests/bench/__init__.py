"""Benchmarks: plain scripts (``python -m tests.bench.<name>``), not collected by pytest."""
