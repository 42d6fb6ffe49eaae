"""Block-streamed export's memory against depth (issue 20 part 4): the same geometry at several layer counts, each
exported with `export-engines --stream-blocks` (the DiT alone, fp32, at 9x64x64) in its own process under a memory
limit too small for the assembled graph, so the export takes the path of a model bigger than the machine: peak RSS
should not grow with the layers. From the measured peaks and block sizes it predicts the full models' peaks
(`--predict-only` recomputes them from an earlier stream-depth.json).

    python -m vidrt.benchmarks.stream_depth --geometry wan2.1-14b --layers 2,4 --out DIR [--models DIR]

Writes DIR/stream-depth.json and DIR/stream-depth.md (machine, ISA, load, per run: wall, peak RSS, the memory
plan, block parity, per-block peaks).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from vidrt.benchmarks.real_size import GEOMETRIES, Step, build_model_dir, machine, run_step
from vidrt.families.wan.config import PRESETS

EXPORT = """import json, sys
from vidrt.builder.engines import export_engines
from vidrt.core.buckets import Bucket
model, out = sys.argv[1:]
man = export_engines(model, out, ["fp32"], [Bucket(9, 64, 64)], parts=("dit",), stream_blocks=True, progress=False,
                     overwrite=True)
print(json.dumps({"memory": man["export_memory"], "streamed": man["streamed"]["dit.fp32"],
                  "validation": man["validation"]["dit.fp32"]}))
