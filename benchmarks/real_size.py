"""Real-size run of the user's path (issue 20): a random-init Wan diffusers directory at a real geometry, then
`vidrt calibrate`, `export-engines`, `Pipeline.from_bundle` + one video and `vidrt bench`, each its own process, with
wall time, peak RSS, load, the bundle's files, parity and PSNR written to OUT/results.json and OUT/RESULTS.md.

    python -m vidrt.benchmarks.real_size --geometry wan2.1-1.3b --out DIR [--model-dir D] [--steps-only a,b] [--keep]
        [--stream-blocks]

torch, onnx and vidrt's models are imported inside the functions that need them: `--help` stays quick and the parent
process small while the measured steps run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from vidrt.app.cli import main as cli
from vidrt.calibration.capture import default_prompts
from vidrt.core.memory import machine_memory
from vidrt.core.onnx_files import data_files
from vidrt.core.ort import cpu_isa
from vidrt.families.wan import tiny
from vidrt.families.wan.config import PRESETS

STEPS = ("build", "calibrate", "export", "generate", "bench")
# geometry -> (families/wan/config.py PRESETS entry, default num_layers: None keeps the preset's); "tiny": tiny.save_wan
GEOMETRIES = {"wan2.1-1.3b": ("wan2.1-1.3b", None), "wan2.1-14b-4l": ("wan2.1-14b", 4), "tiny": (None, None)}
QUANT = ("int8", "fp8")
BENCH_TIMING = ["--warmup", "1", "--runs", "3", "--e2e-runs", "1"]  # a few runs: minutes per run at real size
PROMPT = "a red circle moving left on a blue background"
GENERATE = """import sys
from vidrt.runtime.pipeline import Pipeline
bundle, precision, f, h, w, steps, out = sys.argv[1:]
pipe = Pipeline.from_bundle(bundle, precision=precision)
pipe({prompt!r}, num_frames=int(f), height=int(h), width=int(w), num_inference_steps=int(steps)).save(out)
""".format(prompt=PROMPT)
VERSIONS = ("torch", "onnx", "onnxruntime", "diffusers", "transformers", "safetensors", "numpy")


@dataclass
class Options:
    out: Path
    geometry: str = "wan2.1-1.3b"
    layers: int | None = None
    model_dir: Path | None = None
    frames: int = 9
    height: int = 64
    width: int = 64
    bucket: str = "13x96x96"
    steps: int = 4
    num_prompts: int = 2
    precision: str = "fp32,int8,fp8"
    steps_only: tuple[str, ...] = STEPS
    keep: bool = False
    stream_blocks: bool = False  # export-engines --stream-blocks


@dataclass
class Step:
    name: str
    argv: list[str]
    needs: tuple[str, ...] = ()


@dataclass
class StepResult:
    name: str
    argv: list[str]
    rc: int | None = None
    wall_s: float | None = None
    peak_rss_bytes: int | None = None
    load_before: list[float] = field(default_factory=list)
    load_after: list[float] = field(default_factory=list)
    stderr_tail: str = ""
    status: str = "not run"  # ok, failed (rc != 0), skipped (a step it needs did not succeed), reused (build)
    note: str = ""


@dataclass
class BundleStats:
    files: list[str]
    bytes: int
    stray: list[str]
    data_files: dict[str, list[str]]  # graph -> the external-data files it references
    parity: dict[str, float | None]  # part -> worst rel L2 over its validation cases (None: validated otherwise)
    psnr: dict[str, float]  # quantized part -> quality report's mean video PSNR (dB)


def build_model_dir(geometry: str, out: str, layers: int | None = None) -> None:
    """Write the geometry's random-init diffusers directory to `out` (via out.partial, renamed when complete)."""
    tmp = Path(str(out) + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    preset, default_layers = GEOMETRIES[geometry]
    if preset is None:
        tiny.save_wan(tmp)
    else:
        p = PRESETS[preset]
        tr = {**p["transformer"], "num_layers": layers or default_layers or p["transformer"]["num_layers"]}
        tiny.save_wan_geometry(tmp, tr, p["vae"], flow_shift=p["flow_shift"])
    tmp.rename(out)


def _cli(name: str) -> str:
    """The console script `name` of this interpreter's environment (vidrt, export-engines)."""
    here = Path(sys.executable).with_name(name)
    return str(here) if here.exists() else (shutil.which(name) or name)


def _calibrate_prompts(o: Options) -> list[str]:
    """--num-prompts N when `vidrt calibrate` has it, else a file of the first N default prompts."""
    if any(p.name == "num_prompts" for p in cli.commands["calibrate"].params):
        return ["--num-prompts", str(o.num_prompts)]
    path = o.out / "prompts.txt"
    path.write_text("\n".join(default_prompts()[:o.num_prompts]) + "\n")
    return ["--prompts", str(path)]


def plan(o: Options, model_dir: Path) -> list[Step]:
    """The steps in order, each a command line and the steps whose output it reads."""
    shape = ["--frames", str(o.frames), "--height", str(o.height), "--width", str(o.width)]
    precisions = o.precision.split(",")
    quant = [p for p in precisions if p in QUANT]
    cal, bundle = o.out / "cal", o.out / "bundle"
    py = sys.executable
    build = [py, "-c", "from vidrt.benchmarks.real_size import build_model_dir; "
             f"build_model_dir({o.geometry!r}, {str(model_dir)!r}, {o.layers!r})"]
    calibrate = [_cli("vidrt"), "calibrate", "--model", str(model_dir), "--out", str(cal), *shape,
                 "--steps", str(o.steps), "--overwrite", *_calibrate_prompts(o)]
    export = [_cli("export-engines"), "--model", str(model_dir), "--out", str(bundle), "--precision", o.precision,
              *(["--calib", str(cal)] if quant else []), *shape, "--bucket", o.bucket, "--no-build", "--overwrite",
              *(["--stream-blocks"] if o.stream_blocks else [])]
    gen_prec = "int8" if "int8" in precisions else precisions[0]
    generate = [py, "-c", GENERATE, str(bundle), gen_prec, str(o.frames), str(o.height), str(o.width), str(o.steps),
                str(o.out / f"generate-{gen_prec}.mp4")]
    runners = ["torch:fp32"] + [f"onnxruntime:{p}" for p in precisions if p in ("fp32", "int8")]
    bench = [_cli("vidrt"), "bench", "--model", str(model_dir), "--bundle", str(bundle), "--runners", ",".join(runners),
             *shape, "--steps", str(o.steps), *BENCH_TIMING, "--out", str(o.out / "bench")]
    return [Step("build", build), Step("calibrate", calibrate, ("build",)),
            Step("export", export, ("build", "calibrate") if quant else ("build",)),
            Step("generate", generate, ("export",)), Step("bench", bench, ("build", "export"))]


def run_step(step: Step, logs: Path) -> StepResult:
    """Run one step as a child process. Peak RSS: the child's rusage from os.wait4, i.e. the largest of the child and
    the descendants it waited for (not their sum); stdout/stderr go to logs/STEP.out/.err."""
    r = StepResult(step.name, step.argv, load_before=list(os.getloadavg()))
    t0 = time.perf_counter()
    with open(logs / f"{step.name}.out", "wb") as out, open(logs / f"{step.name}.err", "wb") as err:
        p = subprocess.Popen(step.argv, stdout=out, stderr=err)
        _, status, usage = os.wait4(p.pid, 0)
    p.returncode = r.rc = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    r.wall_s = round(time.perf_counter() - t0, 2)
    r.peak_rss_bytes = usage.ru_maxrss * 1024  # Linux: KiB
    r.load_after = list(os.getloadavg())
    r.status = "failed" if r.rc else "ok"
    if r.rc:
        lines = (logs / f"{step.name}.err").read_text(errors="replace").replace("\r", "\n").splitlines()
        r.stderr_tail = "\n".join(ln for ln in lines if ln.strip())[-3000:]
    return r


def _stray(rel: str) -> bool:
    """A bundle file that is not a graph, its external data, a JSON file or the tokenizer's, or a leftover of the
    export (a hidden file or folder, a 16-bit Q/DQ base)."""
    leftover = any(c.startswith(".") for c in rel.split("/")) or ".qdq-base.onnx" in rel
    return leftover or not (rel.endswith((".onnx", ".data", ".json")) or rel.startswith("tokenizer/"))


def bundle_stats(bundle: Path) -> BundleStats:
    """Files, bytes and stray files of a bundle; the external-data files each graph references; the manifest's worst
    parity rel L2 per part and its quality report's mean PSNR."""
    files = sorted(p for p in bundle.rglob("*") if p.is_file())
    rel = [p.relative_to(bundle).as_posix() for p in files]
    manifest = json.loads((bundle / "manifest.json").read_text())
    parity = {name: max((c["rel_l2"] for c in rep["parity"]), default=None) if rep.get("parity") else None
              for name, rep in manifest.get("validation", {}).items()}
    psnr = {name: q["psnr_mean"] for name, q in (manifest.get("quality") or {}).items() if q}
    return BundleStats(rel, sum(p.stat().st_size for p in files), [r for r in rel if _stray(r)],
                       {p.name: data_files(p) for p in files if p.suffix == ".onnx"}, parity, psnr)


def _safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n))


