"""LoRA adapters through peft on the Qwen2.5-VL policy (``model.lora.*``), the adapter-disabled reference, adapter
checkpoints and the merged export.

- :func:`apply_lora` injects peft LoRA layers (``peft.inject_adapter_in_model``, adapter "default") into the
  decoder's linear layers named by ``target_modules`` — never into the vision blocks, whose MLPs also have
  ``gate_proj``/``up_proj``/``down_proj``, unless ``vision="lora"`` (then every linear layer of the vision blocks,
  ``attn.qkv``/``attn.proj`` included, the merger left out). Only the adapters train: the base weights, the
  embeddings, the LM head and, with ``vision="frozen"``, the whole vision tower get no gradient. The model stays
  the plain HF module (no ``PeftModel`` wrapper), so ``model.forward``, the rollout engines and the strategies run
  it unchanged; the fused head sees a frozen ``lm_head.weight`` and computes no dW.
- :func:`reference`: the frozen reference is the policy's own module with the adapters disabled (as Video-R1's
  trainer with PEFT, through TRL's ``disable_adapter()``): no second copy of the weights. ``dist.wrap_reference``
  runs it through the wrapped policy's forward inside :func:`adapters_disabled`.
- :func:`save_adapter` / :func:`load_adapter`: peft's format (``adapter_config.json`` + ``adapter_model.safetensors``
  with ``base_model.model.`` keys): ``PeftModel.from_pretrained(base, folder)`` loads a checkpoint's ``model/``.
- :func:`export_merged` / ``python -m vr1fast.model.lora --export ADAPTER_DIR --out DIR [--base BASE_DIR]``: the
  base with the adapters merged in (peft's ``merge_and_unload``), an HF folder ``from_pretrained`` loads.

Deviation from Video-R1 (TRL's ``get_peft_config`` + ``get_peft_model``): the same LoRA layers and defaults (r 16,
alpha 32, dropout 0.05, bias none), but a plain list of names there matches every module with that name, the vision
blocks' MLPs included (peft matches name suffixes); here the vision tower is adapted only with ``vision="lora"``.
"""
from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import sys
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from vr1fast.config import LoraConfig
from vr1fast.dist.wrapped import SharedReference
from vr1fast.errors import ConfigError, Vr1fastError

ADAPTER = "default"                      # peft's default adapter name
WEIGHTS_FILE, CONFIG_FILE = "adapter_model.safetensors", "adapter_config.json"
PEFT_PREFIX = "base_model.model."        # PeftModel's key prefix in saved adapters
TOWERS = {"decoder": "model.language_model", "vision": "model.visual.blocks"}


def _peft():
    try:
        import peft
    except ImportError:
        raise ConfigError("model.lora.enabled needs the 'peft' package (pip install 'vr1fast[peft]')") from None
    return peft


def _linear_leaves(model: nn.Module, prefix: str) -> set[str]:
    return {n.rpartition(".")[2] for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.startswith(prefix + ".")}


def target_pattern(model: nn.Module, cfg: LoraConfig) -> str:
    """peft's ``target_modules`` as one regular expression (peft full-matches it against module names): the decoder's
    linear layers named in ``cfg.target_modules`` and, with ``vision="lora"``, every linear layer of the vision
    blocks. A name that matches no linear layer of the decoder is a ConfigError naming it."""
    decoder = _linear_leaves(model, TOWERS["decoder"])
    if not cfg.target_modules:
        raise ConfigError("model.lora.target_modules is empty: name the decoder linear layers to adapt")
    for name in cfg.target_modules:
        if name not in decoder:
            raise ConfigError(f"model.lora.target_modules: {name!r} matches no linear layer of the language model "
                              f"(it has {sorted(decoder)})")
    towers = {TOWERS["decoder"]: sorted(cfg.target_modules)}
    if cfg.vision == "lora":
        towers[TOWERS["vision"]] = sorted(_linear_leaves(model, TOWERS["vision"]))
    return "|".join(rf"{re.escape(prefix)}\..*\.(?:{'|'.join(map(re.escape, names))})"
                    for prefix, names in towers.items())


def apply_lora(model: nn.Module, cfg: LoraConfig, base: Optional[Union[str, Path]] = None) -> nn.Module:
    """Inject LoRA adapters into ``model`` in place (lora_B = 0: the model computes as before) and leave only them
    trainable; ``base`` (the base model's folder, or None for the tiny random model) is recorded in the adapter
    config for :func:`export_merged`. Returns ``model``."""
    peft = _peft()
    config = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
                             target_modules=target_pattern(model, cfg), task_type="CAUSAL_LM",
                             base_model_name_or_path=None if base is None else str(base))
    peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    return model


def is_lora(model: nn.Module) -> bool:
    return ADAPTER in (getattr(model, "peft_config", None) or {})


