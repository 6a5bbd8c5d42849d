"""Benchmark evaluation as Video-R1's ``src/eval_bench.py`` does it. ``scoring`` holds the per-item rules (answer
extraction, multiple choice, numerical, regression by mean relative accuracy) and the benchmark means, including
the VSI-Bench combination."""