def weights(model_dir: Path) -> dict[str, dict]:
    """Per part of a diffusers directory: parameter count and safetensors bytes (read from the headers only)."""
    out = {}
    for part in ("transformer", "transformer_2", "vae", "text_encoder"):
        shards = sorted((model_dir / part).glob("*.safetensors"))
        if shards:
            heads = [_safetensors_header(s) for s in shards]
            n = sum(_numel(t["shape"]) for h in heads for k, t in h.items() if k != "__metadata__")
            out[part] = {"params": n, "bytes": sum(s.stat().st_size for s in shards), "files": len(shards)}
    return out


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def geometry_record(model_dir: Path) -> dict:
    """The directory's own configs (what was measured, also for a reused --model-dir)."""
    def cfg(part: str) -> dict:
        p = model_dir / part / "config.json"
        return {k: v for k, v in json.loads(p.read_text()).items() if not k.startswith("_")} if p.exists() else {}
    te = cfg("text_encoder")
    return {"transformer": cfg("transformer"), "vae": cfg("vae"),
            "text_encoder": {k: te.get(k) for k in ("d_model", "num_layers", "num_heads", "d_ff", "vocab_size")},
            "weights": weights(model_dir)}


def machine() -> dict:
    """Where the numbers come from: machine, ISA, versions, the threading environment, the code's commit."""
    import torch

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")), "")
    root = Path(__file__).resolve().parents[1]
    git = lambda *a: subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True).stdout.strip()
    memory = machine_memory("cpu")
    return {"platform": platform.platform(), "cpu": model or platform.processor(), "nproc": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0)), "memory_bytes": memory, "isa": cpu_isa(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "versions": {v: metadata.version(v) for v in VERSIONS},
            "env": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "MKL_", "VIDRT_", "ORT_"))},
            "git": {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}}


