"""Model families: the unit the runtime is built from. A family is one module that loads a model and supplies what
is model-specific, once; `Pipeline` reads everything through it:

    cfg                 name, sample defaults (.sample), latent_shape(frames, height, width) with the family's
                        frame/size rules (ConfigError naming the fix), to_dict()
    dit                 nn.Module with the one DiT call: dit(latents, timestep, text, text_mask) -> velocity
    to(device, dtype)   move the torch parts
    encode(prompts)     -> (text (B, L, D) float32, text_mask (B, L) bool), exactly as the family's pipeline does it
    solvers, solver(name, steps, shift)
                        the sampler: sigmas from 1 to 0 (.timesteps), the DiT's timestep per step (.model_t),
                        step(i, x, velocity)
    decode(latents, tile)
                        normalised latents -> video in [-1, 1] (B, 3, F, H, W), unclamped
    check_memory(request, device, limit_gb, backend, scale)
                        refuse a request that cannot fit, before any work

Families: "vidrt" (the project's VideoDiT + causal VAE: presets, `tiny`, vidrt checkpoint directories) and "wan"
(models/wan.py: a diffusers WanPipeline directory). A diffusers directory is recognised by its model_index.json.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .checkpoint import FILES, load_model
from .config import PRESETS, ConfigError, ModelConfig, check_memory

# model_index.json _class_name -> family module (vidrt.models.<module>)
DIFFUSERS_FAMILIES = {"WanPipeline": "wan"}


class VidrtFamily:
    """The project's own DiT and causal VAE (ModelConfig). `vae_part`: a backend part decoding normalised latent
    tiles (bundles); None decodes with `vae`."""
    solvers = ("euler", "dpm++2m")

    def __init__(self, cfg: ModelConfig, dit, vae, text_encoder=None, vae_part=None, decode_tile: int = 4):
        self.cfg, self.dit, self.vae, self.vae_part, self.decode_tile = cfg, dit, vae, vae_part, decode_tile
        self._text_encoder, self.device = text_encoder, torch.device("cpu")

    def to(self, device, dtype) -> "VidrtFamily":
        self.device = torch.device(device)
        self.dit.to(self.device, dtype)
        self.vae.to(self.device, dtype)
        return self

    @property
    def text_encoder(self):
        if self._text_encoder is None:
            from .text import TextEncoder
            self._text_encoder = TextEncoder(self.cfg.text, device=self.device)
        return self._text_encoder

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.text_encoder.encode(prompts)

    def solver(self, name: str, steps: int, shift: float | None):
        from vidrt.runtime.schedulers import make_solver
        return make_solver(name, steps, self.cfg.sample.shift if shift is None else shift)

    def decode(self, latents: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        tile = tile or self.decode_tile
        if self.vae_part is not None:  # the exported part de-normalises itself; tiling commutes with that
            return self.vae.decode_tiled(latents.float(), tile=tile, decode_fn=self.vae_part).float()
        z = latents * self.cfg.vae.latent_std + self.cfg.vae.latent_mean
        return self.vae.decode_tiled(z.to(next(self.vae.parameters()).dtype), tile=tile).float()

    def check_memory(self, r, device: str, limit_gb: float | None, backend: str, scale: int = 1) -> int:
        tile = (r.decode_tile or self.decode_tile) + self.vae.decoder.tile_context()
        batch = len(r.prompts) * (2 if r.guidance_scale > 1 else 1)
        return check_memory(self.cfg, r.num_frames, r.height, r.width, batch, scale, tile,
                            attention_scores=backend == "onnxruntime", limit_gb=limit_gb, device=device)


def diffusers_family(root: Path) -> str:
    """The family module name of a diffusers pipeline directory, or ConfigError naming the supported ones."""
    try:
        cls = json.loads((root / "model_index.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError) as e:
        raise ConfigError(f"{root / 'model_index.json'} is not a diffusers model index: {e}") from e
    if cls not in DIFFUSERS_FAMILIES:
        raise ConfigError(f"{root} is a diffusers {cls} directory, which vidrt does not support; supported: "
                          f"{', '.join(DIFFUSERS_FAMILIES)} (Wan 2.1 / 2.2 text-to-video)")
    return DIFFUSERS_FAMILIES[cls]


def load_family(model: str | Path = "tiny", seed: int = 0):
    """A preset name, `tiny`, a vidrt checkpoint directory or a diffusers pipeline directory -> a loaded family on
    CPU in float32 (eval mode)."""
    p = Path(str(model)).expanduser()
    if str(model) not in PRESETS and str(model) != "tiny" and p.is_dir() and (p / "model_index.json").is_file():
        name = diffusers_family(p)
        if name == "wan":
            from .wan import WanFamily
            return WanFamily(p)
    if p.is_dir() and not any((p / f).is_file() for f in FILES) and str(model) not in PRESETS:
        raise ConfigError(f"{p} is neither a vidrt checkpoint ({', '.join(FILES)}) nor a diffusers pipeline "
                          f"directory (model_index.json with transformer/, vae/, text_encoder/, tokenizer/, "
                          f"scheduler/ of a {', '.join(DIFFUSERS_FAMILIES)})")
    cfg, dit, vae = load_model(model, seed)
    return VidrtFamily(cfg, dit, vae)
