"""Bundles and calibration sets on disk: --overwrite, paths a manifest names, concurrent and killed writers, bad flags,
malformed manifests and shards. Real files, real subprocesses (SIGKILL, SIGTERM), no mocks."""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vidrt.app.cli import main as vidrt_main
from vidrt.builder.cli import main as export_main
from vidrt.builder.engines import export_engines
from vidrt.calibration.capture import CalibrationError, capture, load_set
from vidrt.core.buckets import Bucket
from vidrt.core.bundle import KEY_ENV, BundleError, BundleWriter, _digest, check_out, load_manifest, sha256
from vidrt.runtime.pipeline import Pipeline

PROMPTS = ["a red circle moving left on a blue background", "a white square moving down on a black background"]
HYP = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def pipe():
    return Pipeline("tiny")


@pytest.fixture(scope="module")
def dit_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("b") / "dit"
    export_engines("tiny", out, ["fp32"], [Bucket(9, 32, 32)], parts=("dit",), progress=False)
    return out


@pytest.fixture(scope="module")
def cset(pipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("c") / "set"
    capture(pipe, PROMPTS, out, num_inference_steps=2, progress=False)
    return out


def _mini(out, overwrite=False, **manifest) -> Path:
    with BundleWriter(out, overwrite=overwrite, log=lambda s: None) as w:
        (w.dir / "a.onnx").write_bytes(b"graph")
        return w.finish({"parts": {"a": {"onnx": "a.onnx"}}, **manifest})


def _copy(src, dst) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _edit(root: Path, change) -> dict:
    """What an editor who knows the format does: change the manifest, then recompute its digest."""
    m = json.loads((root / "manifest.json").read_text())
    change(m)
    m["digest"] = _digest(m)
    (root / "manifest.json").write_text(json.dumps(m))
    return m


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _tree(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in d.rglob("*") if p.is_file()}


# 1. --overwrite replaces only a vidrt bundle or calibration set, atomically

def test_overwrite_refuses_what_is_not_a_bundle(tmp_path, monkeypatch, dit_bundle):
    user = tmp_path / "p"
    (user / "src").mkdir(parents=True)
    (user / "main.py").write_text("x")
    (user / "src" / "lib.py").write_text("y")
    before = _tree(user)
    monkeypatch.chdir(user)
    r = CliRunner().invoke(export_main, ["--model", "tiny", "--out", ".", "--overwrite"])
    assert r.exit_code != 0 and "is not a vidrt bundle or calibration set" in r.output, r.output
    r = CliRunner().invoke(vidrt_main, ["calibrate", "--out", str(user), "--overwrite"])
    assert r.exit_code != 0 and "is not a vidrt bundle or calibration set" in r.output, r.output
    with pytest.raises(BundleError, match="no vidrt manifest.json"):
        BundleWriter(user, overwrite=True)
    assert _tree(user) == before and not list(tmp_path.glob(".p.*"))
    b = _copy(dit_bundle, tmp_path / "b")  # a real bundle a user put a file into
    (b / "notes.txt").write_text("mine")
    with pytest.raises(BundleError, match="notes.txt"):
        export_engines("tiny", b, ["fp32"], [Bucket(9, 32, 32)], parts=("dit",), overwrite=True, progress=False)
    assert (b / "notes.txt").read_text() == "mine"
    (tmp_path / "link").symlink_to(_copy(dit_bundle, tmp_path / "b2"))
    with pytest.raises(BundleError, match="symlink"):
        check_out(tmp_path / "link", True)
    (tmp_path / "file").write_text("f")
    with pytest.raises(BundleError, match="not a directory"):
        check_out(tmp_path / "file", True)


@HYP
@given(names=st.lists(st.text(st.characters(whitelist_categories=("Ll", "Nd")), min_size=1, max_size=8),
                      min_size=1, max_size=4, unique=True), with_manifest=st.booleans())
def test_overwrite_never_deletes_user_files(tmp_path, names, with_manifest):
    d = Path(tempfile.mkdtemp(dir=tmp_path)) / "out"
    b = _mini(d)
    for n in names:
        (b / f"{n}.txt").write_text(n)
    if not with_manifest:
        (b / "manifest.json").unlink()
    before = _tree(b)
    with pytest.raises(BundleError, match="not a vidrt bundle or calibration set"):
        _mini(d, overwrite=True)
    assert _tree(b) == before


def test_overwrite_replaces_a_bundle_even_at_dot(tmp_path, monkeypatch):
    b = _mini(tmp_path / "b")
    monkeypatch.chdir(b)
    out = _mini(".", overwrite=True, note="second")  # the cwd itself is replaced; the path returned still works
    assert out == b and load_manifest(out)["note"] == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no old copy, partial or lock left
    _mini(tmp_path / "empty_dir_ok", overwrite=False)
    (tmp_path / "e").mkdir()
    _mini(tmp_path / "e", overwrite=True)  # an empty directory holds nothing to lose


# 2. every path a manifest names stays inside it; the digest is not a signature, the key is

EVIL = st.one_of(
    st.sampled_from(["/etc/passwd", "/etc/shadow", "../../x", "..", ".", "", "a/../../x", "./a.onnx", "a//b",
                     "..\\x", "a\0b", "/", "~/../../etc/passwd"]),
    st.builds(lambda n, tail: "../" * n + tail, st.integers(1, 6), st.sampled_from(["etc/passwd", "x", "a.onnx"])),
    st.builds(lambda tail: "/" + tail, st.text(st.characters(whitelist_categories=("Ll",)), min_size=1, max_size=12)))


@HYP
@given(name=EVIL, where=st.sampled_from(["files", "onnx", "graph", "external_data"]))
def test_manifest_names_cannot_reach_outside(tmp_path, name, where):
    b = _mini(Path(tempfile.mkdtemp(dir=tmp_path)) / "b")

    def change(m):
        if where == "files":
            m["files"][name] = {"sha256": "0" * 64, "bytes": 1}  # a wrong hash must not tell what /etc/shadow holds
        elif where == "external_data":
            m["parts"]["a"]["external_data"] = [name]
        else:
            m["parts"]["a"]["onnx" if where == "onnx" else "runtimes"] = name if where == "onnx" else \
                {"onnxruntime": {"graph": name}}
    _edit(b, change)
    with pytest.raises(BundleError, match="not a plain relative path inside the bundle") as e:
        load_manifest(b)
    assert "SHA-256" not in str(e.value) and "missing" not in str(e.value)  # refused before any file is opened


def test_bundle_part_outside_with_a_correct_hash_is_refused(tmp_path, dit_bundle):
    b = _copy(dit_bundle, tmp_path / "b")
    outside = shutil.copy(b / "dit.fp32.onnx", tmp_path / "outside.onnx")
    info = {"sha256": sha256(Path(outside)), "bytes": Path(outside).stat().st_size}
    for name in ("../outside.onnx", str(outside)):
        _edit(b, lambda m: (m["files"].update({name: info}), m["parts"]["dit.fp32"].update(onnx=name)))
        with pytest.raises(BundleError, match="not a plain relative path"):
            Pipeline.from_bundle(b)


def test_symlinks_are_refused(tmp_path, dit_bundle):
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "k.onnx").write_bytes(b"secret")
    cases = 0
    for kind in ("file_listed", "file_unlisted", "dir", "manifest"):
        b = _copy(dit_bundle, tmp_path / kind)
        if kind == "file_listed":
            (b / "k.onnx").symlink_to(secret / "k.onnx")
            _edit(b, lambda m: m["files"].update({"k.onnx": {"sha256": sha256(secret / "k.onnx"), "bytes": 6}}))
        elif kind == "file_unlisted":
            (b / "k.onnx").symlink_to(secret / "k.onnx")
        elif kind == "dir":
            (b / "d").symlink_to(secret)
            _edit(b, lambda m: m["files"].update({"d/k.onnx": {"sha256": sha256(secret / "k.onnx"), "bytes": 6}}))
        else:
            (b / "real.json").write_bytes((b / "manifest.json").read_bytes())
            (b / "manifest.json").unlink()
            (b / "manifest.json").symlink_to(b / "real.json")
        with pytest.raises(BundleError, match="symlink|not an engine bundle"):
            load_manifest(b)
        cases += 1
    assert cases == 4