def _failed_needs(step: Step, done: dict[str, StepResult]) -> list[str]:
    """The steps `step` reads that ran in this invocation and did not succeed (a step not selected is assumed
    done by an earlier run with --keep; if its output is missing the step fails and says so)."""
    return [d for d in step.needs if d in done and done[d].status not in ("ok", "reused")]


def run(o: Options, command: list[str]) -> dict:
    """Every selected step in order, results.json rewritten after each (a long run that dies keeps what it did)."""
    o.out.mkdir(parents=True, exist_ok=True)
    (o.out / "logs").mkdir(exist_ok=True)
    own_model = o.model_dir is None
    model_dir = o.model_dir or o.out / "model"
    res = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": command,
           "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(o).items()},
           "machine": machine(), "steps": []}
    done: dict[str, StepResult] = {}
    for step in plan(o, model_dir):
        if step.name not in o.steps_only:
            continue
        if step.name == "build" and (model_dir / "model_index.json").exists():
            r = StepResult(step.name, step.argv, status="reused", note=f"reused {model_dir}")
        elif failed := _failed_needs(step, done):
            r = StepResult(step.name, step.argv, status="skipped", note=f"needs {', '.join(failed)}, which failed")
        else:
            r = run_step(step, o.out / "logs")
        done[step.name] = r
        res["steps"].append(asdict(r))
        _summarize(res, o, model_dir)
        write(res, o.out)
    if not o.keep:
        big = [o.out / "cal", o.out / "bundle"] + ([model_dir] if own_model else [])
        res["deleted"] = [str(p) for p in big if p.exists()]
        for p in big:
            shutil.rmtree(p, ignore_errors=True)
    write(res, o.out)
    return res


