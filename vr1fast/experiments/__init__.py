"""Experiments that measure what the training recipe does, each one command (``python -m vr1fast.experiments.<name>``)."""
