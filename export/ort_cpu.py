"""onnxruntime's CPU flavour of a DiT graph: exact rewrites of the standard-ONNX form into com.microsoft kernels that
onnxruntime's CPU runs faster. Only for a graph onnxruntime alone opens: int8/fp8 `dit.<prec>.onnx` in place (TensorRT
builds `dit.<prec>.fp16.onnx`), and `dit.fp32.cpu.onnx` beside the standard `dit.fp32.onnx` TensorRT builds (one
weights file for both). Each rewrite matches one form the export writes (models/dit.py) and leaves anything else as
it is; write_checked keeps the result only where its parity is the standard graph's (builder/engines.py, quantized.py).

    counts = cpu_flavour(path, out, feed)   # {"MatMulIntegerToFloat+bias": 56, "MultiHeadAttention": 16, ...}
    report, parity = write_checked(reference, path, out, standard_parity)   # export-engines' use
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from vidrt.export import onnx_export as ox

MS = "com.microsoft"


class Graph:
    """A graph's producers, consumers and constants, and its node list rewritten in place."""

    def __init__(self, model: onnx.ModelProto):
        self.model, self.g = model, model.graph
        self.prod = {o: n for n in self.g.node for o in n.output}
        self.cons: dict[str, list] = {}
        for n in self.g.node:
            for i in n.input:
                self.cons.setdefault(i, []).append(n)
        self.init = {t.name: t for t in self.g.initializer}
        self.inputs = {i.name for i in self.g.input} - set(self.init)
        self.rep: dict[int, list] = {}  # id(node) -> the nodes that take its place
        self.drop: set[int] = set()

    def src(self, t: str, op: str):
        """The node producing t, looked through Identity/Cast nodes, if it is an `op`."""
        n = self.prod.get(self.root(t, ("Identity", "Cast")))
        return n if n is not None and n.op_type == op else None

    def const(self, t: str):
        """t's value if it is a Constant or an initializer stored in the graph (through Identity nodes), else None
        (a weight in external data is not read: see meta)."""
        t = self.root(t)
        if t in self.init:
            inline = self.init[t].data_location != onnx.TensorProto.EXTERNAL
            return numpy_helper.to_array(self.init[t]) if inline else None
        n = self.prod.get(t)
        if n is not None and n.op_type == "Constant" and n.attribute[0].name == "value" and \
                n.attribute[0].t.data_location != onnx.TensorProto.EXTERNAL:
            return numpy_helper.to_array(n.attribute[0].t)
        return None

    def meta(self, t: str):
        """(numpy dtype, shape) of an initializer, read from its header (no data), else None."""
        t = self.root(t)
        if t not in self.init:
            return None
        i = self.init[t]
        return np.dtype(helper.tensor_dtype_to_np_dtype(i.data_type)), tuple(i.dims)

    def root(self, t: str, through=("Identity",)) -> str:
        """The tensor t comes from, back through nodes of the `through` types."""
        while t in self.prod and self.prod[t].op_type in through:
            t = self.prod[t].input[0]
        return t

    def unsqueezed_twice(self, t: str):
        """The tensor behind exactly two Unsqueezes producing t, or None (models/dit's broadcast views)."""
        for _ in range(2):
            n = self.prod.get(t)
            if n is None or n.op_type != "Unsqueeze":
                return None
            t = n.input[0]
        return t

    def only_user(self, t: str):
        users = self.cons.get(t, [])
        return users[0] if len(users) == 1 else None

    def add_init(self, name: str, value: np.ndarray) -> str:
        if name not in self.init:
            self.init[name] = numpy_helper.from_array(value, name)
            self.g.initializer.append(self.init[name])
        return name

    def commit(self) -> onnx.ModelProto:
        """Apply the replacements, drop what nothing reads any more, declare the com.microsoft opset."""
        nodes = []
        for n in self.g.node:
            if id(n) in self.rep:
                nodes += self.rep[id(n)]
            elif id(n) not in self.drop:
                nodes.append(n)
        outs = {o.name for o in self.g.output}
        while True:  # dead nodes: a Q/DQ pair whose MatMul is gone, a head Transpose, a mask's arithmetic
            used = {i for n in nodes for i in n.input} | outs
            live = [n for n in nodes if any(o in used for o in n.output)]
            if len(live) == len(nodes):
                break
            nodes = live
        del self.g.node[:]
        self.g.node.extend(nodes)
        used = {i for n in nodes for i in n.input}
        keep = [t for t in self.g.initializer if t.name in used]
        del self.g.initializer[:]
        self.g.initializer.extend(keep)
        if any(n.domain == MS for n in nodes) and not any(o.domain == MS for o in self.model.opset_import):
            self.model.opset_import.append(helper.make_opsetid(MS, 1))
        return self.model


