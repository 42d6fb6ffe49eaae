"""The family contract: what the runtime, calibration and export-engines may use of a loaded model, as code. A family
is one folder (families/<name>/) whose Family subclass loads a model one of four ways (the factories below, each
ending in the class's one constructor) and supplies what is model-specific once; nothing outside the folder branches
on which family it is. Optional capabilities are typed class attributes or properties with defaults here.
"""
from __future__ import annotations

import abc
import functools
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, ClassVar, Mapping, Protocol

import torch

from vidrt.core.errors import ConfigError
from vidrt.core.memory import refuse_over_limit
from vidrt.core.request import Request
from vidrt.models.config import SampleDefaults

if TYPE_CHECKING:
    from vidrt.core.buckets import Bucket
    from vidrt.core.bundle_parts import BundleParts
    from vidrt.core.dit_call import DitFn
    from vidrt.families.parts import PartSpec, StreamSource


class FamilyConfig(Protocol):
    """One config shape for every family: read without loading weights, saved in a bundle's manifest ("model")."""
    name: str
    family: str
    sample: SampleDefaults

    @property
    def temporal_factor(self) -> int: ...  # video frames per latent frame (after the first)

    @property
    def spatial_factor(self) -> int: ...  # pixels per latent pixel

    @property
    def hw_multiple(self) -> int: ...  # height and width must be multiples of this

    @property
    def text_shape(self) -> tuple[int, int]: ...  # (length, width) of the text embeddings the DiT takes

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]: ...

    def to_dict(self) -> dict: ...


class Solver(Protocol):
    """A sampler: sigmas from 1 to 0 (`timesteps`), the DiT's timestep per step (`model_t`), one update per step."""
    timesteps: list[float]
    model_t: list[float]

    def reset(self) -> None: ...

    def step(self, i: int, x: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor: ...


class Family(abc.ABC):
    """A loaded model. Registered by `name` in families/registry.py; `pipelines` are the diffusers model_index.json
    classes it loads, `presets` its random-init real-size geometries (timing only)."""
    name: ClassVar[str]
    config: ClassVar[type]  # the FamilyConfig class (from_dict reads a manifest's "model")
    pipelines: ClassVar[tuple[str, ...]] = ()
    presets: ClassVar[Mapping[str, dict]] = MappingProxyType({})
    solvers: ClassVar[tuple[str, ...]] = ("default",)
    quant_skip: ClassVar[tuple[str, ...]] = ()  # module-name regexes FP8/INT8 keep in float (measured per family)
    latent_dtype: ClassVar[torch.dtype | None] = None  # latents and solver arithmetic; None: the pipeline's dtype
    streams_dit: ClassVar[bool] = False  # from_dir(stream_dit=True): the DiT as a skeleton read block by block
    int8_vae: ClassVar[bool] = False  # export-engines may add onnxruntime's INT8 VAE decoder (PSNR-checked)
    bundle_backends: ClassVar[tuple[str, ...]] = ("onnxruntime",)  # backends its bundles run on

    cfg: FamilyConfig
    dit: DitFn  # dit(latents, timestep, text, text_mask) -> velocity
    device: torch.device
    vae_part = None  # a backend part decoding normalised latents (bundles and LTX); None: the family's torch VAE
    decode_tile: int | None = None  # latent frames per VAE decode call; None: the family decodes whole or streams
    streams: Mapping[str, StreamSource] = MappingProxyType({})  # DiT part name -> its block source (stream_dit)

    # ---- factories: each ends in the class's constructor ----------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def from_dir(cls, root: Path, dtype: torch.dtype = torch.float32, stream_dit: bool = False) -> "Family":
        """A model directory of this family, loaded on CPU in `dtype`."""

    @classmethod
    @abc.abstractmethod
    def from_bundle(cls, bundle: BundleParts, precision: str, vae_precision: str | None) -> "Family":
        """An export-engines bundle of this family: its graphs or engines as parts."""

    @classmethod
    def from_preset(cls, name: str, device="cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> "Family":
        raise ConfigError(f"{cls.name} has no preset {name!r}")

    @classmethod
    def preset_config(cls, name: str) -> FamilyConfig:
        raise ConfigError(f"{cls.name} has no preset {name!r}")

    @classmethod
    @abc.abstractmethod
    def config_from_dir(cls, root: Path) -> FamilyConfig:
        """The directory's config without loading weights (ConfigError naming what is wrong with it)."""

    @classmethod
    def accepts(cls, root: Path) -> bool:
        """Whether a directory without a model_index.json is this family's (diffusers directories resolve by their
        model_index.json class, `pipelines`)."""
        return False

    # ---- the runtime's side --------------------------------------------------------------------------------
    @abc.abstractmethod
    def to(self, device, dtype: torch.dtype) -> "Family":
        """The torch parts on `device` in `dtype` (a text encoder may stay float32)."""

    @abc.abstractmethod
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (text (B, L, D) float32, text_mask (B, L) bool), exactly as the family's pipeline does it."""

    @abc.abstractmethod
    def solver(self, name: str, steps: int, shift: float | None,
               latent_shape: tuple[int, ...] | None = None) -> Solver:
        """The sampler `name` (one of `solvers`) for `steps` steps; `latent_shape` where the schedule depends on it."""

    @abc.abstractmethod
    def decode(self, latents: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        """Normalised latents -> video in [-1, 1] (B, 3, F, H, W), unclamped."""

    @abc.abstractmethod
    def check_memory(self, r: Request, device: str, limit_gb: float | None, backend: str, scale: int = 1) -> int:
        """The estimated peak bytes of `r`; ConfigError naming the limit and a shape that fits when over it."""

    @abc.abstractmethod
    def export_parts(self, parts: list[str], buckets: list[Bucket], max_batch: int, tile: int) -> list[PartSpec]:
        """The graphs export-engines writes (families/parts.PartSpec)."""

    @property
    def text_encoder(self):
        """What encodes prompts (encode(prompts) -> (text, mask)); a diffusers family is its own."""
        return self

    def use_text_encoder(self, encoder) -> None:
        """Replace the text encoder (Pipeline(text_encoder=...)); only vidrt's own family takes another one."""
        raise ConfigError(f"text_encoder= replaces vidrt's own text encoder; {self.cfg.name} encodes prompts with its "
                          "directory's own (text_encoder/ and tokenizer/)")

    @property
    def expert_boundary(self) -> float | None:
        """Two-expert models (Wan 2.2 A14B): the timestep below which the low-noise expert runs; None: one DiT."""
        return None

    @property
    def scores_faithfulness(self) -> bool:
        """Whether calibration/evaluate.py's synthetic-scene faithfulness score means anything for this model."""
        return False


class DiffusersFamily(Family, abc.ABC):
    """What the families loaded from diffusers directories share: a config class with from_dir(root) and
    estimate_memory(frames, height, width, videos, batch, backend, scale) (models/diffusers_io.DirConfig)."""

    @classmethod
    def config_from_dir(cls, root: Path) -> FamilyConfig:
        return cls.config.from_dir(root)

    def check_memory(self, r: Request, device: str, limit_gb: float | None, backend: str, scale: int = 1) -> int:
        est = functools.partial(self.cfg.estimate_memory, videos=len(r.prompts), batch=r.dit_batch, backend=backend,
                                scale=scale)
        return refuse_over_limit(est, (r.num_frames, r.height, r.width), f"DiT batch {r.dit_batch}", limit_gb, device)
