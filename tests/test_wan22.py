"""Wan 2.2 on tiny random directories written by diffusers' save_pretrained: A14B's two experts exported as two DiT
graphs ("dit" high-noise, "dit_2" low-noise) that the bundle switches per step as WanPipeline does, their INT8
bundle (each expert calibrated on its own timesteps), and TI2V-5B's layout (expand_timesteps, 48-channel residual VAE
with patch_size 2 and x16 space) in torch and as a bundle, all against diffusers' WanPipeline."""
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("onnxruntime")

from vidrt.core.buckets import Bucket  # noqa: E402
from vidrt.families.wan.tiny import save_wan  # noqa: E402
from vidrt.runtime.pipeline import Pipeline  # noqa: E402

PROMPT, NEG, STEPS, G = "a red circle moving left", "blue", 4, 5.0


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan22")
    return {"experts": save_wan(root / "experts", two_experts=True), "ti2v": save_wan(root / "ti2v", ti2v=True)}


def _diffusers(d, lat, f, h, w):
    from diffusers import WanPipeline
    return WanPipeline.from_pretrained(d)(
        prompt=PROMPT, negative_prompt=NEG, num_frames=f, height=h, width=w, num_inference_steps=STEPS,
        guidance_scale=G, latents=lat.clone(), output_type="pt").frames


def _vidrt(pipe, lat, f, h, w, prompt=PROMPT):
    """vidrt's video in diffusers' output convention: (B, F, 3, H, W) in [0, 1]."""
    text, mask = pipe.encode_prompts([NEG, prompt])
    r = pipe.request(prompt, NEG, f, h, w, STEPS, G)
    x = pipe.denoise(lat, text, mask, G, pipe.family.solver(r.solver, STEPS, r.shift), progress=False)
    return (pipe.decode_video(x) / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)


def _latents(pipe, f, h, w):
    return torch.randn(1, *pipe.cfg.latent_shape(f, h, w), generator=torch.Generator().manual_seed(0))


def _export(d, out, buckets, **kw):
    from vidrt.builder.engines import export_engines
    return export_engines(str(d), out, kw.pop("precisions", ["fp32"]), [Bucket.parse(b) for b in buckets],
                          progress=False, **kw)


# ---- Wan 2.2 A14B: two experts --------------------------------------------------------------------------------

def test_two_expert_bundle_on_onnxruntime_matches_diffusers(dirs, tmp_path):
    """Two DiT graphs, each validated at both buckets and the probe shape on timesteps of its own range (measured
    rel L2 <= 2.5e-7); the bundle switches them at boundary_ratio x 1000 = 875 (steps at 999, 900 on "dit", 750,
    500 on "dit_2"): measured max abs 3.6e-7 vs WanPipeline's frames, bound 1e-2. Discriminative: with the
    high-noise graph in every step the frames are off by 0.46."""
    from vidrt.core.dit_call import RoutedDit
    f, h, w = 9, 32, 32
    man = _export(dirs["experts"], tmp_path / "b", ("9x32x32", "5x32x48"))
    val = man["validation"]
    assert sorted(val) == ["dit.fp32", "dit_2.fp32", "text_encoder.fp32", "vae_first.fp32", "vae_step.fp32"]
    for name in ("dit.fp32", "dit_2.fp32"):
        assert val[name]["passed"] and val[name]["polygraphy"]["passed"], name
        worst = max(p["rel_l2"] for p in val[name]["parity"])
        print(f"{name}: rel L2 <= {worst:.1e} at {len(val[name]['parity'])} shapes")
        assert worst <= 1e-4, name
        assert val[name]["parity"][-1]["shape"] == "3x16x4x6x10", name  # the probe: 13x48x80 at batch 3
        assert man["parts"][name]["inputs"] == ["latents", "timestep", "text"]
    pipe = Pipeline.from_bundle(tmp_path / "b")
    assert isinstance(pipe.dit, RoutedDit) and pipe.dit.parts[0][0].boundary == 875.0  # low-noise expert below
    lat = _latents(pipe, f, h, w)
    want = _diffusers(dirs["experts"], lat, f, h, w)
    got = _vidrt(pipe, lat, f, h, w)
    d = (got - want).abs().max().item()
    print(f"two-expert bundle vs WanPipeline: max abs {d:.2e}")
    assert got.shape == want.shape and d <= 1e-2
    pipe.dit.parts = pipe.dit.parts[1:]  # the high-noise expert for every step: must not match
    assert (_vidrt(pipe, lat, f, h, w) - want).abs().max().item() > 1e-2