def test_calibration_shard_names_stay_inside(tmp_path, cset, pipe):
    for name in ("../x.safetensors", "/etc/passwd"):
        s = _copy(cset, tmp_path / f"s{len(name)}")
        _edit(s, lambda m: m["shards"][0].update(file=name))
        with pytest.raises(CalibrationError, match="not a file listed with its SHA-256"):
            load_set(s, pipe.cfg)
        _edit(s, lambda m: m["files"].update({name: {"sha256": "0" * 64, "bytes": 1}}))
        with pytest.raises(CalibrationError, match="not a plain relative path.*vidrt calibrate"):
            load_set(s, pipe.cfg)


def test_signature_with_a_key(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "team-secret")
    b = _mini(tmp_path / "signed")
    assert load_manifest(b)["signature"]["hmac-sha256"]
    _edit(b, lambda m: m.update(parts={}))  # the digest is recomputable, the signature is not
    with pytest.raises(BundleError, match="wrong signature"):
        load_manifest(b)
    monkeypatch.delenv(KEY_ENV)
    unsigned = _mini(tmp_path / "unsigned")
    load_manifest(b)  # without a key only the digest is checked: what the module docstring says
    monkeypatch.setenv(KEY_ENV, "team-secret")
    with pytest.raises(BundleError, match="no signature"):
        load_manifest(unsigned)
    signed = _mini(tmp_path / "signed2")
    load_manifest(signed)
    monkeypatch.setenv(KEY_ENV, "other")
    with pytest.raises(BundleError, match="wrong signature"):
        load_manifest(signed)


