"""Where the DiT step's time goes on onnxruntime CPU, per kind of node, for a bundle's dit.fp32 and dit.int8 graphs
(those onnxruntime runs, manifest `runtimes.onnxruntime.graph`: their CPU flavour where the bundle has one).

    flock /tmp/vidrt-measure.lock python -m vidrt.benchmarks.dit_graph --bundle before --bundle after --calib cal
    flock /tmp/vidrt-measure.lock python -m vidrt.benchmarks.dit_graph --bundle b --calib cal --unprofiled

Sessions are opened like the runtime's OrtPart (core/ort.py: same options), on one captured DiT input (a
validation sample of the calibration set, CFG batch 2). The onnxruntime profiler's per-node kernel times, means over
--runs calls (all graphs interleaved call by call), are bucketed on the session's optimized graph: weight GEMM (a GEMM
whose B input is constant), attention (activation x activation MatMul, Softmax, fused attention), quantize, norm,
elementwise, layout, other; "between nodes" is the mean step the kernels do not cover. The graphs are also timed
round-robin without the profiler (medians of paired ratios: int8 vs fp32, each bundle vs the first), and the fp32
step's GFLOP/s is set against an fp32 GEMM peak measured in the same process. ISA and load average beside every number.

The profiler inflates small nodes (the small DiT's int8 step: ~40 ms profiled, ~30 ms not), so its shares overstate
the non-GEMM part. --unprofiled (formerly --gemm-only) times no profile: the optimized graph is cut into one graph per
bucket (bucket_graphs: that bucket's nodes, fed the values the whole step computes, opened with optimizations off so
the kernels are the step's), and each is timed round-robin against the whole step; "between nodes" is then the step
minus all buckets (scheduling, and what each bucket's call costs on its own).
"""
from __future__ import annotations

import functools
import json
import os
import re
import statistics
import subprocess
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import click

from vidrt.app.bench import dit_flops, gemm_peak_gflops
from vidrt.calibration import quantize as Q
from vidrt.calibration.capture import load_set
from vidrt.core.bundle import load_manifest
from vidrt.core.ort import EXACT_INT8, cpu_isa, int8_saturates, no_spinning, ort_session
from vidrt.models.checkpoint import load_model

BUCKETS = ("weight GEMM", "attention", "quantize", "norm", "elementwise", "layout", "other", "between nodes")
GEMM_OPS = {"MatMul", "Gemm", "FusedMatMul", "FusedGemm", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QGemm",
            "MatMulInteger", "QLinearMatMul", "Conv", "FusedConv", "QLinearConv", "ConvInteger", "MatMulNBits"}
ATTENTION_OPS = {"Softmax", "Attention", "MultiHeadAttention", "GroupQueryAttention", "QAttention"}
QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
NORM_OPS = {"LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization", "RMSNormalization",
            "SkipSimplifiedLayerNormalization", "ReduceMean", "Pow", "Sqrt", "Reciprocal", "ReduceSumSquare"}
LAYOUT_OPS = {"Transpose", "Reshape", "Split", "Concat", "Slice", "Gather", "Unsqueeze", "Squeeze", "Expand",
              "Flatten", "Identity", "Tile", "GatherElements", "Shape", "Size"}
VIEW_OPS = {"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity"}
ELEMENTWISE_OPS = {"Add", "Sub", "Mul", "Div", "Neg", "Cast", "Where", "Gelu", "FastGelu", "BiasGelu", "QuickGelu",
                   "Sigmoid", "Tanh", "Erf", "Exp", "Sin", "Cos", "Relu", "Max", "Min", "Clip", "Abs", "BiasAdd",
                   "BiasSplitGelu", "Equal", "Not", "And", "Or", "Less", "Greater", "Silu", "RotaryEmbedding"}


def isa() -> dict:
    """ISA as torch sees it, avx512_vnni in lscpu's flags, and vidrt's own reading (core/ort.cpu_isa)."""
    import torch

    try:
        flags = next(ln for ln in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                     if ln.startswith("Flags:")).split()
    except (OSError, StopIteration):
        flags = []
    return {"torch_capability": torch.backends.cpu.get_cpu_capability(), "lscpu_avx512_vnni": "avx512_vnni" in flags,
            "vidrt_isa": cpu_isa()}


