import os

# Triton kernels run in the interpreter on CPU tensors; the knob is read lazily, so setting it before any
# kernel module is imported is enough.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
