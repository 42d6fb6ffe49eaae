"""`vidrt` command line: generate, evaluate, calibrate, bench, train."""
from __future__ import annotations

import json
import os
import sys
import time

import click

from vidrt.core.errors import ConfigError


def _fail(e: Exception):
    raise click.ClickException(str(e)) from e


@click.group()
def main():
    """vidrt: text-to-video export + inference runtime."""


@main.command()
@click.argument("prompt")
@click.option("-o", "--out", default="out.mp4", show_default=True, help="Output .mp4 or .gif")
@click.option("--model", default="tiny", show_default=True,
              help="Preset name, vidrt checkpoint directory, or diffusers pipeline directory (Wan)")
@click.option("--negative-prompt", default="", help="Classifier-free guidance negative prompt")
@click.option("--frames", "num_frames", type=int, help="4k+1 frames (model default if omitted)")
@click.option("--height", type=int)
@click.option("--width", type=int)
@click.option("--steps", "num_inference_steps", type=int)
@click.option("--guidance", "guidance_scale", type=float)
@click.option("--guidance-2", "guidance_scale_2", type=float,
              help="Two-expert models (Wan 2.2 A14B): the low-noise expert's guidance (default: --guidance)")
@click.option("--solver", help="euler or dpm++2m (vidrt models; default euler); diffusers directories use their "
              "shipped scheduler (default)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--scale", type=click.IntRange(min=0), default=0,
              help="Nearest-neighbour upscale of the saved video; 0 = auto (>= 256 px)")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file (atomically)")
@click.option("--max-memory-gb", type=float, help="Refuse requests estimated to need more (sets VIDRT_MAX_MEMORY_GB; "
              "default: 80% of the available RAM)")
def generate(prompt, out, model, scale, overwrite, max_memory_gb, **kw):
    """Generate a video from PROMPT (default: the embedded tiny model). An existing -o is replaced only with
    --overwrite, atomically (temporary file + rename: a killed run leaves the old file intact)."""
    # Before torch loads OpenMP: idle worker threads sleep instead of spinning. On a busy machine the spinning thread
    # steals the core its partner needs, and the tiny default took 5-20 s instead of 0.4 s (benchmarks/COLD_START.md).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from vidrt.core.memory import memory_limit  # lazy: --help speed
    from vidrt.core.video import check_output  # lazy: --help speed
    from vidrt.runtime.pipeline import Pipeline  # lazy: --help speed
    try:
        if max_memory_gb is not None:
            memory_limit(max_memory_gb)  # validates
            os.environ["VIDRT_MAX_MEMORY_GB"] = str(max_memory_gb)  # one limit for the pipeline and the writer
        check_output(out, overwrite)  # an unwritable -o fails now, not after the video is made
        t0 = time.time()
        pipe = Pipeline(model)
        kw = {k: v for k, v in kw.items() if v is not None}
        r = pipe.request(prompt, **kw)
        scale = scale or max(1, -(-256 // min(r.height, r.width)))
        pipe.check_memory(r, scale)
        video = pipe(prompt, **kw)
        frames = video.frames[0]
        path = video.save(out, scale=scale, overwrite=overwrite)
    except (ConfigError, ValueError, FileExistsError) as e:  # NonFiniteError is a ValueError
        _fail(e)
    T, H, W, _ = frames.shape
    click.echo(f"wrote {path} ({T} frames, {H}x{W} generated, saved x{scale}, {video.fps} fps) "
               f"in {time.time() - t0:.1f}s")


@main.command()
@click.option("--model", default="tiny", show_default=True)
@click.option("--seeds", default="0,1", show_default=True, help="Comma-separated seeds per held-out prompt")
@click.option("--json-out", type=click.Path(dir_okay=False), help="Write the full report (every video) as JSON")
def evaluate(model, seeds, json_out):
    """Prompt-faithfulness (colour, motion direction) on the held-out synthetic prompts."""
    from vidrt.calibration.evaluate import evaluate_faithfulness  # lazy: --help speed
    from vidrt.core.video import check_output  # lazy: --help speed
    from vidrt.runtime.pipeline import Pipeline  # lazy: --help speed
    try:
        seeds = tuple(int(s) for s in seeds.split(","))
    except ValueError:
        raise click.BadParameter(f"{seeds!r}: give comma-separated integers, e.g. 0,1", param_hint="--seeds") from None
    try:
        if json_out:
            check_output(json_out, overwrite=True, suffixes=())  # before the work, not after it
        rep = evaluate_faithfulness(Pipeline(model), seeds=seeds, progress=True)
    except (ConfigError, ValueError) as e:
        _fail(e)
    click.echo(rep.summary())
    if json_out:
        with open(json_out, "w") as f:
            json.dump(rep.to_dict(), f, indent=2)


@main.command()
@click.option("--model", default="tiny", show_default=True)
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False),
              help="One prompt per line ('#' comments); default: the project's prompts + the six Sora prompts")