# 3. concurrent writers

def test_one_writer_at_a_time(tmp_path):
    out = tmp_path / "b"
    with BundleWriter(out, log=lambda s: None) as w:
        with pytest.raises(BundleError, match=rf"another process \(pid {os.getpid()}\) is writing"):
            BundleWriter(out)
        out.mkdir()  # something else made it meanwhile: the final rename must not replace it
        (out / "theirs").write_text("t")
        (w.dir / "a.onnx").write_bytes(b"x")
        with pytest.raises(BundleError, match="appeared while this run was writing it"):
            w.finish({"parts": {}})
    assert _tree(out) == {"theirs": b"t"} and sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def _calibrate(out, *extra, prompts=None, **kw) -> subprocess.Popen:
    f = Path(out).parent / "prompts.txt"
    f.write_text("\n".join(prompts or PROMPTS) + "\n")
    return subprocess.Popen([sys.executable, "-m", "vidrt.app.cli", "calibrate", "--prompts", str(f), "--out",
                             str(out), "--steps", "2", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


def test_two_concurrent_calibrate_runs(tmp_path):
    out = tmp_path / "c"
    procs = [_calibrate(out), _calibrate(out)]
    res = [(p.wait(120), p.communicate()[1]) for p in procs]
    rcs = sorted(rc for rc, _ in res)
    assert rcs[0] == 0 and rcs[1] != 0, res  # one wins; the other says why, and replaces nothing
    err = next(e for rc, e in res if rc)
    assert "another process (pid" in err or "exists; pass" in err, err
    load_manifest(out, check_versions=False, fmt=1, kind="calibration set")


# 7. flags that would give a bundle that never runs are refused before any work

def test_refused_flags(tmp_path, cset):
    for args, msg in ((["--vae-tile", "0"], "--vae-tile 0"), (["--vae-tile", "-3"], "--vae-tile -3"),
                      (["--calib", str(cset)], "drop --calib"), (["--calib", str(cset), "--precision", "fp16"],
                                                                 "drop --calib")):
        t0 = time.time()
        r = CliRunner().invoke(export_main, ["--out", str(tmp_path / "x"), *args])
        assert r.exit_code != 0 and msg in r.output and not (tmp_path / "x").exists(), r.output
        assert time.time() - t0 < 5  # before the model is loaded
    r = CliRunner().invoke(vidrt_main, ["calibrate", "--out", str(tmp_path / "y"), "--seeds", "0,x"])
    assert r.exit_code != 0 and "comma-separated integers" in r.output


# 8 + 11. killed and terminated writers; modes

def _wait_for(pred, proc, timeout=60.0):
    t0 = time.time()
    while not pred():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout
        time.sleep(0.005)


def test_kill_9_leaves_the_old_set_and_the_next_run_cleans_up(tmp_path, cset):
    out = _copy(cset, tmp_path / "set")
    good = _tree(out)
    partials = lambda: list(tmp_path.glob(".set.partial-*"))  # noqa: E731
    left, err = [], ""
    for when in ("partial made", "first shard written"):
        p = _calibrate(out, "--overwrite", prompts=PROMPTS * 2)  # 4 trajectories: time to kill it mid-write
        if when == "partial made":
            _wait_for(lambda: partials(), p)
        else:
            _wait_for(lambda: any((d / "shard_0000.safetensors").exists() for d in partials()), p)
        p.send_signal(signal.SIGKILL)
        err = p.communicate()[1]
        assert all(f"removed {tmp_path / n}" in err for n in left), err  # the first killed run's partial
        assert _tree(out) == good  # the old set, untouched, loads
        load_manifest(out, check_versions=False, fmt=1, kind="calibration set")
        assert sorted(x.name for x in tmp_path.iterdir() if not x.name.startswith(".")) == ["prompts.txt", "set"]
        left = [d.name for d in partials()]
        assert len(left) == 1
    p = _calibrate(out, "--overwrite", prompts=PROMPTS[:1])
    out_, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert f"removed {tmp_path / left[0]}" in err and "killed before it finished" in err, err
    assert not list(tmp_path.glob(".set.*"))  # no partial, no lock file
    assert len(load_manifest(out, check_versions=False, fmt=1, kind="calibration set")["shards"]) == 1


def test_sigterm_cleans_up_like_ctrl_c(tmp_path):
    out = tmp_path / "t"
    p = _calibrate(out)
    _wait_for(lambda: list(tmp_path.glob(".t.partial-*")), p)
    p.send_signal(signal.SIGTERM)
    assert p.wait(60) != 0
    assert not out.exists() and not list(tmp_path.glob(".t.*"))


def test_signals_wait_until_the_swap_is_done(tmp_path):
    from vidrt.core.bundle import _signals_held
    done, before = [], signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        with BundleWriter(tmp_path / "b", log=lambda s: None):  # SIGTERM now unwinds like Ctrl-C
            with _signals_held():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)  # the handler would have run by now
                done.append("swap")
    assert done == ["swap"] and not list(tmp_path.iterdir())  # then it unwound, and cleaned up
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_swap_killed_midway_is_undone(tmp_path):
    b = _mini(tmp_path / "b")
    os.rename(b, tmp_path / f".b.old-{_dead_pid()}-0000")  # killed between the two renames: no bundle at `b`
    said = []
    with pytest.raises(BundleError, match="exists; pass"):  # it is back, so writing without --overwrite is refused
        BundleWriter(b, log=said.append)
    assert "restored" in said[0] and load_manifest(b) and sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_modes_follow_the_umask(tmp_path, pipe):
    old = os.umask(0o022)
    try:
        s = capture(pipe, PROMPTS[:1], tmp_path / "s", num_inference_steps=1, progress=False)
        root = tmp_path / "s"
        assert oct(root.stat().st_mode & 0o777) == "0o755"
        assert {oct(p.stat().st_mode & 0o777) for p in root.iterdir()} == {"0o644"}, s["files"]
    finally:
        os.umask(old)


# 9 + 11. malformed manifests and shards: a message naming the file and the fix, never a traceback

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                    max_leaves=8)


