"""Benchmarks: ``python -m benchmarks [NAME ...]`` runs ``bench_NAME.py`` modules and writes JSON."""
