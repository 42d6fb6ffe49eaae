"""`vidrt batch`: a prompt suite on Ray actors that each hold one Pipeline. DIR gets one video per item (written
atomically) and results.jsonl (one record per item). A re-run skips items whose file matches the recorded sha256 and
redoes the rest; an item whose actor died is retried on the next free actor, `retries` times, then reported failed."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click

from vidrt.app.batch_files import Results, _lock  # noqa: F401  (_lock: tests use it here)
from vidrt.core.bundle import sha256, write_atomic
from vidrt.core.errors import ConfigError

# .jsonl keys -> Pipeline keyword arguments (the CLI's option names, so a suite line reads like a command line)
FIELDS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "seed": "seed", "frames": "num_frames",
          "height": "height", "width": "width", "steps": "num_inference_steps", "guidance": "guidance_scale"}
RESTART_S = 300  # how long a dead actor may take to come back (process start + model load) before it is dropped


@dataclass
class Engine:
    """What each actor loads: Pipeline(model) or Pipeline.from_bundle(bundle, backend, precision)."""
    model: str = "tiny"
    bundle: str | None = None
    backend: str = "onnxruntime"
    precision: str = "fp32"
    gpus: float = 0.0  # per actor; > 0 runs on cuda
    cpus: float = 1.0  # per actor; also its torch thread count

    def load(self):
        import torch

        from vidrt.runtime.pipeline import Pipeline  # lazy: --help speed (torch)
        torch.set_num_threads(max(1, int(self.cpus)))  # actors share a node: no oversubscription
        device = "cuda" if self.gpus > 0 else "cpu"
        if self.bundle:
            return Pipeline.from_bundle(self.bundle, backend=self.backend, precision=self.precision, device=device)
        return Pipeline(self.model, device=device)


@dataclass
class BatchConfig:
    out: str
    engine: Engine = field(default_factory=Engine)
    replicas: int = 1
    retries: int = 2  # extra attempts for an item whose actor died
    address: str | None = None  # None: the current Ray session, else a new local one; "auto" or HOST:PORT
    seed: int = 0  # items without a seed get seed + their line number
    progress: bool = True
    item_timeout_s: float | None = None  # an item running longer has its actor restarted and counts as a death


@dataclass
class Item:
    line: int  # 1-based line in PROMPTS: the item's name in messages and file names
    params: dict  # Pipeline keyword arguments
    error: str | None = None  # why the line could not be read

    @property
    def key(self) -> str:
        """Names the file; changes with the parameters, so an edited suite never reuses a stale video."""
        h = hashlib.sha256(json.dumps(self.params, sort_keys=True).encode()).hexdigest()[:10]
        return f"{self.line:05d}-{h}"


def read_items(path: str | Path, seed: int = 0) -> list[Item]:
    """.txt: one prompt a line ('#' comments and blank lines skipped); .jsonl: one object a line with FIELDS.
    A bad line becomes an item carrying its error, so it is reported and the rest still run."""
    path = Path(path)
    if path.suffix not in (".txt", ".jsonl"):
        raise ConfigError(f"{path}: PROMPTS must be a .txt (one prompt a line) or .jsonl file")
    items = []
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        s = raw.strip()
        if not s or s.startswith("#"):
            continue
        if path.suffix == ".txt":
            items.append(Item(n, {"prompt": s, "seed": seed + n}))
            continue
        try:
            d = json.loads(s)
            if not isinstance(d, dict):
                raise ValueError(f"expected a JSON object, got {type(d).__name__}")
        except ValueError as e:
            items.append(Item(n, {"line": s[:200]}, f"line {n} is not JSON: {e}"))
            continue
        unknown = sorted(set(d) - set(FIELDS))
        if unknown or "prompt" not in d:
            why = f"unknown keys {unknown}" if unknown else "no 'prompt'"
            items.append(Item(n, {"line": s[:200]}, f"line {n}: {why}; keys are {', '.join(FIELDS)}"))
            continue
        items.append(Item(n, {"seed": seed + n} | {FIELDS[k]: v for k, v in d.items()}))
    return items


class Worker:
    """One Pipeline, loaded once. `run` returns the encoded mp4 bytes, so nodes need no shared file system."""

    def __init__(self, engine: Engine):
        self.pipe, self.where = engine.load(), f"{socket.gethostname()}:{os.getpid()}"
        self.pipe.text_encoder  # loaded now, not inside the first item's time (and its --item-timeout)
        self.state = {"worker": self.where, "item": None, "step": 0, "of": 0}

    def status(self) -> dict:
        return dict(self.state)  # answers while run() works: the actor has two threads

    def run(self, line: int, params: dict, callback=None) -> dict:
        """`callback(step, of)` after each step; returning False cancels (status "cancelled")."""
        from vidrt.core.backends import BackendError  # lazy: --help speed (torch)
        from vidrt.runtime.pipeline import Cancelled, VideoOutput  # lazy: --help speed (torch)
        t = [time.perf_counter()]
        self.state.update(item=line, step=0, of=0)
        self.callback = callback
        try:
            try:
                r = self.pipe.request(**params)
            except (ConfigError, BackendError, TypeError) as e:
                return {"status": "invalid", "error": str(e), "worker": self.where}
            resolved = {k: v for k, v in asdict(r).items() if k not in ("prompts", "negative_prompts")}
            resolved |= {"prompt": r.prompts[0], "negative_prompt": r.negative_prompts[0]}
            t.append(time.perf_counter())
            latents = self.pipe.sample_latents(**params, progress=False, callback=self._step)
            t.append(time.perf_counter())
            frames = self.pipe.decode(latents, tile=r.decode_tile)
            t.append(time.perf_counter())
            with tempfile.TemporaryDirectory(prefix="vidrt-batch-") as d:
                p = VideoOutput(frames, fps=self.pipe.cfg.sample.fps).save(Path(d) / "v.mp4")
                data = p.read_bytes()
            t.append(time.perf_counter())
        except Cancelled as e:
            return {"status": "cancelled", "error": str(e), "worker": self.where}
        except Exception as e:  # a deterministic failure: retrying elsewhere would fail the same way
            return {"status": "failed", "error": f"{type(e).__name__}: {e}", "worker": self.where}
        finally:
            self.state["item"] = None
        stages = ("validate_s", "sample_s", "decode_s", "encode_s")
        return {"status": "done", "data": data, "sha256": hashlib.sha256(data).hexdigest(), "params": resolved,
                "timings": {s: round(b - a, 4) for s, a, b in zip(stages, t, t[1:])}, "worker": self.where}

    def _step(self, step: int, of: int, _latents) -> bool | None:
        self.state.update(step=step, of=of)
        return self.callback(step, of) if self.callback else None


def plan(items: list[Item], folder: Path, results: Results) -> tuple[list[Item], list[dict]]:
    """Split items into (to run, kept records): an item is done when its record says so and its file's sha256
    matches; everything else, half-done included, runs again."""
    for p in folder.glob(".*.partial"):  # a killed driver's unfinished writes
        p.unlink(missing_ok=True)
    old, keep, todo = results.load(), [], []
    for it in items:
        r = old.get(it.key)
        f = folder / f"{it.key}.mp4"
        if r and r.get("status") == "done" and f.is_file() and sha256(f) == r.get("sha256"):
            keep.append(r)
        else:
            todo.append(it)
    return todo, keep


def connect(address: str | None, log_to_driver: bool = True) -> None:
    """Join `address` (auto, HOST:PORT or ray://...) or, when None and no session is open, start a local Ray.
    An unreachable HOST:PORT fails in seconds with the fix, not after Ray's minutes of retries."""
    import ray
    if ray.is_initialized() and not address:
        return
    if address and address != "auto" and "://" not in address:
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except (OSError, ValueError) as e:
            raise ConfigError(f"no Ray cluster answers at --address {address} ({e}); start one with `ray start "
                              "--head` or give its GCS address (HOST:6379), or use --address auto") from None
    ray.init(address=address, ignore_reinit_error=True, include_dashboard=False, log_to_driver=log_to_driver)


def run_batch(prompts: str | Path, cfg: BatchConfig, on_record=None) -> dict:
    """Run every item not already done in cfg.out; returns counts {done, skipped, failed, invalid}.
    `on_record(record)` sees each new record (tests, dashboards)."""
    import ray
    from tqdm import tqdm
    if cfg.replicas < 1 or cfg.retries < 0:
        raise ConfigError(f"replicas={cfg.replicas} must be >= 1 and retries={cfg.retries} >= 0")
    items = read_items(prompts, cfg.seed)
    folder = Path(cfg.out)
    folder.mkdir(parents=True, exist_ok=True)
    lock, results, bar = _lock(folder), Results(folder), None
    try:
        todo, keep = plan(items, folder, results)
        results.rewrite(keep)
        counts = {"done": 0, "skipped": len(keep), "failed": 0, "invalid": 0}
        bar = tqdm(total=len(items), initial=len(keep), desc="batch", unit="video", disable=not cfg.progress)

        def record(it: Item, status: str, **kw) -> None:
            rec = {"item": it.line, "key": it.key, "status": status, "file": f"{it.key}.mp4" if status == "done"
                   else None, "params": it.params, "seed": it.params.get("seed")} | kw
            results.append(rec)
            counts[status] += 1
            bar.update(1)
            bar.set_postfix({k: v for k, v in counts.items() if v})
            if on_record:
                on_record(rec)

        for it in [i for i in todo if i.error]:
            record(it, "invalid", error=it.error, attempts=0)
        todo = [i for i in todo if not i.error]
        if todo:
            connect(cfg.address, log_to_driver=False)  # worker logs would break the progress bar
            _drive(todo, cfg, record)
        return counts
    finally:
        if bar is not None:
            bar.close()
        lock.close()


def _drive(todo: list[Item], cfg: BatchConfig, record) -> None:
    """Feed one item at a time to each actor; a dead actor's item goes back to the front of the queue."""
    import ray
    from ray.exceptions import ActorUnavailableError, RayActorError, RayError
    e = cfg.engine
    # Deaths are bounded by the items' attempts, so restarts may be too; named for `ray list actors` and tests
    opts = dict(num_cpus=e.cpus, num_gpus=e.gpus, max_concurrency=2, max_restarts=len(todo) * (cfg.retries + 1),
                max_task_retries=0)
    cls = ray.remote(Worker)
    actors = [cls.options(name=f"vidrt-batch-{os.getpid()}-{i}", **opts).remote(e) for i in range(cfg.replicas)]
    try:
        ray.get([a.status.remote() for a in actors])  # a model that cannot load fails here, once, with its error
        pending, attempts, idle = deque(todo), {}, list(actors)
        busy, reviving, last, hung = {}, {}, "no worker left", set()
        while pending or busy:
            while idle and pending:
                it, a = pending.popleft(), idle.pop()
                attempts[it.key] = attempts.get(it.key, 0) + 1
                busy[a.run.remote(it.line, it.params)] = (it, a, time.time())
            if not busy and not idle and not reviving:
                for it in pending:
                    record(it, "failed", error=f"every worker died ({last})", attempts=attempts.get(it.key, 0))
                return
            ready, _ = ray.wait(list(busy) + list(reviving), num_returns=1, timeout=1 if cfg.item_timeout_s else None)
            for ref, (it, a, t0) in busy.items() if cfg.item_timeout_s else ():  # every pass: others may finish often
                if time.time() - t0 > cfg.item_timeout_s and ref not in hung:
                    hung.add(ref)
                    ray.kill(a, no_restart=False)  # its call fails with RayActorError: the retry path below
            if not ready:
                continue
            ref = ready[0]
            if ref in reviving:  # a restarted actor answered (back to work) or is gone for good
                a, until = reviving.pop(ref)
                try:
                    ray.get(ref)
                    idle.append(a)
                except ActorUnavailableError as err:  # still restarting: ask again, for a bounded time
                    last = str(err).splitlines()[0]
                    if time.time() < until:
                        time.sleep(0.1)
                        reviving[a.status.remote()] = (a, until)
                except RayActorError as err:
                    last = str(err).splitlines()[0]
                continue
            it, a, t0 = busy.pop(ref)
            try:
                out = ray.get(ref)
            except RayActorError as err:
                last = (f"item {it.line} ran over --item-timeout {cfg.item_timeout_s:g} s: its worker was restarted"
                        if ref in hung else f"worker died during item {it.line}: {str(err).splitlines()[0][:300]}")
                reviving[a.status.remote()] = (a, time.time() + RESTART_S)
                if attempts[it.key] <= cfg.retries:
                    pending.appendleft(it)
                else:
                    record(it, "failed", error=last, attempts=attempts[it.key])
                continue
            except RayError as err:  # e.g. a result Ray could not move: reported, the actor lives on
                idle.append(a)
                record(it, "failed", error=str(err)[:500], attempts=attempts[it.key])
                continue
            idle.append(a)
            _finish(it, out, cfg, attempts[it.key], time.time() - t0, record)
    finally:
        for a in actors:
            ray.kill(a)


def _finish(it: Item, out: dict, cfg: BatchConfig, attempts: int, total: float, record) -> None:
    if out["status"] != "done":
        record(it, out["status"], error=out["error"], worker=out["worker"], attempts=attempts)
        return
    path = Path(cfg.out) / f"{it.key}.mp4"
    write_atomic(path, out["data"])
    if sha256(path) != out["sha256"]:  # the bytes on disk are what the record vouches for
        record(it, "failed", error=f"{path} does not match the worker's sha256", attempts=attempts)
        return
    record(it, "done", sha256=out["sha256"], params=out["params"], seed=out["params"]["seed"],
           timings=out["timings"] | {"total_s": round(total, 4)}, worker=out["worker"], attempts=attempts)


def replica_options(replicas: str, retries: str):
    """The options of `vidrt batch` and `vidrt serve` that say what each replica loads and where it runs; `replicas`
    and `retries` are their help texts."""
    opts = [click.option("--model", default="tiny", show_default=True, help="Preset name or checkpoint directory"),
            click.option("--bundle", type=click.Path(exists=True, file_okay=False),
                         help="export-engines bundle (instead of --model)"),
            click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime",
                         show_default=True),
            click.option("--precision", default="fp32", show_default=True,
                         help="The bundle DiT's precision (int8 on onnxruntime: the bundle's INT8 VAE too)"),
            click.option("--replicas", type=click.IntRange(min=1), default=1, show_default=True, help=replicas),
            click.option("--gpus-per-replica", type=click.FloatRange(min=0), default=0, show_default=True),
            click.option("--cpus-per-replica", type=click.FloatRange(min=0.5), default=1, show_default=True),
            click.option("--address", help="Ray cluster: auto or HOST:PORT (default: start a local one)"),
            click.option("--retries", type=click.IntRange(min=0), default=2, show_default=True, help=retries)]

    def apply(f):
        for o in reversed(opts):  # innermost first, so --help lists them in this order
            f = o(f)
        return f
    return apply