def _perm(n) -> list[int]:
    return list(next(a.ints for a in n.attribute if a.name == "perm"))


def int8_gemm_bias(G: Graph) -> int:
    """Q(x) -> DQ -> MatMul(., DQ(int8 weight)) -> Add(bias) as one MatMulIntegerToFloat with its bias input (the bias
    Add onnxruntime's own Q/DQ fusion leaves as a separate pass over the output). The activation is quantized to u8
    with zero point 128, the s8 values + 128, which is what onnxruntime's x86 fusion does itself."""
    count = 0
    for mm in G.g.node:
        if mm.op_type != "MatMul":
            continue
        a, b = (G.prod.get(x) for x in mm.input)
        if not (a and b and a.op_type == b.op_type == "DequantizeLinear") or G.only_user(a.output[0]) is not mm:
            continue
        q, w = G.prod.get(a.input[0]), G.meta(b.input[0])
        zp = G.const(a.input[2]) if len(a.input) > 2 else None
        if q is None or q.op_type != "QuantizeLinear" or w is None or w[0] != np.int8 or len(w[1]) != 2:
            continue
        if zp is None or zp.dtype != np.int8 or zp.any() or len(q.input) < 3 or q.input[1] != a.input[1]:
            continue
        add, bias = G.only_user(mm.output[0]), None
        if add is not None and add.op_type == "Add":
            other = next(x for x in add.input if x != mm.output[0])
            if (G.meta(other) or (None, ()))[1] == (w[1][1],):
                bias = G.root(other)
        name = mm.name
        zpu = G.add_init("ort_cpu/u8_zero_point_128", np.array(128, np.uint8))
        G.rep[id(mm)] = [
            helper.make_node("QuantizeLinear", [q.input[0], q.input[1], zpu], [name + "/act_u8"], name=name + "/Qu8"),
            helper.make_node("MatMulIntegerToFloat",
                             [name + "/act_u8", b.input[0], a.input[1], b.input[1], zpu,
                              b.input[2] if len(b.input) > 2 else "", *([bias] if bias else [])],
                             [add.output[0] if bias else mm.output[0]], name=name, domain=MS)]
        if bias:
            G.drop.add(id(add))
        count += 1
    return count


def _padding_mask(G: Graph, t: str):
    """(bool input, filter value) if t is models/dit.py's additive text mask, where(mask, 0, c) unsqueezed to
    (B, 1, 1, L): MultiHeadAttention's key_padding_mask with mask_filter_value c is the same arithmetic."""
    t = G.unsqueezed_twice(t)
    where = G.src(t, "Where") if t is not None else None
    if where is None:
        return None
    zero, fill = G.const(where.input[1]), G.const(where.input[2])
    cond = G.root(where.input[0], ("Cast",))
    if zero is None or fill is None or zero.size != 1 or fill.size != 1 or float(zero) != 0 or cond not in G.inputs:
        return None
    return cond, float(fill)


