"""ONNX export, validation and bundles, end to end with real torch/onnx/onnxruntime/polygraphy (no TensorRT here)."""
import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from vidrt.builder.cli import main
from vidrt.builder.engines import export_engines
from vidrt.core.buckets import Bucket
from vidrt.core.bundle import BundleError, BundleWriter, load_manifest
from vidrt.core.errors import ConfigError
from vidrt.core.trt import trt_unavailable_reason
from vidrt.export import onnx_export as ox
from vidrt.families.vidrt import export as vx
from vidrt.families.vidrt.export import profiles_for
from vidrt.models.checkpoint import load_model
from vidrt.models.config import preset


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("b") / "tiny"
    man = export_engines("tiny", out, ["fp32", "fp16"], [Bucket(9, 32, 32), Bucket(13, 32, 48)], progress=False)
    return out, man


def test_tiny_bundle_parity_and_report(tiny_bundle):
    out, man = tiny_bundle
    assert set(man["parts"]) == {"text_encoder.fp32", "dit.fp32", "dit.fp16", "vae_decoder.fp32",
                                 "vae_decoder.fp16"}
    for name, rep in man["validation"].items():
        assert rep["graph"]["checker"] == "ok" and rep["graph"]["opset"] == 18
        assert rep["passed"] and rep["polygraphy"]["passed"]
        shapes = {p["shape"] for p in rep["parity"]}
        assert len(shapes) >= (2 if name.startswith("text") else 3), shapes
        for p in rep["parity"]:
            assert p["rel_l2"] < (1e-4 if name.endswith("fp32") else 1e-2) and p["cosine"] > 0.9999
    assert man["engines"]["built"] is False and "not installed" in man["engines"]["skipped_reason"]
    assert man["opset"] == 18 and man["versions"]["onnxruntime"]


def test_fp32_dit_has_an_onnxruntime_cpu_flavour_on_the_same_weights(tiny_bundle):
    """dit.fp32.cpu.onnx (export/ort_cpu.py: MultiHeadAttention, RotaryEmbedding) is onnxruntime's graph, TensorRT's
    stays the standard dit.fp32.onnx; both read the one weights file; the runtime's DiT equals torch."""
    out, man = tiny_bundle
    cfg, dit, _ = load_model("tiny")
    part = man["parts"]["dit.fp32"]
    rt = part["runtimes"]
    assert rt["onnxruntime"]["graph"] == "dit.fp32.cpu.onnx" and rt["tensorrt"]["graph"] == "dit.fp32.onnx"
    depth = cfg.dit.depth
    assert rt["onnxruntime"]["cpu_flavour"] == {"MatMulIntegerToFloat+bias": 0, "MultiHeadAttention": 2 * depth,
                                                "RotaryEmbedding": depth}
    graphs = {g: onnx.load(str(out / g), load_external_data=False) for g in ("dit.fp32.cpu.onnx", "dit.fp32.onnx")}
    assert {n.domain for n in graphs["dit.fp32.onnx"].graph.node} <= {"", "ai.onnx"}
    for g in graphs.values():
        assert {t.external_data[0].value for t in g.graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL} == {"dit.fp32.onnx.data"}
    assert part["external_data"] == ["dit.fp32.onnx.data"] and (out / "dit.fp32.cpu.onnx").stat().st_size < 1_000_000
    assert "dit.fp16" not in [k for k, p in man["parts"].items() if p["runtimes"]["onnxruntime"].get("cpu_flavour")]
    cases = [vx.dit_inputs(cfg, b, s, seed=b) for b, s in ((1, (5, 4, 8)), (2, (9, 2, 2)))]
    for p in ox.parity(dit, out / "dit.fp32.cpu.onnx", cases):
        assert p.rel_l2 < 1e-5, p  # measured 3.5-3.7e-7


def test_one_graph_serves_every_shape(tiny_bundle):
    """Shapes outside the export-time shape (other frames, H != W, batch) are right: RoPE/patch grids are dynamic."""
    out, _ = tiny_bundle
    cfg, dit, _ = load_model("tiny")
    cases = [vx.dit_inputs(cfg, b, s, seed=b) for b, s in ((1, (5, 4, 8)), (2, (2, 8, 4)), (2, (9, 2, 2)))]
    for p in ox.parity(dit, out / "dit.fp32.onnx", cases):
        assert p.rel_l2 < 1e-4, p


def test_small_preset_export_parity(tmp_path):
    man = export_engines("small", tmp_path / "s", ["fp32"], [Bucket(17, 64, 64), Bucket(9, 64, 128)],
                         parts=("dit", "vae_decoder"), progress=False)
    for name in ("dit.fp32", "vae_decoder.fp32"):
        rep = man["validation"][name]
        assert len(rep["parity"]) >= 3 and all(p["rel_l2"] < 1e-4 for p in rep["parity"]), rep["parity"]


