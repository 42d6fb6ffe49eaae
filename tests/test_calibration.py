import json

import pytest
import torch
from click.testing import CliRunner

from vidrt.app.cli import main
from vidrt.calibration.capture import CalibrationError, capture, default_prompts, load_set, read_prompts
from vidrt.core.schedulers import flow_timesteps
from vidrt.models.config import preset
from vidrt.runtime.pipeline import Pipeline

PROMPTS = ["a red circle moving left on a blue background", "A litter of golden retriever puppies playing in the snow"]


@pytest.fixture(scope="module")
def pipe():
    return Pipeline("tiny")


@pytest.fixture(scope="module")
def calib(pipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("c") / "set"
    return out, capture(pipe, PROMPTS, out, num_inference_steps=4, seeds=(0, 5), progress=False)


def test_capture_records_real_trajectories(pipe, calib):
    out, m = calib
    assert [(s["prompt"], s["seed"]) for s in m["shards"]] == [(p, s) for p in PROMPTS for s in (0, 5)]
    assert m["latent_shape"] == [8, 3, 4, 4] and m["cfg_batch"] == 2 and m["steps"] == 4
    data = load_set(out, pipe.cfg, (9, 32, 32))
    dit = data.dit
    assert dit["latents"].shape == (4 * 4 * 2, 8, 3, 4, 4)  # shards x steps x both CFG rows
    ts = dit["timestep"].view(4, 4, 2)
    torch.testing.assert_close(ts[0], torch.tensor(flow_timesteps(4)[:4])[:, None].expand(4, 2))
    # row 0 of each call is the empty (unconditional) prompt, row 1 the prompt itself
    emb, mask = pipe.text_encoder.encode(["", PROMPTS[0]])
    text = dit["text"].view(4, 4, 2, *emb.shape[1:])
    torch.testing.assert_close(text[0, 2], emb)
    assert torch.equal(dit["text_mask"].view(4, 4, 2, -1)[0, 0], mask)
    # the captured VAE input is exactly what the pipeline decodes for that prompt and seed
    want = pipe.sample_latents(PROMPTS[1], seed=5, num_inference_steps=4, progress=False)
    torch.testing.assert_close(data.vae_latents[3:4], want)


def test_mismatched_sets_are_refused(calib):
    out, _ = calib
    with pytest.raises(CalibrationError, match="another config than 'small'"):
        load_set(out, preset("small"))
    with pytest.raises(CalibrationError, match="is for 9x32x32 videos, not 13x32x32"):
        load_set(out, Pipeline("tiny").cfg, (13, 32, 32))


def test_nan_trajectories_are_refused(tmp_path):
    broken = Pipeline("tiny")
    with torch.no_grad():
        broken.dit.final.bias[0] = float("nan")  # a corrupt checkpoint
    with pytest.raises(CalibrationError, match="NaN/inf"):
        capture(broken, PROMPTS[:1], tmp_path / "bad", num_inference_steps=2, progress=False)
    assert not (tmp_path / "bad").exists()


def test_prompt_files(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# comment\n\n  a red circle moving up on a gray background \n")
    assert read_prompts(f) == ["a red circle moving up on a gray background"]
    f.write_text("\n# only comments\n")
    with pytest.raises(CalibrationError, match="has no prompts"):
        read_prompts(f)
    with pytest.raises(CalibrationError, match="does not exist"):
        read_prompts(tmp_path / "nope.txt")
    d = default_prompts()
    assert "Borneo wildlife on the Kinabatangan River" in d and len(d) == len(set(d)) >= 20


def test_cli_calibrate(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a white square moving down on a black background\n")
    r = CliRunner().invoke(main, ["calibrate", "--prompts", str(f), "--out", str(tmp_path / "c"), "--steps", "3"])
    assert r.exit_code == 0, r.output
    assert "1 trajectories, 6 DiT input samples, video 9x32x32, 3 steps" in r.output
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["model"] == "tiny"
    f.write_text("")
    r = CliRunner().invoke(main, ["calibrate", "--prompts", str(f), "--out", str(tmp_path / "d")])
    assert r.exit_code != 0 and "has no prompts" in r.output and not (tmp_path / "d").exists()
