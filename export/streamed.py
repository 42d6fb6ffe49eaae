"""Block-streamed export of a DiT part: its graph is written one transformer block at a time, so the export holds the
part's weights outside its blocks plus one block, whatever the depth (a 14B DiT on a 24 GiB build machine).

The part's module comes as a skeleton (families/parts.StreamSource: its blocks' parameters on the meta device, read
from the safetensors files one block at a time). Its ModuleList of blocks is replaced by a cut, and the part's own
forward runs three times:

1. capture: every case runs up to the first block, whose inputs are kept (the forward stops there);
2. blocks: block k is loaded, exported alone (graph + side file), run in torch on every case's carried inputs (its
   outputs feed block k+1), its graph checked on onnxruntime against those outputs, and freed;
3. replay: every case runs again, the cut returning the last block's output: torch's outputs of the whole part.

The skeleton is exported with the cut as one custom node (vidrt::Blocks). The assembly replaces that node by the
block graphs in order, named as the whole module's export names them ("/transformer/blocks.3/attn1/to_q/MatMul",
"transformer.blocks.3.attn1.to_q.bias"), and streams every tensor into the one side file (core/onnx_files).
Nothing is computed that the module does not compute: the blocks' and the skeleton's own code is what is traced.
"""
from __future__ import annotations

import contextlib
import itertools
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from vidrt.core.errors import ConfigError
from vidrt.core.memory import peak_rss_bytes, trim_heap
from vidrt.core.onnx_files import save_graph
from vidrt.export import onnx_export as ox


class _BlocksOp(torch.autograd.Function):
    """The cut in the skeleton's graph: one vidrt::Blocks node over the first block's inputs, typed as its hidden
    state (in torch: a copy of the hidden state, so the trace of what follows has the right shapes)."""

    @staticmethod
    def forward(ctx, hidden, *rest):
        return hidden.clone()

    @staticmethod
    def symbolic(g, hidden, *rest):
        out = g.op("vidrt::Blocks", hidden, *rest)
        out.setType(hidden.type())
        return out


class _Stop(Exception):
    """Raised by the cut in capture mode: the case's forward ends at the first block."""


class _Cut(nn.Module):
    """Stands in for the blocks (a one-element ModuleList holds it): records the first block's inputs (capture),
    emits the vidrt::Blocks node (export) or returns the blocks' output of the case at hand (replay)."""

    def __init__(self):
        super().__init__()
        self.mode, self.calls, self.outputs = "capture", [], []

    def forward(self, *args, **kwargs):
        leaves, tree = tree_flatten((args, kwargs))
        if not all(isinstance(x, torch.Tensor) for x in leaves):
            raise TypeError("block-streamed export: a block input is not a tensor "
                            f"({[type(x).__name__ for x in leaves if not isinstance(x, torch.Tensor)]})")
        if self.mode == "export":
            return _BlocksOp.apply(*leaves)
        if self.mode == "capture":
            self.calls.append((leaves, tree))
            raise _Stop
        return self.outputs.pop(0)


class _Block(nn.Module):
    """One block as exported: its flattened inputs in, its hidden state out (the first input's shape)."""

    def __init__(self, block: nn.Module, tree):
        super().__init__()
        self.block, self.tree = block, tree

    def forward(self, *leaves):
        args, kwargs = tree_unflatten(list(leaves), self.tree)
        return self.block(*args, **kwargs)


@contextlib.contextmanager
def _replaced(root: nn.Module, path: str, new: nn.Module):
    parent_path, _, attr = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    old = getattr(parent, attr)
    setattr(parent, attr, new)
    try:
        yield old
    finally:
        setattr(parent, attr, old)


@dataclass
class StreamReport:
    """What a streamed export measured: per block the worst rel L2 of its graph vs torch over the cases, the
    seconds, the process's peak RSS after each block (flat in depth when streaming works)."""
    blocks: int
    skeleton_parity: list = field(default_factory=list)  # onnx_export.Parity per case, of the one-block graph
    block_rel_l2: list[float] = field(default_factory=list)
    block_seconds: list[float] = field(default_factory=list)
    peak_rss_after_block: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"blocks": self.blocks, "skeleton_parity": [p.__dict__ for p in self.skeleton_parity],
                "block_rel_l2_max": max(self.block_rel_l2, default=0.0),
                "block_rel_l2": [float(f"{v:.3g}") for v in self.block_rel_l2],
                "block_seconds": [round(s, 2) for s in self.block_seconds],
                "peak_rss_after_block": self.peak_rss_after_block}


