"""Benchmarks against common baselines: ``python -m benchmarks.NAME`` writes results/NAME.json
and a PNG; ``python -m benchmarks.update_readme_table`` renders all results as a table."""