def test_external_data_path(tmp_path):
    man = export_engines("tiny", tmp_path / "x", ["fp32"], [Bucket(9, 32, 32)], parts=("dit",),
                         external_threshold=1024, progress=False)
    part = man["parts"]["dit.fp32"]
    assert part["external_data"] == ["dit.fp32.onnx.data"] and "dit.fp32.onnx.data" in man["files"]
    model = onnx.load(str(tmp_path / "x" / "dit.fp32.onnx"), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    graph, data = (tmp_path / "x" / "dit.fp32.onnx").stat().st_size, (tmp_path / "x" / "dit.fp32.onnx.data").stat().st_size
    assert data > 9_000_000 and graph < data / 10  # the 2.3M fp32 weights live in the side file
    assert man["validation"]["dit.fp32"]["passed"]


def test_profiles_from_buckets():
    cfg = preset("tiny")
    dit = profiles_for("dit", cfg, [Bucket(9, 32, 32), Bucket(13, 32, 48), Bucket(9, 32, 32)])
    assert len(dit) == 2  # duplicate buckets share a profile
    assert dit[1]["latents"] == ((1, 8, 4, 4, 6), (2, 8, 4, 4, 6), (2, 8, 4, 4, 6))
    assert dit[0]["text"] == ((1, 32, 384), (2, 32, 384), (2, 32, 384))
    vae = profiles_for("vae_decoder", cfg, [Bucket(81, 32, 32)], vae_tile=4)
    assert vae[0]["latents"][2][2] == 4 + 17  # tile + past context (receptive field 16 + 1)
    with pytest.raises(ConfigError, match="4k\\+1"):
        profiles_for("dit", cfg, [Bucket(8, 32, 32)])
    with pytest.raises(ValueError, match="FRAMESxHEIGHTxWIDTH"):
        Bucket.parse("9x32")
    assert trt_unavailable_reason() is not None  # no TensorRT on this machine: the reason is explicit


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_corrupt_partial_or_edited_bundles_are_refused(tiny_bundle, tmp_path):
    out, _ = tiny_bundle
    load_manifest(out)  # intact
    b = _copy(out, tmp_path / "flip")
    f = b / "dit.fp16.onnx"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="dit.fp16.onnx does not match its SHA-256"):
        load_manifest(b)
    b = _copy(out, tmp_path / "del")
    (b / "vae_decoder.fp32.onnx").unlink()
    with pytest.raises(BundleError, match="vae_decoder.fp32.onnx is missing"):
        load_manifest(b)
    b = _copy(out, tmp_path / "edit")
    m = json.loads((b / "manifest.json").read_text())
    m["buckets"] = ["9x64x64"]
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="edited after export"):
        load_manifest(b)
    b = _copy(out, tmp_path / "extra")
    (b / "stray.onnx").write_bytes(b"x")
    with pytest.raises(BundleError, match="stray.onnx"):
        load_manifest(b)
    b = _copy(out, tmp_path / "junk")
    (b / "manifest.json").write_text("{")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_manifest(b)
    with pytest.raises(BundleError, match="not an engine bundle"):
        load_manifest(tmp_path)


def test_version_mismatch_refused(tiny_bundle, tmp_path):
    from vidrt.core.bundle import _digest
    b = _copy(tiny_bundle[0], tmp_path / "v")
    m = json.loads((b / "manifest.json").read_text())
    m["versions"]["onnx"] = "0.9.0"
    m["digest"] = _digest(m)
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="onnx 0.9.0"):
        load_manifest(b)
    load_manifest(b, check_versions=False)


def test_writer_is_atomic(tmp_path):
    out = tmp_path / "bundle"
    with pytest.raises(RuntimeError, match="boom"):
        with BundleWriter(out) as w:
            (w.dir / "a.onnx").write_bytes(b"partial")
            raise RuntimeError("boom")
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no partial bundle, no temp dir left
    with BundleWriter(out) as w:
        (w.dir / "a.onnx").write_bytes(b"1")
        w.finish({"parts": {}})
    with pytest.raises(BundleError, match="exists"):
        BundleWriter(out)
    with BundleWriter(out, overwrite=True) as w:
        (w.dir / "b.onnx").write_bytes(b"2")
        w.finish({"parts": {}})
    assert sorted(load_manifest(out)["files"]) == ["b.onnx"]


