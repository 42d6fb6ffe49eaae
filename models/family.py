"""Model families: the unit the runtime is built from. A family is one module that loads a model and supplies what
is model-specific, once; `Pipeline` reads everything through it:

    cfg                 name, sample defaults (.sample), latent_shape(frames, height, width) with the family's
                        frame/size rules (ConfigError naming the fix), to_dict()
    dit                 nn.Module with the one DiT call: dit(latents, timestep, text, text_mask) -> velocity
    to(device, dtype)   move the torch parts
    encode(prompts)     -> (text (B, L, D) float32, text_mask (B, L) bool), exactly as the family's pipeline does it
    quant_skip          module-name regexes kept in float by FP8/INT8 (measured per family)
    solvers, solver(name, steps, shift, latent_shape=None)
                        the sampler: sigmas from 1 to 0 (.timesteps), the DiT's timestep per step (.model_t),
                        step(i, x, velocity)
    decode(latents, tile)
                        normalised latents -> video in [-1, 1] (B, 3, F, H, W), unclamped
    check_memory(request, device, limit_gb, backend, scale)
                        refuse a request that cannot fit, before any work
    export_parts(parts, buckets, max_batch, tile)
                        the graphs export-engines writes (PartSpec: module, names and dynamic axes declared once,
                        validation feeds including a probe shape unlike every bucket, TensorRT profiles, exact swaps)

Families: "vidrt" (the project's VideoDiT + causal VAE: presets, `tiny`, vidrt checkpoint directories), "wan"
(models/wan.py: a diffusers WanPipeline directory) and "ltx" (models/ltx.py: a diffusers LTXPipeline directory).
A diffusers directory is recognised by its model_index.json.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from vidrt.runtime.fp8 import SENSITIVE_MODULES

from .checkpoint import FILES, load_model
from .config import PRESETS, ConfigError, ModelConfig, check_memory

if TYPE_CHECKING:
    from .diffusers_io import SafetensorsFolder

# model_index.json _class_name -> family module (vidrt.models.<module>; it defines Family and Config)
DIFFUSERS_FAMILIES = {"WanPipeline": "wan", "LTXPipeline": "ltx"}
DIT_CALL = ("latents", "timestep", "text", "text_mask")  # the runtime's one DiT call, in this order


@dataclass
class PartSpec:
    """One exported graph, declared by its family. `io` = (input names, output names, dynamic axes {name: {axis:
    label}}) is the one declaration export, parity, TensorRT profiles and the runtime read. `cases`: validation feeds
    (every bucket, and a probe shape unlike every bucket, so a shape baked into the graph fails the export);
    `example`: the tracing feed; `swaps`: a context manager of exact export-time module swaps; `files`: files the
    runtime needs beside the graph (bundle name -> source path). `calib_select`: for a DiT part that serves only some
    timesteps (Wan 2.2 A14B's two experts), timestep (N,) -> bool (N,): the timesteps it serves, i.e. the captured
    calibration samples that calibrate it and the steps it runs in a whole-pipeline report (None: every one).
    `stream`: set when the module is a skeleton whose blocks are read one at a time (block-streamed export)."""
    name: str
    module: torch.nn.Module
    io: tuple
    cases: list[dict]
    example: dict
    profiles: list[dict]
    swaps: Callable = lambda module: contextlib.nullcontext()  # module -> context manager
    files: dict = field(default_factory=dict)
    calib_select: Callable | None = None
    stream: "StreamSource | None" = None


@dataclass
class StreamSource:
    """A DiT part loaded as a skeleton for block-streamed export (export/streamed.py): the parameters of its blocks,
    the ModuleList at `blocks` (a dotted path in the part's module), stay on the meta device and are read from
    `weights` (a diffusers_io.SafetensorsFolder of the module at `holder`, whose state-dict keys it uses) one block
    at a time."""
    blocks: str
    holder: str
    weights: "SafetensorsFolder"
    block_bytes: int  # fp32 bytes of its widest block (the memory plan's unit)

    def key_prefix(self, k: int) -> str:
        rel = self.blocks[len(self.holder) + 1:] if self.holder else self.blocks
        return f"{rel}.{k}."


def batch_profiles(io: tuple, feeds: list[dict]) -> list[dict]:
    """TensorRT profiles from one max-batch feed per bucket: every dim exact except the batch axis (1..max)."""
    names, _, axes = io
    out = []
    for feed in feeds:
        prof = {}
        for n in names:
            shape = tuple(feed[n].shape)
            lo = tuple(1 if axes.get(n, {}).get(i) == "batch" else d for i, d in enumerate(shape))
            prof[n] = (lo, shape, shape)
        if prof not in out:
            out.append(prof)
    return out


def probe_shape(buckets, frames_step: int, hw_multiple: int) -> tuple[int, int, int]:
    """A valid (frames, height, width) unlike every bucket in all three: validation runs the graphs there too."""
    f = max(b.frames for b in buckets) + frames_step
    h = max(b.height for b in buckets) + hw_multiple
    w = max(b.width for b in buckets) + 2 * hw_multiple
    return f, h, w


class RoutedDit:
    """Several DiT parts behind one DiT call (Wan 2.2 A14B's experts): each step runs the first part whose timestep
    predicate (a PartSpec's calib_select) accepts the step's timestep; None accepts every one."""

    def __init__(self, parts: list):
        self.parts = parts  # [(predicate on a (1,) timestep tensor, or None; DiT call)]
        self.backend = getattr(parts[0][1], "backend", "torch")

    def __call__(self, latents, timestep, *rest):
        t = timestep.reshape(-1)[:1]
        part = next(p for sel, p in self.parts if sel is None or bool(sel(t)[0]))
        return part(latents, timestep, *rest)


class DitCall:
    """The runtime's DiT call (DIT_CALL order) on a graph that declares fewer inputs (Wan has no text mask)."""

    def __init__(self, part, inputs: tuple[str, ...]):
        self.part, self.inputs, self.backend = part, tuple(inputs), getattr(part, "backend", "torch")

    def __call__(self, *args):
        named = dict(zip(DIT_CALL, args))
        return self.part(*(named[n] for n in self.inputs))


class VidrtFamily:
    """The project's own DiT and causal VAE (ModelConfig). `vae_part`: a backend part decoding normalised latent
    tiles (bundles); None decodes with `vae`."""
    solvers = ("euler", "dpm++2m")
    quant_skip = SENSITIVE_MODULES  # kept in float by FP8 and the INT8/FP8 ONNX recipe

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

    def solver(self, name: str, steps: int, shift: float | None, **_):
        from vidrt.runtime.schedulers import make_solver
        return make_solver(name, steps, self.cfg.sample.shift if shift is None else shift)

    def decode(self, latents: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        tile = tile or self.decode_tile
        if self.vae_part is not None:  # the exported part de-normalises itself; tiling commutes with that
            return self.vae.decode_tiled(latents.float(), tile=tile, decode_fn=self.vae_part).float()
        z = latents * self.cfg.vae.latent_std + self.cfg.vae.latent_mean
        return self.vae.decode_tiled(z.to(next(self.vae.parameters()).dtype), tile=tile).float()

    def export_parts(self, parts, buckets, max_batch: int, tile: int) -> list[PartSpec]:
        """text_encoder (fp32 BERT/T5), dit, vae_decoder (one temporal tile with its causal context, de-normalising
        inside); names and axes from export/onnx_export.IO, profiles from export/tensorrt.profiles_for."""
        from vidrt.export import onnx_export as ox
        from vidrt.export.tensorrt import profiles_for
        cfg, specs = self.cfg, []
        for part in parts:
            cases, example = [], None
            for i, b in enumerate(buckets):
                _, t, h, w = cfg.latent_shape(b.frames, b.height, b.width)
                if part == "dit":
                    cases += [ox.dit_inputs(cfg, n, (t, h, w), seed=i) for n in (1, max_batch)]
                elif part == "vae_decoder":
                    tmax = profiles_for("vae_decoder", cfg, [b], vae_tile=tile)[0]["latents"][2][2]
                    cases += [ox.vae_inputs(cfg, 1, (n, h, w), seed=i) for n in sorted({1, tmax})]
            if part == "dit":  # and a probe unlike every bucket in frames, size, batch and text length
                example = cases[-1]
                pf = probe_shape(buckets, cfg.vae.temporal_factor, cfg.hw_multiple)
                cases.append(ox.dit_inputs(cfg, max_batch + 1, cfg.latent_shape(*pf)[1:],
                                           max(2, cfg.text.max_length // 2), seed=99))
                module = self.dit
            elif part == "vae_decoder":
                module = ox.DecoderPart(self.vae, cfg.vae.latent_mean, cfg.vae.latent_std)
            else:
                module = self.text_encoder
                prompts = ["a red circle moving left on a blue background", "A litter of golden retriever puppies "
                           "playing in the snow", ""]
                for n in (1, 2):
                    tok = module.tokenize(prompts[:n] if n == 1 else prompts[1:])
                    cases.append({"input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"]})
            specs.append(PartSpec(part, module, ox.IO[part], cases, example or cases[-1],
                                  profiles_for(part, cfg, buckets, max_batch, tile)))
        return specs

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
                          f"{', '.join(DIFFUSERS_FAMILIES)} (Wan 2.1 / 2.2, LTX-Video 0.9 text-to-video)")
    return DIFFUSERS_FAMILIES[cls]


def _diffusers_dir(model) -> Path | None:
    p = Path(str(model)).expanduser()
    ok = str(model) not in PRESETS and str(model) != "tiny" and p.is_dir() and (p / "model_index.json").is_file()
    return p if ok else None


def family_module(name: str):
    """vidrt.models.<name>: a family module, defining Family (loaded model) and Config (configs only)."""
    import importlib
    return importlib.import_module(f"vidrt.models.{name}")


def _family_preset(model) -> str | None:
    """The family module of a random-init preset at a real size (e.g. wan2.1-14b, ltx-video), or None: every family
    module's PRESETS is looked up. A directory of that name (a downloaded checkpoint, say) wins over the preset."""
    if Path(str(model)).expanduser().exists():
        return None
    for name in dict.fromkeys(DIFFUSERS_FAMILIES.values()):
        if str(model) in getattr(family_module(name), "PRESETS", {}):
            return name
    return None


def family_config(model: str | Path):
    """The model's config (defaults, shape rules) without loading weights."""
    if name := _family_preset(model):
        return family_module(name).preset_config(str(model))
    p = _diffusers_dir(model)
    if p is not None:
        return family_module(diffusers_family(p)).Config.from_dir(p)
    from .checkpoint import resolve_model
    return resolve_model(model)[0]


STREAMING_FAMILIES = ("wan",)  # whose Family(root, stream_dit=True) loads its DiT as a skeleton (export/streamed.py)


def load_family(model: str | Path = "tiny", seed: int = 0, device="cpu", dtype=torch.float32,
                stream_dit: bool = False):
    """A preset name, `tiny`, a vidrt checkpoint directory or a diffusers pipeline directory -> a loaded family on
    CPU in float32 (eval mode); a family's real-size random-init preset is built directly on `device` in `dtype`.
    `stream_dit`: the DiT as a skeleton whose blocks a block-streamed export reads one at a time."""
    fam = diffusers_family(Path(str(model)).expanduser()) if _diffusers_dir(model) is not None else None
    if stream_dit and fam not in STREAMING_FAMILIES:
        raise ConfigError(f"block-streamed export reads a diffusers directory's safetensors block by block; it is "
                          f"available for {', '.join(STREAMING_FAMILIES)} directories, and {model} is "
                          f"{'a ' + fam + ' directory' if fam else 'not a diffusers directory'}")
    if name := _family_preset(model):
        return family_module(name).from_preset(str(model), device, dtype, seed)
    p = Path(str(model)).expanduser()
    if fam is not None:
        kw = {"stream_dit": True} if stream_dit else {}
        return family_module(fam).Family(p, dtype=dtype, **kw)
    if p.is_dir() and not any((p / f).is_file() for f in FILES) and str(model) not in PRESETS:
        raise ConfigError(f"{p} is neither a vidrt checkpoint ({', '.join(FILES)}) nor a diffusers pipeline "
                          f"directory (model_index.json with transformer/, vae/, text_encoder/, tokenizer/, "
                          f"scheduler/ of a {', '.join(DIFFUSERS_FAMILIES)})")
    cfg, dit, vae = load_model(model, seed)
    return VidrtFamily(cfg, dit, vae)
