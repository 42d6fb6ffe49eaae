"""Engine bundle: a self-describing directory with manifest.json, written atomically, verified on load."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

MANIFEST = "manifest.json"
FORMAT = 2  # 2: parts say which graph each runtime uses ("runtimes")


class BundleError(RuntimeError):
    """A corrupt, partial or mismatched bundle. The message names the file and what to do."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _digest(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def versions() -> dict:
    import onnx
    import torch
    out = {"torch": torch.__version__, "onnx": onnx.__version__}
    try:
        import onnxruntime
        out["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        out["onnxruntime"] = None
    from .tensorrt import trt_version
    out["tensorrt"] = trt_version()
    return out


class BundleWriter:
    """with BundleWriter(out) as w: write files under w.dir, then w.finish(manifest). Nothing appears at `out`
    until finish() renames the complete temp directory into place; on error the temp directory is removed."""

    def __init__(self, out: str | Path, overwrite: bool = False):
        self.out = Path(out).resolve()
        if self.out.exists() and not overwrite:
            raise BundleError(f"{self.out} exists; pass overwrite=True (--overwrite) or choose another --out")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-", dir=self.out.parent))

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)
        return False

    def finish(self, manifest: dict) -> Path:
        files = sorted(p for p in self.dir.rglob("*") if p.is_file())
        manifest = {"format": FORMAT, **manifest, "versions": versions(),  # a calibration set gives its own format
                    "files": {str(p.relative_to(self.dir)): {"sha256": sha256(p), "bytes": p.stat().st_size}
                              for p in files}}
        manifest["digest"] = _digest(manifest)  # any later edit of the manifest itself is detected
        (self.dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        old = None
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            os.rename(self.out, old)
        os.rename(self.dir, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out


def load_manifest(bundle: str | Path, check_versions: bool = True, fmt: int = FORMAT) -> dict:
    """Read and verify a bundle: every listed file present with its SHA-256, no unlisted files, format and
    library versions compatible. Raises BundleError naming the problem."""
    root = Path(bundle)
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"{root} is not an engine bundle (no {MANIFEST}); re-run export-engines")
    try:
        m = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{mpath} is not valid JSON ({e}); the bundle is corrupt, re-export it") from e
    if m.get("digest") != _digest(m):
        raise BundleError(f"{mpath} was edited after export (its digest does not match); re-run export-engines")
    if m.get("format") != fmt:
        raise BundleError(f"{mpath}: format {m.get('format')!r}, this vidrt reads {fmt}; re-export it")
    files = m.get("files") or {}
    for name, info in files.items():
        p = root / name
        if not p.is_file():
            raise BundleError(f"{root}: {name} is missing (partial bundle); re-run export-engines")
        if p.stat().st_size != info["bytes"] or sha256(p) != info["sha256"]:
            raise BundleError(f"{root}: {name} does not match its SHA-256 in {MANIFEST} (corrupt or edited); "
                              "re-run export-engines")
    extra = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()
                   and p.name != MANIFEST and str(p.relative_to(root)) not in files)
    if extra:
        raise BundleError(f"{root}: files not in {MANIFEST}: {', '.join(extra)}; the bundle was modified")
    for part in m.get("parts", {}).values():
        named = [part.get("onnx"), part.get("engine")] + [r.get("graph") for r in part.get("runtimes", {}).values()]
        for f in filter(None, named):
            if f not in files:
                raise BundleError(f"{mpath}: part file {f} is not listed with a hash; re-export it")
    if check_versions:
        have = versions()
        for lib in ("onnx", "tensorrt"):
            want = m.get("versions", {}).get(lib)
            if lib == "tensorrt" and not any(p.get("engine") for p in m.get("parts", {}).values()):
                continue  # no engines: any TensorRT (or none) is fine
            if lib == "tensorrt" and want and have.get(lib):  # engines: exact version unless version-compatible
                from .tensorrt import engine_incompatibility
                why = engine_incompatibility(want, have[lib], m.get("engines", {}).get("version_compatible", False))
                if why:
                    raise BundleError(f"bundle {root}: {why}")
            elif want and have.get(lib) and want.split(".")[0] != have[lib].split(".")[0]:
                raise BundleError(f"bundle built with {lib} {want}, this machine has {have[lib]}: "
                                  f"engines and graphs do not carry across major versions; re-export here")
            if lib == "tensorrt" and want and not have.get(lib):
                raise BundleError(f"bundle has TensorRT {want} engines but TensorRT is not installed; install "
                                  "it or load the ONNX parts with the onnxruntime backend")
    return m