def test_two_expert_int8_bundle(dirs, tmp_path):
    """INT8 of both experts, each calibrated and validated on the captured DiT calls at its own timesteps (split at
    875 from one capture of 3 prompts x 8 steps x 2 CFG rows); the quality report runs once, for the pipeline with
    both quantized experts switching. Measured held-out rel L2: dit 0.0024 (4 held-out samples, timesteps 999, 954,
    900), dit_2 0.0031 (7 samples, timesteps 833 to 301) (bound 0.03); video PSNR vs fp32 (held-out prompts, 8 steps)
    mean 47.5 dB (bound 35)."""
    from vidrt.calibration.capture import capture
    f, h, w = 9, 32, 32
    capture(Pipeline(dirs["experts"]), ["a red circle moving left", "a blue square moving up slowly",
                                        "a green circle moving right"], tmp_path / "cal", f, h, w,
            num_inference_steps=8, progress=False)
    man = _export(dirs["experts"], tmp_path / "b", (f"{f}x{h}x{w}",), precisions=["int8"], calib=tmp_path / "cal",
                  parts=("dit",))
    val = man["validation"]
    assert sorted(val) == ["dit.int8", "dit_2.int8"]
    for name, served in (("dit.int8", lambda t: t >= 875), ("dit_2.int8", lambda t: t < 875)):
        rep = val[name]
        worst = max(p["rel_l2"] for p in rep["parity"])
        print(f"{name}: held-out rel L2 {worst:.4f} on {rep['validation_samples']} samples, timesteps "
              f"{rep['timesteps']}")
        assert rep["passed"] and worst < 0.03, name
        assert rep["timesteps"] and all(served(t) for t in rep["timesteps"]), name
        assert rep["layers"].endswith("7 kept in float"), name
    assert set(val["dit.int8"]["timesteps"]) | set(val["dit_2.int8"]["timesteps"]) == \
        {round(t, 3) for t in Pipeline(dirs["experts"]).family.solver("default", 8, None).model_t}
    q = man["quality"]
    assert list(q) == ["dit.int8"] and q["dit.int8"]["parts"] == ["dit.int8", "dit_2.int8"]
    print(f"video PSNR {q['dit.int8']['psnr_mean']:.1f} dB")
    assert q["dit.int8"]["psnr_mean"] > 35
    assert sorted(man["parts"]) == ["dit.int8", "dit_2.int8"]  # the fp32 graphs were only the quantizer's input


# ---- Wan 2.2 TI2V-5B: expand_timesteps, 48-channel residual VAE ------------------------------------------------

TI2V = (9, 32, 64)  # frames, height, width: sizes are multiples of 32 (VAE x16 times patch 2)


def test_ti2v_torch_parity_with_diffusers(dirs):
    """save_wan(ti2v=True) writes the 5B's layout (expand_timesteps, z_dim 48 = the transformer's channels, the
    residual VAE with patch_size 2, 12 in/out channels, scale_factor_spatial 16). Pipeline(dir) vs
    WanPipeline(expand_timesteps): decoded frames measured max abs 1.1e-6, bound 1e-3; the prompt must matter
    beyond that bound, or parity would prove nothing (another prompt: measured 4.7e-3). (Text-to-video gives every
    token the same timestep, so the per-token path equals the per-row one in value; it differs only with image
    conditioning, which is not built.)"""
    import json
    d = dirs["ti2v"]
    idx = json.loads((d / "model_index.json").read_text())
    vae = json.loads((d / "vae" / "config.json").read_text())
    tr = json.loads((d / "transformer" / "config.json").read_text())
    assert idx["expand_timesteps"] is True and vae["z_dim"] == 48 == tr["in_channels"] == tr["out_channels"]
    assert vae["is_residual"] and vae["patch_size"] == 2 and vae["scale_factor_spatial"] == 16
    assert (vae["in_channels"], vae["out_channels"]) == (12, 12) and len(vae["latents_mean"]) == 48
    pipe = Pipeline(d)
    assert pipe.cfg.expand_timesteps and pipe.cfg.latent_shape(*TI2V) == (48, 3, 2, 4)
    lat = _latents(pipe, *TI2V)
    want = _diffusers(d, lat, *TI2V)
    got = _vidrt(pipe, lat, *TI2V)
    dmax = (got - want).abs().max().item()
    print(f"TI2V torch vs WanPipeline: max abs {dmax:.2e}")
    assert got.shape == want.shape == (1, 9, 3, 32, 64) and dmax <= 1e-3
    assert (_vidrt(pipe, lat, *TI2V, prompt="a green square moving up") - want).abs().max().item() > 1e-3