def load() -> float:
    return round(os.getloadavg()[0], 2)


def session_options(profile_prefix: str | None = None, optimized_path: str | None = None):
    """core/ort.ort_session's options (no spinning, quiet, exact int8 where the CPU needs it) plus profiling."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    no_spinning(so)
    if int8_saturates():
        for k, v in EXACT_INT8.items():
            so.add_session_config_entry(k, v)
    so.log_severity_level = 3
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    return so


def const_tensors(model) -> set[str]:
    """Tensors of the graph that do not depend on its inputs: initializers and what is computed only from them."""
    const = {t.name for t in model.graph.initializer} | {""}
    for n in model.graph.node:  # nodes are topologically sorted
        if n.op_type == "Constant" or (n.input and all(i in const for i in n.input)):
            const.update(n.output)
    return const


def classify(node, const: set[str]) -> str:
    op = node.op_type
    if op in GEMM_OPS:
        return "weight GEMM" if len(node.input) > 1 and node.input[1] in const else "attention"
    if op in ATTENTION_OPS:
        return "attention"
    if op in QUANT_OPS:
        return "quantize"
    # an unfused norm's arithmetic (its Mul/Add/Div) lives in a *norm* module scope: "/blocks.0/attn/q_norm/Mul"
    if op in NORM_OPS or re.search(r"(^|/)[\w.]*norm\d*(/|$)", node.name):
        return "norm"
    if op in LAYOUT_OPS:
        return "layout"
    if op in ELEMENTWISE_OPS:
        return "elementwise"
    return "other"


def optimized_model(path: Path):
    """The graph onnxruntime runs (after its session-time fusions, with the runtime's options), as an onnx model."""
    import onnx
    import onnxruntime as ort
    with tempfile.TemporaryDirectory() as d:
        out = str(Path(d) / "opt.onnx")
        so = session_options(optimized_path=out)
        # weights in external data (large graphs, a CPU flavour sharing the standard graph's file): written beside
        # the optimized copy, not referred back to the bundle's file by a path relative to another folder
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "opt.onnx.data")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return onnx.load(out)


def optimized_graph(path: Path) -> dict[str, tuple[str, str]]:
    """{node name: (op type, bucket)} of the graph onnxruntime runs (after its session-time fusions)."""
    model = optimized_model(path)
    const = const_tensors(model)
    return {n.name: (n.op_type, classify(n, const)) for n in model.graph.node}


def profile(paths: dict[str, Path], feed: dict, runs: int, warmup: int = 3) -> dict[str, dict]:
    """Per-run ms per bucket and per op type from onnxruntime's profiler, `runs` calls of every graph, interleaved
    (call i of every graph, then call i + 1) so that a busy spell of the shared machine hits all graphs alike."""
    import onnxruntime as ort
    with tempfile.TemporaryDirectory() as d:
        sess = {g: ort.InferenceSession(str(p), session_options(str(Path(d) / f"prof{i}")),
                                        providers=["CPUExecutionProvider"]) for i, (g, p) in enumerate(paths.items())}
        for _ in range(warmup):
            for s in sess.values():
                s.run(None, feed)
        for _ in range(runs):
            for s in sess.values():
                s.run(None, feed)
        events = {g: json.loads(Path(s.end_profiling()).read_text()) for g, s in sess.items()}
    return {g: _buckets(events[g], optimized_graph(paths[g]), runs, warmup) for g in paths}