@click.command("batch")
@click.argument("prompts", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the videos and results.jsonl")
@replica_options(replicas="Actors, one Pipeline each", retries="Extra attempts for an item whose actor died")
@click.option("--item-timeout", type=click.FloatRange(min=0, min_open=True),
              help="Seconds an item may run before its actor is restarted and the item retried (default: no limit)")
@click.option("--seed", type=int, default=0, show_default=True, help="Items without a seed get SEED + line number")
def batch_command(prompts, out, model, bundle, backend, precision, replicas, gpus_per_replica, cpus_per_replica,
                  address, retries, item_timeout, seed):
    """Generate every item of PROMPTS (.txt: a prompt a line; .jsonl: prompt, negative_prompt, seed, frames,
    height, width, steps, guidance) on Ray actors. Re-running on the same --out skips the items already done
    (verified by sha256) and redoes the rest. Exits 1 if any item failed or was invalid."""
    eng = Engine(model, bundle, backend, precision, gpus_per_replica, cpus_per_replica)
    cfg = BatchConfig(out, eng, replicas, retries, address, seed, item_timeout_s=item_timeout)
    try:
        c = run_batch(prompts, cfg)
    except (ConfigError, OSError) as e:
        raise click.ClickException(str(e)) from e
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted: finished items are in {out}; run the same command again to resume", err=True)
        raise SystemExit(130) from None
    click.echo(f"{out}: {c['done']} done, {c['skipped']} already done, {c['failed']} failed, {c['invalid']} invalid "
               f"(see {Path(out) / 'results.jsonl'})")
    if c["failed"] or c["invalid"]:
        raise SystemExit(1)
