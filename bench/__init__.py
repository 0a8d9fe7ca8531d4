"""Benchmarks, run on demand (never by pytest); see bench/README.md."""