def _buckets(events: list, nodes: dict, runs: int, warmup: int) -> dict:
    # the warm-up calls (allocations, prepacking) are profiled too: keep what comes after them
    model_runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                        key=lambda e: e["ts"])
    start = model_runs[warmup - 1]["ts"] + model_runs[warmup - 1]["dur"]
    runs_ms = [e["dur"] / 1000 for e in model_runs[warmup:]]
    buckets, ops, counts, unknown = defaultdict(float), defaultdict(float), defaultdict(int), set()
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < start:
            continue
        name = e["name"][: -len("_kernel_time")]
        op, bucket = nodes.get(name, (e["args"].get("op_name", "?"), None))
        if bucket is None:
            unknown.add(name)
            bucket = "other"
        buckets[bucket] += e["dur"] / 1000 / runs
        ops[f"{op} ({bucket})"] += e["dur"] / 1000 / runs
    for _, bucket in nodes.values():
        counts[bucket] += 1
    step = statistics.mean(runs_ms)  # a mean, like the node times: the buckets add up to it
    buckets["between nodes"] = step - sum(buckets.values())
    return {"step_ms_profiled": step, "buckets_ms": {b: buckets.get(b, 0.0) for b in BUCKETS},
            "nodes": dict(counts), "top_ops_ms": dict(sorted(ops.items(), key=lambda kv: -kv[1])[:15]),
            "unmatched_nodes": sorted(unknown)[:5], "load": load()}


