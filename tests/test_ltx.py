"""The LTX-Video family (models/ltx.py) on tiny random directories written by diffusers' save_pretrained: parity
with diffusers' own LTXPipeline (torch, and an exported bundle on onnxruntime), the frame/size rules, the errors."""
import json

import pytest
import torch

pytest.importorskip("diffusers")

from vidrt.models.config import ConfigError  # noqa: E402
from vidrt.models.ltx import save_tiny  # noqa: E402
from vidrt.runtime.pipeline import Pipeline  # noqa: E402

PROMPT, NEG = "a red circle moving left", "blue"
F, H, W, STEPS, G = 9, 32, 64, 3, 3.0


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ltx")
    return {"v090": save_tiny(root / "v090"), "tconf": save_tiny(root / "tconf", timestep_conditioning=True)}


def _reference(d, lat, f=F, h=H, w=W):
    """diffusers' LTXPipeline with the same initial latents, given in its packed (B, T*H*W, C) form."""
    from diffusers import LTXPipeline
    return LTXPipeline.from_pretrained(d)(
        prompt=PROMPT, negative_prompt=NEG, num_frames=f, height=h, width=w, num_inference_steps=STEPS,
        guidance_scale=G, latents=LTXPipeline._pack_latents(lat.clone(), 1, 1), output_type="pt").frames


def _vidrt(pipe, lat, prompt=PROMPT, f=F, h=H, w=W):
    """vidrt's video in diffusers' output convention: (B, F, 3, H, W) in [0, 1]."""
    text, mask = pipe.encode_prompts([NEG, prompt])
    r = pipe.request(prompt, NEG, f, h, w, STEPS, G)
    x = pipe.denoise(lat, text, mask, G, pipe.family.solver(r.solver, STEPS, r.shift, latent_shape=lat.shape),
                     progress=False)
    return (pipe.decode_video(x) / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)


def _latents(pipe, f=F, h=H, w=W):
    return torch.randn(1, *pipe.cfg.latent_shape(f, h, w), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", ["v090", "tconf"])
def test_parity_with_diffusers_ltx_pipeline(dirs, kind):
    """Same prompts, initial latents, steps and guidance: vidrt's decoded frames equal LTXPipeline's (measured max
    abs diff 0.0 for both a 0.9.0-style VAE and a timestep-conditioned one; bound 1e-3). The prompt must matter."""
    pipe = Pipeline(dirs[kind])
    lat = _latents(pipe)
    want = _reference(dirs[kind], lat)
    got = _vidrt(pipe, lat)
    assert got.shape == want.shape == (1, F, 3, H, W)
    assert (got - want).abs().max().item() <= 1e-3
    assert (_vidrt(pipe, lat, "a green square moving up") - want).abs().max().item() > 1e-2


def test_schedule_is_ltx_pipelines_dynamic_shift(dirs):
    """mu from the latent video's T*H*W (calculate_shift with the scheduler's base/max shift and lengths), sigmas
    linspace(1, 1/steps, steps): the solver's schedule is what LTXPipeline's scheduler steps through, and it
    changes with the video size."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.ltx.pipeline_ltx import calculate_shift
    pipe = Pipeline(dirs["v090"])
    c = pipe.cfg.scheduler
    for shape in ((8, 2, 1, 2), (8, 3, 2, 3)):
        mu = calculate_shift(shape[1] * shape[2] * shape[3], c["base_image_seq_len"], c["max_image_seq_len"],
                             c["base_shift"], c["max_shift"])
        sched = FlowMatchEulerDiscreteScheduler.from_config(c)
        sched.set_timesteps(sigmas=[1 - i * (1 - 1 / STEPS) / (STEPS - 1) for i in range(STEPS)], mu=mu)
        s = pipe.family.solver("default", STEPS, None, latent_shape=shape)
        assert s.timesteps == pytest.approx(sched.sigmas.tolist(), abs=1e-6)
        assert s.model_t == pytest.approx(sched.timesteps.tolist(), abs=1e-3)
    a, b = (pipe.family.solver("default", STEPS, None, latent_shape=s).timesteps for s in ((8, 2, 1, 2), (8, 9, 4, 4)))
    assert a != b
    with pytest.raises(ConfigError, match="depends on the video size"):
        pipe.family.solver("default", STEPS, None)


def test_generate_cli_writes_the_video(dirs, tmp_path):
    from click.testing import CliRunner

    from vidrt.app.cli import main
    from vidrt.runtime.video import read_video
    out = tmp_path / "ltx.mp4"
    res = CliRunner().invoke(main, ["generate", PROMPT, "--model", str(dirs["v090"]), "--frames", "9", "--height",
                                    "32", "--width", "64", "--steps", "2", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert read_video(out).shape[:3] == (9, 256, 512)  # frames, saved x8 (>= 256 px)


def test_frame_and_size_rules_name_the_fix(dirs, tmp_path):
    pipe = Pipeline(dirs["v090"])
    assert pipe.cfg.latent_shape(17, 64, 96) == (8, 3, 2, 3)  # VAE x8 time, x32 space
    with pytest.raises(ConfigError, match=r"8k\+1 for LTX-Video.*try 9 or 17"):
        pipe.request(PROMPT, num_frames=10, height=32, width=32)
    with pytest.raises(ConfigError, match=r"height=48 must be a positive multiple of 32 for LTX-Video.*try 64"):
        pipe.request(PROMPT, num_frames=9, height=48, width=32)
    with pytest.raises(ConfigError, match="width=16 must be a positive multiple of 32"):
        pipe.request(PROMPT, num_frames=9, height=32, width=16)
    s = pipe.cfg.sample  # LTXPipeline's defaults
    assert (s.num_frames, s.height, s.width, s.num_inference_steps, s.guidance_scale, s.fps) == (
        161, 512, 704, 50, 3.0, 25)
    import shutil
    bad = tmp_path / "notext"
    shutil.copytree(dirs["v090"], bad)
    shutil.rmtree(bad / "text_encoder")
    with pytest.raises(ConfigError, match="lacks text_encoder/"):
        Pipeline(bad)
    mism = tmp_path / "mismatch"
    shutil.copytree(dirs["v090"], mism)
    cfg = json.loads((mism / "transformer" / "config.json").read_text())
    (mism / "transformer" / "config.json").write_text(json.dumps({**cfg, "caption_channels": 64}))
    with pytest.raises(ConfigError, match="caption_channels=64: the parts are from different models"):
        Pipeline(mism)

