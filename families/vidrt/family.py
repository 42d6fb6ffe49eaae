"""vidrt's own family: the project's VideoDiT and causal VAE (models/), from a preset name (`tiny` ships trained
weights; the others are random-init geometries), a vidrt checkpoint directory, or a bundle."""
from __future__ import annotations

from pathlib import Path

import torch

from vidrt.core.backends import Part
from vidrt.core.bundle_parts import BundleParts
from vidrt.core.fp8 import QUANT_SKIP
from vidrt.core.request import Request
from vidrt.core.schedulers import make_solver
from vidrt.families.base import Family
from vidrt.families.parts import PartSpec, probe_shape
from vidrt.families.vidrt.export import IO, DecoderPart, dit_inputs, profiles_for, vae_inputs
from vidrt.models.checkpoint import FILES, load_model, resolve_model
from vidrt.models.config import PRESETS, ModelConfig, TextConfig, check_memory
from vidrt.models.dit import VideoDiT
from vidrt.models.text import PromptTokenizer, TextEncoder
from vidrt.models.vae import CausalVAE


class VidrtFamily(Family):
    """The project's own DiT and causal VAE (ModelConfig). `vae_part`: a backend part decoding normalised latent
    tiles (bundles); None decodes with `vae`. `text_encoder`: None loads cfg.text's on first use."""
    name = "vidrt"
    config = ModelConfig
    presets = PRESETS
    solvers = ("euler", "dpm++2m")
    quant_skip = QUANT_SKIP  # kept in float by FP8 and the INT8/FP8 ONNX recipe
    int8_vae = True
    bundle_backends = ("onnxruntime", "tensorrt")

    def __init__(self, cfg: ModelConfig, dit: VideoDiT | Part, vae: CausalVAE, text_encoder=None, vae_part=None,
                 decode_tile: int = 4):
        self.cfg, self.dit, self.vae, self.vae_part, self.decode_tile = cfg, dit, vae, vae_part, decode_tile
        self._text_encoder, self.device = text_encoder, torch.device("cpu")

    @classmethod
    def accepts(cls, root: Path) -> bool:
        return any((root / f).is_file() for f in FILES)

    @classmethod
    def from_dir(cls, root: Path, dtype: torch.dtype = torch.float32, stream_dit: bool = False) -> "VidrtFamily":
        return cls(*load_model(root))

    @classmethod
    def from_preset(cls, name: str, device="cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> "VidrtFamily":
        """`tiny` (its shipped weights) or a random-init preset, on CPU in float32 (Pipeline moves it)."""
        return cls(*load_model(name, seed))

    @classmethod
    def config_from_dir(cls, root: Path) -> ModelConfig:
        return resolve_model(root)[0]

    @classmethod
    def preset_config(cls, name: str) -> ModelConfig:
        return resolve_model(name)[0]

    @classmethod
    def from_bundle(cls, bundle: BundleParts, precision: str, vae_precision: str | None) -> "VidrtFamily":
        """The DiT, the VAE decoder (one temporal tile, sized for the bundle's tile) and the text encoder as parts;
        the VAE itself only on the meta device, for its tiling logic."""
        cfg = ModelConfig.from_dict(bundle.manifest.model)
        sf, tf = cfg.vae.spatial_factor, cfg.vae.temporal_factor
        dit = bundle.dit(precision, reuse=True)
        vae_part = bundle.part(bundle.entry("vae_decoder", vae_precision), lambda z: (
            z.shape[0], 3, (z.shape[2] - 1) * tf + 1, z.shape[3] * sf, z.shape[4] * sf))
        te = bundle.part(bundle.entry("text_encoder"), lambda ids, _: (*ids.shape, cfg.text.dim))
        with torch.device("meta"):
            vae = CausalVAE(cfg.vae)
        fam = cls(cfg, dit, vae, _BundleTextEncoder(cfg.text, te), vae_part,
                  bundle.manifest.vae_tile)
        fam.device = torch.device(bundle.device)
        return fam

    def to(self, device, dtype) -> "VidrtFamily":
        self.device = torch.device(device)
        self.dit.to(self.device, dtype)
        self.vae.to(self.device, dtype)
        return self

    @property
    def text_encoder(self):
        if self._text_encoder is None:  # loaded on first use: a bundle or a given encoder never loads it
            self._text_encoder = TextEncoder(self.cfg.text, device=self.device)
        return self._text_encoder

    def use_text_encoder(self, encoder) -> None:
        self._text_encoder = encoder

    @property
    def scores_faithfulness(self) -> bool:
        return self.cfg.name == "tiny"  # trained on calibration/evaluate.py's synthetic scenes

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.text_encoder.encode(prompts)

    def solver(self, name: str, steps: int, shift: float | None, latent_shape=None):
        return make_solver(name, steps, self.cfg.sample.shift if shift is None else shift)

    def decode(self, latents: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        tile = tile or self.decode_tile
        if self.vae_part is not None:  # the exported part de-normalises itself; tiling commutes with that
            return self.vae.decode_tiled(latents.float(), tile=tile, decode_fn=self.vae_part).float()
        z = latents * self.cfg.vae.latent_std + self.cfg.vae.latent_mean
        return self.vae.decode_tiled(z.to(next(self.vae.parameters()).dtype), tile=tile).float()

    def export_parts(self, parts, buckets, max_batch: int, tile: int) -> list[PartSpec]:
        """text_encoder (fp32 BERT/T5), dit, vae_decoder (one temporal tile with its causal context, de-normalising
        inside); names and axes from export.IO, profiles from export.profiles_for."""
        cfg, specs = self.cfg, []
        for part in parts:
            cases, example = [], None
            for i, b in enumerate(buckets):
                _, t, h, w = cfg.latent_shape(b.frames, b.height, b.width)
                if part == "dit":
                    cases += [dit_inputs(cfg, n, (t, h, w), seed=i) for n in (1, max_batch)]
                elif part == "vae_decoder":
                    tmax = profiles_for("vae_decoder", cfg, [b], vae_tile=tile)[0]["latents"][2][2]
                    cases += [vae_inputs(cfg, 1, (n, h, w), seed=i) for n in sorted({1, tmax})]
            if part == "dit":  # and a probe unlike every bucket in frames, size, batch and text length
                example = cases[-1]
                pf = probe_shape(buckets, cfg.vae.temporal_factor, cfg.hw_multiple)
                cases.append(dit_inputs(cfg, max_batch + 1, cfg.latent_shape(*pf)[1:],
                                           max(2, cfg.text.max_length // 2), seed=99))
                module = self.dit
            elif part == "vae_decoder":
                module = DecoderPart(self.vae, cfg.vae.latent_mean, cfg.vae.latent_std)
            else:
                module = self.text_encoder
                prompts = ["a red circle moving left on a blue background", "A litter of golden retriever puppies "
                           "playing in the snow", ""]
                for n in (1, 2):
                    tok = module.tokenize(prompts[:n] if n == 1 else prompts[1:])
                    cases.append({"input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"]})
            specs.append(PartSpec(part, module, IO[part], cases, example or cases[-1],
                                  profiles_for(part, cfg, buckets, max_batch, tile)))
        return specs

    def check_memory(self, r: Request, device: str, limit_gb: float | None, backend: str, scale: int = 1) -> int:
        tile = (r.decode_tile or self.decode_tile) + self.vae.decoder.tile_context()
        return check_memory(self.cfg, r.num_frames, r.height, r.width, r.dit_batch, scale, tile,
                            attention_scores=backend == "onnxruntime", limit_gb=limit_gb, device=device)


class _BundleTextEncoder:
    """Tokenizer + the text-encoder part of a bundle (same encode() contract as TextEncoder)."""

    def __init__(self, cfg: TextConfig, part: Part):
        self.part, self.tokenizer = part, PromptTokenizer(cfg)

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.tokenizer(prompts)
        return self.part(tok["input_ids"], tok["attention_mask"]).float(), tok["attention_mask"].bool()