@HYP
@given(field=st.sampled_from(["<top>", "files", "parts", "versions", "format", "<file entry>", "<part>"]), value=JSON)
def test_malformed_bundle_manifests(tmp_path, field, value):
    b = _mini(Path(tempfile.mkdtemp(dir=tmp_path)) / "b")
    m = json.loads((b / "manifest.json").read_text())
    if field == "<top>":
        m = value
    elif field == "<file entry>":
        m["files"]["a.onnx"] = value
    elif field == "<part>":
        m["parts"]["a"] = value
    else:
        m[field] = value
    if isinstance(m, dict):
        m["digest"] = _digest(m)
    (b / "manifest.json").write_text(json.dumps(m))
    try:
        load_manifest(b)
    except BundleError as e:
        assert str(b) in str(e) and "re-run export-engines" in str(e) or "format" in str(e)


@HYP
@given(field=st.sampled_from(["shards", "video_shape", "model_digest", "<shard>"]), value=JSON)
def test_malformed_calibration_manifests(tmp_path, cset, pipe, field, value):
    s = _copy(cset, Path(tempfile.mkdtemp(dir=tmp_path)) / "s")
    _edit(s, lambda m: m["shards"].__setitem__(0, value) if field == "<shard>" else m.__setitem__(field, value))
    try:
        load_set(s, pipe.cfg)
    except CalibrationError as e:
        assert "vidrt calibrate" in str(e) and "export-engines" not in str(e), e


@HYP
@given(cut=st.floats(0, 0.999), rehash=st.booleans())
def test_truncated_shards(tmp_path, cset, pipe, cut, rehash):
    s = _copy(cset, Path(tempfile.mkdtemp(dir=tmp_path)) / "s")
    f = s / "shard_0001.safetensors"
    f.write_bytes(f.read_bytes()[:int(cut * f.stat().st_size)])
    if rehash:  # hashes made to match: only the shard reader stands between the file and a traceback
        _edit(s, lambda m: m["files"].update({f.name: {"sha256": sha256(f), "bytes": f.stat().st_size}}))
    with pytest.raises(CalibrationError, match="shard_0001.safetensors.*vidrt calibrate") as e:
        load_set(s, pipe.cfg)
    assert ("not a readable safetensors" if rehash else "does not match its SHA-256") in str(e.value)