"""
# the limit each run is held to, as on a machine with this much free: below the model with its assembled DiT on
# onnxruntime at 2 layers of the 14B width (export-engines then checks it block by block), above one block's work
LIMIT_GB = "8"
PREDICT = ("wan2.1-14b", "wan2.2-5b", "wan2.1-1.3b")  # full depth, from families/wan/config.py PRESETS


def block_bytes(preset: str) -> tuple[int, int]:
    """(fp32 bytes of one transformer block, of everything outside the blocks) of a PRESETS geometry, counted on
    the meta device."""
    import diffusers
    import torch

    with torch.device("meta"):
        m = diffusers.WanTransformer3DModel(**{**PRESETS[preset]["transformer"], "num_layers": 1})
    size = lambda ps: sum(p.numel() * 4 for p in ps)
    block = size(m.blocks.parameters())
    return block, size(m.parameters()) - block


def run(geometry: str, layers: list[int], out: Path, models: Path) -> dict:
    preset = GEOMETRIES[geometry][0] if geometry in GEOMETRIES else geometry
    runs = []
    for n in layers:
        d = models / f"{preset}-{n}l"
        if not d.exists():
            build_model_dir_for(preset, d, n)
        bundle = out / f"bundle-{n}l"
        r = run_step(Step(f"export-{n}l", ["env", f"VIDRT_MAX_MEMORY_GB={LIMIT_GB}", sys.executable, "-c", EXPORT,
                                          str(d), str(bundle)]), out)
        shutil.rmtree(bundle, ignore_errors=True)  # GBs each: the numbers are in the log
        res = json.loads((out / f"export-{n}l.out").read_text().strip().splitlines()[-1]) if r.rc == 0 else {}
        runs.append({"layers": n, "wall_s": r.wall_s, "peak_rss_bytes": r.peak_rss_bytes, "rc": r.rc,
                     "load_before": r.load_before, "load_after": r.load_after, "stderr_tail": r.stderr_tail, **res})
    return {"machine": machine(), "geometry": preset, "limit_gb": float(LIMIT_GB), "runs": runs,
            "prediction": predict(preset, runs)}


def build_model_dir_for(preset: str, d: Path, layers: int) -> None:
    geometry = next(g for g, (p, _) in GEOMETRIES.items() if p == preset)
    build_model_dir(geometry, str(d), layers)


def predict(preset: str, runs: list[dict]) -> dict:
    """The full models' peaks from the runs. The working set of the block loop, in blocks: (peak - what the memory
    plan counts as loaded: text encoder, VAE, the DiT outside its blocks) / one block, from the deepest run. For
    each full model, the DiT's share of a streamed export's peak = its weights outside the blocks + that many of
    its blocks (the text encoder and VAE come on top, as loaded); for this geometry at full depth also the whole
    process's peak: the deepest run's + the measured growth per layer for the layers it lacks."""
    ok = [r for r in runs if r["rc"] == 0]
    if not ok:
        return {}
    deep, shallow = ok[-1], ok[0]
    slope = ((deep["peak_rss_bytes"] - shallow["peak_rss_bytes"]) / (deep["layers"] - shallow["layers"])
             if deep["layers"] != shallow["layers"] else 0.0)
    block, outside = block_bytes(preset)
    k = (deep["peak_rss_bytes"] - deep["memory"]["model_bytes"]) / block
    n = PRESETS[preset]["transformer"]["num_layers"]
    out = {"slope_bytes_per_layer": int(slope), "block_bytes": block, "outside_blocks_bytes": outside,
           "working_set_in_blocks": round(k, 2),
           "full_depth_process_peak_bytes": int(deep["peak_rss_bytes"] + max(slope, 0.0) * (n - deep["layers"]))}
    for p in PREDICT:
        b, o = block_bytes(p)
        out[p] = {"layers": PRESETS[p]["transformer"]["num_layers"],
                  "dit_fp32_bytes": b * PRESETS[p]["transformer"]["num_layers"] + o, "block_bytes": b,
                  "predicted_dit_share_bytes": int(o + k * b)}
    return out


def to_markdown(res: dict) -> str:
    m = res["machine"]
    g = lambda n: f"{n / 2 ** 30:.2f} GiB" if n is not None else "-"
    lines = [f"# Block-streamed export against depth: {res['geometry']}", "",
             f"Machine: {m['cpu']}, ISA {m['isa']} (torch: {m['torch_cpu_capability']}), {m['nproc']} cores, "
             f"{g(m['memory_bytes'])}, commit {m['git']['commit'][:7]}; "
             f"VIDRT_MAX_MEMORY_GB={res['limit_gb']:g} (the assembled graph does not fit: checked block by block).",
             "", "| layers | DiT fp32 | wall | peak RSS | worst block rel L2 | skeleton rel L2 | load before/after |",
             "|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        s, mem = r.get("streamed", {}), r.get("memory", {})
        sk = max((p["rel_l2"] for p in s.get("skeleton_parity", [])), default=None)
        lines.append(f"| {r['layers']} | {g(mem.get('dit_bytes'))} | {r['wall_s']} s | {g(r['peak_rss_bytes'])} | "
                     f"{s.get('block_rel_l2_max', '-'):.2e} | {sk if sk is None else f'{sk:.2e}'} | "
                     f"{r['load_before'][0]:.2f} / {r['load_after'][0]:.2f} |" if r["rc"] == 0 else
                     f"| {r['layers']} | failed (rc {r['rc']}) | | | | | |")
    p = res["prediction"]
    if p:
        lines += ["", f"Peak RSS grows {g(p['slope_bytes_per_layer'])} per layer; one block is "
                      f"{g(p['block_bytes'])}, the DiT's weights outside its blocks {g(p['outside_blocks_bytes'])}; "
                      f"the block loop's working set is {p['working_set_in_blocks']} blocks beyond what the memory "
                      f"plan counts as loaded. This geometry at full depth: predicted process peak "
                      f"{g(p['full_depth_process_peak_bytes'])}.", "",
                  "| full model | layers | DiT fp32 | one block | predicted DiT share of the peak "
                  "(+ text encoder, VAE) |",
                  "|---|---|---|---|---|"]
        lines += [f"| {k} | {v['layers']} | {g(v['dit_fp32_bytes'])} | {g(v['block_bytes'])} | "
                  f"{g(v['predicted_dit_share_bytes'])} |" for k, v in p.items() if isinstance(v, dict)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--geometry", default="wan2.1-14b", choices=sorted({p for p, _ in GEOMETRIES.values() if p}),
                    help="a families/wan/config.py PRESETS name that benchmarks/real_size.py builds")
    ap.add_argument("--layers", default="2,4", help="comma list of layer counts")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--models", type=Path, help="where the random-init directories are (built if missing)")
    ap.add_argument("--predict-only", action="store_true", help="recompute the prediction of OUT/stream-depth.json")
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.predict_only:
        res = json.loads((a.out / "stream-depth.json").read_text())
        res["prediction"] = predict(res["geometry"], res["runs"])
    else:
        res = run(a.geometry, [int(x) for x in a.layers.split(",")], a.out, a.models or a.out / "models")
    (a.out / "stream-depth.json").write_text(json.dumps(res, indent=1))
    (a.out / "stream-depth.md").write_text(to_markdown(res))
    print(to_markdown(res))
    return res


if __name__ == "__main__":
    main()
