"""Benchmarks of the retrieval engine: ``python -m bench --help`` (see bench/README.md)."""
