"""Runtime reliability (issue 10): bad values and types refused before any work, memory and step limits, NaN/inf
named by step and part, outputs checked before generating, atomic overwrite under SIGKILL, one Pipeline shared by
threads, prompt type and length checks."""
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from vidrt.app.cli import main
from vidrt.core.errors import ConfigError
from vidrt.core.memory import memory_limit
from vidrt.core.video import check_output, save_video
from vidrt.models.config import check_memory, estimate_memory, preset
from vidrt.runtime.pipeline import NonFiniteError, Pipeline

PROMPT = "a red circle moving left on a blue background"
FAST = settings(max_examples=30, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])


class CountingPart:
    """The real DiT, counting its calls: a refused request must not reach it."""

    def __init__(self, part):
        self.part, self.calls = part, 0

    def __call__(self, *a):
        self.calls += 1
        return self.part(*a)


@pytest.fixture(scope="module")
def pipe():
    p = Pipeline("tiny")
    p.dit = CountingPart(p.dit)
    return p


def refused(pipe, match=None, **kw):
    before = pipe.dit.calls
    with pytest.raises(ConfigError, match=match):
        pipe(PROMPT, progress=False, **kw)
    assert pipe.dit.calls == before  # validation failed before any model work


# --- item 5/6: every numeric argument outside its range is a ConfigError, never another error, never a run ---------

bad_frames = st.integers(-10 ** 6, 0) | st.integers(1, 10 ** 6).filter(lambda f: (f - 1) % 4) | \
    st.integers(10 ** 7, 10 ** 30).map(lambda k: 4 * k + 1)  # valid shape, but terabytes
bad_side = st.integers(-10 ** 6, 15) | st.integers(16, 10 ** 5).filter(lambda v: v % 16) | \
    st.integers(10 ** 4, 10 ** 9).map(lambda k: 16 * k)
bad_steps = st.integers(-10 ** 9, 0) | st.integers(1001, 10 ** 12)
bad_guidance = st.floats(allow_nan=True, allow_infinity=True).filter(lambda g: not 1 <= g <= 100)
bad_shift = st.floats(allow_nan=True, allow_infinity=True).filter(lambda s: not 0.01 <= s <= 100)


@FAST
@given(f=bad_frames)
@example(f=0)
@example(f=-1)
def test_bad_frames_refused(pipe, f):
    refused(pipe, num_frames=f)


@FAST
@given(v=bad_side, which=st.sampled_from(["height", "width"]))
@example(v=0, which="height")
@example(v=8192 * 64, which="width")
def test_bad_height_width_refused(pipe, v, which):
    refused(pipe, **{which: v})


@FAST
@given(n=bad_steps)
@example(n=0)
@example(n=1_000_000)
def test_bad_steps_refused(pipe, n):
    refused(pipe, match="num_inference_steps", num_inference_steps=n)


@FAST
@given(g=bad_guidance)
@example(g=math.inf)
@example(g=-math.inf)
@example(g=math.nan)
@example(g=1e30)
@example(g=-1.0)
@example(g=0.0)
def test_bad_guidance_refused(pipe, g):
    refused(pipe, match="guidance_scale", guidance_scale=g)


@FAST
@given(s=bad_shift)
@example(s=math.nan)
@example(s=math.inf)
@example(s=0.0)
@example(s=5e-324)
def test_bad_shift_refused(pipe, s):
    refused(pipe, match="shift", shift=s)


@pytest.mark.parametrize("kw,match", [
    (dict(num_frames="9"), "num_frames must be an integer, got str '9'"),
    (dict(height=32.5), "height must be an integer, got float 32.5"),
    (dict(width=True), "width must be an integer, got bool"),
    (dict(num_inference_steps=2.0), "num_inference_steps must be an integer"),
    (dict(guidance_scale="4"), "guidance_scale must be a number, got str"),
    (dict(shift=[1.0]), "shift must be a number, got list"),
    (dict(seed="1"), "seed must be an integer"),
    (dict(seed=2 ** 64), "seed=.* must fit in 64 bits"),
    (dict(solver=3), "unknown solver 3"),
    (dict(decode_tile=0), "decode_tile=0 must be >= 1"),
    (dict(callback=5), "callback must be callable"),
    (dict(num_frames=0), "num_frames=0 must be 4k\\+1"),  # 0 no longer means "default"
    (dict(height=0), "height=0 must be a positive multiple of 16"),
    (dict(num_inference_steps=0), "num_inference_steps=0 must be 1 to 1000"),
    (dict(guidance_scale=-2.0), "guidance_scale=-2.0 must be 1 \\(no guidance\\) to 100"),
    (dict(guidance_scale=0.5), "guidance_scale=0.5 must be 1"),
])
def test_wrong_types_and_zero_values_refused(pipe, kw, match):
    refused(pipe, match=match, **kw)


