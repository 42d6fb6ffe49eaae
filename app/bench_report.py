"""`vidrt bench`'s report: the markdown table and the PNG bar chart of a results.json (bench.run's dict)."""
from __future__ import annotations

from pathlib import Path


def to_markdown(rep: dict) -> str:
    m = rep["machine"]
    lines = [f"Model `{rep['model']}`, video {rep['shape']}, {rep['steps']} steps, CFG batch 2; device "
             f"{rep['device']} ({m.get('gpu') or m['cpu']}, ISA {m.get('isa', '?')}, {m['cpu_threads']} threads, load "
             f"{m.get('load_avg_1m_start', '?')} at start, {m.get('load_avg_1m', '?')} at end); {rep['date']}.",
             f"Timing: {rep.get('timing', 'sequential')}. Speedup columns: "
             + ("median (q25-q75) of the paired ratios." if "round-robin" in rep.get("timing", "") else
                "ratios of the medians."),
             (f"DiT step: {rep['dit_gflop']:.1f} GFLOP counted" if rep["dit_gflop"] else
              "DiT step: FLOPs not counted (no torch module of this model ran)")
             + f"; measured GEMM peak {rep['gemm_peak_gflops']:.0f} GFLOP/s"
             + (f", int8 GEMM peak (onnxruntime) {rep['int8_gemm_peak_gops']:.0f} GOP/s: the int8 rows' % peak"
                if rep.get("int8_gemm_peak_gops") else "") + ".", "",
             "| runner | text enc p50 ms | DiT step p50 / p90 / p99 ms | DiT x | DiT GFLOP/s (% peak) | VAE p50 ms "
             "| e2e p50 s | e2e x | frames/s | videos/min | process peak RSS MiB |", "|---" * 11 + "|"]
    for r in rep["results"]:
        if "skipped" in r or "error" in r:
            why = f"skipped: {r['skipped']}" if "skipped" in r else f"ERROR: {r['error']}"
            lines.append(f"| {r['label']} | {why} |" + " |" * 9)
            continue
        s = r["stages"]
        d, e = s["dit_step"], s["end_to_end"]
        def fmt(st):
            v = st.get("speedup_vs_baseline")
            return "-" if not v else f"{v:.2f}x" + (f" ({st['speedup_q25']:.2f}-{st['speedup_q75']:.2f})"
                                                    if "speedup_q25" in st and st["speedup_q25"] != v else "")
        te = f"{s['text_encoder']['p50_ms']:.1f}" if "p50_ms" in s["text_encoder"] else "n/a (random text)"
        lines.append(
            f"| {r['label']} | {te} | {d['p50_ms']:.1f} / {d['p90_ms']:.1f} / "
            f"{d['p99_ms']:.1f} | {fmt(d)} | "
            + (f"{d['gflops']:.1f} ({d['peak_fraction']:.0%})" if "gflops" in d else "-") + " | "
            f"{s['vae_decode']['p50_ms']:.1f} | {e['p50_ms'] / 1000:.2f} | {fmt(e)} | "
            f"{e['throughput_frames_per_s']:.1f} | {e['videos_per_min']:.1f} | "
            f"{max(st.get('rss_peak_mib', 0) for st in s.values()):.0f} |")
    notes = [f"- {r['label']}: CUDA graphs fell back: {r['cuda_graph_fallback']}" for r in rep["results"]
             if r.get("cuda_graph_fallback")]
    notes += [f"- {r['label']}: text encoder not timed ({r['stages']['text_encoder']['skipped'][:90]}...); "
              "random text embeddings" for r in rep["results"]
              if "error" not in r and "stages" in r and "skipped" in r["stages"].get("text_encoder", {})]
    if rep.get("baseline_missing"):
        notes.append(f"- {rep['baseline_missing']}")
    return "\n".join(lines + ([""] + notes if notes else []))


def plot_png(rep: dict, path: Path) -> None:
    """Horizontal bars of DiT-step p50 and end-to-end p50 per runner (PIL: no plotting dependency)."""
    from PIL import Image, ImageDraw
    rows = [r for r in rep["results"] if "stages" in r and "error" not in r]
    if not rows:
        return
    W, bar, pad, left = 900, 22, 10, 260
    H = 60 + len(rows) * 2 * (bar + 4) + len(rows) * pad
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.text((pad, pad), f"vidrt bench: {rep['model']} {rep['shape']} on {rep['device']} (p50; shorter is faster)",
           fill="black")
    y = 40
    for stage, color in (("dit_step", (52, 101, 164)), ("end_to_end", (204, 102, 0))):
        mx = max(r["stages"][stage]["p50_ms"] for r in rows)
        for r in rows:
            v = r["stages"][stage]["p50_ms"]
            d.text((pad, y + 5), f"{r['label']} [{stage}]"[:40], fill="black")
            d.rectangle([left, y, left + int((W - left - 120) * v / mx), y + bar], fill=color)
            d.text((left + int((W - left - 120) * v / mx) + 5, y + 5), f"{v:.1f} ms", fill="black")
            y += bar + 4
        y += pad
    img.save(path)
