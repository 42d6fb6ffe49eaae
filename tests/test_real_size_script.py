"""benchmarks/real_size.py at the tiny geometry: the real CLIs as child processes, their wall time and peak RSS, the
bundle's files (none stray), parity per part and the int8 PSNR in results.json; a failing step is recorded with its
stderr and the steps that need it are skipped. The whole chain (fp32,int8) takes 50-70 s on 2 cores, so the chain
test runs build + calibrate + export of int8 only (28-46 s at load 1.3-3.3; the quantizer's fp32 input graph must
not be left behind); `generate` and `bench` were run by hand at the same shapes."""
import json
import sys

from vidrt.benchmarks import real_size as R
from vidrt.families.wan.family import WanConfig
from vidrt.families.wan.tiny import save_wan_geometry

TINY = ["--geometry", "tiny", "--frames", "5", "--height", "16", "--width", "16", "--bucket", "5x16x32", "--steps", "2",
        "--precision", "int8"]


def test_chain_records_steps_bundle_parity(tmp_path):
    res = R.main([*TINY, "--out", str(tmp_path), "--steps-only", "build,calibrate,export"])
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["steps"] == res["steps"] and (tmp_path / "RESULTS.md").read_text().startswith("# Real-size run")
    assert [s["name"] for s in res["steps"]] == ["build", "calibrate", "export"]
    for s in res["steps"]:
        assert s["rc"] == 0 and s["status"] == "ok", s["stderr_tail"]
        assert s["peak_rss_bytes"] > 0 and s["wall_s"] > 0 and len(s["load_before"]) == 3
    b = res["bundle"]
    assert b["files"] and b["bytes"] > 0 and b["stray"] == []
    assert {"dit.int8", "text_encoder.fp32", "vae_first.fp32", "vae_step.fp32"} <= set(b["parity"])
    assert all(isinstance(v, float) and v < 0.05 for v in b["parity"].values())
    assert all(len(files) <= 1 for files in b["data_files"].values())  # one .data per graph at most
    assert b["psnr"]["dit.int8"] > 20
    w = res["geometry"]["weights"]["transformer"]
    assert w["params"] > 0 and w["bytes"] > 4 * w["params"] * 0.99  # float32 safetensors
    assert res["machine"]["isa"] and res["machine"]["versions"]["onnxruntime"]
    assert res["deleted"] and not (tmp_path / "bundle").exists() and not (tmp_path / "model").exists()


def test_failed_step_is_recorded_and_dependents_skipped(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    bad = R.run_step(R.Step("export", [sys.executable, "-c", "import sys; sys.exit('no bundle here')"]), logs)
    assert bad.rc == 1 and bad.status == "failed" and "no bundle here" in bad.stderr_tail and bad.peak_rss_bytes > 0
    gen = R.Step("generate", ["true"], ("export",))
    assert R._failed_needs(gen, {"export": bad}) == ["export"]
    assert R._failed_needs(gen, {}) == []  # not run this time: its output may be from an earlier --keep run


def test_save_wan_geometry_writes_a_loadable_directory(tmp_path):
    tr = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=16, out_channels=16,
              text_dim=128, freq_dim=32, ffn_dim=32, num_layers=3, cross_attn_norm=True,
              qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    vae = dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
    root = save_wan_geometry(tmp_path / "wan", tr, vae, text_layers=1, text_d_model=128, flow_shift=5.0)
    cfg = WanConfig.from_dir(root)
    assert (cfg.text_dim, cfg.width, cfg.scheduler["flow_shift"]) == (128, 16, 5.0)
    g = R.geometry_record(root)
    assert g["transformer"]["num_layers"] == 3 and g["text_encoder"]["num_layers"] == 1
    assert g["text_encoder"]["num_heads"] == 2 and g["weights"]["text_encoder"]["params"] > 0


def test_stream_blocks_reaches_export_and_depth_prediction_arithmetic(tmp_path):
    """--stream-blocks is passed to export-engines; stream_depth's prediction from two runs of one geometry: the growth
    per layer, the block loop's working set in blocks (peak less what the plan counts as loaded, over one block),
    the full depth's peak and each preset's DiT share (its weights outside the blocks + that many blocks)."""
    from vidrt.benchmarks import stream_depth as S
    o = R.parse(["--out", str(tmp_path), "--stream-blocks"])
    export = next(s for s in R.plan(o, tmp_path / "model") if s.name == "export")
    assert export.argv[-1] == "--stream-blocks"
    block, outside = S.block_bytes("wan2.1-14b")
    # fp32 bytes of 2 attentions x 4 projections (5120^2 + bias) + FFN (2 x 5120 x 13824 + biases) + norms + modulation
    assert block == 4 * (8 * (5120 ** 2 + 5120) + 2 * 5120 * 13824 + 13824 + 5120 + 6 * 5120 + 6 * 5120)
    assert 0 < outside < block
    gib = 2 ** 30
    runs = [{"layers": 2, "rc": 0, "peak_rss_bytes": 7 * gib, "memory": {"model_bytes": 3 * gib}},
            {"layers": 4, "rc": 0, "peak_rss_bytes": 7 * gib + 2 * 2 ** 20, "memory": {"model_bytes": 3 * gib}}]
    p = S.predict("wan2.1-14b", runs)
    assert p["slope_bytes_per_layer"] == 2 ** 20 and p["working_set_in_blocks"] == round((4 * gib + 2 ** 21) / block, 2)
    assert p["full_depth_process_peak_bytes"] == 7 * gib + 2 * 2 ** 20 + 36 * 2 ** 20
    b5, o5 = S.block_bytes("wan2.2-5b")
    assert p["wan2.2-5b"]["predicted_dit_share_bytes"] == int(o5 + (4 * gib + 2 ** 21) / block * b5)