@pytest.mark.parametrize("prompt,match", [
    (b"x", "prompt is bytes, not text"),
    (["a red circle", 3], "prompt\\[1\\] is int 3, not str"),
    ([b"a"], "prompt\\[0\\] is bytes"),
    (7, "prompt must be a str or a list of str, got int"),
    ([], "prompt is empty"),
    ("  ", "prompt is empty"),
])
def test_prompt_types_say_what_is_wrong(pipe, prompt, match):
    with pytest.raises(ConfigError, match=match):
        pipe.request(prompt)
    with pytest.raises(ConfigError, match="negative_prompt\\[0\\] is bytes"):
        pipe.request(PROMPT, negative_prompt=[b"x"])


def test_long_prompt_warns_with_token_counts(pipe):
    long = "a red circle moving left on a blue background " * 5
    with pytest.warns(UserWarning, match=r"prompt 1 is 47 tokens but the text encoder reads 32: the last 15"):
        pipe.text_encoder.encode([PROMPT, long])


# --- item 5: memory estimate and limits ----------------------------------------------------------------------------

def test_memory_estimate_scales_and_limit_is_configurable(pipe, monkeypatch, tmp_path):
    monkeypatch.setattr("vidrt.core.memory.available_ram", lambda: 16 * 2 ** 30)  # the same limit on every host
    cfg = preset("tiny")
    small, big = estimate_memory(cfg, 9, 32, 32, 2), estimate_memory(cfg, 9, 64, 64, 2)
    assert big["VAE decode tile"] == 4 * small["VAE decode tile"]  # linear in pixels
    assert estimate_memory(cfg, 9, 32, 32, 2, scale=1000)["saved video"] == 9 * 32000 * 32000 * 3  # 25.7 GiB
    ort = estimate_memory(cfg, 9, 32, 32, 2, attention_scores=True)["DiT attention scores"]
    assert ort == 4 * 2 * 4 * 48 ** 2  # fp32 x batch x heads x tokens^2
    assert estimate_memory(cfg, 9, 8192, 8192, 2)["peak"] > 250 * 2 ** 30
    monkeypatch.setenv("VIDRT_MAX_MEMORY_GB", "0.01")
    assert memory_limit() == (int(0.01 * 2 ** 30), "VIDRT_MAX_MEMORY_GB")
    e = estimate_memory(cfg, 9, 128, 128, 2, decode_latents=4 + 17)
    assert e["VAE decode tile"] == 5 * 4 * 32 * 9 * 128 * 128  # 5 live fp32 copies of 32 channels at full size
    refused(pipe, match=rf"9x128x128 \(DiT batch 2, scale 1\) needs about {e['peak'] / 2 ** 30:.3g} GiB \(largest: "
            r"VAE decode tile, 0\.0879 GiB\) but the limit is 0\.01 GiB \(VIDRT_MAX_MEMORY_GB\).*--max-memory-gb",
            height=128, width=128)
    monkeypatch.setenv("VIDRT_MAX_MEMORY_GB", "nan")
    with pytest.raises(ConfigError, match="VIDRT_MAX_MEMORY_GB='nan' must be a positive number"):
        memory_limit()
    monkeypatch.delenv("VIDRT_MAX_MEMORY_GB")
    assert memory_limit(2.5) == (int(2.5 * 2 ** 30), "--max-memory-gb")
    assert "of the available RAM" in memory_limit()[1]
    refused(pipe, match=r"9x8192x8192 \(DiT batch 2, scale 1\) needs about 368 GiB \(largest: VAE decode tile",
            height=8192, width=8192)
    with pytest.raises(ConfigError, match="saving at scale 1000 needs 25.7 GiB"):
        save_video(np.zeros((9, 32, 32, 3), np.uint8), tmp_path / "v.mp4", scale=1000)


def test_export_engines_refuses_before_work(tmp_path):
    from vidrt.builder.engines import export_engines
    from vidrt.core.buckets import Bucket
    t = time.time()
    with pytest.raises(ConfigError, match=r"9x8192x8192 \(DiT batch 2, scale 1\) needs about 2\.95e\+05 GiB \(largest: "
                       r"DiT attention scores.*VIDRT_MAX_MEMORY_GB=N"):
        export_engines("tiny", tmp_path / "b", ["fp32"], [Bucket(9, 8192, 8192)], progress=False)
    assert time.time() - t < 10 and not (tmp_path / "b").exists()