# What a block-streamed export holds beyond the model's weights outside the DiT's blocks, per byte of one fp32 block:
# its weights, torch's exporter's copy of them, the block check's onnxruntime session. The assembled graph on
# onnxruntime (parity, polygraphy, the CPU flavour, calibration statistics, the int8 and fp8 sessions of the quality
# report) took 1.98 x the DiT's fp32 bytes beyond the rest of the model at the Wan 1.3B geometry (13.4 GB peak,
# benchmarks/results/real-size-wan2.1-1.3b-streamed-2026-12-07), as the whole export's onnxruntime phase does.
STREAM_PER_BLOCK_BYTE = 3.0
ORT_PER_DIT_BYTE = 2.0


@dataclass
class StreamPlan:
    """A block-streamed export's peak: the model without its DiT's blocks, plus the larger of one block's working
    set and, when `whole_graph`, the assembled DiT graph on onnxruntime."""
    model_bytes: int
    dit_bytes: int
    block_bytes: int
    whole_graph: bool

    @property
    def peak(self) -> int:
        return int(self.model_bytes + max(self.block_bytes * STREAM_PER_BLOCK_BYTE,
                                          self.dit_bytes * ORT_PER_DIT_BYTE * self.whole_graph))

    def to_dict(self) -> dict:
        return {"streamed": True, "model_bytes": self.model_bytes, "dit_bytes": self.dit_bytes,
                "block_bytes": self.block_bytes, "whole_graph_checked": self.whole_graph,
                "estimate_peak_bytes": self.peak}


def plan_stream(model_bytes: int, dit_bytes: int, block_bytes: int, quant: bool, limit: int, source: str,
                resident: int = 0) -> StreamPlan:
    """The assembled graph is checked whole where that fits the limit; int8/fp8 need it (calibration statistics and
    the quality report run it), float exports do not (every block and the skeleton are checked on their own).
    `resident`: what loading the model made resident already (its weights count once)."""
    gib = lambda n: f"{n / 2 ** 30:.1f} GiB"
    plan = StreamPlan(model_bytes, dit_bytes, block_bytes, True)
    limit += min(resident, model_bytes)
    if plan.peak <= limit:
        return plan
    if quant:
        raise ConfigError(f"int8/fp8 run the assembled DiT graph on onnxruntime (calibration statistics, parity, the "
                          f"quality report): about {gib(plan.peak)} with the rest of the model, over the limit of "
                          f"{gib(limit)} ({source}); a block-streamed fp32/fp16/bf16 export needs about "
                          f"{gib(StreamPlan(model_bytes, dit_bytes, plan.block_bytes, False).peak)}")
    plan.whole_graph = False
    if plan.peak > limit:
        raise ConfigError(f"a block-streamed export needs about {gib(plan.peak)} (the model outside the DiT's blocks "
                          f"{gib(model_bytes)}, one block's working set "
                          f"{gib(plan.block_bytes * STREAM_PER_BLOCK_BYTE)}), over the limit of {gib(limit)} "
                          f"({source})")
    return plan


def _dynamic_axes(calls: list) -> dict[str, dict[int, str]]:
    """An axis of a block input is dynamic when the cases disagree on its size (they differ in batch, shape and text
    length, as the part's validation cases do); the output takes the hidden state's."""
    first = calls[0][0]
    axes = {}
    for i, x in enumerate(first):
        axes[f"x{i}"] = {d: f"x{i}_{d}" for d in range(x.dim()) if len({c[0][i].shape[d] for c in calls}) > 1}
    axes["y"] = dict(axes["x0"])
    return axes


def _check_block(path: Path, carry: list, outs: list) -> float:
    """Worst rel L2 of the block graph on onnxruntime vs torch's outputs, over the cases (the exporter drops inputs
    a block does not use: each is fed by its name, x<i>)."""
    sess, worst = ox.ort_session(path), 0.0
    names = [i.name for i in sess.get_inputs()]
    for leaves, ref in zip(carry, outs):
        try:
            got = sess.run(None, {n: leaves[int(n[1:])].numpy() for n in names})[0]
        except Exception as e:  # noqa: BLE001 - onnxruntime's own error types
            raise RuntimeError(f"{path.stem}: onnxruntime cannot run the block graph: {str(e)[:300]}") from e
        worst = max(worst, ox.compare(ref.float().numpy(), np.asarray(got, np.float32), "").rel_l2)
    return worst