@click.option("--num-prompts", type=int, help="Use only the first N prompts (a quicker, smaller set)")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Calibration set directory to create")
@click.option("--frames", "num_frames", type=int)
@click.option("--height", type=int)
@click.option("--width", type=int)
@click.option("--steps", "num_inference_steps", type=int)
@click.option("--seeds", default="0", show_default=True, help="Comma-separated seeds per prompt")
@click.option("--overwrite", is_flag=True, help="Replace an existing calibration set at --out (atomically)")
def calibrate(model, prompts_file, num_prompts, out, seeds, overwrite, **kw):
    """Capture DiT and VAE-decoder inputs on real sampling trajectories (calibration set for INT8/FP8). After the
    first trajectory an ETA for the rest goes to stderr."""
    from vidrt.calibration.capture import CalibrationError, capture, default_prompts, read_prompts  # lazy: --help speed
    from vidrt.core.bundle import BundleError, check_out  # lazy: --help speed
    from vidrt.runtime.pipeline import Pipeline  # lazy: --help speed
    try:
        try:
            seed_list = tuple(int(x) for x in seeds.split(","))
        except ValueError:
            raise ConfigError(f"--seeds {seeds!r}: give comma-separated integers, e.g. --seeds 0,1") from None
        check_out(out, overwrite)  # before any work: an existing --out without --overwrite, or not a calibration set
        prompts = first_prompts(read_prompts(prompts_file) if prompts_file else default_prompts(), num_prompts,
                                prompts_file)
        m = capture(Pipeline(model), prompts, out, seeds=seed_list, overwrite=overwrite,
                    **{k: v for k, v in kw.items() if v is not None})
    except (ConfigError, CalibrationError, BundleError, ValueError) as e:
        _fail(e)
    n = len(m["shards"]) * m["steps"] * m["cfg_batch"]
    click.echo(f"wrote {out}: {len(m['shards'])} trajectories, {n} DiT input samples, "
               f"video {'x'.join(map(str, m['video_shape']))}, {m['steps']} steps")


def first_prompts(prompts: list[str], n: int | None, prompts_file: str | None) -> list[str]:
    """The first `n` prompts (all for None); click.BadParameter, before any model loads, for n outside 1..len."""
    if n is not None and not 1 <= n <= len(prompts):
        source = f"--prompts {prompts_file} has" if prompts_file else "the default prompt list has"
        raise click.BadParameter(f"{n}: {source} {len(prompts)} prompts; give 1 to {len(prompts)}",
                                 param_hint="--num-prompts")
    return prompts if n is None else prompts[:n]


def bench_wait_policy(runners: str, load: float, cpus: int) -> str | None:
    """"PASSIVE" when `vidrt bench` should make OpenMP workers sleep: no runner is torch's, or the machine is busy
    (1-min load >= 3/4 of the cores); None keeps libgomp's default (see bench below)."""
    torch_runner = any(r.strip().split(":")[0] in ("torch", "torch.compile") for r in runners.split(","))
    return "PASSIVE" if load >= 0.75 * cpus or not torch_runner else None


@main.command()
@click.option("--model", default="small", show_default=True)
@click.option("--bundle", type=click.Path(exists=True, file_okay=False),
              help="export-engines bundle for the onnxruntime/tensorrt runners")
