"""Benchmarks, run from the repository root as modules: `python -m benchmarks.kda` (see common.py)."""
