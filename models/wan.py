"""The Wan family: Wan 2.1 / 2.2 text-to-video from a local diffusers directory (WanPipeline).

The directory is loaded with diffusers and transformers classes (safetensors only, local files only); nothing of
the model code is copied. What vidrt adds is the family's side of the contract in models/family.py:

- the transformer behind the runtime's one DiT call `dit(latents, timestep, text, text_mask) -> velocity` (`WanDiT`:
  Wan has no text mask, its text is zero-padded instead; Wan 2.2 A14B's two experts switch at `boundary_ratio`;
  TI2V-5B's `expand_timesteps` gives every token the step's timestep);
- prompts -> UMT5 embeddings exactly as WanPipeline makes them (cleaned, padded to max_sequence_length, every row
  past its prompt's tokens zeroed);
- the schedule from the directory's own scheduler_config (runtime/schedulers.solver_from_diffusers);
- decode: per-channel latent de-normalisation, then the Wan VAE's own causal, cached decode;
- shape rules: frames 4k+1 (the VAE's time factor), height/width multiples of VAE factor x patch.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .config import ConfigError, SampleDefaults, refuse_over_limit
from .diffusers_io import (DirConfig, bundle_dit, load_pretrained, load_skeleton, load_text, move, random_init,
                           read_configs, read_json, require_diffusers, text_spec)

PIPELINES = ("WanPipeline",)  # model_index.json _class_name values this family loads
TEXT_LEN = 512  # WanPipeline's max_sequence_length default


@dataclass
class WanConfig(DirConfig):
    """The geometry and rules the runtime reads, from the directory's configs (no weights needed)."""
    name: str
    in_channels: int
    text_dim: int
    patch: tuple[int, int, int]
    temporal_factor: int
    spatial_factor: int
    latents_mean: list[float]
    latents_std: list[float]
    scheduler: dict
    boundary_ratio: float | None = None
    expand_timesteps: bool = False
    text_len: int = TEXT_LEN
    width: int = 1536  # the transformer's hidden size and FFN width, the VAE decoder's base channels (memory estimate)
    ffn_dim: int = 8960
    vae_base_dim: int = 96
    heads: int = 12
    sample: SampleDefaults = field(default_factory=SampleDefaults)
    family: str = "wan"

    @classmethod
    def from_dir(cls, root: Path) -> "WanConfig":
        index = read_json(root / "model_index.json")
        tr, vae, sched, te = read_configs(root, "a Wan text-to-video")
        if not {"latents_mean", "latents_std"} <= set(vae):
            raise ConfigError(f"{root / 'vae' / 'config.json'} lacks latents_mean/latents_std: not a Wan VAE config")
        from vidrt.runtime.schedulers import solver_from_diffusers
        try:  # an unsupported scheduler fails here, before any request is queued
            solver_from_diffusers(sched, 2)
        except ValueError as e:
            raise ConfigError(f"{root / 'scheduler'}: {e}") from e
        st, ss = vae.get("scale_factor_temporal", 4), vae.get("scale_factor_spatial", 8)
        patch = tuple(tr.get("patch_size", (1, 2, 2)))
        shift = float(sched.get("flow_shift", sched.get("shift", 1.0)))
        if te.get("d_model", tr.get("text_dim")) != tr.get("text_dim", 4096):
            raise ConfigError(f"{root}: text_encoder d_model={te.get('d_model')} but transformer text_dim="
                              f"{tr.get('text_dim')}: the parts are from different models")
        # WanPipeline's defaults: 81 frames at 480x832, 50 steps, guidance 5, 16 fps
        m = ss * max(patch[1:])
        h, w = max(m, 480 // m * m), max(m, 832 // m * m)
        return cls(name=root.name, in_channels=tr.get("in_channels", 16), text_dim=tr.get("text_dim", 4096),
                   width=tr.get("num_attention_heads", 12) * tr.get("attention_head_dim", 128),
                   heads=tr.get("num_attention_heads", 12),
                   ffn_dim=tr.get("ffn_dim", 8960), vae_base_dim=vae.get("decoder_base_dim") or vae.get("base_dim", 96),
                   patch=patch, temporal_factor=st, spatial_factor=ss, latents_mean=list(vae["latents_mean"]),
                   latents_std=list(vae["latents_std"]), scheduler=sched,
                   boundary_ratio=index.get("boundary_ratio"), expand_timesteps=bool(index.get("expand_timesteps")),
                   sample=SampleDefaults(num_frames=81, height=h, width=w, num_inference_steps=50, guidance_scale=5.0,
                                         shift=shift, fps=16))

    @property
    def hw_multiple(self) -> int:
        return self.spatial_factor * max(self.patch[1:])

    @property
    def text_shape(self) -> tuple[int, int]:
        return self.text_len, self.text_dim

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        f, m = self.temporal_factor, self.hw_multiple
        if num_frames < 1 or (num_frames - 1) % f:
            k = max(0, (num_frames - 1) // f)
            raise ConfigError(f"num_frames={num_frames} must be {f}k+1 for Wan (its VAE compresses time x{f}); try "
                              f"{f * k + 1} or {f * (k + 1) + 1}")
        for name, v in (("height", height), ("width", width)):
            if v < m or v % m:
                raise ConfigError(f"{name}={v} must be a positive multiple of {m} for Wan (VAE x{self.spatial_factor}"
                                  f" times patch {max(self.patch[1:])}); try {max(m, round(v / m) * m)}")
        return (self.in_channels, (num_frames - 1) // f + 1, height // self.spatial_factor,
                width // self.spatial_factor)

    def tokens(self, num_frames: int, height: int, width: int) -> int:
        _, t, h, w = self.latent_shape(num_frames, height, width)
        pt, ph, pw = self.patch
        return math.ceil(t / pt) * (h // ph) * (w // pw)

    def estimate_memory(self, num_frames: int, height: int, width: int, videos: int, batch: int, backend: str,
                        scale: int = 1) -> dict[str, int]:
        """A coarse activation estimate (float32 bytes): the DiT's widest activation (FFN) per CFG row, and the VAE
        decoder's widest feature map at full resolution over its cached frames; on onnxruntime the attention scores
        (B, heads, N, N), which it materialises."""
        n = self.tokens(num_frames, height, width)
        dit = 4 * batch * n * max(self.ffn_dim, 4 * self.width) * 3
        if backend == "onnxruntime":
            dit = max(dit, 4 * batch * self.heads * n * n * 2)
        est = {"DiT activations": dit, "VAE decode": 4 * videos * 6 * self.vae_base_dim * height * width * 4,
               "video": videos * num_frames * height * width * 3 * (4 + scale * scale)}
        return {**est, "peak": max(est.values())}


def _boundary(cfg: WanConfig) -> float:
    """Wan 2.2 A14B's switch timestep, as WanPipeline: boundary_ratio * the scheduler's num_train_timesteps."""
    return cfg.boundary_ratio * cfg.scheduler.get("num_train_timesteps", 1000)


class WanDiT(nn.Module):
    """One or two Wan transformers behind vidrt's DiT call. `timestep` is the scheduler's timestep (0..1000), one per
    batch row; `text_mask` is accepted and unused (Wan zero-pads its text instead of masking it)."""

    def __init__(self, transformer: nn.Module, transformer_2: nn.Module | None = None,
                 boundary: float | None = None, expand_timesteps: bool = False):
        super().__init__()
        self.transformer, self.transformer_2 = transformer, transformer_2
        self.boundary, self.expand_timesteps = boundary, expand_timesteps

    def forward(self, latents, timestep, text, text_mask=None):
        model = self.transformer
        if self.transformer_2 is not None and float(timestep.reshape(-1)[0]) < self.boundary:
            model = self.transformer_2  # Wan 2.2 A14B: the low-noise expert below the boundary timestep
        dtype = model.dtype  # as WanPipeline: the dtype of the parameters not kept in float32
        if self.expand_timesteps:  # one timestep per latent token (2x2 spatial patches), as WanPipeline does;
            # the count from the latents' shape, so an exported graph takes (B,) and stays shape-generic
            _, _, t, h, w = latents.shape
            timestep = timestep[:, None].expand(-1, t * (h // 2) * (w // 2))
        return model(hidden_states=latents.to(dtype), timestep=timestep, encoder_hidden_states=text.to(dtype),
                     return_dict=False)[0]


class _Served:
    """The timesteps one Wan 2.2 A14B expert serves, as WanPipeline switches: high-noise t >= boundary, low-noise
    t < boundary (PartSpec.calib_select; a class, not a lambda, so specs stay picklable)."""

    def __init__(self, boundary: float, high: bool):
        self.boundary, self.high = float(boundary), high

    def __call__(self, timestep: torch.Tensor) -> torch.Tensor:
        return (timestep >= self.boundary) if self.high else (timestep < self.boundary)


def _load_streamed(fam: "WanFamily", sub: str, part: str) -> nn.Module:
    """The transformer in `sub`/ as a skeleton whose blocks the export reads one at a time (fam.streams[part])."""
    from .family import StreamSource
    tr, weights = load_skeleton(require_diffusers()[0].WanTransformer3DModel, fam.root / sub, "blocks", sub)
    block = max(sum(p.numel() * 4 for p in b.parameters()) for b in tr.blocks)
    fam.streams = {**fam.streams, part: StreamSource("transformer.blocks", "transformer", weights, block)}
    return tr


class WanFamily:
    """A loaded Wan directory: see models/family.py for the contract."""
    solvers = ("default",)
    latent_dtype = torch.float32  # as the family's diffusers pipeline: latents and solver in float32
    # kept in float by FP8/INT8 (module-name regexes): the time/text condition embedders, the patch embedding and the
    # output projection (a colleague measured Wan INT8 rel L2 0.087 with nothing skipped, 0.040 with these skipped)
    quant_skip = (r"condition_embedder", r"patch_embedding", r"(^|\.)proj_out(\.|$)")
    streams: dict = {}  # DiT part name -> StreamSource when loaded with stream_dit (never mutated: one per instance)

    def __init__(self, root: str | Path, dtype: torch.dtype = torch.float32, stream_dit: bool = False):
        """Loads the directory's weights in `dtype` (diffusers keeps its float32 modules), so a 14B model never
        exists in float32 on the host when the run is bf16; the text encoder loads as saved. `stream_dit`: the
        transformers as skeletons (their blocks on the meta device, read a block at a time by the block-streamed
        export; nothing else can run them)."""
        from vidrt.models.text import _offline
        self.root = Path(root)
        self.cfg = WanConfig.from_dir(self.root)
        _offline()
        diffusers, _ = require_diffusers()
        self.tokenizer, self.text_model = load_text(self.root, "UMT5EncoderModel")
        self.text_part = WanText(self.text_model)
        load = functools.partial(_load_streamed, self) if stream_dit else \
            (lambda sub, _part: load_pretrained(diffusers.WanTransformer3DModel, self.root / sub, sub,
                                                torch_dtype=dtype))
        tr, tr2 = load("transformer", "dit"), load("transformer_2", "dit_2") if (self.root / "transformer_2").is_dir() \
            else None
        if tr2 is not None and self.cfg.boundary_ratio is None:
            raise ConfigError(f"{self.root} has transformer_2/ but model_index.json gives no boundary_ratio")
        boundary = None if tr2 is None else _boundary(self.cfg)
        self.dit = WanDiT(tr.eval(), tr2, boundary, self.cfg.expand_timesteps)
        self.vae = load_pretrained(diffusers.AutoencoderKLWan, self.root / "vae", "VAE", torch_dtype=dtype).eval()
        self.vae_decode = lambda z: self.vae.decode(z, return_dict=False)[0]
        self.device = torch.device("cpu")

    @classmethod
    def from_bundle(cls, root: Path, manifest: dict, pick, part, precision: str, vae_precision: str | None,
                    device: str = "cpu") -> "WanFamily":
        """A Wan export-engines bundle on onnxruntime: the tokenizer saved in the bundle, the text encoder and DiT
        graphs, the VAE's two streaming step graphs. `pick(part, precision)` -> manifest entry (None: the first
        float one); `part(name, entry, out_shape)` -> a backend part."""
        from vidrt.export.wan_vae import OrtStep, stream_decode

        from .family import RoutedDit
        _, transformers = require_diffusers()
        self = cls.__new__(cls)
        self.root, self.cfg, self.device = Path(root), WanConfig.from_dict(manifest["model"]), torch.device(device)
        self.tokenizer = load_pretrained(transformers.AutoTokenizer, self.root / "tokenizer", "tokenizer")
        self.text_part = part("text_encoder", pick("text_encoder", None),
                              lambda ids, _: (*ids.shape, self.cfg.text_dim))
        self.text_model, self.vae = None, None
        self.dit = bundle_dit(pick, part, precision)
        if self.cfg.boundary_ratio is not None:  # Wan 2.2 A14B: "dit" the high-noise expert, "dit_2" the low-noise
            low = bundle_dit(pick, part, precision, "dit_2")  # switched as WanDiT and WanPipeline: t < boundary
            self.dit = RoutedDit([(_Served(_boundary(self.cfg), high=False), low), (None, self.dit)])
        steps = [OrtStep(self.root / pick(n, vae_precision)["runtimes"]["onnxruntime"]["graph"])
                 for n in ("vae_first", "vae_step")]
        self.vae_decode = lambda z: stream_decode(steps[0], steps[1], z.float())
        return self

    @property
    def expert_boundary(self) -> float | None:
        """The timestep below which Wan 2.2 A14B's low-noise expert runs (None: one DiT)."""
        return None if self.cfg.boundary_ratio is None else _boundary(self.cfg)

    def to(self, device, dtype) -> "WanFamily":
        """The DiT and VAE in `dtype` on `device`; the text encoder stays float32 (as WanPipeline's bf16 one would
        be cast back to the transformer dtype anyway)."""
        move(self, (*self.dit.children(), self.vae) if self.vae is not None else (), device, dtype)
        return self

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tokenizer is None:
            raise ConfigError(f"{self.cfg.name} is a random-init geometry preset without a text encoder (UMT5-XXL "
                              "is not built at random): pass text embeddings, or use a Wan diffusers directory")
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean
        L = self.cfg.text_len
        tok = self.tokenizer([prompt_clean(p) for p in prompts], padding="max_length", max_length=L, truncation=True,
                             add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        ids, mask = tok.input_ids.to(self.device), tok.attention_mask.to(self.device)
        return self.text_part(ids, mask), mask.bool()

    def solver(self, name: str, steps: int, shift: float | None, **_):
        from vidrt.runtime.schedulers import solver_from_diffusers
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

    @property
    def text_encoder(self) -> "WanFamily":
        return self  # encode(prompts) is the text encoder's contract

    def check_memory(self, r, device: str, limit_gb: float | None, backend: str, scale: int = 1) -> int:
        batch = len(r.prompts) * (2 if r.guidance_scale > 1 else 1)
        est = functools.partial(self.cfg.estimate_memory, videos=len(r.prompts), batch=batch, backend=backend,
                                scale=scale)
        return refuse_over_limit(est, (r.num_frames, r.height, r.width), f"DiT batch {batch}", limit_gb, device)

    # ---- export: the parts export-engines writes ----------------------------------------------------------------
    def export_parts(self, parts, buckets, max_batch: int, tile: int) -> list:
        from .family import PartSpec, batch_profiles, probe_shape
        c, specs = self.cfg, []
        pf = probe_shape(buckets, c.temporal_factor, c.hw_multiple)
        g = torch.Generator().manual_seed(0)
        if "text_encoder" in parts:
            specs.append(text_spec(WanText(self.text_model), self.tokenizer, self.root, ("input_ids", "attention_mask"),
                                   c.text_len, max_batch))
        if "dit" in parts:
            from vidrt.export.onnx_export import dit_io
            from vidrt.export.swaps import exportable
            io = dit_io(("latents", "timestep", "text"))  # Wan has no text mask

            def feed(shape, n, length, lo, hi):
                return {"latents": torch.randn(n, *c.latent_shape(*shape), generator=g),
                        "timestep": lo + torch.rand(n, generator=g) * (hi - lo),
                        "text": torch.randn(n, length, c.text_dim, generator=g)}
            # Wan 2.2 A14B: one graph per expert ("dit" the high-noise one at timesteps >= boundary, "dit_2" the
            # low-noise one below), each validated on timesteps of its own range; the runtime switches per step
            d, b0 = self.dit, self.dit.boundary
            experts = [("dit", d, None, 0.0, 1000.0)] if d.transformer_2 is None else [
                ("dit", WanDiT(d.transformer, None, None, d.expand_timesteps), _Served(b0, True), b0, 1000.0),
                ("dit_2", WanDiT(d.transformer_2, None, None, d.expand_timesteps), _Served(b0, False), 0.0, b0)]
            for name, module, select, lo, hi in experts:
                per_bucket = [feed((b.frames, b.height, b.width), max_batch, c.text_len, lo, hi) for b in buckets]
                cases = [feed((b.frames, b.height, b.width), 1, c.text_len, lo, hi) for b in buckets] + per_bucket
                cases.append(feed(pf, max_batch + 1, max(2, c.text_len // 3), lo, hi))  # probe: batch, shape, text
                specs.append(PartSpec(name, module.eval(), io, cases, per_bucket[-1], batch_profiles(io, per_bucket),
                                      swaps=exportable, calib_select=select, stream=self.streams.get(name)))
        if "vae_decoder" in parts:  # two streaming step graphs (export/wan_vae.py): first latent frame, the rest
            from vidrt.export.wan_vae import WanDecodeStep, cache_shapes, nearest_for_export, step_io
            z = c.in_channels

            def feed(first, shape, n):
                _, _, h, w = c.latent_shape(*shape)
                shapes = cache_shapes(self.vae, n, h, w)
                x = {"latent": torch.randn(n, z, 1, h, w, generator=g)}
                if not first:
                    x.update({f"cache_{i}": torch.randn(s, generator=g) for i, s in enumerate(shapes)})
                return x, [(s[3] // h, s[4] // w) for s in shapes]
            for first, name in ((True, "vae_first"), (False, "vae_step")):
                per_bucket = [feed(first, (b.frames, b.height, b.width), 1)[0] for b in buckets]
                probe, scales = feed(first, pf, 2)
                io = step_io(len(scales), scales, first)
                specs.append(PartSpec(name, WanDecodeStep(self.vae, first), io, per_bucket + [probe],
                                      per_bucket[-1], batch_profiles(io, per_bucket),
                                      swaps=lambda m: nearest_for_export(m)))
        return specs


class WanText(nn.Module):
    """UMT5 as WanPipeline uses it: embeddings of every position past a prompt's tokens are zero."""

    def __init__(self, text_model: nn.Module):
        super().__init__()
        self.text_model = text_model

    def forward(self, input_ids, attention_mask):
        emb = self.text_model(input_ids, attention_mask).last_hidden_state.float()
        return emb * attention_mask[..., None].to(emb.dtype)


Family, Config = WanFamily, WanConfig  # what models/family.py loads

# Random-init presets at the real sizes, from the published diffusers configs (timing only: no text encoder, so
# bench feeds random text embeddings; the VAE statistics of Wan 2.2's 48-channel VAE are placeholders).
_T2V = dict(patch_size=(1, 2, 2), attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
            freq_dim=256, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
_VAE21 = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True])
PRESETS = {
    "wan2.1-1.3b": dict(transformer={**_T2V, "num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30},
                        vae=_VAE21, sample=(81, 480, 832, 16), flow_shift=3.0),
    "wan2.1-14b": dict(transformer={**_T2V, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40},
                       vae=_VAE21, sample=(81, 720, 1280, 16), flow_shift=5.0),
    "wan2.2-5b": dict(transformer={**_T2V, "num_attention_heads": 24, "ffn_dim": 14336, "num_layers": 30,
                                   "in_channels": 48, "out_channels": 48},
                      vae=dict(base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                               temperal_downsample=[False, True, True], is_residual=True, in_channels=12,
                               out_channels=12, patch_size=2, scale_factor_spatial=16, latents_mean=[0.0] * 48,
                               latents_std=[1.0] * 48),
                      sample=(121, 704, 1280, 24), flow_shift=5.0, expand_timesteps=True),
    "wan2.2-a14b": dict(transformer={**_T2V, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40},
                        vae=_VAE21, sample=(81, 720, 1280, 16), flow_shift=5.0, boundary_ratio=0.875),
}


def preset_config(name: str) -> WanConfig:
    diffusers, _ = require_diffusers()
    p = PRESETS[name]
    t, v = p["transformer"], p["vae"]
    with torch.device("meta"):
        vd = diffusers.AutoencoderKLWan(**v).config  # the class's defaults (latent statistics, scale factors)
    f, h, w, fps = p["sample"]
    return WanConfig(name=name, in_channels=t["in_channels"], text_dim=t["text_dim"], patch=tuple(t["patch_size"]),
                     temporal_factor=vd.scale_factor_temporal, spatial_factor=vd.scale_factor_spatial,
                     latents_mean=list(vd.latents_mean), latents_std=list(vd.latents_std),
                     scheduler={"_class_name": "UniPCMultistepScheduler", "prediction_type": "flow_prediction",
                                "use_flow_sigmas": True, "flow_shift": p["flow_shift"], "num_train_timesteps": 1000},
                     boundary_ratio=p.get("boundary_ratio"), expand_timesteps=p.get("expand_timesteps", False),
                     width=t["num_attention_heads"] * t["attention_head_dim"], ffn_dim=t["ffn_dim"],
                     heads=t["num_attention_heads"],
                     vae_base_dim=v.get("decoder_base_dim") or v["base_dim"],
                     sample=SampleDefaults(num_frames=f, height=h, width=w, num_inference_steps=50,
                                           guidance_scale=5.0, shift=p["flow_shift"], fps=fps))


def from_preset(name: str, device="cpu", dtype=torch.float32, seed: int = 0) -> WanFamily:
    """A random-init Wan at a real size (PRESETS), built directly on `device` in `dtype`."""
    diffusers, _ = require_diffusers()
    t, v, cfg = PRESETS[name]["transformer"], PRESETS[name]["vae"], preset_config(name)
    self = WanFamily.__new__(WanFamily)
    self.root, self.cfg, self.device = None, cfg, torch.device(device)
    self.tokenizer = self.text_model = self.text_part = None
    tr = random_init(diffusers.WanTransformer3DModel, t, device, dtype, seed)
    tr2 = random_init(diffusers.WanTransformer3DModel, t, device, dtype, seed + 1) if cfg.boundary_ratio else None
    self.dit = WanDiT(tr, tr2, None if tr2 is None else cfg.boundary_ratio * 1000, cfg.expand_timesteps)
    self.vae = random_init(diffusers.AutoencoderKLWan, v, device, dtype, seed + 2)
    self.vae_decode = lambda z: self.vae.decode(z, return_dict=False)[0]
    return self
