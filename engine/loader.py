"""Loading a local Hugging Face checkpoint directory (safetensors) into `CausalLM`."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from engine.config import ModelConfig, UnsupportedModel
from engine.model import CausalLM


def load_model(model_dir: Path, device: str, dtype: torch.dtype) -> CausalLM:
    cfg = ModelConfig.from_dir(model_dir)
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise UnsupportedModel(f"{model_dir} has no *.safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f, device="cpu"))
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_word_embeddings or "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    for i in range(cfg.num_layers):
        fuse(state, f"model.layers.{i}.self_attn.", ["q_proj", "k_proj", "v_proj"], "qkv_proj")
        fuse(state, f"model.layers.{i}.mlp.", ["gate_proj", "up_proj"], "gate_up_proj")
    with torch.device("meta"):
        model = CausalLM(cfg)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    return model.to(device).eval()


def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(model_dir))


def fuse(state: dict[str, torch.Tensor], prefix: str, parts: list[str], fused: str) -> None:
    """Concatenate the output rows of linear layers that read the same input into one."""
    for kind in ("weight", "bias"):
        names = [f"{prefix}{p}.{kind}" for p in parts]
        if names[0] in state:
            state[f"{prefix}{fused}.{kind}"] = torch.cat([state.pop(n) for n in names])
