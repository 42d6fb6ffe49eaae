"""What a family declares for export-engines: one PartSpec per graph (module, names and dynamic axes once, validation
feeds with a probe shape unlike every bucket, TensorRT profiles, exact swaps), and the helpers families build them
with."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from vidrt.export.onnx_export import GraphIO
from vidrt.models.diffusers_io import TEXT_PROMPTS

if TYPE_CHECKING:
    from vidrt.models.diffusers_io import SafetensorsFolder


@dataclass
class PartSpec:
    """One exported graph, declared by its family. `io` (export/onnx_export.GraphIO: input and output names, dynamic
    axes) is the one declaration export, parity, TensorRT profiles and the runtime read. `cases`: validation feeds
    (every bucket, and a probe shape unlike every bucket, so a shape baked into the graph fails the export);
    `example`: the tracing feed; `swaps`: a context manager of exact export-time module swaps; `files`: files the
    runtime needs beside the graph (bundle name -> source path). `calib_select`: for a DiT part that serves only some
    timesteps (Wan 2.2 A14B's two experts), timestep (N,) -> bool (N,): the timesteps it serves, i.e. the captured
    calibration samples that calibrate it and the steps it runs in a whole-pipeline report (None: every one).
    `stream`: set when the module is a skeleton whose blocks are read one at a time (block-streamed export)."""
    name: str
    module: torch.nn.Module
    io: GraphIO
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


def batch_profiles(io: GraphIO, feeds: list[dict]) -> list[dict]:
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


def text_spec(module: nn.Module, tokenizer, root: Path, inputs: tuple[str, ...], text_len: int, max_batch: int):
    """The text encoder's PartSpec: `inputs` of the tokenizer's output (input_ids, and attention_mask where the
    family's encoder takes it) -> text; validated at batch 1, max_batch, and a shorter text at a larger batch; the
    tokenizer's files travel in the bundle."""
    axes = {n: {0: "batch", 1: "text_len"} for n in (*inputs, "text")}
    io = GraphIO(list(inputs), ["text"], axes)

    def feed(n, length):
        tok = tokenizer((TEXT_PROMPTS * n)[:n], padding="max_length", max_length=length, truncation=True,
                        return_attention_mask=True, return_tensors="pt")
        return {k: tok[k] for k in inputs}
    full = feed(max_batch, text_len)
    cases = [feed(1, text_len), full, feed(min(3, max_batch + 1), max(2, text_len // 3))]
    files = {f"tokenizer/{p.name}": p for p in sorted((root / "tokenizer").iterdir()) if p.is_file()}
    return PartSpec("text_encoder", module, io, cases, full, batch_profiles(io, [full]), files=files)