def _summarize(res: dict, o: Options, model_dir: Path) -> None:
    """Geometry, bundle and bench summaries from what is on disk now; peak RSS as a multiple of the fp32 DiT."""
    if (model_dir / "model_index.json").exists():
        name = o.geometry if o.layers is None else f"{GEOMETRIES[o.geometry][0] or o.geometry}-{o.layers}l"
        res["geometry"] = {"name": name, **geometry_record(model_dir)}
    if (o.out / "bundle" / "manifest.json").exists():
        res["bundle"] = asdict(bundle_stats(o.out / "bundle"))
    if (o.out / "bench" / "results.json").exists():
        res["bench"] = bench_summary(o.out / "bench" / "results.json")
    dit = res.get("geometry", {}).get("weights", {}).get("transformer", {}).get("bytes")
    for s in res["steps"]:
        s["peak_rss_x_dit_weights"] = round(s["peak_rss_bytes"] / dit, 2) if dit and s["peak_rss_bytes"] else None


def bench_summary(path: Path) -> list[dict]:
    rows = []
    for r in json.loads(path.read_text()).get("results", []):
        st = r.get("stages", {})
        rows.append({"runner": r.get("label"), "error": r.get("error") or r.get("skipped"),
                     **{f"{k}_p50_ms": st[k]["p50_ms"] for k in ("dit_step", "vae_decode", "end_to_end")
                        if "p50_ms" in st.get(k, {})}})
    return rows


def write(res: dict, out: Path) -> None:
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "RESULTS.md").write_text(to_markdown(res))


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2 ** 30:.2f}"


def to_markdown(res: dict) -> str:
    m, g = res["machine"], res.get("geometry", {})
    w = g.get("weights", {})
    lines = [f"# Real-size run: {g.get('name', res['options']['geometry'])}", "",
             f"- date {res['date']}; `{' '.join(res['command'])}`; vidrt {m['git']['commit'][:10]}"
             + (" (dirty)" if m["git"]["dirty"] else ""),
             f"- {m['cpu']}, {m['nproc']} cores ({m['affinity']} usable), {_gib(m['memory_bytes'])} GiB; ISA {m['isa']}"
             f", torch {m['torch_cpu_capability']}; {m['platform']}",
             "- " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + (f"; env {m['env']}" if m["env"] else ""),
             "- weights: " + ", ".join(f"{p} {v['params'] / 1e6:.4g} M params, {v['bytes'] / 2 ** 20:.4g} MiB"
                                      for p, v in w.items()), "",
             "| step | rc | wall s | peak RSS GiB | x fp32 DiT weights | load 1-min before -> after | note |",
             "|---|---|---|---|---|---|---|"]
    for s in res["steps"]:
        load = f"{s['load_before'][0]:.2f} -> {s['load_after'][0]:.2f}" if s["load_after"] else "-"
        note = s["note"] or (s["stderr_tail"].splitlines() or [""])[-1][:100].replace("|", "/")
        lines.append(f"| {s['name']} | {s['status'] if s['rc'] is None else s['rc']} | {s['wall_s'] or '-'} | "
                     f"{_gib(s['peak_rss_bytes'])} | {s.get('peak_rss_x_dit_weights') or '-'} | {load} | {note} |")
    lines += _bundle_md(res.get("bundle")) + _bench_md(res.get("bench"))
    lines += ["", "Commands (generate: `python -c` of real_size.GENERATE):", ""]
    lines += [f"    {' '.join('GENERATE' if chr(10) in a else a for a in s['argv'])}" for s in res["steps"]]
    return "\n".join(lines) + "\n"


