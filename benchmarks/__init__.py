"""Benchmark scripts: figures and ratios measured against a baseline in the same run."""
