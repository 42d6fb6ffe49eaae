"""The LTX-Video family (families/ltx/) on tiny random directories written by diffusers' save_pretrained: parity
with diffusers' own LTXPipeline (torch, and an exported bundle on onnxruntime), the frame/size rules, the errors."""
import json

import pytest
import torch

pytest.importorskip("diffusers")

from vidrt.core.errors import ConfigError  # noqa: E402
from vidrt.families.ltx.tiny import save_ltx  # noqa: E402
from vidrt.runtime.pipeline import Pipeline  # noqa: E402

PROMPT, NEG = "a red circle moving left", "blue"
F, H, W, STEPS, G = 9, 32, 64, 3, 3.0


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ltx")
    return {"v090": save_ltx(root / "v090"), "tconf": save_ltx(root / "tconf", timestep_conditioning=True)}


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
    from vidrt.core.video import read_video
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


BUCKETS = ((9, 32, 32), (17, 32, 64))


@pytest.fixture(scope="module")
def bundle(dirs, tmp_path_factory):
    from vidrt.builder.engines import export_engines
    from vidrt.core.buckets import Bucket
    out = tmp_path_factory.mktemp("ltxb") / "b"
    return out, export_engines(str(dirs["v090"]), out, ["fp32"], [Bucket(*b) for b in BUCKETS], progress=False)


def test_export_validates_every_graph_beyond_its_buckets(bundle):
    """Text encoder, DiT (with its text mask) and the whole-video VAE decoder, each checked against PyTorch at both
    buckets and at a probe shape unlike both (frames, height, width, batch and text length differ)."""
    man = bundle[1]
    val = man["validation"]
    assert sorted(val) == ["dit.fp32", "text_encoder.fp32", "vae_decoder.fp32"]
    for name, rep in val.items():
        assert rep["passed"] and rep["polygraphy"]["passed"], name
        assert max(p["rel_l2"] for p in rep["parity"]) <= 1e-4, name
    assert val["dit.fp32"]["parity"][-1]["shape"] == "3x8x4x2x4"  # probe 25x64x128 at batch 3
    assert val["vae_decoder.fp32"]["parity"][-1]["shape"] == "2x8x4x2x4"
    assert man["parts"]["dit.fp32"]["inputs"] == ["latents", "timestep", "text", "text_mask"]
    assert man["model"]["family"] == "ltx" and "tokenizer/tokenizer.json" in man["files"]


def test_bundle_on_onnxruntime_matches_diffusers(dirs, bundle):
    """The exported bundle on onnxruntime vs diffusers' LTXPipeline at both buckets (measured max abs 9.5e-7 and
    1.2e-6; bound 1e-2)."""
    from vidrt.core.backends import BackendError
    pipe = Pipeline.from_bundle(bundle[0])
    diffs = []
    for f, h, w in BUCKETS:
        lat = _latents(pipe, f, h, w)
        diffs.append((_vidrt(pipe, lat, f=f, h=h, w=w) - _reference(dirs["v090"], lat, f, h, w)).abs().max().item())
    print("onnxruntime bundle vs LTXPipeline max abs:", diffs)
    assert max(diffs) <= 1e-2, diffs
    with pytest.raises(BackendError, match="9x64x64 is not a shape this bundle serves"):
        pipe.request(PROMPT, num_frames=9, height=64, width=64)