def export_streamed(spec, stream, out: Path, cases: list[dict], dtype: torch.dtype = torch.float32,
                    threshold: int | None = None, check_blocks: bool = True,
                    progress: bool = False) -> tuple[Path, ox.Reference, StreamReport]:
    """The part `spec` (its module a skeleton; `stream` its families/parts.StreamSource) exported to `out` block by
    block, in `dtype` inside with float32 IO (a 16-bit dtype: each block converted as it is loaded); returns (path,
    torch's outputs on `cases`, the report); traced at spec.example. `check_blocks`: each block graph run on
    onnxruntime against torch on the cases, and the skeleton's ops through a graph of it with block 0 alone: the
    whole part checked without ever holding its weights (the caller checks the assembled graph too where it fits).
    The cases must differ in every axis that is dynamic inside the blocks (batch, frames, height, width, text)."""
    # a 16-bit skeleton is a copy (its weights outside the blocks are small): the fp32 one serves the next export
    module = spec.module if dtype == torch.float32 else ox.CastIO.copy_of(spec.module, dtype)
    check = check_blocks and dtype != torch.bfloat16  # onnxruntime's CPU has no bf16 kernels
    cut = _Cut()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".stream", dir=out.parent))
    try:
        path = f"module.{stream.blocks}" if dtype != torch.float32 else stream.blocks
        with _replaced(module, path, nn.ModuleList([cut])) as blocks, torch.no_grad():
            # traced at the part's example (the largest bucket at max batch, as the whole export), then the cases
            carry, tree, axes = _capture(spec, module, cut, [spec.example, *cases])
            cut.mode = "export"
            with spec.swaps(module):
                ox.export_onnx(module, spec.example, spec.io, tmp / "skeleton.onnx", 0, custom_opsets={"vidrt": 1},
                               transform=None if dtype == torch.float32 else ox.unwrap_scope)
            report = StreamReport(len(blocks))
            first = _blocks(spec, stream, blocks, (carry, tree, axes), dtype, tmp, report, check, progress)
            cut.mode = "replay"
            ref = _replay(module, cut, cases, [x[0] for x in carry])
            ref1 = _replay(module, cut, cases, first) if check else None
        out_path = assemble(tmp, report.blocks, stream.blocks, out, threshold)
        if check:  # the skeleton's own ops: the graph with block 0 alone
            one = assemble(tmp, 1, stream.blocks, tmp / "one_block.onnx", 0)
            report.skeleton_parity = ox.check_parity(ref1, one)
        return out_path, ref, report
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        trim_heap()


def _capture(spec, module: nn.Module, cut: _Cut, cases: list[dict]) -> tuple[list, object, dict]:
    """1. Every case run up to the first block: (its inputs per case, their structure, their dynamic axes)."""
    for case in cases:
        try:
            module(*case.values())
        except _Stop:
            pass
    if len(cut.calls) != len(cases):
        raise RuntimeError(f"{spec.name}: the forward did not reach its blocks in every case")
    return [list(leaves) for leaves, _ in cut.calls], cut.calls[0][1], _dynamic_axes(cut.calls)


def _blocks(spec, stream, blocks: nn.ModuleList, captured: tuple, dtype: torch.dtype, tmp: Path,
            report: StreamReport, check: bool, progress: bool) -> list[torch.Tensor]:
    """2. Each block read, exported to tmp/block{k}.onnx, run on every case's carried inputs (its outputs replace
    the hidden state carried to the next), checked, freed. Returns block 0's outputs (the one-block check's)."""
    from tqdm import tqdm
    carry, tree, axes = captured
    io, first = ([f"x{i}" for i in range(len(carry[0]))], ["y"], axes), []
    for k in tqdm(range(len(blocks)), desc=f"{spec.name} blocks", disable=not progress):
        t0 = time.time()
        try:
            stream.weights.load_into(blocks[k], stream.key_prefix(k), dtype)
            block = _Block(blocks[k], tree).eval()
            with spec.swaps(block):
                ox.export_onnx(block, {f"x{i}": x for i, x in enumerate(carry[0])}, io, tmp / f"block{k}.onnx", 0)
            outs = [block(*leaves) for leaves in carry]
            if check:
                report.block_rel_l2.append(_check_block(tmp / f"block{k}.onnx", carry, outs))
        finally:
            _free(blocks[k])  # its weights given back, also on failure: the next block's take their place
        for leaves, o in zip(carry, outs):
            leaves[0] = o
        first = first if k else outs
        del block, outs
        trim_heap()
        report.block_seconds.append(time.time() - t0)
        report.peak_rss_after_block.append(peak_rss_bytes())
    return first