def test_cli_end_to_end(tmp_path):
    out = tmp_path / "cli"
    r = CliRunner().invoke(main, ["--model", "tiny", "--out", str(out), "--precision", "fp32"])
    assert r.exit_code == 0, r.output
    assert "dit.fp32" in r.output and "ok on 2 shapes" in r.output and "TensorRT engines: SKIPPED" in r.output
    man = load_manifest(out)
    assert man["buckets"] == ["9x32x32"]
    r = CliRunner().invoke(main, ["--model", "tiny", "--out", str(out)])
    assert r.exit_code != 0 and "--overwrite" in r.output
    r = CliRunner().invoke(main, ["--out", str(tmp_path / "q"), "--precision", "int8"])
    assert r.exit_code != 0 and "calibrat" in r.output and not (tmp_path / "q").exists()
    r = CliRunner().invoke(main, ["--out", str(tmp_path / "q"), "--frames", "10"])
    assert r.exit_code != 0 and "try 9 or 13" in r.output
    r = CliRunner().invoke(main, ["--out", str(tmp_path / "q"), "--precision", "fp64"])
    assert r.exit_code != 0 and "unknown precision fp64" in r.output


def test_compare_metrics():
    ref = np.array([3.0, 4.0], np.float32)
    p = ox.compare(ref, ref * 1.01, "2")
    assert p.max_abs == pytest.approx(0.04, rel=1e-5) and p.rel_l2 == pytest.approx(0.01, rel=1e-5)
    assert p.cosine == pytest.approx(1.0) and not p.ok(1e-4) and p.ok(2e-2)
    q = ox.compare(ref, np.array([4.0, -3.0], np.float32), "2")  # orthogonal, same norm
    assert q.cosine == pytest.approx(0.0, abs=1e-9) and q.rel_l2 == pytest.approx(2 ** 0.5)
    assert not ox.compare(ref, np.array([np.nan, 0], np.float32), "2").ok(1.0)


def test_onnx_tiles_reproduce_the_full_pytorch_decode(tiny_bundle):
    """The exported tile graph, driven tile by tile, equals the PyTorch decoder on the whole latent video."""
    out, man = tiny_bundle
    cfg, _, vae = load_model("tiny")
    sess = ox.ort_session(out / "vae_decoder.fp32.onnx")
    z = torch.randn(1, 8, 23, 4, 4, generator=torch.Generator().manual_seed(0))  # 89 frames, > one tile
    dec = vx.DecoderPart(vae, cfg.vae.latent_mean, cfg.vae.latent_std)
    with torch.no_grad():
        full = dec(z)
    tiled = vae.decode_tiled(z, tile=man["vae_tile"],
                             decode_fn=lambda t: torch.from_numpy(sess.run(None, {"latents": t.numpy()})[0]))
    assert tiled.shape == full.shape == (1, 3, 89, 32, 32)
    torch.testing.assert_close(tiled, full, atol=2e-5, rtol=1e-5)


def test_export_memory_plan_checked_before_any_work(tmp_path, monkeypatch):
    """The export's peak (the loaded model, its working memory, a 16-bit copy of the DiT where a second 16-bit
    type needs one) is estimated and refused before anything is written when it cannot fit; a bundle records the
    plan and its measured peak."""
    from vidrt.builder.torch_side import WORKING_PER_DIT_BYTE
    monkeypatch.setenv("VIDRT_MAX_MEMORY_GB", "0.000001")
    with pytest.raises(ConfigError, match="16-bit copy of the DiT .*one 16-bit type for the DiT"):
        export_engines("tiny", tmp_path / "a", ["fp32", "fp16", "bf16"], [Bucket(9, 32, 32)], progress=False)
    with pytest.raises(ConfigError, match=r"the export's working memory [\d.]+ GiB\), "):  # fp16: in place, no copy
        export_engines("tiny", tmp_path / "a", ["fp32", "fp16"], [Bucket(9, 32, 32)], progress=False)
    assert not (tmp_path / "a").exists() and not list(tmp_path.iterdir())
    monkeypatch.delenv("VIDRT_MAX_MEMORY_GB")
    man = export_engines("tiny", tmp_path / "b", ["fp32"], [Bucket(9, 32, 32)], progress=False, parts=("dit",))
    plan = man["export_memory"]
    dit = sum(p.numel() * 4 for p in load_model("tiny")[1].parameters())
    assert plan["dit_bytes"] == dit and plan["model_bytes"] > dit and plan["copy16"] is False
    assert plan["estimate_peak_bytes"] == int(plan["model_bytes"] + dit * WORKING_PER_DIT_BYTE)
    assert plan["peak_rss_bytes"] > plan["model_bytes"]  # the process's own peak, libraries included