def _tuner_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Every LoRA layer of ``model`` computes its base layer only inside the block (what peft's
    ``disable_adapter`` does to the forward); enabled again after, also on an error.

    The layers' own flag is set, not ``enable_adapters(False)``: that also flips the adapters' ``requires_grad``,
    and FSDP2 creates each unsharded parameter once, copying the flag of the moment, so a first unshard inside the
    block would leave the adapters untrainable for good."""
    layers = _tuner_layers(model)
    saved = [layer.disable_adapters for layer in layers]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer, flag in zip(layers, saved):
            layer._disable_adapters = flag


def reference(model: nn.Module) -> SharedReference:
    """The frozen reference of a LoRA run: ``model`` itself with its adapters disabled."""
    return SharedReference(model, lambda: adapters_disabled(model))


def save_adapter(model: nn.Module, state_dict: dict[str, torch.Tensor], folder: Union[str, Path]) -> Path:
    """Write the adapters of ``state_dict`` (``model``'s full weights under HF keys, ``dist.full_state_dict``) and
    the adapter config into ``folder`` in peft's format."""
    from safetensors.torch import save_file
    peft, folder = _peft(), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    adapters = peft.get_peft_model_state_dict(model, state_dict=state_dict, adapter_name=ADAPTER)
    save_file({PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in adapters.items()},
              folder / WEIGHTS_FILE, metadata={"format": "pt"})
    model.peft_config[ADAPTER].save_pretrained(folder)
    return folder


def load_adapter(model: nn.Module, folder: Union[str, Path]) -> nn.Module:
    """Copy the adapter weights saved in ``folder`` (peft's format) into ``model``'s adapters, all of them and
    nothing else, in ``model``'s dtypes; a ConfigError naming the folder when they do not fit."""
    from safetensors.torch import load_file
    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise ConfigError(f"{folder}: no {WEIGHTS_FILE}: not a LoRA checkpoint (model.lora.enabled is true)")
    saved = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(path).items()}
    try:
        result = _peft().set_peft_model_state_dict(model, saved, adapter_name=ADAPTER)
    except RuntimeError as e:
        raise ConfigError(f"{path}: adapters do not fit the model (model.lora.rank?): "
                          f"{str(e).strip().splitlines()[-1].strip()}") from None
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise ConfigError(f"{path}: adapters do not match model.lora.target_modules / vision: missing "
                          f"{missing[:3]}, unexpected {list(result.unexpected_keys)[:3]}")
    return model


def export_merged(adapter_dir: Union[str, Path], out_dir: Union[str, Path],
                  base: Optional[Union[str, Path]] = None) -> Path:
    """The base model (``base``, else the folder the adapter config names) with the adapters of ``adapter_dir``
    merged into its weights, saved as an HF folder in the base's dtype with the tokenizer/processor files of
    ``adapter_dir`` (a checkpoint's ``model/``) or of the base."""
    from transformers import Qwen2_5_VLForConditionalGeneration as QwenVL
    peft, adapter_dir, out = _peft(), Path(adapter_dir), Path(out_dir)
    if not (adapter_dir / CONFIG_FILE).is_file():
        raise ConfigError(f"{adapter_dir}: no {CONFIG_FILE} (expected a LoRA checkpoint's model/ folder)")
    base = base or peft.LoraConfig.from_pretrained(adapter_dir).base_model_name_or_path
    if not base:
        raise ConfigError(f"{adapter_dir}: its adapter config names no base model folder; pass --base")
    model = QwenVL.from_pretrained(base, local_files_only=True)
    merged = peft.PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    merged.save_pretrained(out)
    for source in (adapter_dir, Path(base)):
        for file in source.iterdir():
            if file.is_file() and not file.name.startswith("adapter_") and not (out / file.name).exists() \
                    and file.suffix in (".json", ".jinja", ".txt", ".model"):
                shutil.copy2(file, out / file.name)
    return out


def main(argv: Optional[list[str]] = None) -> None:
    """``python -m vr1fast.model.lora --export ADAPTER_DIR --out DIR [--base BASE_DIR]``."""
    parser = argparse.ArgumentParser(prog="vr1fast.model.lora", description=export_merged.__doc__)
    parser.add_argument("--export", required=True, metavar="ADAPTER_DIR", help="a LoRA checkpoint's model/ folder")
    parser.add_argument("--out", required=True, help="the merged HF folder to write")
    parser.add_argument("--base", default=None, help="the base model folder (default: the adapter config's)")
    args = parser.parse_args(argv)
    try:
        out = export_merged(args.export, args.out, args.base)
    except (Vr1fastError, FileNotFoundError, OSError) as e:
        print(f"vr1fast.model.lora: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    print(f"merged {args.export} into {out}", flush=True)


if __name__ == "__main__":
    main()