def _free(block: nn.Module) -> None:
    """The block's parameters back on the meta device (its buffers, if any, stay: they are built, not read)."""
    for m in block.modules():
        for name, p in m._parameters.items():
            if p is not None and not p.is_meta:
                m._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=False)


def _replay(module: nn.Module, cut: _Cut, cases: list[dict], outs: list) -> ox.Reference:
    """3. The part's outputs per case, the cut returning `outs` (the blocks' output of the traced example, then of
    each case)."""
    cut.outputs = list(outs[1:])
    return ox.reference(module, cases)


def _renamer(k: int, blocks_path: str, inputs: dict[str, str]):
    """Names of block k's graph as the whole module's export has them: node scopes "/block/..." ->
    "/<blocks path>.k/...", parameters "block.x" -> "<blocks path>.k.x", other values under "<blocks path>.k/"; its
    graph inputs and output -> the skeleton's values they stand for (`inputs`)."""
    scope, dotted = "/" + blocks_path.replace(".", "/") + f".{k}", f"{blocks_path}.{k}"

    def ren(s: str) -> str:
        if not s or s in inputs:
            return inputs.get(s, s)
        if s.startswith("/block/"):
            return scope + s[len("/block"):]
        if s.startswith("block."):
            return f"{dotted}.{s[len('block.'):]}"
        return f"{dotted}/{s}"
    return ren


def _rename_node(n: onnx.NodeProto, ren, count) -> None:
    """A node's name, inputs and outputs through `ren`, and everything inside its subgraphs (an If's branches read
    the block's values by name); `count` numbers the nodes that have no name."""
    n.name = ren(n.name or f"/block/{n.op_type}_unnamed_{next(count)}")
    n.input[:] = [ren(s) for s in n.input]
    n.output[:] = [ren(s) for s in n.output]
    for a in n.attribute:
        for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
            for sub in g.node:
                _rename_node(sub, ren, count)
            for v in (*g.input, *g.output, *g.value_info, *g.initializer):
                v.name = ren(v.name)


def assemble(tmp: Path, count: int, blocks_path: str, out: Path, threshold: int | None) -> Path:
    """The skeleton's graph with its vidrt::Blocks node replaced by the `count` block graphs (all in `tmp`, their
    tensors in side files there), written to `out` with its tensors streamed into one side file."""
    skel = onnx.load(str(tmp / "skeleton.onnx"), load_external_data=False)
    g = skel.graph
    at = [i for i, n in enumerate(g.node) if n.domain == "vidrt"]
    if len(at) != 1:
        raise RuntimeError(f"the skeleton graph has {len(at)} vidrt::Blocks nodes (one expected)")
    cut = g.node[at[0]]
    feed, nodes, unnamed = list(cut.input), [], itertools.count()
    imports = {o.domain: o.version for o in skel.opset_import if o.domain != "vidrt"}
    for k in range(count):
        m = onnx.load(str(tmp / f"block{k}.onnx"), load_external_data=False)
        b = m.graph
        last = cut.output[0] if k == count - 1 else f"/{blocks_path.replace('.', '/')}.{k}/output_0"
        ren = _renamer(k, blocks_path, {**{x.name: feed[int(x.name[1:])] for x in b.input}, b.output[0].name: last})
        for t in b.initializer:
            t.name = ren(t.name)
            g.initializer.append(t)
        for n in b.node:
            _rename_node(n, ren, unnamed)
            nodes.append(n)
        imports.update({o.domain: o.version for o in m.opset_import})
        feed[0] = last
    merged = [*g.node[:at[0]], *nodes, *g.node[at[0] + 1:]]
    del g.node[:]
    g.node.extend(merged)
    del g.value_info[:]
    del skel.opset_import[:]
    skel.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in imports.items())
    return save_graph(skel, out, tmp, threshold)