def rotate(calls: dict[str, callable], rounds: int) -> dict[str, list[float]]:
    """{name: call} -> {name: seconds per call}: 3 warm-up calls each, then `rounds` rounds of one call each, the
    first of a round rotating."""
    for c in calls.values():
        for _ in range(3):
            c()
    ts = {k: [] for k in calls}
    names = list(calls)
    for i in range(rounds):
        for k in names[i % len(names):] + names[:i % len(names)]:
            t0 = time.perf_counter()
            calls[k]()
            ts[k].append(time.perf_counter() - t0)
    return ts


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    r = sorted(xs)
    return statistics.median(r), r[len(r) // 4], r[3 * len(r) // 4]


def round_robin(paths: dict[str, Path], feed: dict, rounds: int) -> dict:
    """Unprofiled sessions as the runtime opens them (core/ort.ort_session), one call each per round, the first
    graph of a round rotating. Median ms per graph, and medians of paired ratios (same round): int8 vs fp32 of a
    bundle, and every later bundle's graph vs the first bundle's."""
    ts = rotate({k: functools.partial(ort_session(p).run, None, feed) for k, p in paths.items()}, rounds)
    names = list(ts)
    out = {"median_ms": {k: 1000 * statistics.median(v) for k, v in ts.items()}, "speedups": {}}

    def ratio(base: str, other: str) -> None:
        out["speedups"][f"{other} vs {base}"] = quartiles([a / b for a, b in zip(ts[base], ts[other])])
    for k in names:
        if k.endswith("int8") and k[:-4] + "fp32" in ts:
            ratio(k[:-4] + "fp32", k)
    first = names[0].rsplit(":", 1)[0] if ":" in names[0] else None
    for k in names:
        if first and not k.startswith(first + ":") and f"{first}:{k.rsplit(':', 1)[1]}" in ts:
            ratio(f"{first}:{k.rsplit(':', 1)[1]}", k)
    return out


def as_is(model: bytes):
    """A session on an already optimized graph: the runtime's options, onnxruntime's optimizations off (the kernels
    are those of the step, fusions included; re-optimizing a piece of the graph could fuse it differently)."""
    import onnxruntime as ort
    so = session_options()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def bucket_graphs(model, feed: dict) -> dict[str, tuple[bytes, dict, dict]]:
    """The optimized graph cut into one graph per bucket: that bucket's nodes in their order, its inputs the tensors
    the nodes read from other buckets or the step's inputs (fed what the whole graph computes on `feed`; constant
    ones as initializers, so a weight stays a weight), its outputs what other buckets or the step's outputs read,
    except views. {bucket: (model bytes, feed, expected outputs)}."""
    import onnx
    from onnx import helper, numpy_helper
    g, const = model.graph, const_tensors(model)
    bucket = [classify(n, const) for n in g.node]
    made = {o: b for n, b in zip(g.node, bucket) for o in n.output}
    step_out = [o.name for o in g.output]
    cross = list(dict.fromkeys([i for n, b in zip(g.node, bucket) for i in n.input if i in made and made[i] != b]
                               + step_out))
    full = onnx.ModelProto()
    full.CopyFrom(model)
    del full.graph.output[:]  # untyped outputs: onnxruntime takes the types its nodes infer
    full.graph.output.extend(onnx.ValueInfoProto(name=t) for t in cross)
    values = {**feed, **dict(zip(cross, as_is(full.SerializeToString()).run(cross, feed)))}
    del full
    inits = {t.name for t in g.initializer}
    vi = lambda t: helper.make_tensor_value_info(t, helper.np_dtype_to_tensor_dtype(values[t].dtype),
                                                 values[t].shape)
    out = {}
    for b in sorted(set(bucket), key=BUCKETS.index):
        nodes = [n for n, nb in zip(g.node, bucket) if nb == b]
        mine = {o for n in nodes for o in n.output}
        ins = list(dict.fromkeys(i for n in nodes for i in n.input if i and i not in mine and i not in inits))
        used = {i for n in nodes for i in n.input}
        # a view's output (Reshape...) aliases its input inside the step; as a graph output it would be a copy
        outs = [o for n in nodes for o in n.output if o in cross and (n.op_type not in VIEW_OPS or o in step_out)]
        sub = helper.make_graph(nodes, b, [vi(i) for i in ins if i not in const], [vi(o) for o in outs],
                                [t for t in g.initializer if t.name in used]
                                + [numpy_helper.from_array(values[i], i) for i in ins if i in const])
        m = helper.make_model(sub, opset_imports=model.opset_import, ir_version=model.ir_version)
        out[b] = (m.SerializeToString(), {i: values[i] for i in ins if i not in const}, {o: values[o] for o in outs})
    return out


def bound(sess, feed: dict, outputs: dict):
    """A call of `sess` with inputs and outputs bound once, outputs preallocated: what a bucket graph's call costs on
    top of its kernels is then small (no numpy conversions, no output allocation); the whole step is called alike."""
    import numpy as np
    import onnxruntime as ort
    io, keep = sess.io_binding(), []
    for name, v in [*feed.items(), *outputs.items()]:
        keep.append(ort.OrtValue.ortvalue_from_numpy(v if name in feed else np.empty_like(v)))
        (io.bind_ortvalue_input if name in feed else io.bind_ortvalue_output)(name, keep[-1])
    return lambda: sess.run_with_iobinding(io) or keep  # (keep: the bound arrays live as long as the call)


def unprofiled(paths: dict[str, Path], feed: dict, rounds: int) -> dict:
    """Per graph: the whole step (opened as the runtime opens it) and every bucket's graph alone (bucket_graphs),
    unprofiled, all timed round-robin with the first rotating. Each bucket graph's outputs are first checked against
    the whole graph's values (relative L2 error). Per bucket: median ms and median of per-round (bucket / step);
    "elementwise + layout + norm" and "between nodes" (step - all buckets) from per-round sums."""
    import numpy as np

    calls, err, counts = {}, {}, {}
    for k, p in paths.items():
        model = optimized_model(p)
        const = const_tensors(model)
        counts[k] = dict(Counter(classify(n, const) for n in model.graph.node))
        step = ort_session(p)
        calls[k] = bound(step, feed, dict(zip([o.name for o in step.get_outputs()], step.run(None, feed))))
        for b, (blob, f, want) in bucket_graphs(model, feed).items():
            s = as_is(blob)
            err[k, b] = max([float(np.linalg.norm((got - v).astype(np.float64)) / max(np.linalg.norm(
                v.astype(np.float64)), 1e-30)) for got, v in zip(s.run(list(want), f), want.values())], default=0.0)
            assert err[k, b] < 1e-3, f"{k}: the {b} graph alone computes other values (rel. L2 {err[k, b]:.2g})"
            calls[f"{k} {b}"] = bound(s, f, want)
        del model
    ts = rotate(calls, rounds)
    res = {}
    for k in paths:
        parts = {b: ts[f"{k} {b}"] for b in BUCKETS if f"{k} {b}" in ts}
        parts["elementwise + layout + norm"] = [sum(x) for x in zip(*(parts.get(b, [0] * rounds)
                                                                      for b in ("elementwise", "layout", "norm")))]
        parts["between nodes"] = [t - sum(x) for t, *x in zip(ts[k], *(parts[b] for b in BUCKETS if b in parts))]
        res[k] = {"step_ms": 1000 * statistics.median(ts[k]), "nodes": counts[k],
                  "buckets_ms": {b: 1000 * statistics.median(v) for b, v in parts.items()},
                  "share": {b: quartiles([x / t for x, t in zip(v, ts[k])]) for b, v in parts.items()},
                  "max_rel_err": {b: e for (g, b), e in err.items() if g == k}}
    return res


def feed_and_flops(bundle: Path, calib: str) -> tuple[dict, int, str]:
    """A captured DiT input (a validation sample, CFG batch 2) as numpy, the FLOPs of one call counted like
    app/bench.py (torch's FlopCounterMode on the module), and the model name."""
    import torch

    man = load_manifest(bundle)
    cfg, dit, _ = load_model(man["model_source"])
    feed = Q.split_samples(load_set(calib, cfg).dit)[1][0]
    feed = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in feed.items()}
    flops = dit_flops(dit, tuple(torch.from_numpy(feed[k]) for k in ("latents", "timestep", "text", "text_mask")))
    return feed, flops, cfg.name


