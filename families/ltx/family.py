"""The LTX-Video family: a local diffusers LTXPipeline directory (LTX-Video 0.9.x text-to-video).

Loaded with diffusers and transformers classes (safetensors only, local files only); nothing of the model code is
copied. vidrt's side of the contract in families/base.py, each rule as LTXPipeline applies it:

- `LTXDiT`: LTXPipeline works on packed latents (B, T/pt * H/p * W/p, C * pt * p * p); the runtime's latents are
  (B, C, T, H, W), so the wrapper packs before and unpacks after the transformer (pure reshapes/permutes: exact). The
  RoPE positions are LTXPipeline's (latent grid x (temporal ratio / frame_rate, spatial ratio, spatial ratio) x
  patch), passed as `video_coords` built without in-place writes (what LTXVideoRotaryPosEmbed computes from
  rope_interpolation_scale, op for op). LTX masks its text: the DiT takes `text_mask` as `encoder_attention_mask`.
- prompts -> T5 embeddings as LTXPipeline.encode_prompt: padded to max_sequence_length 128; the text encoder runs
  *without* the attention mask (padding positions are encoded, not zeroed), the mask goes to the transformer.
- schedule: FlowMatchEulerDiscreteScheduler with dynamic shifting: sigmas linspace(1, 1/steps, steps) and mu from
  the video's latent sequence length (calculate_shift with the scheduler's base/max shift and sequence lengths).
- decode: latents * latents_std / scaling_factor + latents_mean (the VAE's buffers), then the whole latent video in
  one decoder call (the LTX decoder is not causal-cached). A timestep-conditioned VAE (0.9.1+) gets LTXPipeline's
  defaults decode_timestep 0, decode_noise_scale = decode_timestep (0: no noise is mixed in).
- shape rules: frames = temporal ratio x k + 1 (8k+1), height/width multiples of lcm(32, spatial ratio x patch).

PRESETS: "ltx-video", LTX-Video 0.9.x at its real size with random weights (GPU timing), built on the meta device and
materialised on the run's device in its dtype (models/diffusers_io.random_init); it has no text encoder.
`quant_skip`: the layers INT8/FP8 keep in float, measured on the tiny directory (see LTXFamily).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from vidrt.core.backends import Part
from vidrt.core.buckets import Bucket
from vidrt.core.bundle_parts import BundleParts
from vidrt.core.dit_call import DitFn
from vidrt.core.errors import ConfigError
from vidrt.core.schedulers import solver_from_diffusers
from vidrt.families.base import DiffusersFamily
from vidrt.families.ltx.config import PRESETS, LTXConfig, preset_config, vae_for_init
from vidrt.families.ltx.export import dit_spec, vae_spec
from vidrt.families.ltx.modules import LTXDecode, LTXDiT, LTXText
from vidrt.families.parts import PartSpec, probe_shape, text_spec
from vidrt.models.diffusers_io import load_pretrained, load_text, move, random_init, require_diffusers
from vidrt.models.text import offline


class LTXFamily(DiffusersFamily):
    """A loaded LTX-Video directory, preset or bundle (families/base.py: the contract)."""
    name = "ltx"
    config = LTXConfig
    pipelines = ("LTXPipeline",)
    presets = PRESETS
    latent_dtype = torch.float32  # as the family's diffusers pipeline: latents and solver in float32
    # kept in float by FP8/INT8 (module-path regexes; calibration.quantize.targets also tries an ONNX node name's
    # dotted form, "/transformer/proj_out/MatMul" -> "transformer.proj_out.MatMul", hence (\.|$)): the timestep
    # (AdaLayerNormSingle) and caption embedders, the patch projection in and the output projection (7 layers of the
    # tiny model, ~2% of the real model's parameters, none inside the 28 blocks). Measured on the tiny directory
    # (families/ltx/tiny.save_ltx), 9x32x64, 8 steps, held-out max rel L2 / mean video PSNR, int8 and fp8:
    #   this list           0.0031 / 54.7 dB   0.0111 / 45.0 dB
    #   nothing in float    0.0115 / 48.9 dB   0.0457 / 38.6 dB
    #   the earlier list    0.0100 / 49.5 dB   0.0454 / 39.5 dB  (proj_in$/proj_out$ matched no ONNX node: 5 float)
    #   proj_in/out only    0.0035 / 53.6 dB   0.0216 / 44.9 dB
    #   + attn2 to_k/to_v   0.0025 / 57.5 dB   0.0098 / 47.0 dB  (11 float; ~12% of the real model's weights)
    #   + all of attn2      0.0020 / 57.3 dB   0.0090 / 52.4 dB  (15 float; to_q/to_out run on every video token)
    #   + attn1 / + ff      0.0026 / 54.4, 54.3 dB   0.0105, 0.0116 / 45.0, 45.8 dB
    # The per-block additions gain less than the embedders did, for a large share of the blocks' weights.
    quant_skip = (r"time_embed", r"caption_projection", r"(^|\.)proj_in(\.|$)", r"(^|\.)proj_out(\.|$)")

    def __init__(self, cfg: LTXConfig, dit: LTXDiT | DitFn, vae_part: LTXDecode | Part, vae: nn.Module | None = None,
                 tokenizer=None, text_part: LTXText | Part | None = None, root: Path | None = None):
        """`vae_part` decodes normalised latents (the torch LTXDecode of `vae`, or a bundle's graph); `text_part`: T5
        as LTXPipeline runs it, with its `tokenizer` (None for a preset: no text encoder)."""
        self.cfg, self.dit, self.vae_part, self.vae, self.root = cfg, dit, vae_part, vae, root
        self.tokenizer, self.text_part, self.device = tokenizer, text_part, torch.device("cpu")

    @classmethod
    def preset_config(cls, name: str) -> LTXConfig:
        return preset_config(name)

    @classmethod
    def from_dir(cls, root: Path, dtype: torch.dtype = torch.float32, stream_dit: bool = False) -> "LTXFamily":
        """Loads the transformer and VAE in `dtype` (as Wan); the text encoder loads as saved."""
        root, cfg = Path(root), LTXConfig.from_dir(Path(root))
        offline()
        diffusers, _ = require_diffusers()
        tokenizer, text_model = load_text(root, "T5EncoderModel")
        tr = load_pretrained(diffusers.LTXVideoTransformer3DModel, root / "transformer", "transformer",
                             torch_dtype=dtype).eval()
        vae = load_pretrained(diffusers.AutoencoderKLLTXVideo, root / "vae", "VAE", torch_dtype=dtype).eval()
        return cls(cfg, LTXDiT(tr, cfg), LTXDecode(vae), vae, tokenizer, LTXText(text_model), root)

    @classmethod
    def from_bundle(cls, bundle: BundleParts, precision: str, vae_precision: str | None) -> "LTXFamily":
        """An LTX export-engines bundle on onnxruntime: the bundle's tokenizer, text encoder, DiT (with its text mask
        input) and whole-video VAE decoder graphs."""
        _, transformers = require_diffusers()
        c = LTXConfig.from_dict(bundle.manifest.model)
        tokenizer = load_pretrained(transformers.AutoTokenizer, bundle.root / "tokenizer", "tokenizer")
        text = bundle.part(bundle.entry("text_encoder"), lambda ids: (*ids.shape, c.text_dim))
        dit = bundle.dit(precision)
        vae_part = bundle.part(bundle.entry("vae_decoder", vae_precision), lambda z: (
            z.shape[0], 3, (z.shape[2] - 1) * c.temporal_factor + 1, z.shape[3] * c.spatial_factor,
            z.shape[4] * c.spatial_factor))
        fam = cls(c, dit, vae_part, None, tokenizer, text, bundle.root)
        fam.device = torch.device(bundle.device)
        return fam

    @classmethod
    def from_preset(cls, name: str, device="cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> "LTXFamily":
        """A random-init LTX-Video at the real size (PRESETS), built on the meta device and materialised directly on
        `device` in `dtype` (models/diffusers_io.random_init). encode() raises ConfigError: T5-XXL is not built."""
        diffusers, _ = require_diffusers()
        p, cfg = PRESETS[name], preset_config(name)
        tr = random_init(diffusers.LTXVideoTransformer3DModel, p["transformer"], device, dtype, seed)
        vae = random_init(vae_for_init, p["vae"], device, dtype, seed + 2)
        fam = cls(cfg, LTXDiT(tr, cfg), LTXDecode(vae), vae)
        fam.device = torch.device(device)
        return fam

    def to(self, device, dtype) -> "LTXFamily":
        """The DiT and VAE in `dtype` on `device`; the text encoder stays float32."""
        move(self, (self.dit.transformer, self.vae) if self.vae is not None else (), self.text_part, device, dtype)
        return self

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tokenizer is None:
            raise ConfigError(f"{self.cfg.name} is a random-init geometry preset without a text encoder (T5-XXL is "
                              "not built at random): pass text embeddings, or use an LTX-Video diffusers directory")
        tok = self.tokenizer(prompts, padding="max_length", max_length=self.cfg.text_len, truncation=True,
                             add_special_tokens=True, return_tensors="pt")
        return self.text_part(tok.input_ids.to(self.device)).float(), tok.attention_mask.bool().to(self.device)

    def solver(self, name: str, steps: int, shift: float | None = None, latent_shape=None):
        """LTXPipeline's schedule for a video of `latent_shape` ((C,) T, H, W: mu depends on it). `shift` is not
        used: LTX's scheduler shifts by mu (use_dynamic_shifting), which the video's size sets."""
        if latent_shape is None:
            raise ConfigError("the LTX-Video schedule depends on the video size: pass latent_shape=cfg.latent_shape("
                              "frames, height, width) to solver()")
        mu = self.cfg.mu(latent_shape) if self.cfg.scheduler.get("use_dynamic_shifting") else None
        return solver_from_diffusers(self.cfg.scheduler, steps, None, mu=mu,
                                     sigmas=np.linspace(1.0, 1 / steps, steps))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        """Normalised latents -> video in [-1, 1] (B, 3, F, H, W), unclamped. `tile` is unused: the LTX decoder
        decodes the whole latent video at once (it is not causal, so frame tiles would not be exact)."""
        if self.vae is None:
            return self.vae_part(latents.float())
        p = next(self.vae.parameters())
        return self.vae_part(latents.to(p.device, p.dtype))

    def export_parts(self, parts: list[str], buckets: list[Bucket], max_batch: int, tile: int) -> list[PartSpec]:
        """text_encoder (input_ids -> text), dit (with text_mask), vae_decoder (the whole latent video, de-normalising
        inside); every graph dynamic in batch, frames, height, width (and text length): families/ltx/export.py."""
        pf = probe_shape(buckets, self.cfg.temporal_factor, self.cfg.hw_multiple)
        g = torch.Generator().manual_seed(0)
        specs = [text_spec(self.text_part, self.tokenizer, self.root, ("input_ids",), self.cfg.text_len, max_batch)] \
            if "text_encoder" in parts else []
        if "dit" in parts:
            specs.append(dit_spec(self.cfg, self.dit, buckets, max_batch, pf, g))
        if "vae_decoder" in parts:
            specs.append(vae_spec(self.cfg, self.vae_part, buckets, pf, g))
        return specs