def _bundle_md(b: dict | None) -> list[str]:
    if not b:
        return []
    lines = ["", f"Bundle: {len(b['files'])} files, {_gib(b['bytes'])} GiB, {len(b['stray'])} stray"
             + (f" ({', '.join(b['stray'][:5])}...)" if b["stray"] else ""), "",
             "| part | worst rel L2 | video PSNR dB | external data files |", "|---|---|---|---|"]
    for name, rel in b["parity"].items():
        data = b["data_files"].get(f"{name}.onnx", [])
        psnr = b["psnr"].get(name)
        lines.append(f"| {name} | {'-' if rel is None else f'{rel:.2e}'} | {'-' if psnr is None else f'{psnr:.1f}'} | "
                     f"{len(data)} |")
    return lines


def _bench_md(rows: list[dict] | None) -> list[str]:
    if not rows:
        return []
    lines = ["", "| bench runner | DiT step p50 ms | VAE decode p50 ms | end to end p50 s |", "|---|---|---|---|"]
    for r in rows:
        e2e = r.get("end_to_end_p50_ms")
        ms = lambda k: f"{r[k]:.1f}" if k in r else (r["error"] or "-")[:80]
        lines.append(f"| {r['runner']} | {ms('dit_step_p50_ms')} | {ms('vae_decode_p50_ms')} | "
                     f"{'-' if e2e is None else f'{e2e / 1000:.2f}'} |")
    return lines


def parse(argv: list[str] | None = None) -> Options:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--geometry", choices=list(GEOMETRIES), default=Options.geometry)
    ap.add_argument("--out", type=Path, required=True, help="results.json, RESULTS.md, logs/ (and the work dirs)")
    ap.add_argument("--layers", type=int, help="override the transformer's num_layers (wan2.1-14b-4l: 4)")
    ap.add_argument("--model-dir", type=Path, help="reuse this diffusers directory (built there if absent; kept)")
    for name in ("frames", "height", "width", "steps", "num_prompts"):
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(Options, name))
    ap.add_argument("--bucket", default=Options.bucket, help="the extra export bucket FRAMESxHEIGHTxWIDTH")
    ap.add_argument("--precision", default=Options.precision, help="export-engines --precision")
    ap.add_argument("--steps-only", default=",".join(STEPS), help=f"comma list of {','.join(STEPS)}")
    ap.add_argument("--keep", action="store_true", help="keep the model dir, calibration set and bundle")
    ap.add_argument("--stream-blocks", action="store_true", help="export the DiT block by block (export-engines)")
    a = ap.parse_args(argv)
    only = tuple(s.strip() for s in a.steps_only.split(",") if s.strip())
    if bad := [s for s in only if s not in STEPS]:
        ap.error(f"--steps-only {','.join(bad)}: choose from {','.join(STEPS)}")
    kw = {k: v for k, v in vars(a).items() if k != "steps_only"}
    return Options(**kw, steps_only=only)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    res = run(parse(argv), ["python", "-m", "vidrt.benchmarks.real_size", *argv])
    print((Path(res["options"]["out"]) / "RESULTS.md").read_text())
    return res


if __name__ == "__main__":
    main()