def test_export_swaps_are_exact_and_needed(dirs, tmp_path, monkeypatch):
    """The LTX swaps change no value (torch output with and without them: equal) and each is needed: without
    ltx_rope the exporter rewrites the timestep embedding's Concat axis to 2 on rank-2 tensors; without ltx_movedim
    the VAE's movedim(-1, 1) becomes Transpose perm (0, -1, 1, 2, 3). Both graphs fail ONNX's checker."""
    from vidrt.builder.engines import export_engines
    from vidrt.core.buckets import Bucket
    from vidrt.export.swaps import exportable
    from vidrt.families.ltx import export as ltx_export
    from vidrt.families.ltx.family import LTXFamily
    fam = LTXFamily.from_dir(dirs["tconf"])
    for spec in fam.export_parts(("dit", "vae_decoder"), [Bucket(9, 32, 32)], 2, 4):
        with torch.no_grad():
            x = spec.cases[-1]
            ref = spec.module(*x.values())
            with exportable(spec.module, ltx_export.LTX_SWAPS) as n:
                assert torch.equal(spec.module(*x.values()), ref), spec.name
        assert n["ltx_rope" if spec.name == "dit" else "ltx_movedim"] >= 1
    for drop, part, match in (("ltx_rope", "dit", "axis must be in"), ("ltx_movedim", "vae_decoder", "perm")):
        monkeypatch.setattr(ltx_export, "LTX_SWAPS", {k: v for k, v in ltx_export.LTX_SWAPS.items() if k != drop})
        with pytest.raises(Exception, match=match):
            export_engines(str(dirs["v090"]), tmp_path / drop, ["fp32"], [Bucket(9, 32, 32)], parts=(part,),
                           progress=False)
        assert not (tmp_path / drop).exists()


def test_int8_and_fp8_bundles_with_the_ltx_recipe(dirs, tmp_path):
    """Calibration on real sampling trajectories, then INT8 and FP8 DiT graphs quantized with LTX's float-layer
    recipe (timestep and caption embedders, proj_in, proj_out: 7 layers of the tiny model; the regexes match the
    torch module paths and the ONNX node names alike). Measured here: held-out max rel L2 int8 0.0031, fp8 0.0111
    (nothing kept in float: 0.0115, 0.0457; proj_in/proj_out unmatched in ONNX, as before: 0.0100, 0.0454); video
    PSNR vs fp32 on held-out prompts, 8 steps, mean int8 54.7 dB, fp8 45.0 dB (nothing kept: 48.9, 38.6). Bounds
    rel L2 0.008 / 0.03 (about 2.6x margin, and below the nothing-kept values), PSNR 51 / 42 dB (3 dB margin)."""
    import re

    from vidrt.builder.engines import export_engines
    from vidrt.calibration.capture import capture
    from vidrt.core.buckets import Bucket
    from vidrt.families.ltx.family import LTXFamily
    pipe = Pipeline(dirs["v090"])
    linears = [n for n, m in pipe.dit.named_modules() if isinstance(m, torch.nn.Linear)]
    kept = sorted(n for n in linears if any(re.search(p, n) for p in LTXFamily.quant_skip))
    assert len(kept) == 7 and "transformer.proj_in" in kept and "transformer.proj_out" in kept, kept
    capture(pipe, ["a red circle moving left", "a blue square moving up slowly", "a green circle moving right"],
            tmp_path / "cal", F, H, W, num_inference_steps=8, progress=False)
    man = export_engines(str(dirs["v090"]), tmp_path / "b", ["int8", "fp8"], [Bucket(F, H, W)],
                         calib=tmp_path / "cal", progress=False, parts=("dit",))
    for prec, bound, psnr in (("int8", 0.008, 51), ("fp8", 0.03, 42)):
        rep, q = man["validation"][f"dit.{prec}"], man["quality"][f"dit.{prec}"]
        print(prec, max(p["rel_l2"] for p in rep["parity"]), q["psnr_mean"])
        assert rep["passed"] and rep["tensorrt_qdq"]["per_channel_weights"] == 20, prec
        assert rep["layers"].endswith("20 layers quantized, 7 kept in float"), rep["layers"]
        assert max(p["rel_l2"] for p in rep["parity"]) < bound and q["psnr_mean"] > psnr, prec
        trt = rep["tensorrt_graph"]  # the same quantization on the fp16 export: what TensorRT builds from
        print(prec, "fp16 Q/DQ graph rel L2", max(p["rel_l2"] for p in trt["parity"]))
        assert trt["passed"] and trt["layers"] == rep["layers"] and max(p["rel_l2"] for p in trt["parity"]) < bound
    assert "dit.fp32" not in man["parts"] and man["parts"]["dit.int8"]["inputs"] == list(
        ("latents", "timestep", "text", "text_mask"))


TINY_TR = dict(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2,
               attention_head_dim=8, cross_attention_dim=16, num_layers=2, caption_channels=32)
