"""The Wan family (families/wan/family.py) on tiny random directories written by diffusers' save_pretrained: parity with
diffusers' own WanPipeline, and the errors a user gets for directories that are not what vidrt needs."""
import json
import shutil

import pytest
import torch

pytest.importorskip("diffusers")

from vidrt.core.errors import ConfigError  # noqa: E402
from vidrt.families.wan.tiny import save_wan  # noqa: E402
from vidrt.runtime.pipeline import Pipeline  # noqa: E402

PROMPT, NEG = "a red circle moving left", "blue"
F, H, W, STEPS, G = 9, 32, 32, 4, 5.0


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan")
    return {k: save_wan(root / k, scheduler=s, two_experts=k == "experts")
            for k, s in (("unipc", "unipc"), ("euler", "euler"), ("experts", "unipc"))}


def _vidrt(pipe, lat, prompt=PROMPT):
    """vidrt's video in diffusers' output convention: (B, F, 3, H, W) in [0, 1]."""
    text, mask = pipe.encode_prompts([NEG, prompt])
    r = pipe.request(prompt, NEG, F, H, W, STEPS, G)
    x = pipe.denoise(lat, text, mask, G, pipe.family.solver(r.solver, STEPS, r.shift), progress=False)
    return (pipe.decode_video(x) / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)


@pytest.mark.parametrize("kind", ["unipc", "euler", "experts"])
def test_parity_with_diffusers_wan_pipeline(dirs, kind):
    """Same prompts, initial latents, steps and guidance: vidrt's decoded frames equal WanPipeline's (measured
    max abs diff 2.4e-7 euler, 2.1e-7 unipc; bound 1e-3). The prompt must matter, or parity would prove nothing:
    another prompt moves the frames by 0.024 (unipc), 0.28 (euler), 0.066 (experts); bound > 1e-2."""
    from diffusers import WanPipeline
    ref = WanPipeline.from_pretrained(dirs[kind])
    pipe = Pipeline(dirs[kind])
    lat = torch.randn(1, *pipe.cfg.latent_shape(F, H, W), generator=torch.Generator().manual_seed(0))
    want = ref(prompt=PROMPT, negative_prompt=NEG, num_frames=F, height=H, width=W, num_inference_steps=STEPS,
               guidance_scale=G, latents=lat.clone(), output_type="pt").frames
    got = _vidrt(pipe, lat)
    assert got.shape == want.shape == (1, F, 3, H, W)
    assert (got - want).abs().max().item() <= 1e-3
    assert (_vidrt(pipe, lat, "a green square moving up") - want).abs().max().item() > 1e-2


