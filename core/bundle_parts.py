"""A verified bundle opened for one backend: the manifest entry that serves a part at a precision (`entry`), and that
graph or engine as a runnable part (`part`, `dit`). Families build themselves from one (Family.from_bundle)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from vidrt.core.backends import BackendError, Part, SharedDeviceMemory, make_part
from vidrt.core.dit_call import DIT_CALL, DitCall

FLOATS = ("fp32", "fp16", "bf16")


class BundleParts:
    def __init__(self, root: str | Path, manifest: dict, backend: str, device: str = "cpu"):
        self.root, self.manifest, self.backend, self.device = Path(root), manifest, backend, device
        self.shared = SharedDeviceMemory(torch.device(device)) if backend == "tensorrt" else None

    def entry(self, part: str, precision: str | None = None) -> dict:
        """The manifest entry of `part` at `precision` (None: its first float one); BackendError naming what the
        bundle has, or why this backend cannot run it."""
        parts, root = self.manifest["parts"], self.root
        names = [n for n in parts if parts[n]["part"] == part]
        name = f"{part}.{precision}" if precision else next((n for n in names if parts[n]["precision"] in FLOATS),
                                                            None)
        if name not in parts:
            raise BackendError(f"bundle {root} has no {part} at {precision or 'a float precision'} (it has "
                               f"{', '.join(names) or 'none'}); export it with export-engines --precision")
        e = parts[name]
        if self.backend == "tensorrt" and "tensorrt" not in e.get("runtimes", {"tensorrt": {}}):
            raise BackendError(f"{name} in bundle {root} is an onnxruntime-only graph; pick a float precision for it "
                               "on backend='tensorrt'")
        if self.backend == "tensorrt" and not e.get("engine"):
            raise BackendError(f"bundle {root} has no TensorRT engine for {name} "
                               f"({self.manifest['engines']['skipped_reason']}); use backend='onnxruntime' or rebuild "
                               "on a TensorRT machine")
        return e

    def part(self, name: str, entry: dict, out_shape: Callable, reuse: bool = False) -> Part:
        """The entry's engine (tensorrt) or graph (onnxruntime, as the bundle says to run it). `out_shape`: the
        output shape from the input shapes (onnxruntime's bound output); `reuse`: rebind one output buffer."""
        if self.backend == "tensorrt":
            return make_part(self.backend, name, self.root / entry["engine"], self.device, shared=self.shared)
        rt = entry["runtimes"]["onnxruntime"]
        return make_part(self.backend, name, self.root / rt["graph"], self.device,
                         basic_opt=rt["graph_optimization"] == "basic", out_shape=out_shape, reuse_output=reuse)

    def dit(self, precision: str, name: str = "dit", reuse: bool = False) -> Part | DitCall:
        """The bundle's DiT graph behind the runtime's DiT call: the part itself where it takes the call's inputs,
        else fed the inputs its entry declares (Wan has no text mask)."""
        e = self.entry(name, precision)
        part, inputs = self.part(name, e, lambda x, *_: x.shape, reuse=reuse), tuple(e.get("inputs", DIT_CALL))
        return part if inputs == DIT_CALL else DitCall(part, inputs)
