"""A tiny offline tokenizer with Qwen2.5-VL's special tokens and chat format, for tests and the demo.

``build_tiny_tokenizer()`` trains a byte-level BPE (``tokenizers``) on a small built-in corpus: Video-R1's prompt
templates, the answer tags, option letters, digits and a few hundred everyday and synthetic-video words. Text
tokens take ids ``0 .. TEXT_VOCAB_SIZE-1``; Qwen2.5-VL's 22 added tokens follow in Qwen's own order (so
``<|endoftext|>`` is the first id after the text vocabulary, as 151643 is in Qwen2.5). Pre-tokenisation is
Qwen2's: NFC, the GPT-4-style split regex with single digits, then byte-level mapping. Training is
deterministic, so every build gives the same ids (tested across processes).

The chat template reproduces the output of Qwen2.5-VL's template: a default system turn
``You are a helpful assistant.`` when the first message is not a system message, ``<|im_start|>{role}\\n ...
<|im_end|>\\n`` per message, ``<|vision_start|><|image_pad|><|vision_end|>`` / ``<|vision_start|><|video_pad|>
<|vision_end|>`` for media entries (optionally prefixed "Picture n: " / "Video n: " with ``add_vision_id``), and
``<|im_start|>assistant\\n`` for the generation prompt. The template is written here, not copied.
"""
from __future__ import annotations

from dataclasses import dataclass

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

TEXT_VOCAB_SIZE = 896       # byte alphabet (256) + 640 BPE merges (the corpus supports up to 995)
MODEL_VOCAB_SIZE = 960      # embedding rows for a tiny model: text vocab + 22 added tokens, rounded up to 64

# Qwen2.5's added tokens in id order. The first 14 are special; the rest are ordinary added tokens.
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
EXTRA_ADDED_TOKENS = (
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
)

# Qwen2's pre-tokeniser split: contractions, letter runs (with one leading non-letter), single digits,
# punctuation runs, newlines, spaces.
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