def table(res: dict) -> str:
    """Markdown: a row per bucket, a column per graph, ms per call (% of the profiled step)."""
    graphs = res["graphs"]
    lines = ["| bucket | " + " | ".join(f"{g} ms (%)" for g in graphs) + " |", "|---" * (1 + len(graphs)) + "|"]
    for b in BUCKETS + ("elementwise + layout + norm",):
        row = []
        for p in graphs.values():
            ms = p["buckets_ms"].get(b, sum(p["buckets_ms"][x] for x in ("elementwise", "layout", "norm")))
            row.append(f"{ms:.1f} ({100 * ms / p['step_ms_profiled']:.0f}%)")
        lines.append(f"| {b} | " + " | ".join(row) + " |")
    lines.append("| step, profiled | " + " | ".join(f"{p['step_ms_profiled']:.1f}" for p in graphs.values()) + " |")
    lines.append("| step, round robin (no profiler) | " + " | ".join(
        f"{res['round_robin']['median_ms'][g]:.1f}" for g in graphs) + " |")
    lines.append("| nodes (optimized graph) | " + " | ".join(str(sum(p["nodes"].values())) for p in graphs.values())
                 + " |")
    return "\n".join(lines)


def unprofiled_table(graphs: dict) -> str:
    """Markdown: a row per bucket, a column per graph, median ms per call (median % of the step, same rounds)."""
    lines = ["| bucket (no profiler) | " + " | ".join(f"{g} ms (%)" for g in graphs) + " |",
             "|---" * (1 + len(graphs)) + "|"]
    for b in BUCKETS + ("elementwise + layout + norm",):
        lines.append(f"| {b} | " + " | ".join(f"{p['buckets_ms'][b]:.1f} ({100 * p['share'][b][0]:.0f}%)"
                                              if b in p["buckets_ms"] else "-" for p in graphs.values()) + " |")
    lines.append("| step | " + " | ".join(f"{p['step_ms']:.1f}" for p in graphs.values()) + " |")
    lines.append("| nodes (optimized graph) | " + " | ".join(str(sum(p["nodes"].values())) for p in graphs.values())
                 + " |")
    return "\n".join(lines)


@click.command()
@click.option("--bundle", "bundles", required=True, multiple=True, type=click.Path(exists=True, file_okay=False),
              help="export-engines bundle with dit.fp32 and/or dit.int8; repeat to compare bundles in one run "
                   "(the first is the baseline)")
@click.option("--calib", required=True, type=click.Path(exists=True, file_okay=False),
              help="the calibration set the bundle was quantized from (its validation sample is the input)")