SUGGESTED = r"--frames (\d+) --height (\d+) --width (\d+) \(--bucket \1x\2x\3\)"


def suggested(msg: str) -> tuple[int, int, int]:
    """The shape a memory refusal suggests; the shape flags come before any mention of raising the limit."""
    assert msg.index("--frames/--height/--width (export-engines: --bucket FxHxW)") < msg.index("VIDRT_MAX_MEMORY_GB=N")
    return tuple(map(int, re.search(SUGGESTED, msg).groups()))


def test_memory_refusal_suggests_a_shape_that_fits():
    cfg = preset("vidrt-wan2.1-1.3b")  # its default 81x480x832 at CFG batch 2: about 116 GiB
    with pytest.raises(ConfigError, match=r"81x480x832 \(DiT batch 2, scale 1\) needs about 116 GiB") as e:
        check_memory(cfg, 81, 480, 832, 2, limit_gb=8)
    f, h, w = suggested(str(e.value))
    assert (f, h, w) == (33, 256, 256) and check_memory(cfg, f, h, w, 2, limit_gb=8) <= 8 * 2 ** 30
    # beyond any machine's memory, raising the limit is named as no fix; the tiny model's 9x8192x8192 on onnxruntime
    with pytest.raises(ConfigError, match=r"--bucket 9x480x832\), which needs about .*Raising the limit with "
                       r"VIDRT_MAX_MEMORY_GB=N \(vidrt generate: --max-memory-gb N\) would not help: this machine has"):
        check_memory(preset("tiny"), 9, 8192, 8192, 2, 1, 21, True, limit_gb=16)
    # within the machine's memory, raising the limit is the last alternative; the request's own size, fewer frames
    with pytest.raises(ConfigError, match=r"Last alternative, only if that much memory is really free") as e:
        check_memory(preset("tiny"), 1001, 32, 32, 2, limit_gb=0.05)
    assert suggested(str(e.value)) == (49, 32, 32)
    with pytest.raises(ConfigError, match=r"no smaller standard shape fits either; or save it at a smaller --scale"):
        check_memory(preset("tiny"), 9, 32, 32, 2, scale=1000, limit_gb=16)


def test_wan_memory_refusal_suggests_a_shape_that_fits(monkeypatch, tmp_path):
    pytest.importorskip("diffusers")
    from vidrt.families.wan.tiny import save_wan
    wan = Pipeline(str(save_wan(tmp_path / "wan")))
    big = wan.request(PROMPT, num_frames=81, height=480, width=832)  # under the default limit
    monkeypatch.setenv("VIDRT_MAX_MEMORY_GB", str(wan.check_memory(big) / 4 / 2 ** 30))
    with pytest.raises(ConfigError, match=r"81x480x832 \(DiT batch 2\) needs about") as e:
        wan.check_memory(big)
    f, h, w = suggested(str(e.value))
    assert f * h * w < 81 * 480 * 832
    wan.request(PROMPT, num_frames=f, height=h, width=w)  # accepted: request() checks memory as well


def test_steps_cap_is_configurable(pipe, monkeypatch):
    refused(pipe, match="1 to 1000 \\(VIDRT_MAX_STEPS", num_inference_steps=1_000_000)
    monkeypatch.setenv("VIDRT_MAX_STEPS", "2000000")
    assert pipe.request(PROMPT, num_inference_steps=1_000_000).num_inference_steps == 1_000_000


def test_cli_refuses_before_work(tmp_path, monkeypatch):
    monkeypatch.setattr("vidrt.core.memory.available_ram", lambda: 16 * 2 ** 30)  # the same limit on every host
    monkeypatch.setenv("VIDRT_MAX_MEMORY_GB", "1")  # so that teardown removes what --max-memory-gb sets below
    monkeypatch.delenv("VIDRT_MAX_MEMORY_GB")
    out = str(tmp_path / "v.mp4")
    cases = [
        (["--height", "8192", "--width", "8192"], "needs about 368"),
        (["--scale", "1000"], "needs about 25.7 GiB \\(largest: saved video"),
        (["--steps", "1000000"], "must be 1 to 1000"),
        (["--frames", "0"], "num_frames=0 must be 4k\\+1"),
        (["--height", "0"], "height=0 must be a positive multiple"),
        (["--steps", "0"], "num_inference_steps=0"),
        (["--guidance", "inf"], "guidance_scale must be finite"),
        (["--guidance", "nan"], "guidance_scale must be finite"),
        (["--guidance", "1e30"], "guidance_scale=1e\\+30 must be 1"),
        (["--guidance", "-3"], "guidance_scale=-3.0 must be 1"),
        (["--max-memory-gb", "0.001"], "limit is 0.001 GiB \\(VIDRT_MAX_MEMORY_GB\\)"),
        (["--max-memory-gb", "-1"], "max memory must be a positive number"),
        (["-o", str(tmp_path / "file" / "x.mp4")], "is not a folder"),
    ]
    (tmp_path / "file").write_text("not a folder")
    for args, msg in cases:
        t = time.time()
        r = CliRunner().invoke(main, ["generate", PROMPT, "-o", out, *args])
        assert r.exit_code == 1 and isinstance(r.exception, SystemExit), (args, r.output)
        assert re.search(msg, r.output), (args, r.output)
        assert time.time() - t < 10, args  # refused before sampling
    os.environ.pop("VIDRT_MAX_MEMORY_GB", None)  # --max-memory-gb sets it for the process
    assert not os.path.exists(out)
    r = CliRunner().invoke(main, ["generate", PROMPT, "-o", str(tmp_path / "v.avi")])
    assert r.exit_code == 1 and "use .mp4 or .gif" in r.output