def multi_head_attention(G: Graph, heads: dict[str, int]) -> int:
    """softmax(q @ kt [+ text mask]) @ v between head Transposes (models/dit.attention's export: q, v moved
    (B, N, H, d) -> (B, H, N, d), k -> (B, H, d, N), the output back and flattened) as one MultiHeadAttention on
    (B, N, H * d) views; the attention scale is already in q (scale=1). heads: q tensor -> H (see attention_heads)."""
    count, shape3 = 0, None
    for sm in G.g.node:
        m = _attention_match(G, sm)
        if m is None or m["q"] not in heads:
            continue
        mask = None
        if m["mask"] is not None:
            mask = _padding_mask(G, m["mask"])
            if mask is None:
                continue
        shape3 = shape3 or G.add_init("ort_cpu/shape_b_n_flat", np.array([0, 0, -1], np.int64))
        p = sm.name.rsplit("/", 1)[0] + "/mha"
        new = [helper.make_node("Reshape", [m[w], shape3], [f"{p}/{w}"], name=f"{p}/{w}") for w in ("q", "k", "v")]
        ins, attrs = [f"{p}/q", f"{p}/k", f"{p}/v"], {}
        if mask is not None:
            kpm = "ort_cpu/key_padding_mask"
            if kpm not in G.prod:  # one int32 mask for every cross-attention
                G.prod[kpm] = helper.make_node("Cast", [mask[0]], [kpm], name=kpm, to=onnx.TensorProto.INT32)
                new.insert(0, G.prod[kpm])
            ins += ["", kpm]
            attrs["mask_filter_value"] = mask[1]
        new.append(helper.make_node("MultiHeadAttention", ins, [m["out"].output[0]], name=p, domain=MS,
                                    num_heads=heads[m["q"]], scale=1.0, **attrs))
        G.rep[id(m["out"])] = new
        G.drop |= {id(n) for n in m["nodes"]}
        count += 1
    return count


def _attention_match(G: Graph, sm):
    """The nodes of one models/dit.attention export around Softmax `sm`, or None."""
    if sm.op_type != "Softmax":
        return None
    pre, mask = G.prod.get(sm.input[0]), None
    if pre is not None and pre.op_type == "Add":
        s = G.prod.get(pre.input[0])
        mask = pre.input[1]
    else:
        s = pre
    if s is None or s.op_type != "MatMul":
        return None
    tq, tk = G.prod.get(s.input[0]), G.prod.get(s.input[1])
    mv = G.only_user(sm.output[0])
    tv = G.prod.get(mv.input[1]) if mv is not None and mv.op_type == "MatMul" and mv.input[0] == sm.output[0] else None
    to = G.only_user(mv.output[0]) if tv is not None else None
    out = G.only_user(to.output[0]) if to is not None and to.op_type == "Transpose" else None
    if not (tq and tk and tv and out and out.op_type == "Reshape"
            and all(t.op_type == "Transpose" for t in (tq, tk, tv))
            and _perm(tq) == _perm(tv) == _perm(to) == [0, 2, 1, 3] and _perm(tk) == [0, 2, 3, 1]):
        return None
    nodes = [s, sm, mv, to, tq, tk, tv] + ([pre] if mask is not None else [])
    return {"q": tq.input[0], "k": tk.input[0], "v": tv.input[0], "mask": mask, "out": out, "nodes": nodes}


def attention_heads(G: Graph, path: Path, feed: dict) -> dict[str, int]:
    """The head count of every attention the rewrite would take, read from one run of G's graph, stored at `path`
    (its q is (B, N, H, d) there; the graph computes the shape): {q tensor: H}. The probe (G's graph with q as extra
    outputs) is written beside `path` so that it reads the same external data, and removed; G is left as it was."""
    import onnxruntime as ort
    qs = [m["q"] for m in map(lambda n: _attention_match(G, n), G.g.node) if m is not None]
    if not qs:
        return {}
    outs, n = G.g.output, len(G.g.output)
    outs.extend(helper.make_tensor_value_info(q, onnx.TensorProto.FLOAT, None) for q in qs)
    probe = path.with_name(path.name + ".heads-probe.onnx")
    try:
        onnx.save(G.model, str(probe))
    finally:
        del outs[n:]
    try:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        sess = ort.InferenceSession(str(probe), so, providers=["CPUExecutionProvider"])
        names = {i.name for i in sess.get_inputs()}
        values = sess.run(qs, {k: v for k, v in feed.items() if k in names})
    finally:
        probe.unlink(missing_ok=True)
    return {q: int(v.shape[2]) for q, v in zip(qs, values) if v.ndim == 4}


