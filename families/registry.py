"""The one place model names resolve: FAMILIES (name -> Family class). A model is a preset name of some family, a
directory a family accepts (a vidrt checkpoint, a diffusers pipeline directory), or a bundle's manifest. Adding a
family is its folder and one line here.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from vidrt.core.backends import BackendError
from vidrt.core.bundle_parts import BundleParts
from vidrt.core.errors import ConfigError
from vidrt.core.manifest import Manifest
from vidrt.families.base import Family, FamilyConfig
from vidrt.families.ltx.family import LTXFamily
from vidrt.families.vidrt.family import VidrtFamily
from vidrt.families.wan.family import WanFamily
from vidrt.models.checkpoint import FILES

FAMILIES: dict[str, type[Family]] = {f.name: f for f in (VidrtFamily, WanFamily, LTXFamily)}
OWN = VidrtFamily  # what a vidrt checkpoint directory or a bundle without a "family" is


def all_presets() -> list[str]:
    """Every family's preset names: vidrt's first, then the real-size random-init geometries."""
    return [p for f in FAMILIES.values() for p in f.presets]


def diffusers_families() -> dict[str, type[Family]]:
    """model_index.json _class_name -> the family that loads it."""
    return {p: f for f in FAMILIES.values() for p in f.pipelines}


def _diffusers_class(root: Path) -> str:
    try:
        return json.loads((root / "model_index.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError) as e:
        raise ConfigError(f"{root / 'model_index.json'} is not a diffusers model index: {e}") from e


def diffusers_family(root: Path) -> type[Family]:
    """The family of a diffusers pipeline directory, or ConfigError naming the supported ones."""
    cls, known = _diffusers_class(root), diffusers_families()
    if cls not in known:
        raise ConfigError(f"{root} is a diffusers {cls} directory, which vidrt does not support; supported: "
                          f"{', '.join(known)} (Wan 2.1 / 2.2, LTX-Video 0.9 text-to-video)")
    return known[cls]


def resolve(model: str | Path) -> tuple[type[Family], Path | None]:
    """(family, directory), or (family, None) for a preset name. vidrt's presets (and `tiny`) win over a directory of
    that name; a directory wins over another family's preset; ConfigError names what `model` could have been."""
    if str(model) in OWN.presets:
        return OWN, None
    p = Path(str(model)).expanduser()
    if p.is_dir() and (p / "model_index.json").is_file():
        return diffusers_family(p), p
    if p.is_dir() and not OWN.accepts(p):
        raise ConfigError(f"{p} is neither a vidrt checkpoint ({', '.join(FILES)}) nor a diffusers pipeline "
                          f"directory (model_index.json with transformer/, vae/, text_encoder/, tokenizer/, "
                          f"scheduler/ of a {', '.join(diffusers_families())})")
    if p.exists():
        return OWN, p  # its checkpoint loader names what the directory lacks
    fam = next((f for f in FAMILIES.values() if str(model) in f.presets), None)
    if fam is None:
        raise ConfigError(f"checkpoint path {str(p)!r} does not exist; pass a directory with {', '.join(FILES)} "
                          f"or a preset ({', '.join(all_presets())})")
    return fam, None


def family_config(model: str | Path) -> FamilyConfig:
    """The model's config (defaults, shape rules) without loading weights."""
    fam, root = resolve(model)
    return fam.preset_config(str(model)) if root is None else fam.config_from_dir(root)


def is_preset(model: str | Path) -> bool:
    """A random-init geometry of a diffusers family (no text encoder: it cannot be exported or calibrated)."""
    fam, root = resolve(model)
    return root is None and fam is not OWN


def load_family(model: str | Path = "tiny", seed: int = 0, device="cpu", dtype: torch.dtype = torch.float32,
                stream_dit: bool = False) -> Family:
    """A preset name, `tiny`, a vidrt checkpoint directory or a diffusers pipeline directory -> a loaded family on
    CPU in float32 (eval mode); a family's real-size random-init preset is built directly on `device` in `dtype`.
    `stream_dit`: the DiT as a skeleton whose blocks a block-streamed export reads one at a time."""
    fam, root = resolve(model)
    if stream_dit and (root is None or not fam.streams_dit):
        streaming = [f.name for f in FAMILIES.values() if f.streams_dit]
        what = f"a {fam.name} directory" if root is not None and fam.pipelines else "not a diffusers directory"
        raise ConfigError(f"block-streamed export reads a diffusers directory's safetensors block by block; it is "
                          f"available for {', '.join(streaming)} directories, and {model} is {what}")
    if root is None:
        return fam.from_preset(str(model), device, dtype, seed)
    return fam.from_dir(root, dtype=dtype, stream_dit=stream_dit)


def family_of_bundle(manifest: Manifest, backend: str) -> type[Family]:
    """The family a bundle was exported from (its manifest's model.family; none: vidrt's own), or BackendError."""
    name = manifest.model.get("family") or OWN.name
    if name not in FAMILIES:
        raise BackendError(f"bundle {manifest.root} is of model family {name!r}, which this vidrt does not know "
                           f"({', '.join(sorted(FAMILIES))}); re-export it")
    fam = FAMILIES[name]
    if backend not in fam.bundle_backends:
        raise BackendError(f"{name} bundles run on backend={fam.bundle_backends[0]!r} (their TensorRT path is not "
                           "built)")
    return fam


def load_bundle_family(bundle: BundleParts, precision: str, vae_precision: str | None) -> Family:
    return family_of_bundle(bundle.manifest, bundle.backend).from_bundle(bundle, precision, vae_precision)
