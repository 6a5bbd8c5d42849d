"""Qwen2.5-VL models: a real checkpoint from a local folder, the tiny random model, and the frozen reference.

- ``load_model(path)``: ``Qwen2_5_VLForConditionalGeneration`` + its tokenizer from a local HF folder (no hub);
  prompts render with the folder's processor chat template (``chat_template.json``) when it has one.
  The HF processor is not loaded: its video half needs torchvision, which has no CPU build that works beside
  transformers; pixels come from ``vr1fast.data.processor`` with the patch sizes of ``model.config.vision_config``
  (patch 14, temporal patch 2, merge 2 for every Qwen2.5-VL size).
- ``tiny_model(seed)``: the same architecture at toy size (about 0.3M parameters): text hidden 64, 2 layers,
  4 heads of dim 16 (2 KV heads), M-RoPE sections [2, 3, 3] (sum = head_dim / 2); vision depth 2, hidden 32,
  ``out_hidden_size`` = 64 = text hidden, window attention on block 0 and full attention on block 1 as in
  Qwen2.5-VL. Embeddings are **untied** (``lm_head.weight`` is its own parameter) as in Qwen2.5-VL-7B (3B ties
  them). Token ids come from ``vr1fast.model.tokenizer``; the vocabulary is padded to a multiple of 64 like
  Qwen's (151,665 tokens in 152,064 rows). Its ``generation_config`` mirrors Qwen2.5-VL-Instruct's special
  tokens (eos = [<|im_end|>, <|endoftext|>], pad = bos = <|endoftext|>).
- ``reference_model(policy_or_path, beta)``: the frozen initial policy for the k3 KL term (Video-R1 loads a
  second copy of the starting checkpoint and never updates it); ``None`` when β = 0.
- ``build_models(cfg, ...)`` with ``model.lora.enabled``: the base with peft LoRA adapters (``vr1fast.model.lora``);
  the reference is the policy with its adapters disabled, as Video-R1 with PEFT.

Every loader takes ``rope_positions`` ("videor1", the default: Video-R1's transformers 4.x M-RoPE positions, or
"transformers": the installed 5.x ones; ``vr1fast.model.rope``); a deep copy keeps the choice.
Every loader also makes each vision attention layer one attention call instead of HF's loop over windows
(``vr1fast.model.vision``); a deep copy stays so.

dtype "auto" is bf16 on CUDA (Video-R1 trains in bf16) and fp32 on CPU; attention "auto" is FlashAttention-2
when ``flash_attn`` is importable and the device is CUDA (as Video-R1's scripts set), SDPA otherwise.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import json
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn
from transformers import AutoConfig, AutoTokenizer, GenerationConfig, Qwen2_5_VLConfig
from transformers import Qwen2_5_VLForConditionalGeneration as QwenVL

from vr1fast.config import ModelConfig
from vr1fast.dist import rank0
from vr1fast.errors import ConfigError
from vr1fast.model import lora
from vr1fast.model.qwen import TINY_TEXT, TINY_VISION
from vr1fast.model.rope import RopePositions, use_rope_positions
from vr1fast.model.tokenizer import MODEL_VOCAB_SIZE, build_tiny_tokenizer, token_ids
from vr1fast.model.vision import use_batched_vision_attention


DtypeLike = Union[str, torch.dtype]


def resolve_dtype(dtype: DtypeLike, device: Optional[Union[str, torch.device]] = None) -> torch.dtype:
    """``"auto"`` → bf16 on CUDA, fp32 elsewhere; a name ("bfloat16") or a torch dtype as given."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device or "cpu").type == "cuda" else torch.float32
    if not isinstance(getattr(torch, str(dtype), None), torch.dtype):
        raise ValueError(f"model dtype: unknown dtype {dtype!r}")
    return getattr(torch, dtype)