CHAT_TEMPLATE = (
    "{%- set counts = namespace(image=0, video=0) -%}"
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' or 'image' in item or 'image_url' in item -%}"
    "{%- set counts.image = counts.image + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Picture ' + counts.image|string + ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'video' or 'video' in item -%}"
    "{%- set counts.video = counts.video + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Video ' + counts.video|string + ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in item -%}"
    "{{- item['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

_QUESTION_TEMPLATE = (
    "Please think about this question as if you were a human pondering deeply. Engage in an internal dialogue "
    "using expressions such as 'let me think', 'wait', 'Hmm', 'oh, I see', 'let's break it down', etc, or other "
    "natural language thought expressions It's encouraged to include self-reflection or verification in the "
    "reasoning process. Provide your detailed reasoning between the <think> </think> tags, and then give your "
    "final answer between the <answer> </answer> tags. Provide your detailed reasoning between the <think> and "
    "</think> tags, and then give your final answer between the <answer> and </answer> tags."
)
_TYPE_TEMPLATES = (
    " Please provide only the single option letter (e.g., A, B, C, D, etc.) within the <answer> </answer> tags.",
    " Please provide the numerical value (e.g., 42 or 3.14) within the <answer> </answer> tags.",
    " Please transcribe text from the image/video clearly and provide your text answer within the <answer> "
    "</answer> tags.",
    " Please provide your text answer within the <answer> </answer> tags.",
)
_WORDS = (
    "system user assistant You are a helpful assistant. video image frame frames picture clip scene camera "
    "question answer options option correct wrong true false yes no the a an of in on at to from by with and or "
    "but not is are was were be been has have had do does did what which who where when why how many much "
    "first second third last next previous before after then while during begin end start finish appears "
    "disappears moves moving stops turns rotates enters leaves falls rises jumps rolls slides collides "
    "left right up down top bottom middle center front back inside outside above below near far between "
    "red green blue yellow orange purple black white gray brown pink color colour shape size small large big "
    "tiny square circle triangle star ball cube cylinder sphere box dot line object objects person man woman "
    "child dog cat car table chair door window room kitchen road tree water light dark bright "
    "count number numbers total order sequence time times earlier later faster slower same different more less "
    "most least increase decrease clockwise counterclockwise direction position path motion happen happens "
    "event events action actions reverse forward backward because so therefore I see let me think wait Hmm oh "
    "break it down look carefully again check verify step reasoning final seems likely must should could "
    "would one two three four five six seven eight nine ten zero hundred percent meters seconds minutes "
    "text word letter read written title sign label chart graph table value values mean average sum "
    "zero one 0 1 2 3 4 5 6 7 8 9 10 12 16 32 42 64 100 3.14 0.5 2.5 A. B. C. D. E. F. A B C D E F "
    "Options:\nA. red\nB. blue\nC. green\nD. yellow\n"
)
_TAG_LINES = (
    "<think>\nLet me think. The ball moves left, then right. Wait, I see it again.\n</think>\n<answer>A</answer>",
    "<think>Hmm, count the objects: 1, 2, 3.</think>\n<answer>3</answer>",
    "<think>oh, I see. The red square appears first.</think> <answer>B</answer>",
    "<answer>C</answer> <answer>D</answer> <answer>42</answer> <answer>3.14</answer>",
)

_LINE_STARTS = "system\nuser\nassistant\nWhat\nWhich\nHow\nWhere\nWhen\nWho\nWhy\nIs\nAre\nDoes\nThe\nIn\n" * 3


def _corpus() -> list[str]:
    """The fixed training text; every build sees it in the same order."""
    lines = [_QUESTION_TEMPLATE, *_TYPE_TEMPLATES, _WORDS, *_TAG_LINES, _LINE_STARTS]
    lines += [f"{n} {n * 7 % 101} {n / 4}" for n in range(64)]
    lines += [" ".join(_WORDS.split()[i::5]) for i in range(5)]
    return lines


def _train_bpe() -> Tokenizer:
    tk = Tokenizer(models.BPE())
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TEXT_VOCAB_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[], show_progress=False)
    tk.train_from_iterator(_corpus(), trainer)
    if tk.get_vocab_size() != TEXT_VOCAB_SIZE:
        raise RuntimeError(f"tiny tokenizer corpus gave {tk.get_vocab_size()} tokens, expected {TEXT_VOCAB_SIZE}")
    return tk


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A deterministic 918-token byte-level BPE carrying Qwen2.5-VL's added tokens and chat template.

    eos = ``<|im_end|>``, pad = ``<|endoftext|>`` (Qwen2.5-VL-Instruct's tokenizer settings); no BOS.
    """
    tk = _train_bpe()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in EXTRA_ADDED_TOKENS])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL_TOKENS[1:]), chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False, model_max_length=131072,
    )
    ids = tok.convert_tokens_to_ids(list(SPECIAL_TOKENS + EXTRA_ADDED_TOKENS))
    if ids != list(range(TEXT_VOCAB_SIZE, TEXT_VOCAB_SIZE + len(ids))):
        raise RuntimeError(f"tiny tokenizer added tokens got ids {ids}, expected consecutive from {TEXT_VOCAB_SIZE}")
    return tok


@dataclass(frozen=True)
class TokenIds:
    """The token ids a Qwen2.5-VL config and the data/rollout stages need."""

    pad: int            # <|endoftext|>; also Qwen's bos_token_id in the model config
    eos: int            # <|im_end|>: ends an assistant turn
    im_start: int
    vision_start: int
    vision_end: int
    vision_pad: int     # Qwen's vision_token_id
    image: int          # <|image_pad|>
    video: int          # <|video_pad|>

    def config_kwargs(self) -> dict[str, int]:
        """Top-level ``Qwen2_5_VLConfig`` token-id fields (text_config takes bos/eos/pad)."""
        return dict(image_token_id=self.image, video_token_id=self.video, vision_start_token_id=self.vision_start,
                    vision_end_token_id=self.vision_end, vision_token_id=self.vision_pad)

    def text_config_kwargs(self) -> dict[str, int]:
        return dict(bos_token_id=self.pad, eos_token_id=self.eos, pad_token_id=self.pad)


def token_ids(tokenizer) -> TokenIds:
    """Look up the Qwen2.5-VL token ids in ``tokenizer`` (the tiny one or a real Qwen2.5-VL tokenizer)."""
    names = dict(pad="<|endoftext|>", eos="<|im_end|>", im_start="<|im_start|>", vision_start="<|vision_start|>",
                 vision_end="<|vision_end|>", vision_pad="<|vision_pad|>", image="<|image_pad|>",
                 video="<|video_pad|>")
    found = {}
    for field, token in names.items():
        idx = tokenizer.convert_tokens_to_ids(token)
        if idx is None or idx == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no token {token!r} (needed for {field})")
        found[field] = idx
    return TokenIds(**found)