TINY_VAE = dict(latent_channels=8, block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4,
                layers_per_block=(1,) * 5, decoder_layers_per_block=(1,) * 5)


def test_real_size_preset_matches_the_published_model():
    """"ltx-video": LTX-Video 0.9.x at its published size, random-init (GPU timing). Transformer parameters on the
    meta device: measured 1.923B (LTX-Video 0.9, "2B"; bound 1.85-2.0B); the VAE 0.419B; latent shape and sample
    defaults at LTXPipeline's 161x512x704; every family's presets are found by name."""
    from diffusers import AutoencoderKLLTXVideo, LTXVideoTransformer3DModel

    from vidrt.families.ltx import config as ltx
    from vidrt.families.registry import all_presets, family_config, resolve
    p = ltx.PRESETS["ltx-video"]
    with torch.device("meta"):
        tr = LTXVideoTransformer3DModel(**p["transformer"])
        vae = AutoencoderKLLTXVideo(**p["vae"])
    n = sum(x.numel() for x in tr.parameters())
    assert 1.85e9 <= n <= 2.0e9, n
    assert 0.40e9 <= sum(x.numel() for x in vae.parameters()) <= 0.44e9
    assert (tr.config.num_layers, tr.config.num_attention_heads * tr.config.attention_head_dim,
            tr.config.caption_channels, tr.config.in_channels) == (28, 2048, 4096, 128)
    cfg = family_config("ltx-video")
    assert cfg.family == "ltx" and cfg.text_shape == (128, 4096) and cfg.width == 2048
    assert cfg.latent_shape(cfg.sample.num_frames, cfg.sample.height, cfg.sample.width) == (128, 21, 16, 22)
    assert (cfg.sample.num_frames, cfg.sample.height, cfg.sample.width) == (161, 512, 704)
    assert cfg.tokens(161, 512, 704) == 7392 and cfg.scheduler["use_dynamic_shifting"]
    with pytest.raises(ConfigError, match="multiple of 32 for LTX-Video"):
        cfg.latent_shape(161, 500, 704)
    assert "ltx-video" in all_presets() and "wan2.1-14b" in all_presets()
    assert [resolve(m)[0].name for m in ("ltx-video", "wan2.1-1.3b", "tiny")] == ["ltx", "wan", "vidrt"]


def test_preset_builds_on_the_device_in_the_dtype_and_runs(monkeypatch):
    """A preset is built the Wan way (meta device, materialised on the device in the run's dtype); here a tiny one
    registered like "ltx-video", through Pipeline: bf16 parameters, a finite CPU forward of the random-init
    transformer and VAE, and encode refusing (no T5 is built)."""
    from vidrt.families.ltx import config as ltx
    from vidrt.families.registry import load_family
    monkeypatch.setitem(ltx.PRESETS, "ltx-test", dict(transformer=TINY_TR, vae=TINY_VAE, scheduler=ltx.LTX_SCHEDULER))
    fam = load_family("ltx-test", device="cpu", dtype=torch.bfloat16)
    assert {x.dtype for x in fam.dit.parameters()} == {x.dtype for x in fam.vae.parameters()} == {torch.bfloat16}
    assert sum(x.numel() for x in fam.vae.parameters()) > 50_000  # the full tiny VAE, not the buffers' twin
    assert fam.dit.transformer.transformer_blocks[1].attn1.to_q.weight.float().std().item() == pytest.approx(0.02, rel=0.2)
    pipe = Pipeline("ltx-test", dtype=torch.bfloat16)
    lat = torch.randn(2, *pipe.cfg.latent_shape(F, H, W))
    with torch.no_grad():
        v = pipe.dit(lat, torch.tensor([900.0, 100.0]), torch.randn(2, 128, 32), torch.ones(2, 128, dtype=torch.bool))
        video = pipe.family.decode(v.float())
    assert v.shape == lat.shape and v.dtype == torch.bfloat16 and torch.isfinite(v).all() and v.float().std() > 0
    assert video.shape == (2, 3, F, H, W) and torch.isfinite(video).all()
    with pytest.raises(ConfigError, match="without a text encoder"):
        pipe.family.encode(["a red circle"])