def resolve_attn(attn_implementation: str, device: Optional[Union[str, torch.device]] = None) -> str:
    """``"auto"`` → ``flash_attention_2`` when flash-attn is importable on a CUDA device, else ``sdpa``."""
    if attn_implementation != "auto":
        return attn_implementation
    on_cuda = torch.device(device or "cpu").type == "cuda"
    return "flash_attention_2" if on_cuda and importlib.util.find_spec("flash_attn") else "sdpa"


def tiny_config(tokenizer, vocab_size: int = MODEL_VOCAB_SIZE, init_std: float = 0.02) -> Qwen2_5_VLConfig:
    """The tiny Qwen2.5-VL config with the token ids of ``tokenizer`` (see the module docstring for sizes).

    ``init_std`` is the normal-init std of every weight (Qwen's ``initializer_range`` 0.02); tests use a larger
    one for peaked, position-sensitive logits.
    """
    ids = token_ids(tokenizer)
    if vocab_size < len(tokenizer):
        raise ValueError(f"tiny_config: vocab_size {vocab_size} < tokenizer size {len(tokenizer)}")
    text = dict(TINY_TEXT, vocab_size=vocab_size, initializer_range=init_std, **ids.text_config_kwargs())
    vision = dict(TINY_VISION, initializer_range=init_std)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                            initializer_range=init_std, **ids.config_kwargs())


def _generation_config(tokenizer) -> GenerationConfig:
    ids = token_ids(tokenizer)
    return GenerationConfig(bos_token_id=ids.pad, eos_token_id=[ids.eos, ids.pad], pad_token_id=ids.pad)


def tiny_model(seed: int = 0, *, dtype: DtypeLike = torch.float32, attn_implementation: str = "sdpa",
               device: Optional[Union[str, torch.device]] = None, tokenizer=None, init_std: float = 0.02,
               rope_positions: RopePositions = "videor1"):
    """A randomly initialised tiny Qwen2.5-VL and its tokenizer: ``(model, tokenizer)``.

    The weights depend only on ``seed`` (drawn on CPU in fp32 under a forked RNG, so the global RNG is left
    alone), then the model is cast to ``dtype`` and moved to ``device``; ``device="meta"`` builds it there (no
    weights: rank-0 loading, ``vr1fast.dist.rank0``).
    """
    tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer()
    config = tiny_config(tokenizer, init_std=init_std)
    meta = torch.device(device or "cpu").type == "meta"
    with torch.random.fork_rng(devices=[]), torch.device("meta") if meta else contextlib.nullcontext():
        torch.manual_seed(seed)
        model = QwenVL._from_config(config, attn_implementation=resolve_attn(attn_implementation, device),
                                    dtype=torch.float32)
    model.generation_config = _generation_config(tokenizer)
    model.to(device=device or "cpu", dtype=resolve_dtype(dtype, device))
    use_batched_vision_attention(model)
    return use_rope_positions(model, rope_positions), tokenizer


