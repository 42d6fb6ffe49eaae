"""A verified bundle opened for one backend: the entry that serves a part at a precision (`entry`), and that graph or
engine as a runnable part (`part`, `dit`). Families build themselves from one (Family.from_bundle)."""
from __future__ import annotations

from typing import Callable

import torch

from vidrt.core.backends import Part, SharedDeviceMemory, make_part
from vidrt.core.dit_call import DIT_CALL, DitCall
from vidrt.core.manifest import Manifest, PartEntry


class BundleParts:
    def __init__(self, manifest: Manifest, backend: str, device: str = "cpu"):
        self.manifest, self.root, self.backend, self.device = manifest, manifest.root, backend, device
        self.shared = SharedDeviceMemory(torch.device(device)) if backend == "tensorrt" else None

    def entry(self, part: str, precision: str | None = None) -> PartEntry:
        """Manifest.entry on this backend."""
        return self.manifest.entry(part, precision, self.backend)

    def part(self, entry: PartEntry, out_shape: Callable, reuse: bool = False) -> Part:
        """The entry's engine (tensorrt) or graph (onnxruntime, as the bundle says to run it). `out_shape`: the
        output shape from the input shapes (onnxruntime's bound output); `reuse`: rebind one output buffer."""
        if self.backend == "tensorrt":
            return make_part(self.backend, entry.part, self.root / entry.engine, self.device, shared=self.shared)
        return make_part(self.backend, entry.part, self.root / entry.graph, self.device, basic_opt=entry.basic_opt,
                         out_shape=out_shape, reuse_output=reuse)

    def dit(self, precision: str, name: str = "dit", reuse: bool = False) -> Part | DitCall:
        """The bundle's DiT graph behind the runtime's DiT call: the part itself where it takes the call's inputs,
        else fed the inputs its entry declares (Wan has no text mask)."""
        e = self.entry(name, precision)
        part = self.part(e, lambda x, *_: x.shape, reuse=reuse)
        return part if e.inputs in ((), DIT_CALL) else DitCall(part, e.inputs)