def test_ti2v_bundle_on_onnxruntime_matches_diffusers(dirs, tmp_path):
    """The TI2V DiT graph takes the runtime's (B,) timestep and expands it to one per token inside, from the latents'
    shape: validated at both buckets and a probe shape unlike both (measured rel L2 <= 7.6e-7 over every graph,
    the VAE's 48-channel step graphs included); the bundle vs WanPipeline(expand_timesteps): measured max abs
    2.3e-6, bound 1e-2."""
    d = dirs["ti2v"]
    man = _export(d, tmp_path / "b", ("9x32x64", "5x32x32"))
    val = man["validation"]
    for name, rep in val.items():
        assert rep["passed"] and rep["polygraphy"]["passed"], name
        assert max(p["rel_l2"] for p in rep["parity"]) <= 1e-4, name
    assert val["dit.fp32"]["parity"][-1]["shape"] == "3x48x4x4x8"  # probe 13x64x128, batch 3: 128 tokens
    assert man["parts"]["dit.fp32"]["inputs"] == ["latents", "timestep", "text"]
    import onnx  # the graph expands the (B,) timestep itself: timestep -> Unsqueeze -> Expand (per-token)
    g = onnx.load(str(tmp_path / "b" / "dit.fp32.onnx"), load_external_data=False).graph
    uses = lambda name: [n for n in g.node if name in n.input]
    assert [n.op_type for n in uses("timestep")] == ["Unsqueeze"]
    assert [n.op_type for n in uses(uses("timestep")[0].output[0])] == ["Expand"]
    pipe = Pipeline.from_bundle(tmp_path / "b")
    lat = _latents(pipe, *TI2V)
    want = _diffusers(d, lat, *TI2V)
    dmax = (_vidrt(pipe, lat, *TI2V) - want).abs().max().item()
    print(f"TI2V bundle vs WanPipeline: max abs {dmax:.2e}")
    assert dmax <= 1e-2


def test_low_noise_expert_guidance_matches_wan_pipeline(tmp_path):
    """guidance_scale_2 (Wan 2.2 A14B's low-noise expert) as WanPipeline applies it (measured max abs 2.4e-7, bound
    1e-3; it moves the latents by 8.7e-3 against one guidance for both, bound > 1e-3); refused for one-DiT models."""
    from diffusers import WanPipeline

    from vidrt.core.errors import ConfigError
    root = save_wan(tmp_path / "a14b", two_experts=True)
    pipe = Pipeline(root)
    f, h, w, steps = 9, 32, 32, 6
    lat = torch.randn(1, *pipe.cfg.latent_shape(f, h, w), generator=torch.Generator().manual_seed(0))
    want = WanPipeline.from_pretrained(root)(
        prompt="a red circle moving left", negative_prompt="blue", num_frames=f, height=h, width=w,
        num_inference_steps=steps, guidance_scale=5.0, guidance_scale_2=2.0, latents=lat.clone(),
        output_type="pt").frames
    text, mask = pipe.encode_prompts(["blue", "a red circle moving left"])
    r = pipe.request("a red circle moving left", "blue", f, h, w, steps, 5.0, guidance_scale_2=2.0)
    x = pipe.denoise(lat, text, mask, 5.0, pipe.family.solver(r.solver, steps, r.shift), progress=False,
                     guidance_scale_2=r.guidance_scale_2)
    got = (pipe.decode_video(x) / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)
    same_g = pipe.denoise(lat, text, mask, 5.0, pipe.family.solver(r.solver, steps, r.shift), progress=False)
    assert (got - want).abs().max().item() <= 1e-3
    assert (x - same_g).abs().max().item() > 1e-3  # guidance_scale_2 changed the low-noise steps
    with pytest.raises(ConfigError, match="guidance_scale_2 is the low-noise expert's guidance"):
        Pipeline("tiny").request("a red circle", guidance_scale_2=2.0)