@click.option("--runs", type=int, default=20, show_default=True, help="Profiled calls per graph")
@click.option("--rounds", type=int, default=40, show_default=True, help="Round-robin timing rounds")
@click.option("--json-out", type=click.Path(dir_okay=False), help="Write the full result as JSON here")
@click.option("--unprofiled", "--gemm-only", "unprofiled_", is_flag=True,
              help="No profiler: time each graph against each bucket's nodes alone (--gemm-only: the former name)")
def main(bundles, calib, runs, rounds, json_out, unprofiled_):
    import torch

    paths = {}
    for b in bundles:
        parts = json.loads((Path(b) / "manifest.json").read_text())["parts"]
        for g in ("fp32", "int8"):  # the graph onnxruntime runs (its CPU flavour where the bundle has one)
            if f"dit.{g}" in parts:
                graph = parts[f"dit.{g}"]["runtimes"]["onnxruntime"]["graph"]
                paths[g if len(bundles) == 1 else f"{Path(b).name}:{g}"] = Path(b) / graph
    feed, flops, model = feed_and_flops(Path(bundles[0]), calib)
    res = {"model": model, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "isa": isa(),
           "threads": torch.get_num_threads(), "gflop_per_step": flops / 1e9, "bundles": list(bundles)}
    cpu = torch.device("cpu")
    peak0 = (gemm_peak_gflops(cpu, torch.float32), load())
    if unprofiled_:
        res["unprofiled"] = {"graphs": unprofiled(paths, feed, rounds), "rounds": rounds, "load": load()}
    else:
        res["round_robin"] = {**round_robin(paths, feed, rounds), "rounds": rounds, "load": load()}
        res["graphs"] = profile(paths, feed, runs)
    peak1 = (gemm_peak_gflops(cpu, torch.float32), load())
    res["gemm_peak_gflops"] = {"before": peak0, "after": peak1, "peak": max(peak0[0], peak1[0])}
    steps = ({g: v["step_ms"] for g, v in res["unprofiled"]["graphs"].items()} if unprofiled_
             else res["round_robin"]["median_ms"])
    res["fp32_pct_of_gemm_peak"] = {
        g: {"gflops": flops / ms * 1e-6, "pct": 100 * flops / ms * 1e-6 / res["gemm_peak_gflops"]["peak"]}
        for g, ms in steps.items() if g.endswith("fp32")}
    i = res["isa"]
    print(f"model {model}, {res['date']}, ISA {i['vidrt_isa']} (torch {i['torch_capability']}, lscpu avx512_vnni "
          f"{i['lscpu_avx512_vnni']}), torch threads {res['threads']}, {res['gflop_per_step']:.2f} GFLOP/step")
    if unprofiled_:
        print(f"{rounds} rounds, load {peak0[1]} -> {res['unprofiled']['load']} -> {peak1[1]}")
        print(unprofiled_table(res["unprofiled"]["graphs"]))
    else:
        print(table(res))
        for g, p in res["graphs"].items():
            print(f"{g}: load {p['load']}; nodes per bucket {p['nodes']}; top ops (ms/run):",
                  ", ".join(f"{k} {v:.1f}" for k, v in p["top_ops_ms"].items()))
            if p["unmatched_nodes"]:
                print(f"  profiler nodes not in the optimized graph (bucket 'other'): {p['unmatched_nodes']}")
        rr = res["round_robin"]
        print(f"round robin ({rounds} rounds, load {rr['load']}): median ms " +
              ", ".join(f"{k} {v:.1f}" for k, v in rr["median_ms"].items()))
        for k, (m, q1, q3) in rr["speedups"].items():
            print(f"  speedup {k}: {m:.3f} (quartiles {q1:.3f}-{q3:.3f})")
    pk = res["gemm_peak_gflops"]
    print(f"fp32 GEMM peak (torch, 2048^3): {pk['before'][0]:.1f} GFLOP/s (load {pk['before'][1]}), "
          f"{pk['after'][0]:.1f} (load {pk['after'][1]}); fp32 step: " + ", ".join(
              f"{g} {v['gflops']:.1f} GFLOP/s = {v['pct']:.0f}% of the peak"
              for g, v in res["fp32_pct_of_gemm_peak"].items()))
    if json_out:
        Path(json_out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
