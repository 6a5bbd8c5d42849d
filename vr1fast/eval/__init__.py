"""Benchmark evaluation as Video-R1's ``src/eval_bench.py`` does it (``python -m vr1fast.eval``, :mod:`.run`), plus
the ordered − shuffled gap and the held-out evaluation inside training (:mod:`.heldout`). ``scoring`` holds the
per-item rules and the benchmark means (VSI-Bench's combination included), ``benchmarks`` the files and the synthetic
held-out set, ``answer`` one batch of items through ``vr1fast.rollout.generate``, ``results`` the resumable rows, the
summaries and the table."""
