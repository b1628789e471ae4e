"""Benchmarks: ``python -m bench.<name>`` prints a baseline beside ours and their ratio."""