def test_outputs_checked_before_work(tmp_path):
    frames = np.zeros((9, 32, 32, 3), np.uint8)
    for bad in (0, -1, 2.0, "2", True):
        with pytest.raises(ConfigError, match="scale must be an integer >= 1"):
            save_video(frames, tmp_path / "s.mp4", scale=bad)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is not a folder"):
        check_output(tmp_path / "file" / "a" / "v.mp4")
    with pytest.raises(ConfigError, match="cannot write /proc/v.mp4"):
        check_output("/proc/v.mp4")
    with pytest.raises(ConfigError, match="is a folder"):
        check_output(tmp_path, suffixes=())
    assert check_output(tmp_path / "new" / "deeper" / "v.gif") == tmp_path / "new" / "deeper" / "v.gif"
    assert not (tmp_path / "new").exists() and sorted(os.listdir(tmp_path)) == ["file"]  # the probe left nothing
    r = CliRunner().invoke(main, ["evaluate", "--json-out", "/proc/x/report.json"])
    assert r.exit_code == 1 and "cannot write /proc/x/report.json" in r.output
    r = CliRunner().invoke(main, ["evaluate", "--seeds", "0,a"])
    assert r.exit_code == 2 and "comma-separated integers" in r.output
    for opt in ("--runs", "--e2e-runs", "--steps", "--frames"):
        r = CliRunner().invoke(main, ["bench", "--out", str(tmp_path / "b"), opt, "0"])
        assert r.exit_code == 2 and opt in r.output and "0 is not in the range" in r.output, r.output
    assert not (tmp_path / "b").exists()


# --- item 6: NaN/inf found after the step that made them, naming it ------------------------------------------------

def test_non_finite_named_by_step_and_part(pipe):
    def nan_at_2(step, n, x):
        if step == 2:
            x[0, 0, 0, 0, 0] = math.nan
    with pytest.raises(NonFiniteError, match="after the step callback at step 2 of 3 .*1 of 384 values"):
        pipe(PROMPT, num_inference_steps=3, progress=False, callback=nan_at_2)
    w = next(pipe.dit.part.parameters())
    keep = w.data.clone()
    try:
        w.data[0, 0] = math.nan
        with pytest.raises(NonFiniteError, match="DiT output at step 1 of 2"):
            pipe(PROMPT, num_inference_steps=2, progress=False)
    finally:
        w.data.copy_(keep)
    text, mask = pipe.encode_prompts([PROMPT])
    lat = torch.randn(1, 8, 3, 4, 4)
    from vidrt.core.schedulers import make_solver
    with pytest.raises(NonFiniteError, match="text embeddings"):
        pipe.denoise(lat, torch.where(text == text.max(), math.nan, text), mask, 1.0, make_solver("euler", 2), False)
    with pytest.raises(NonFiniteError, match="initial latents: 128 of 384"):
        pipe.denoise(lat.index_fill(2, torch.tensor([0]), math.inf), text, mask, 1.0, make_solver("euler", 2), False)
    with pytest.raises(ConfigError, match="guidance_scale must be finite"):
        pipe.denoise(lat, text, mask, math.nan, make_solver("euler", 2), False)
    v = pipe.vae.decoder.conv_out.conv.weight
    keep = v.data.clone()
    try:
        v.data[0, 0, 0, 0, 0] = math.inf
        with pytest.raises(NonFiniteError, match="decoded video \\(VAE decoder, torch\\)"):
            pipe.decode(torch.randn(1, 8, 3, 4, 4))
    finally:
        v.data.copy_(keep)
    assert pipe(PROMPT, num_inference_steps=2, progress=False).frames[0].max() > 0  # restored weights work