def rotary_embedding(G: Graph) -> int:
    """models/dit.apply_rope_tokens' export, Concat(x1 cos - x2 sin, x1 sin + x2 cos) of the (.., d/2, 2) pairs, as
    one RotaryEmbedding (interleaved) on the (B, N, heads * d) view, positions 0..N-1 of the (N, d/2) tables."""
    count = 0
    for cat in G.g.node:
        if cat.op_type != "Concat" or len(cat.input) != 2:
            continue
        sub, add = (G.prod.get(i) for i in cat.input)
        if not (sub and add and sub.op_type == "Sub" and add.op_type == "Add"):
            continue
        muls = [G.prod.get(i) for i in (*sub.input, *add.input)]
        if not all(m is not None and m.op_type == "Mul" for m in muls):
            continue
        (x1, c), (x2, s), (x1b, s2), (x2b, c2) = (m.input for m in muls)
        split = G.prod.get(x1)
        if split is None or split.op_type != "Split" or list(split.output) != [x1, x2] or (x1b, x2b, s2, c2) != (
                x1, x2, s, c):
            continue
        flat, out = G.prod.get(split.input[0]), G.only_user(cat.output[0])
        tables = [G.unsqueezed_twice(t) for t in (c, s)]  # the (N, d/2) tables behind (N, 1, d/2, 1) views
        if flat is None or flat.op_type != "Reshape" or out is None or out.op_type != "Reshape" or None in tables:
            continue
        p = cat.name.rsplit("/", 1)[0] + "/rope"
        shape3 = G.add_init("ort_cpu/shape_b_n_flat", np.array([0, 0, -1], np.int64))
        pos0 = G.add_init("ort_cpu/position_0", np.array([0], np.int64))
        G.rep[id(out)] = [
            helper.make_node("Reshape", [flat.input[0], shape3], [p + "/x"], name=p + "/x"),
            helper.make_node("RotaryEmbedding", [p + "/x", pos0, *tables], [p + "/y"], name=p, domain=MS,
                             interleaved=1),
            helper.make_node("Reshape", [p + "/y", out.input[1]], [out.output[0]], name=p + "/y")]
        G.drop |= {id(n) for n in (cat, sub, add, *muls, split, flat)}
        count += 1
    return count


def cpu_flavour(path: Path, out: Path, feed: dict) -> dict[str, int]:
    """Write the CPU flavour of the graph at `path` to `out` (same folder: it reads the same external data, which is
    not loaded); feed: one input of the graph (the attention head counts are read from a run). Returns how many of
    each rewrite it made."""
    G = Graph(onnx.load(str(path), load_external_data=False))
    heads = attention_heads(G, path, feed)
    counts = {"MatMulIntegerToFloat+bias": int8_gemm_bias(G), "MultiHeadAttention": multi_head_attention(G, heads),
              "RotaryEmbedding": rotary_embedding(G)}
    onnx.save(G.commit(), str(out))
    return counts


def write_checked(ref, path: Path, out: Path, standard: list, basic_opt: bool = False) -> tuple:
    """Write the CPU flavour of `path` to `out` (`out` may be `path`: rewritten in place) and keep it where it computes
    what the standard graph computes on this CPU: its worst rel L2 against torch (`ref`: onnx_export.Reference) within
    1.1x the standard graph's (`standard`: its Parity list) + 1e-4 (the rewrites are exact; int8 rounding can move a
    few activations across a quantization step). Returns (report, the flavour's Parity list); nothing is left at `out`
    when it is not kept."""
    import os

    tmp = out.with_name(out.name + ".cpu-flavour.tmp")
    feed = {k: v.numpy() for k, v in ref.cases[0].items()}
    try:
        counts = cpu_flavour(path, tmp, feed)
        par = ox.check_parity(ref, tmp, basic_opt=basic_opt) if any(counts.values()) else []
        worst, base = max((p.rel_l2 for p in par), default=None), max(p.rel_l2 for p in standard)
        kept = worst is not None and worst <= 1.1 * base + 1e-4
        if kept:
            os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    why = None if kept else "nothing to rewrite" if worst is None else "its parity is off: standard graph kept"
    return {"rewrites": counts, "kept": kept, "graph": out.name if kept else None, "why_not": why,
            "worst_rel_l2": worst, "standard_worst_rel_l2": base,
            "rule": "kept if its worst held-out rel L2 <= 1.1 x the standard graph's + 1e-4"}, par