@click.option("--runners", default=None, help="Comma list BACKEND:PRECISION[+graphs]; the first is the baseline. "
              "Default CPU: torch:fp32,torch.compile:fp32,onnxruntime:fp32,onnxruntime:int8,onnxruntime:fp8,"
              "tensorrt:fp16; CUDA: torch fp32/bf16/bf16+graphs/compile bf16/fp8 (torch._scaled_mm)/fp8+graphs, "
              "onnxruntime, tensorrt")
@click.option("--device", default="cpu", show_default=True)
@click.option("--frames", type=click.IntRange(min=1))
@click.option("--height", type=click.IntRange(min=1))
@click.option("--width", type=click.IntRange(min=1))
@click.option("--steps", type=click.IntRange(1, 1000), default=10, show_default=True,
              help="Sampling steps of the end-to-end runs")
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True)
@click.option("--runs", type=click.IntRange(min=1), default=20, show_default=True, help="Timed runs per stage")
@click.option("--e2e-runs", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for results.json/.md/.png")
@click.option("--together/--one-at-a-time", default=None,
              help="Every runner resident, timed round-robin / one runner's model in memory at a time (default: "
                   "round-robin on a CPU where they fit together, measured on the first)")
def bench(model, bundle, runners, device, out, **kw):
    """Benchmark every backend x precision side by side: per stage and end to end, ratios vs the first runner."""
    if runners is None:
        runners = ("torch:fp32,torch:bf16,torch:bf16+graphs,torch.compile:bf16,torch:fp8,torch:fp8+graphs,"
                   "onnxruntime:fp32,tensorrt:fp16"
                   if device.startswith("cuda") else
                   "torch:fp32,torch.compile:fp32,onnxruntime:fp32,onnxruntime:int8,onnxruntime:fp8,tensorrt:fp16")
    # On a busy machine spinning OpenMP workers made torch eager 4x slower at the median and 29x at p99; on a quiet one
    # sleeping workers make it 1.5x slower (benchmarks/RESULTS.md, "Benchmarking on a busy machine"). Without a torch
    # runner torch only glues the parts together, and its spinning workers take the cores from onnxruntime's (small
    # INT8 DiT step 52.5 ms instead of 32.7 on a quiet machine). So: PASSIVE when no runner is torch's or the machine is
    # busy as the run starts (1-min load >= 3/4 of the cores), libgomp's default otherwise; a policy the user set
    # wins. The report records which.
    if "OMP_WAIT_POLICY" not in os.environ and bench_wait_policy(runners, os.getloadavg()[0], os.cpu_count() or 1):
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    from vidrt.app.bench import parse_runners, run  # lazy: --help speed
    try:
        rep = run(model, parse_runners(runners), out, bundle=bundle, device=device,
                  **{k: v for k, v in kw.items() if v is not None})
    except (ConfigError, ValueError) as e:
        _fail(e)
    from vidrt.app.bench_report import to_markdown  # lazy: --help speed
    click.echo(to_markdown(rep))
    click.echo(f"wrote {out}/results.json, results.md, results.png")


@main.command()
@click.option("--out", required=True, help="Checkpoint directory to write")
@click.option("--vae-steps", type=int, default=1000, show_default=True)
@click.option("--vae-finetune-steps", type=int, default=500, show_default=True,
              help="VAE fine-tuning with object pixels weighted x10")
@click.option("--dit-steps", type=int, default=2500, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--vae-dir", help="Start from this checkpoint's VAE: skip the first VAE stage")
def train(out, **kw):
    """Train the tiny model on the synthetic world (CPU, about 50 min on 2 cores)."""
    from vidrt.models.train import train_tiny  # lazy: --help speed
    train_tiny(out, **kw)


# Ray subcommands live beside their code; ray itself is imported only when one of them runs.
from vidrt.app.batch import batch_command  # noqa: E402
from vidrt.app.serve import serve_command  # noqa: E402

main.add_command(batch_command)
main.add_command(serve_command)

if __name__ == "__main__":
    sys.exit(main())
