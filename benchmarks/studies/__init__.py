"""Research studies: one-off questions asked of a finished work folder (``python -m benchmarks.studies``).

Unlike the product benchmarks (``benchmarks/bench_*.py``), a study measures a lever or diagnoses a
result on a work folder that a full run already made; its answers live beside the run they concern
in ``benchmarks/results/`` and are summarised in docs/RESULTS.md.
"""
