"""The Wan family: Wan 2.1 / 2.2 text-to-video from a local diffusers directory (WanPipeline).

The directory is loaded with diffusers and transformers classes (safetensors only, local files only); nothing of
the model code is copied. What vidrt adds is the family's side of the contract in families/base.py:

- the transformer behind the runtime's one DiT call `dit(latents, timestep, text, text_mask) -> velocity` (`WanDiT`:
  Wan has no text mask, its text is zero-padded instead; Wan 2.2 A14B's two experts switch at `boundary_ratio`;
  TI2V-5B's `expand_timesteps` gives every token the step's timestep);
- prompts -> UMT5 embeddings exactly as WanPipeline makes them (cleaned, padded to max_sequence_length, every row
  past its prompt's tokens zeroed);
- the schedule from the directory's own scheduler_config (core/schedulers.solver_from_diffusers);
- decode: per-channel latent de-normalisation, then the Wan VAE's own causal, cached decode;
- shape rules: frames 4k+1 (the VAE's time factor), height/width multiples of VAE factor x patch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from vidrt.core.backends import Part
from vidrt.core.buckets import Bucket
from vidrt.core.bundle_parts import BundleParts
from vidrt.core.dit_call import DitFn, RoutedDit
from vidrt.core.errors import ConfigError
from vidrt.core.schedulers import solver_from_diffusers
from vidrt.families.base import DiffusersFamily
from vidrt.families.parts import PartSpec, StreamSource, probe_shape, text_spec
from vidrt.families.wan.config import PRESETS, WanConfig, boundary_timestep, preset_config
from vidrt.families.wan.export import dit_specs, vae_specs
from vidrt.families.wan.modules import Served, WanDiT, WanText
from vidrt.families.wan.vae_export import OrtStep, stream_decode
from vidrt.models.diffusers_io import load_pretrained, load_skeleton, load_text, move, random_init, require_diffusers
from vidrt.models.text import offline


def _torch_decode(vae: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda z: vae.decode(z, return_dict=False)[0]


def _load_streamed(root: Path, sub: str) -> tuple[nn.Module, StreamSource]:
    """The transformer in `sub`/ as a skeleton whose blocks the export reads one at a time, and its block source."""
    tr, weights = load_skeleton(require_diffusers()[0].WanTransformer3DModel, root / sub, "blocks", sub)
    block = max(sum(p.numel() * 4 for p in b.parameters()) for b in tr.blocks)
    return tr, StreamSource("transformer.blocks", "transformer", weights, block)


class WanFamily(DiffusersFamily):
    """A loaded Wan directory, preset or bundle (families/base.py: the contract)."""
    name = "wan"
    config = WanConfig
    pipelines = ("WanPipeline",)
    latent_dtype = torch.float32  # as the family's diffusers pipeline: latents and solver in float32
    # kept in float by FP8/INT8 (module-name regexes): the time/text condition embedders, the patch embedding and the
    # output projection (a colleague measured Wan INT8 rel L2 0.087 with nothing skipped, 0.040 with these skipped)
    quant_skip = (r"condition_embedder", r"patch_embedding", r"(^|\.)proj_out(\.|$)")
    streams_dit = True
    presets = PRESETS

    def __init__(self, cfg: WanConfig, dit: WanDiT | DitFn, vae_decode: Callable[[torch.Tensor], torch.Tensor],
                 vae: nn.Module | None = None, tokenizer=None, text_part: WanText | Part | None = None,
                 root: Path | None = None, streams: dict[str, StreamSource] | None = None):
        """`text_part`: UMT5 as WanPipeline runs it (a torch WanText or a bundle's part), with its `tokenizer`; None
        for a preset (no text encoder). `vae`: the torch VAE (None in a bundle, whose `vae_decode` runs its graphs)."""
        self.cfg, self.dit, self.vae_decode, self.vae, self.root = cfg, dit, vae_decode, vae, root
        self.tokenizer, self.text_part, self.streams, self.device = tokenizer, text_part, dict(streams or {}), \
            torch.device("cpu")

    @classmethod
    def preset_config(cls, name: str) -> WanConfig:
        return preset_config(name)

    @classmethod
    def from_dir(cls, root: Path, dtype: torch.dtype = torch.float32, stream_dit: bool = False) -> "WanFamily":
        """Loads the directory's weights in `dtype` (diffusers keeps its float32 modules), so a 14B model never
        exists in float32 on the host when the run is bf16; the text encoder loads as saved. `stream_dit`: the
        transformers as skeletons (their blocks on the meta device, read a block at a time by the block-streamed
        export; nothing else can run them)."""
        root, cfg = Path(root), WanConfig.from_dir(Path(root))
        offline()
        diffusers, _ = require_diffusers()
        tokenizer, text_model = load_text(root, "UMT5EncoderModel")
        subs = [s for s in ("transformer", "transformer_2") if (root / s).is_dir()]
        if len(subs) == 2 and cfg.boundary_ratio is None:
            raise ConfigError(f"{root} has transformer_2/ but model_index.json gives no boundary_ratio")
        streams = {}
        if stream_dit:
            loaded = [_load_streamed(root, s) for s in subs]
            trs, streams = [t for t, _ in loaded], {n: src for n, (_, src) in zip(("dit", "dit_2"), loaded)}
        else:
            trs = [load_pretrained(diffusers.WanTransformer3DModel, root / s, s, torch_dtype=dtype) for s in subs]
        tr2 = trs[1] if len(trs) == 2 else None
        dit = WanDiT(trs[0].eval(), tr2, None if tr2 is None else boundary_timestep(cfg), cfg.expand_timesteps)
        vae = load_pretrained(diffusers.AutoencoderKLWan, root / "vae", "VAE", torch_dtype=dtype).eval()
        return cls(cfg, dit, _torch_decode(vae), vae, tokenizer, WanText(text_model), root, streams)

    @classmethod
    def from_bundle(cls, bundle: BundleParts, precision: str, vae_precision: str | None) -> "WanFamily":
        """A Wan export-engines bundle on onnxruntime: the tokenizer saved in the bundle, the text encoder and DiT
        graphs, the VAE's two streaming step graphs."""
        _, transformers = require_diffusers()
        cfg = WanConfig.from_dict(bundle.manifest.model)
        tokenizer = load_pretrained(transformers.AutoTokenizer, bundle.root / "tokenizer", "tokenizer")
        text = bundle.part(bundle.entry("text_encoder"), lambda ids, _: (*ids.shape, cfg.text_dim))
        dit = bundle.dit(precision)
        if cfg.boundary_ratio is not None:  # Wan 2.2 A14B: "dit" the high-noise expert, "dit_2" the low-noise one,
            low = bundle.dit(precision, "dit_2")  # switched as WanDiT and WanPipeline: t < boundary
            dit = RoutedDit([(Served(boundary_timestep(cfg), high=False), low), (None, dit)])
        steps = [OrtStep(bundle.root / bundle.entry(n, vae_precision).graph)
                 for n in ("vae_first", "vae_step")]
        fam = cls(cfg, dit, lambda z: stream_decode(steps[0], steps[1], z.float()), None, tokenizer, text,
                  bundle.root)
        fam.device = torch.device(bundle.device)
        return fam

    @classmethod
    def from_preset(cls, name: str, device="cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> "WanFamily":
        """A random-init Wan at a real size (PRESETS), built directly on `device` in `dtype`; no text encoder."""
        diffusers, _ = require_diffusers()
        t, v, cfg = PRESETS[name]["transformer"], PRESETS[name]["vae"], preset_config(name)
        tr = random_init(diffusers.WanTransformer3DModel, t, device, dtype, seed)
        tr2 = random_init(diffusers.WanTransformer3DModel, t, device, dtype, seed + 1) if cfg.boundary_ratio else None
        dit = WanDiT(tr, tr2, None if tr2 is None else cfg.boundary_ratio * 1000, cfg.expand_timesteps)
        vae = random_init(diffusers.AutoencoderKLWan, v, device, dtype, seed + 2)
        fam = cls(cfg, dit, _torch_decode(vae), vae)
        fam.device = torch.device(device)
        return fam

    @property
    def expert_boundary(self) -> float | None:
        """The timestep below which Wan 2.2 A14B's low-noise expert runs (None: one DiT)."""
        return None if self.cfg.boundary_ratio is None else boundary_timestep(self.cfg)

    def to(self, device, dtype) -> "WanFamily":
        """The DiT and VAE in `dtype` on `device`; the text encoder stays float32 (as WanPipeline's bf16 one would
        be cast back to the transformer dtype anyway)."""
        move(self, (*self.dit.children(), self.vae) if self.vae is not None else (), self.text_part, device, dtype)
        return self

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tokenizer is None:
            raise ConfigError(f"{self.cfg.name} is a random-init geometry preset without a text encoder (UMT5-XXL "
                              "is not built at random): pass text embeddings, or use a Wan diffusers directory")
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean  # lazy: diffusers is an optional dependency
        L = self.cfg.text_len
        tok = self.tokenizer([prompt_clean(p) for p in prompts], padding="max_length", max_length=L, truncation=True,
                             add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        ids, mask = tok.input_ids.to(self.device), tok.attention_mask.to(self.device)
        return self.text_part(ids, mask), mask.bool()

    def solver(self, name: str, steps: int, shift: float | None, latent_shape=None):
        return solver_from_diffusers(self.cfg.scheduler, steps, shift)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        """Normalised latents (B, C, T, H, W) -> video in [-1, 1] (B, 3, F, H, W) (the Wan VAE clamps). `tile` is
        unused: the Wan VAE decodes frame by frame with its causal feature cache, exact at any length."""
        dev, dtype = (latents.device, torch.float32) if self.vae is None else \
            (lambda p: (p.device, p.dtype))(next(self.vae.parameters()))
        c = latents.shape[1]
        mean = torch.tensor(self.cfg.latents_mean, device=dev, dtype=dtype).view(1, c, 1, 1, 1)
        std = torch.tensor(self.cfg.latents_std, device=dev, dtype=dtype).view(1, c, 1, 1, 1)
        return self.vae_decode(latents.to(dev, dtype) * std + mean)

    def export_parts(self, parts: list[str], buckets: list[Bucket], max_batch: int, tile: int) -> list[PartSpec]:
        """text_encoder (UMT5 -> zero-padded embeddings), one DiT graph per expert, the VAE's two streaming step
        graphs (families/wan/export.py)."""
        pf = probe_shape(buckets, self.cfg.temporal_factor, self.cfg.hw_multiple)
        g = torch.Generator().manual_seed(0)
        specs = [text_spec(self.text_part, self.tokenizer, self.root, ("input_ids", "attention_mask"),
                           self.cfg.text_len, max_batch)] if "text_encoder" in parts else []
        if "dit" in parts:
            specs += dit_specs(self.cfg, self.dit, self.streams, buckets, max_batch, pf, g)
        if "vae_decoder" in parts:
            specs += vae_specs(self.cfg, self.vae, buckets, pf, g)
        return specs


