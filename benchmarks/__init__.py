"""Benchmarks comparing this project's preprocessing, batching and loading with common baselines.

Each module runs as ``python -m benchmarks.NAME`` and writes ``benchmarks/results/NAME.json``
plus a PNG plot; ``python -m benchmarks.update_readme_table`` renders all results as a table.
"""
