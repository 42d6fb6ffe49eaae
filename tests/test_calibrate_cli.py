"""`vidrt calibrate --num-prompts N` (the first N prompts, refused outside 1..len before any model loads) and the ETA
it prints to stderr after the first trajectory."""
import json
import time

from click.testing import CliRunner

from vidrt.app.cli import main
from vidrt.calibration.capture import default_prompts, eta_line


def test_num_prompts_out_of_range_refused_before_model_loads(tmp_path):
    n = len(default_prompts())
    f = tmp_path / "p.txt"
    f.write_text("a red circle moving left\na blue square moving up\n")
    cases = [([], "0", f"the default prompt list has {n} prompts; give 1 to {n}"),
             ([], str(n + 1), f"{n + 1}: the default prompt list has {n} prompts"),
             (["--prompts", str(f)], "3", f"--prompts {f} has 2 prompts; give 1 to 2")]
    for extra, k, msg in cases:
        t = time.time()
        # a --model that does not exist: the refusal must come before any model is looked at
        r = CliRunner().invoke(main, ["calibrate", "--model", str(tmp_path / "no-model"), "--out",
                                      str(tmp_path / "c"), *extra, "--num-prompts", k])
        assert r.exit_code == 2 and "--num-prompts" in r.output and msg in r.output, r.output
        assert time.time() - t < 5 and not (tmp_path / "c").exists()


def test_num_prompts_takes_the_first_n_and_prints_an_eta(tmp_path):
    out = tmp_path / "c"
    r = CliRunner().invoke(main, ["calibrate", "--out", str(out), "--num-prompts", "2", "--seeds", "0,1",
                                  "--steps", "2", "--frames", "9", "--height", "32", "--width", "32"])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "manifest.json").read_text())
    first = default_prompts()[:2]
    assert [(s["prompt"], s["seed"]) for s in m["shards"]] == [(p, s) for p in first for s in (0, 1)]
    assert "4 trajectories, 16 DiT input samples, video 9x32x32, 2 steps" in r.stdout
    eta = [ln for ln in r.stderr.splitlines() if "ETA" in ln]
    assert len(eta) == 1 and "4 trajectories x 2 steps" in eta[0] and "per step measured on the first" in eta[0]
    assert "ETA" not in r.stdout  # the ETA is for the terminal, not for what a script reads


def test_eta_line_extrapolates_the_first_trajectory():
    assert eta_line(15.2 * 4, 22, 4) == ("calibrate: ETA ~21 min more: 22 trajectories x 4 steps, 15.2 s per step "
                                         "measured on the first")
    assert "ETA ~3 s more: 4 trajectories x 2 steps, 0.5 s per step" in eta_line(1.0, 4, 2)
    assert "ETA ~2.0 h more" in eta_line(3600.0, 3, 50)