def save_tiny(out_dir: Union[str, Path], seed: int = 0) -> Path:
    """Write the tiny model and tokenizer as an HF folder (safetensors, config, tokenizer, chat template)."""
    out = Path(out_dir)
    model, tokenizer = tiny_model(seed)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def checkpoint_config(path: Union[str, Path]):
    """The config of a local Qwen2.5-VL checkpoint folder, no weights read. A folder without config.json is a
    FileNotFoundError, another model type a ConfigError, both naming the folder (never HF's hub-id error)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model path {path}: no config.json (expected a local HF Qwen2.5-VL folder)")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if config.model_type != "qwen2_5_vl":
        raise ConfigError(f"model path {path}: model_type {config.model_type!r} is not qwen2_5_vl")
    return config


def load_model(path: Union[str, Path], *, dtype: DtypeLike = "auto", attn_implementation: str = "auto",
               device: Optional[Union[str, torch.device]] = None, rope_positions: RopePositions = "videor1"):
    """``(model, tokenizer)`` from a local Qwen2.5-VL checkpoint folder (offline; nothing is downloaded).
    ``device="meta"``: the architecture only, no weight read (rank-0 loading, ``vr1fast.dist.rank0``)."""
    path = Path(path)
    config = checkpoint_config(path)
    if torch.device(device or "cpu").type == "meta":
        with torch.device("meta"):
            model = QwenVL._from_config(config, attn_implementation=resolve_attn(attn_implementation, device),
                                        dtype=resolve_dtype(dtype, device))
        if (path / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(path)
    else:
        model = QwenVL.from_pretrained(path, dtype=resolve_dtype(dtype, device), local_files_only=True,
                                       attn_implementation=resolve_attn(attn_implementation, device))
    use_batched_vision_attention(model)
    return use_rope_positions(model.to(device or "cpu"), rope_positions), load_tokenizer(path)


def load_tokenizer(path: Union[str, Path]):
    """The tokenizer of a checkpoint folder, rendering prompts with the *processor's* chat template when the folder
    has one (``chat_template.json``): Video-R1 renders with ``processor.apply_chat_template``, and a folder saved
    by a processor may keep the template only there. ValueError naming the folder when it has no template at all.
    """
    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    processor_template = path / "chat_template.json"
    if processor_template.is_file():
        try:
            tokenizer.chat_template = json.loads(processor_template.read_text())["chat_template"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"model path {path}: chat_template.json has no readable 'chat_template': {e}") from None
    if not tokenizer.chat_template:
        raise ValueError(f"model path {path}: no chat template (neither in the tokenizer files nor chat_template.json)")
    return tokenizer


def build_model(cfg: ModelConfig, device: Optional[Union[str, torch.device]] = None):
    """The policy named by ``cfg`` (tiny when ``cfg.path`` is None) with the training switches applied.

    Gradient checkpointing uses ``use_reentrant=False`` (as Video-R1's SFT; its RL trainer uses HF's default);
    ``freeze_vision`` stops gradients into the vision tower. The model is returned in train mode, as HF Trainer
    puts Video-R1's policy: ``from_pretrained`` returns eval mode, where HF skips activation checkpointing.
    """
    if cfg.path is None:
        model, tokenizer = tiny_model(cfg.tiny_seed, dtype=resolve_dtype(cfg.dtype, device),
                                      attn_implementation=cfg.attn_implementation, device=device,
                                      rope_positions=cfg.rope_positions)
    else:
        model, tokenizer = load_model(cfg.path, dtype=cfg.dtype, attn_implementation=cfg.attn_implementation,
                                      device=device, rope_positions=cfg.rope_positions)
    if cfg.gradient_checkpointing:
        set_checkpointing(model, True)
    if cfg.freeze_vision:
        model.model.visual.requires_grad_(False)
    return model.train(), tokenizer


def set_checkpointing(model, enable: bool) -> None:
    """Activation (gradient) checkpointing on the decoder and vision blocks, ``use_reentrant=False``.

    Recent transformers 5 releases name it ``activation_checkpointing_*``, older ones ``gradient_checkpointing_*``.
    """
    prefix = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"
    if enable:
        getattr(model, f"{prefix}_checkpointing_enable")({"use_reentrant": False})
    else:
        getattr(model, f"{prefix}_checkpointing_disable")()


def is_checkpointing(model) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode, no gradients, no checkpointing: a module used only under ``torch.no_grad``."""
    if is_checkpointing(model):
        set_checkpointing(model, False)
    model.eval()
    model.requires_grad_(False)
    return model


def reference_model(source: Union[nn.Module, str, Path], *, beta: float, dtype: DtypeLike = "auto",
                    attn_implementation: str = "auto", device: Optional[Union[str, torch.device]] = None,
                    rope_positions: RopePositions = "videor1"):
    """The frozen reference policy for the KL term, or ``None`` when ``beta == 0`` (nothing is built).

    ``source`` is the policy itself (deep-copied: build the reference before wrapping the policy in
    DDP/FSDP/DeepSpeed; the copy keeps the policy's M-RoPE positions) or a checkpoint folder (loaded again, as
    Video-R1 does, with ``rope_positions``).
    """
    if beta == 0:
        return None
    if isinstance(source, nn.Module):
        return freeze(copy.deepcopy(source))
    return freeze(load_model(source, dtype=dtype, attn_implementation=attn_implementation, device=device,
                             rope_positions=rope_positions)[0])


