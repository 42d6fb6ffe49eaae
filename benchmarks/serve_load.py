"""What Ray adds to a video: one request in-process vs through a Ray actor (`vidrt batch`'s path) vs over HTTP
(`vidrt serve`), interleaved round by round, medians and per-round ratios; then throughput of a burst on 1 vs 2
replicas. Loopback only, every loop bounded. `python -m vidrt.benchmarks.serve_load --out DIR` writes
results.json and results.md."""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from vidrt.app.batch import Engine, Worker
from vidrt.app.serve import ServeConfig, app, start
from vidrt.core.ort import cpu_isa
from vidrt.runtime.pipeline import Pipeline

PROMPT = "a red circle moving left on a blue background"


@dataclass
class LoadConfig:
    out: str
    rounds: int = 7  # interleaved rounds of the latency comparison
    steps: int = 4
    burst: int = 8  # requests sent at once in the throughput part
    burst_rounds: int = 3
    timeout_s: float = 120.0  # any single request taking longer fails the run
    poll_ms: int = 5  # the client's GET interval: short polls measure latency finely but take CPU from the replicas


def _http(method: str, url: str, body: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        raw = r.read()
        return json.loads(raw) if r.headers.get("content-type", "").startswith("application/json") else raw


def http_video(base: str, seed: int, steps: int, timeout_s: float, poll_ms: int = 5) -> tuple[float, bytes]:
    """POST, poll every `poll_ms` until completed, GET the mp4: the latency a client sees."""
    t0 = time.perf_counter()
    v = _http("POST", f"{base}/v1/videos", {"prompt": PROMPT, "seed": seed, "num_inference_steps": steps})
    while v["status"] in ("queued", "in_progress"):
        if time.perf_counter() - t0 > timeout_s:
            raise TimeoutError(f"{v['id']} still {v['status']} after {timeout_s} s")
        time.sleep(poll_ms / 1000)
        v = _http("GET", f"{base}/v1/videos/{v['id']}")
    if v["status"] != "completed":
        raise RuntimeError(f"{v['id']}: {v['status']} {v['error']}")
    data = _http("GET", f"{base}/v1/videos/{v['id']}/content")
    return time.perf_counter() - t0, data


def run(cfg: LoadConfig) -> dict:
    import ray
    import torch
    from ray import serve

    torch.set_num_threads(1)  # like one replica with one CPU: the ratios compare equal compute
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = start(ServeConfig(replicas=1, max_queued=cfg.burst, port=port, name="bench"))
    actor = ray.remote(Worker).options(num_cpus=1).remote(Engine())
    pipe, tmp = Pipeline("tiny"), Path(tempfile.mkdtemp(prefix="vidrt-load-"))
    params = {"prompt": PROMPT, "num_inference_steps": cfg.steps}

    def local(seed: int) -> tuple[float, bytes]:
        t0 = time.perf_counter()
        p = pipe(**params, seed=seed, progress=False).save(tmp / f"{seed}.mp4", overwrite=True)
        return time.perf_counter() - t0, p.read_bytes()

    def actor_call(seed: int) -> tuple[float, bytes]:
        t0 = time.perf_counter()
        out = ray.get(actor.run.remote(0, params | {"seed": seed}), timeout=cfg.timeout_s)
        return time.perf_counter() - t0, out["data"]

    modes = {"in-process": local, "ray actor": actor_call,
             "serve http": lambda s: http_video(base, s, cfg.steps, cfg.timeout_s, cfg.poll_ms)}
    for f in modes.values():  # warm-up: text encoder, first HTTP connection, actor start
        f(999)
    times, load0 = {m: [] for m in modes}, os.getloadavg()
    for r in range(cfg.rounds):
        order = list(modes)[r % 3:] + list(modes)[:r % 3]  # rotate: no mode always runs first after a pause
        data = {}
        for m in order:
            t, data[m] = modes[m](r)
            times[m].append(t)
        if len(set(data.values())) != 1:  # same seed, same bytes on every path
            raise AssertionError(f"round {r}: the three paths wrote different videos")
    rows = {m: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "runs": t}
            for m, t in times.items()}
    for m in rows:
        rows[m]["ratio_median"] = statistics.median(a / b for a, b in zip(times[m], times["in-process"]))
    ray.kill(actor)  # its CPU goes to the second replica
    burst = _burst(cfg, base, port)
    serve.shutdown()
    ray.shutdown()
    return {"config": asdict(cfg), "latency": rows, "burst": burst, "isa": cpu_isa(), "cpus": os.cpu_count(),
            "loadavg_1_5_15": {"start": load0, "end": os.getloadavg()}, "machine": platform.platform(),
            "ray": ray.__version__,
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def _burst(cfg: LoadConfig, base: str, port: int) -> dict:
    """`burst` requests at once, 1 replica vs 2 (redeployed in turn, interleaved): wall time until all are done."""
    from ray import serve
    walls = {1: [], 2: []}
    for r in range(cfg.burst_rounds):
        for n in (1, 2) if r % 2 == 0 else (2, 1):
            serve.run(app(ServeConfig(replicas=n, max_queued=cfg.burst, port=port)), name="bench", route_prefix="/")
            with ThreadPoolExecutor(cfg.burst) as ex:  # untimed: every replica's text encoder loaded
                list(ex.map(lambda s: http_video(base, s, cfg.steps, cfg.timeout_s, cfg.poll_ms), range(cfg.burst)))
            t0 = time.perf_counter()
            with ThreadPoolExecutor(cfg.burst) as ex:
                list(ex.map(lambda s: http_video(base, s, cfg.steps, cfg.timeout_s, cfg.poll_ms), range(cfg.burst)))
            walls[n].append(time.perf_counter() - t0)
    med = {n: statistics.median(w) for n, w in walls.items()}
    return {"walls_s": walls, "median_s": med, "videos_per_s": {n: cfg.burst / m for n, m in med.items()},
            "speedup_2_vs_1": med[1] / med[2]}


def to_markdown(rep: dict) -> str:
    c, la = rep["config"], rep["loadavg_1_5_15"]
    lines = [f"tiny, 9x32x32, {c['steps']} steps, client polls every {c.get('poll_ms', 5)} ms, "
             "1 torch thread per Pipeline; "
             f"{rep['machine']}, {rep['cpus']} CPUs, "
             f"ISA {rep['isa']}; ray {rep['ray']}, torch {rep['torch']}; {rep['date']}; load average (1/5/15 min) "
             f"{'/'.join(f'{x:.1f}' for x in la['start'])} at start, {'/'.join(f'{x:.1f}' for x in la['end'])} at end",
             "", f"Latency of one video, {c['rounds']} interleaved rounds (ratio: median of per-round ratios "
             "vs in-process):", "", "| path | median s | min s | max s | ratio vs in-process |",
             "|---|---|---|---|---|"]
    for m, r in rep["latency"].items():
        lines.append(f"| {m} | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['max_s']:.3f} | {r['ratio_median']:.2f}x |")
    b = rep["burst"]
    lines += ["", f"Burst of {c['burst']} concurrent HTTP requests, {c['burst_rounds']} interleaved rounds:", "",
              "| replicas | median wall s | videos/s |", "|---|---|---|"]
    for n in ("1", "2") if "1" in b["median_s"] else (1, 2):
        lines.append(f"| {n} | {b['median_s'][n]:.2f} | {b['videos_per_s'][n]:.2f} |")
    lines += ["", f"2 replicas vs 1: {b['speedup_2_vs_1']:.2f}x"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True, help="Folder for results.json and results.md")
    for f in ("rounds", "steps", "burst", "burst_rounds", "poll_ms"):
        ap.add_argument(f"--{f.replace('_', '-')}", type=int, default=getattr(LoadConfig, f))
    cfg = LoadConfig(**vars(ap.parse_args(argv)))
    if min(cfg.rounds, cfg.steps, cfg.burst, cfg.burst_rounds, cfg.poll_ms) < 1:
        ap.error("--rounds, --steps, --burst, --burst-rounds and --poll-ms must be >= 1")
    rep = run(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rep, indent=2))
    md = to_markdown(rep)
    (out / "results.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