def test_generate_cli_writes_the_video(dirs, tmp_path):
    from click.testing import CliRunner

    from vidrt.app.cli import main
    from vidrt.core.video import read_video
    out = tmp_path / "wan.mp4"
    res = CliRunner().invoke(main, ["generate", PROMPT, "--model", str(dirs["unipc"]), "--frames", "5", "--height",
                                    "32", "--width", "48", "--steps", "2", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert read_video(out).shape[:3] == (5, 256, 384)  # frames, saved x8 (>= 256 px)


def test_shape_rules_and_solver_errors(dirs):
    pipe = Pipeline(dirs["unipc"])
    with pytest.raises(ConfigError, match=r"4k\+1 for Wan.*try 9 or 13"):
        pipe.request(PROMPT, num_frames=10, height=32, width=32)
    with pytest.raises(ConfigError, match="multiple of 16 for Wan"):
        pipe.request(PROMPT, num_frames=9, height=40, width=32)
    with pytest.raises(ConfigError, match="unknown solver 'euler'.*default"):
        pipe.request(PROMPT, num_frames=9, height=32, width=32, solver="euler")


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_directory_errors_name_the_fix(dirs, tmp_path):
    src = dirs["unipc"]
    with pytest.raises(ConfigError, match="neither a vidrt checkpoint .* nor a diffusers pipeline"):
        Pipeline(tmp_path)  # empty directory
    cog = _copy(src, tmp_path / "cog")
    idx = json.loads((cog / "model_index.json").read_text())
    (cog / "model_index.json").write_text(json.dumps({**idx, "_class_name": "CogVideoXPipeline"}))
    with pytest.raises(ConfigError, match="CogVideoXPipeline directory, which vidrt does not support; supported: "
                                          "WanPipeline, LTXPipeline"):
        Pipeline(cog)
    novae = _copy(src, tmp_path / "novae")
    shutil.rmtree(novae / "vae")
    with pytest.raises(ConfigError, match="lacks vae/"):
        Pipeline(novae)
    mismatch = _copy(src, tmp_path / "mismatch")  # weights of another geometry under this config
    cfg = json.loads((mismatch / "transformer" / "config.json").read_text())
    (mismatch / "transformer" / "config.json").write_text(json.dumps({**cfg, "ffn_dim": 48}))
    with pytest.raises(ConfigError, match="cannot load the transformer"):
        Pipeline(mismatch)
    pickled = _copy(src, tmp_path / "pickled")  # only a .bin: vidrt never unpickles
    st = pickled / "transformer" / "diffusion_pytorch_model.safetensors"
    st.rename(st.with_suffix(".bin"))
    with pytest.raises(ConfigError, match="no pickle files are read"):
        Pipeline(pickled)


BUCKETS = ("9x32x32", "5x32x48")


@pytest.fixture(scope="module")
def bundle(dirs, tmp_path_factory):
    from vidrt.builder.engines import export_engines
    from vidrt.core.buckets import Bucket
    out = tmp_path_factory.mktemp("wanb") / "b"
    return out, export_engines(str(dirs["unipc"]), out, ["fp32"], [Bucket.parse(b) for b in BUCKETS],
                               progress=False)


def test_export_validates_every_graph_beyond_its_buckets(bundle):
    """Text encoder, DiT and the VAE's two streaming step graphs, each checked against PyTorch at both buckets and at
    a probe shape unlike both (frames, height, width, batch and text length differ; measured rel L2 <= 2.7e-7)."""
    man = bundle[1]
    val = man["validation"]
    assert sorted(val) == ["dit.fp32", "text_encoder.fp32", "vae_first.fp32", "vae_step.fp32"]
    for name, rep in val.items():
        assert rep["passed"] and rep["polygraphy"]["passed"], name
        assert max(p["rel_l2"] for p in rep["parity"]) <= 1e-4, name
    dit_shapes = [p["shape"] for p in val["dit.fp32"]["parity"]]
    assert dit_shapes[-1] == "3x16x4x6x10"  # the probe: 13x48x80 at batch 3 (buckets: 9x32x32, 5x32x48 at <= 2)
    assert man["parts"]["dit.fp32"]["inputs"] == ["latents", "timestep", "text"]  # Wan has no text mask
    assert "tokenizer/tokenizer.json" in man["files"]


def test_bundle_on_onnxruntime_matches_diffusers(dirs, bundle):
    """The exported bundle on onnxruntime vs diffusers' WanPipeline: measured max abs 6.3e-7, bound 1e-2."""
    from diffusers import WanPipeline

    from vidrt.core.backends import BackendError
    pipe = Pipeline.from_bundle(bundle[0])
    lat = torch.randn(1, *pipe.cfg.latent_shape(F, H, W), generator=torch.Generator().manual_seed(0))
    want = WanPipeline.from_pretrained(dirs["unipc"])(
        prompt=PROMPT, negative_prompt=NEG, num_frames=F, height=H, width=W, num_inference_steps=STEPS,
        guidance_scale=G, latents=lat.clone(), output_type="pt").frames
    assert (_vidrt(pipe, lat) - want).abs().max().item() <= 1e-2
    with pytest.raises(BackendError, match="13x32x32 is not a shape this bundle serves"):
        pipe.request(PROMPT, num_frames=13, height=32, width=32)


def test_validation_catches_a_shape_baked_into_the_graph(dirs, tmp_path, monkeypatch):
    """Without the RoPE swap the DiT graph bakes the export shape (batch 2 here): the export must fail on its own
    validation, not later in a user's run."""
    from vidrt.builder.engines import ExportError, export_engines
    from vidrt.core.buckets import Bucket
    from vidrt.families.wan import export as wan_export
    monkeypatch.delitem(wan_export.WAN_SWAPS, "wan_rope")  # the DiT exported with its RoPE's shape baked in
    with pytest.raises(ExportError, match=r"dit.fp32: onnxruntime cannot run the graph at input shape 1x16x3x4x4: "
                                          r"output 0 is \S+, PyTorch gives 1x16x3x4x4 \(a shape baked"):
        export_engines(str(dirs["unipc"]), tmp_path / "b", ["fp32"], [Bucket(9, 32, 32)], parts=("dit",),
                       progress=False)
    assert not (tmp_path / "b").exists()


def test_real_size_presets_match_the_published_models():
    """Random-init presets at the real sizes (for GPU timing): DiT parameter counts on the meta device, measured vs
    the published sizes: Wan2.1-T2V-1.3B 1.419B ("1.42B"), 14B 14.29B, Wan2.2-TI2V-5B 5.00B."""
    from diffusers import WanTransformer3DModel

    from vidrt.families.registry import family_config
    from vidrt.families.wan import config as wan

    def n(name):
        with torch.device("meta"):
            return sum(p.numel() for p in WanTransformer3DModel(**wan.PRESETS[name]["transformer"]).parameters())
    assert 1.38e9 <= n("wan2.1-1.3b") <= 1.46e9
    assert 13.5e9 <= n("wan2.1-14b") <= 15e9
    assert 4.7e9 <= n("wan2.2-5b") <= 5.3e9
    assert family_config("wan2.1-1.3b").latent_shape(81, 480, 832) == (16, 21, 60, 104)
    five = family_config("wan2.2-5b")  # 48-channel VAE, x16 space, patch 2: sizes are multiples of 32
    assert five.latent_shape(121, 704, 1280) == (48, 31, 44, 80) and five.expand_timesteps
    with pytest.raises(ConfigError, match="multiple of 32 for Wan"):
        five.latent_shape(121, 720, 1280)
    assert family_config("wan2.2-a14b").boundary_ratio == 0.875


def test_random_init_materialises_on_the_device_like_diffusers_loads():
    """Built on meta, materialised in bf16, with the RoPE tables of a CPU-built twin and diffusers' float32 modules
    (time embedder, norms, modulation table) in float32; the forward is finite."""
    from diffusers import WanTransformer3DModel

    from vidrt.models.diffusers_io import random_init
    kw = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
              text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32)
    m = random_init(WanTransformer3DModel, kw, "cpu", torch.bfloat16, 0)
    ref = WanTransformer3DModel(**kw)
    assert torch.equal(m.rope.freqs_cos.float(), ref.rope.freqs_cos)
    assert m.scale_shift_table.dtype == torch.float32 and m.blocks[0].ffn.net[0].proj.weight.dtype == torch.bfloat16
    out = m(hidden_states=torch.randn(1, 4, 2, 8, 8, dtype=torch.bfloat16), timestep=torch.tensor([500.0]),
            encoder_hidden_states=torch.randn(1, 7, 32, dtype=torch.bfloat16), return_dict=False)[0]
    assert out.shape == (1, 4, 2, 8, 8) and torch.isfinite(out).all()


def test_int8_and_fp8_bundles_with_the_wan_recipe(dirs, tmp_path):
    """Calibration on real sampling trajectories, then INT8 and FP8 DiT graphs quantized with Wan's float-layer
    recipe (condition embedders, patch embedding, output projection: 7 layers of the tiny model). Measured here:
    held-out rel L2 int8 0.0032, fp8 0.0113 (with nothing kept in float: 0.0155, 0.0554), bound 0.03 / 0.05; video
    PSNR vs fp32 on held-out prompts, 8 steps, mean int8 51.7 dB, fp8 45.9 dB (nothing kept: 35.9, 27.6), bound 35.
    TensorRT's graph (the same quantization on the fp16 export): int8 0.0032, fp8 0.0117, same bounds."""
    from vidrt.builder.engines import export_engines
    from vidrt.calibration.capture import capture
    from vidrt.core.buckets import Bucket
    pipe = Pipeline(dirs["unipc"])
    capture(pipe, ["a red circle moving left", "a blue square moving up slowly", "a green circle moving right"],
            tmp_path / "cal", F, H, W, num_inference_steps=8, progress=False)
    man = export_engines(str(dirs["unipc"]), tmp_path / "b", ["int8", "fp8"], [Bucket(F, H, W)],
                         calib=tmp_path / "cal", progress=False, parts=("dit",))
    for prec, bound in (("int8", 0.03), ("fp8", 0.05)):
        rep = man["validation"][f"dit.{prec}"]
        assert rep["passed"] and rep["tensorrt_qdq"]["per_channel_weights"] == 20, prec
        assert rep["layers"].endswith("7 kept in float") and max(p["rel_l2"] for p in rep["parity"]) < bound
        trt = rep["tensorrt_graph"]  # the same quantization on the fp16 export: what TensorRT builds from
        assert trt["passed"] and trt["layers"] == rep["layers"] and max(p["rel_l2"] for p in trt["parity"]) < bound
        assert man["quality"][f"dit.{prec}"]["psnr_mean"] > 35
        # onnxruntime's CPU flavour: the int8 Linears take their bias in the integer GEMM (diffusers' attention and
        # RoPE are not models/dit.py's export form: left as they are)
        cpu = rep["onnxruntime_cpu"]["cpu_flavour"]
        assert cpu["rewrites"] == {"MatMulIntegerToFloat+bias": 20 if prec == "int8" else 0, "MultiHeadAttention": 0,
                                   "RotaryEmbedding": 0} and cpu["kept"] == (prec == "int8")
    assert "dit.fp32" not in man["parts"]  # only the quantizer's input


def test_a_directory_wins_over_the_preset_of_its_name(dirs, tmp_path, monkeypatch):
    """`--model wan2.1-1.3b` with a downloaded ./wan2.1-1.3b directory loads the directory, not random weights; a
    preset is refused by export-engines (no text encoder) before any work."""
    from vidrt.builder.engines import export_engines
    from vidrt.core.buckets import Bucket
    shutil.copytree(dirs["unipc"], tmp_path / "wan2.1-1.3b")
    monkeypatch.chdir(tmp_path)
    assert Pipeline("wan2.1-1.3b").cfg.text_dim == 32  # the tiny directory's, not the preset's 4096
    monkeypatch.chdir(tmp_path.parent)
    with pytest.raises(ConfigError, match="random-init timing preset"):
        export_engines("wan2.1-14b", tmp_path / "b", ["fp32"], [Bucket(9, 32, 32)], progress=False)


def test_big_model_validated_at_reduced_shapes(dirs, tmp_path, monkeypatch):
    """A DiT past BIG_DIT_BYTES (here: any, the threshold set to 0) is traced and validated at the reduced shapes and
    a probe beyond them, not at its buckets: a bucket the CPU could not validate (81x480x832, refused by the memory
    check at the buckets) is exported for TensorRT's profiles, its graph matching torch at every reduced shape.
    --validate-buckets keeps the old rule (and its refusal)."""
    from vidrt.builder import torch_side
    from vidrt.builder.engines import export_engines
    from vidrt.core.buckets import Bucket
    monkeypatch.setattr(torch_side, "BIG_DIT_BYTES", 0)
    monkeypatch.setenv("VIDRT_MAX_MEMORY_GB", "4")
    big, small = Bucket(81, 480, 832), Bucket(9, 32, 32)
    with pytest.raises(ConfigError, match="--bucket"):
        export_engines(str(dirs["unipc"]), tmp_path / "a", ["fp32"], [big, small], progress=False,
                       validate_buckets=True)
    man = export_engines(str(dirs["unipc"]), tmp_path / "b", ["fp32"], [big, small], progress=False,
                         parts=("dit",))
    assert man["validated_at"] == ["9x64x64", "17x96x128"] and man["buckets_validated"] is False
    shapes = [p["shape"] for p in man["validation"]["dit.fp32"]["parity"]]
    assert shapes == ["1x16x3x8x8", "1x16x5x12x16", "2x16x3x8x8", "2x16x5x12x16",  # 9x64x64, 17x96x128 at batch 1, 2
                      "3x16x6x14x20"]  # and the probe: 21x112x160 at batch 3
    assert max(p["rel_l2"] for p in man["validation"]["dit.fp32"]["parity"]) <= 1e-4
    prof = man["parts"]["dit.fp32"]["profiles"][0]["latents"]  # TensorRT's profile: still the real bucket
    assert prof[2] == [2, 16, 21, 60, 104]
    from vidrt.families.registry import load_family  # buckets no bigger than the reduced shapes: validated as they are
    small_buckets = [small, Bucket(13, 96, 96)]
    assert torch_side.validation_buckets(load_family(str(dirs["unipc"])), small_buckets, False) == small_buckets