def load_weights(model: nn.Module, path: Union[str, Path]) -> nn.Module:
    """Copy the weights of a saved checkpoint folder (read with ``from_pretrained``, which maps the saved names)
    into ``model`` of the same architecture, strictly, in its dtype and on its device; returns it. A model on the
    meta device is returned untouched (rank-0 loading: rank 0 reads the folder)."""
    if any(p.is_meta for p in model.parameters()):
        return model
    saved = QwenVL.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    model.load_state_dict(saved.state_dict())
    return model


def build_models(cfg: ModelConfig, *, beta: float, dtype: str, attn: str, init: Optional[Path] = None,
                 warm: Optional[Path] = None):
    """``(policy, reference or None, tokenizer)`` for a run, on the CPU, in ``dtype`` with attention ``attn``.

    The policy comes from ``init`` (a checkpoint's model folder, when resuming) or the configured source; the
    reference (β ≠ 0) always from the configured source: it is the frozen *initial* policy. ``warm`` (the demo's
    warm-started tiny model) overrides the configured source's weights: in the reference, and in the policy
    unless it is resumed. With ``model.lora.enabled`` see :func:`_lora_models`. Under rank-0 loading (DDP / FSDP2
    with several ranks, ``vr1fast.dist.rank0``) ranks other than 0 build both on the meta device and read nothing."""
    device = "meta" if rank0.builds_on_meta() else "cpu"
    if cfg.lora.enabled:
        return _lora_models(cfg, beta=beta, dtype=dtype, attn=attn, init=init, warm=warm, device=device)
    source = dataclasses.replace(cfg, dtype=dtype, attn_implementation=attn,
                                 path=str(init) if init else cfg.path)
    policy, tokenizer = build_model(source, device=device)
    if warm is not None and init is None:
        load_weights(policy, warm)
    if beta == 0:
        return policy, None, tokenizer
    if cfg.path is None:
        ref = tiny_model(cfg.tiny_seed, dtype=dtype, tokenizer=tokenizer, attn_implementation=attn,
                         rope_positions=cfg.rope_positions, device=device)[0]
    else:
        ref = load_model(cfg.path, dtype=dtype, attn_implementation=attn, device=device,
                         rope_positions=cfg.rope_positions)[0]
    if warm is not None:
        load_weights(ref, warm)
    return policy, freeze(ref), tokenizer


def _lora_models(cfg: ModelConfig, *, beta: float, dtype: str, attn: str, init: Optional[Path],
                 warm: Optional[Path], device: str):
    """LoRA: the base is always the configured source (with ``warm``'s weights), the adapters come fresh
    (``lora_B`` = 0) or from ``init`` (a LoRA checkpoint's model folder holds adapters only); the reference is the
    policy itself with its adapters disabled (``model.lora.reference``), not a second model."""
    policy, tokenizer = build_model(dataclasses.replace(cfg, dtype=dtype, attn_implementation=attn), device=device)
    if warm is not None:
        load_weights(policy, warm)
    lora.apply_lora(policy, cfg.lora, base=warm or cfg.path)
    if init is not None and device != "meta":
        lora.load_adapter(policy, init)
    return policy, (None if beta == 0 else lora.reference(policy)), tokenizer


def text_hidden_size(cfg: ModelConfig) -> int:
    """The text hidden size of the configured model, read from config.json (no weights loaded)."""
    if cfg.path is None:
        return TINY_TEXT["hidden_size"]
    return checkpoint_config(cfg.path).text_config.hidden_size
