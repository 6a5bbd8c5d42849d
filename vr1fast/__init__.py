"""vr1fast: Video-R1's T-GRPO, kernel-first."""
__version__ = "0.1.0"