def test_fp16_overflow_is_reported_not_hidden():
    p = Pipeline("tiny", dtype=torch.float16)
    lat = torch.randn((1, 8, 3, 4, 4), generator=torch.Generator().manual_seed(0))
    assert p.decode(lat * 100)[0].shape == (9, 32, 32, 3)
    # fp16 overflows inside the decoder: the clamp to [-1, 1] used to turn the infs into a plausible video
    with pytest.raises(NonFiniteError, match="decoded video \\(VAE decoder, torch\\): 27648 of 27648"):
        p.decode(lat * 1e4)


# --- item 10: one Pipeline, two threads, IO binding ----------------------------------------------------------------

@pytest.fixture(scope="module")
def ort_pipe(tmp_path_factory):
    """A Pipeline whose DiT and VAE decoder are onnxruntime sessions with IO binding (the CUDA default) on CPU."""
    from vidrt.core.backends import OrtPart
    from vidrt.export import onnx_export as ox
    from vidrt.families.vidrt import export as vx
    p = Pipeline("tiny")
    d = tmp_path_factory.mktemp("onnx")
    shape = p.cfg.latent_shape(9, 32, 32)[1:]
    ox.export_onnx(p.dit, vx.dit_inputs(p.cfg, 2, shape), ox.DIT_IO, d / "dit.onnx")
    dec = vx.DecoderPart(p.vae, p.cfg.vae.latent_mean, p.cfg.vae.latent_std)
    ox.export_onnx(dec, vx.vae_inputs(p.cfg, 1, shape), vx.VAE_IO, d / "vae.onnx")
    sf, tf = p.cfg.vae.spatial_factor, p.cfg.vae.temporal_factor
    p.dit = OrtPart("dit", d / "dit.onnx", io_binding=True, out_shape=lambda x, *_: x.shape, reuse_output=True)
    p.vae_part = OrtPart("vae_decoder", d / "vae.onnx", io_binding=True, out_shape=lambda z: (
        z.shape[0], 3, (z.shape[2] - 1) * tf + 1, z.shape[3] * sf, z.shape[4] * sf), reuse_output=True)
    p.backend = "onnxruntime"
    return p


def test_one_pipeline_shared_by_threads(ort_pipe):
    jobs = [("a red circle moving left on a blue background", 1), ("a yellow square moving up on a black "
                                                                   "background", 2)] * 2
    ref = [ort_pipe(pr, seed=s, num_inference_steps=4, progress=False).frames[0] for pr, s in jobs[:2]]
    assert np.abs(ref[0].astype(int) - ref[1].astype(int)).max() > 50  # the two videos differ: a swap would show
    outs, errors = {}, []

    def work(i, pr, s):
        try:
            outs[i] = ort_pipe(pr, seed=s, num_inference_steps=4, progress=False).frames[0]
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i, pr, s)) for i, (pr, s) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(outs) == 4
    for i in range(4):
        np.testing.assert_array_equal(outs[i], ref[i % 2])


# --- overwrite rule: atomic replace survives SIGKILL -----------------------------------------------------------------

def test_sigkill_during_overwrite_keeps_previous_file(tmp_path):
    out = tmp_path / "existing.mp4"
    save_video(np.full((9, 32, 32, 3), 200, np.uint8), out)
    before = out.read_bytes()
    # a long write (65 frames at 512x512) so the kill lands while the temporary file is being encoded
    cmd = [sys.executable, "-m", "vidrt.app.cli", "generate", PROMPT, "-o", str(out), "--overwrite", "--steps", "1",
           "--frames", "65", "--scale", "16"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 90
        while time.time() < deadline and proc.poll() is None:
            if any(p.name.endswith(".partial.mp4") for p in tmp_path.iterdir()):
                break
            time.sleep(0.005)
        assert proc.poll() is None, "the run ended before its temporary file appeared"
        proc.send_signal(signal.SIGKILL)  # at once: the temporary file exists only while the video is encoded
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert out.read_bytes() == before  # the previous video, byte for byte
    left = [p.name for p in tmp_path.iterdir() if p.name != "existing.mp4"]
    assert len(left) == 1 and re.fullmatch(rf"\.existing\.mp4\.{proc.pid}\.\w+\.partial\.mp4", left[0]), left
    live = tmp_path / f".existing.mp4.{os.getpid()}.x.partial.mp4"  # a writer still running: kept
    live.write_bytes(b"")
    save_video(np.zeros((9, 32, 32, 3), np.uint8), out, overwrite=True)  # the next save clears the dead one
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["existing.mp4", live.name])
