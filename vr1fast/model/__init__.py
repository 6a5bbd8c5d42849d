"""Qwen2.5-VL models: ``load`` (real checkpoint, tiny random model, frozen reference), ``forward`` (hidden states on
completion positions only, and Video-R1's full-logits log-probs), ``tokenizer`` (the tiny offline tokenizer).

Import from the submodules; this package module stays empty so that importing the tokenizer stays light.
"""
