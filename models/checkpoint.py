"""Checkpoints: a directory with config.json, dit.safetensors and vae.safetensors (no pickle anywhere)."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vidrt.core.errors import ConfigError
from vidrt.models.config import PRESETS, ModelConfig, preset
from vidrt.models.dit import VideoDiT
from vidrt.models.vae import CausalVAE

TINY_DIR = Path(__file__).resolve().parent / "weights" / "tiny"
FILES = ("config.json", "dit.safetensors", "vae.safetensors")


def save_checkpoint(out_dir: str | Path, cfg: ModelConfig, dit: VideoDiT, vae: CausalVAE,
                    dtype: torch.dtype = torch.float16) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out / "config.json")
    for name, m in (("dit", dit), ("vae", vae)):
        sd = {k: v.detach().to(dtype).contiguous() for k, v in m.state_dict().items()}
        save_file(sd, str(out / f"{name}.safetensors"), metadata={"model": cfg.name, "part": name})
    return out


def _load_into(module: torch.nn.Module, path: Path) -> None:
    sd = load_file(str(path))
    ref = module.state_dict()
    missing, unexpected = sorted(set(ref) - set(sd)), sorted(set(sd) - set(ref))
    bad = [k for k in set(ref) & set(sd) if ref[k].shape != sd[k].shape]
    if missing or unexpected or bad:
        raise ConfigError(f"{path} does not match its config.json: missing {missing[:3]}, unexpected "
                          f"{unexpected[:3]}, shape mismatch {bad[:3]}")
    module.load_state_dict({k: v.float() for k, v in sd.items()})


def resolve_model(model: str | Path) -> tuple[ModelConfig, Path | None]:
    """'tiny' -> shipped weights; another preset name -> random init (None); a directory -> its checkpoint."""
    if str(model) == "tiny":
        return ModelConfig.load(TINY_DIR / "config.json"), TINY_DIR
    if str(model) in PRESETS:
        return preset(str(model)), None
    p = Path(model).expanduser()
    if not p.exists():
        raise ConfigError(f"checkpoint path {str(p)!r} does not exist; pass a directory with {', '.join(FILES)} "
                          f"or a preset ({', '.join(PRESETS)})")
    missing = [f for f in FILES if not (p / f).is_file()]
    if missing:
        raise ConfigError(f"checkpoint directory {str(p)!r} lacks {', '.join(missing)}")
    return ModelConfig.load(p / "config.json"), p


def load_model(model: str | Path = "tiny", seed: int = 0) -> tuple[ModelConfig, VideoDiT, CausalVAE]:
    """Build DiT + VAE in eval mode, float32, on CPU. Presets without weights are randomly initialised from `seed`
    with non-zero adaLN gates so they do real work (for benchmarks and export tests)."""
    cfg, path = resolve_model(model)
    torch.manual_seed(seed)
    dit, vae = VideoDiT(cfg.dit), CausalVAE(cfg.vae)
    if path is not None:
        _load_into(dit, path / "dit.safetensors")
        _load_into(vae, path / "vae.safetensors")
    else:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in dit.named_parameters():
                if p.dim() > 1 and ("adaLN" in name or name.startswith("final")):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return cfg, dit.eval(), vae.eval()
