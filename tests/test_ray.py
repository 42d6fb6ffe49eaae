"""`vidrt batch` and `vidrt serve` on a real local Ray (2 CPUs, loopback only): outputs equal in-process generation
by sha256, resume after a SIGKILLed driver, actors killed mid-item, invalid items, HTTP statuses."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from vidrt.app.batch import BatchConfig, read_items, run_batch, sha256  # noqa: E402
from vidrt.runtime.pipeline import Pipeline  # noqa: E402

RED = "a red circle moving left on a blue background"
KEY = "test-key-0123"  # the serve fixture's API key
YELLOW = "a yellow square moving right on a black background"


@pytest.fixture(scope="module")
def cluster():
    # Workers inherit it: the serve test's "long" job (100000 steps, hours) can only end by being cancelled
    os.environ["VIDRT_MAX_STEPS"] = "100000"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
    os.environ.pop("VIDRT_MAX_STEPS")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """sha256 of the mp4 an in-process Pipeline writes for the same request (1 thread, like an actor)."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # restored after this module: later modules keep the process's threads
    pipe, folder, cache = Pipeline("tiny"), tmp_path_factory.mktemp("ref"), {}

    def ref(**kw) -> str:
        key = json.dumps(kw, sort_keys=True)
        if key not in cache:
            path = folder / f"{len(cache)}.mp4"
            pipe(**kw, progress=False).save(path)
            cache[key] = sha256(path)
        return cache[key]
    yield ref
    torch.set_num_threads(threads)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def records(folder: Path) -> list[dict]:
    return [json.loads(s) for s in (folder / "results.jsonl").read_text().splitlines()]


def test_batch_reads_txt_and_allows_one_driver_per_folder(tmp_path):
    from vidrt.app.batch import _lock
    from vidrt.core.errors import ConfigError
    (tmp_path / "p.txt").write_text(f"# a comment\n\n{RED}\n  {YELLOW}  \n")
    items = read_items(tmp_path / "p.txt", seed=100)
    assert [(i.line, i.params) for i in items] == [(3, {"prompt": RED, "seed": 103}),
                                                   (4, {"prompt": YELLOW, "seed": 104})]
    with pytest.raises(ConfigError, match="txt .* or .jsonl"):
        read_items(tmp_path / "p.csv")
    held = _lock(tmp_path)
    with pytest.raises(ConfigError, match="another vidrt batch is writing"):
        run_batch(tmp_path / "p.txt", BatchConfig(str(tmp_path), progress=False))
    held.close()
    with pytest.raises(ConfigError, match="no Ray cluster answers at --address 127.0.0.1:1"):
        run_batch(tmp_path / "p.txt", BatchConfig(str(tmp_path), address="127.0.0.1:1", progress=False))


def test_batch_cli_exits_1_when_items_are_invalid(tmp_path):
    from click.testing import CliRunner

    from vidrt.app.cli import main
    suite = write_jsonl(tmp_path / "s.jsonl", ["[1, 2]", {"steps": 2}])
    r = CliRunner().invoke(main, ["batch", str(suite), "--out", str(tmp_path / "out")])
    assert r.exit_code == 1 and "0 done, 0 already done, 0 failed, 2 invalid" in r.output
    assert [x["error"] for x in records(tmp_path / "out")] == [
        "line 1 is not JSON: expected a JSON object, got list",
        "line 2: no 'prompt'; keys are prompt, negative_prompt, seed, frames, height, width, steps, guidance"]


def test_batch_matches_in_process_and_reports_invalid(cluster, reference, tmp_path):
    rows = [{"prompt": RED, "seed": 5, "steps": 2},
            "not json {",
            {"prompt": YELLOW, "steps": 2, "guidance": 1.0, "negative_prompt": "blur"},
            {"prompt": RED, "colour": "red"},
            {"prompt": RED, "frames": 10, "steps": 2},
            {"prompt": YELLOW, "steps": 0},
            {"prompt": YELLOW, "seed": 9, "steps": 3, "height": 32, "width": 32, "frames": 9}]
    suite = write_jsonl(tmp_path / "suite.jsonl", rows)
    items = read_items(suite)
    assert [i.line for i in items] == [1, 2, 3, 4, 5, 6, 7] and items[2].params["seed"] == 3  # default: line number
    seen = []
    c = run_batch(suite, BatchConfig(str(tmp_path / "out"), replicas=2, progress=False), on_record=seen.append)
    assert c == {"done": 3, "skipped": 0, "failed": 0, "invalid": 4}
    recs = {r["item"]: r for r in records(tmp_path / "out")}
    assert sorted(recs) == [1, 2, 3, 4, 5, 6, 7] and len(seen) == 7
    assert "not JSON" in recs[2]["error"] and "unknown keys ['colour']" in recs[4]["error"]
    assert "4k+1" in recs[5]["error"] or "frames" in recs[5]["error"]
    assert "num_inference_steps=0" in recs[6]["error"]
    for line, kw in [(1, dict(seed=5, num_inference_steps=2)),
                     (3, dict(seed=3, num_inference_steps=2, guidance_scale=1.0, negative_prompt="blur")),
                     (7, dict(seed=9, num_inference_steps=3))]:
        r = recs[line]
        assert r["status"] == "done" and r["attempts"] == 1 and r["seed"] == kw["seed"]
        assert set(r["timings"]) == {"validate_s", "sample_s", "decode_s", "encode_s", "total_s"}
        assert sha256(tmp_path / "out" / r["file"]) == r["sha256"]
        assert r["sha256"] == reference(prompt=rows[line - 1]["prompt"], **kw), f"item {line} differs from in-process"
    assert {recs[i]["worker"] for i in (1, 3, 7)} and not list((tmp_path / "out").glob(".*.partial"))


def test_batch_resume_after_driver_sigkill(cluster, reference, tmp_path):
    prompts = [RED, YELLOW] * 4
    suite = write_jsonl(tmp_path / "suite.jsonl", [{"prompt": p, "steps": 6} for p in prompts])
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "vidrt.app.cli", "batch", str(suite), "--out", str(out), "--address", cluster]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 150
    while time.time() < deadline and proc.poll() is None:
        path = out / "results.jsonl"
        if path.exists() and path.read_text().count('"done"') >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the driver finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    before = {r["item"]: r for r in records(out) if r["status"] == "done"}
    assert 2 <= len(before) < len(prompts)
    # Half-done states a kill can leave, plus a damaged video: each must be redone, not trusted.
    damaged = min(before)
    (out / before[damaged]["file"]).write_bytes(b"not the video")
    (out / f".{before[damaged]['file']}.x.partial").write_bytes(b"half")
    with open(out / "results.jsonl", "a") as f:
        f.write('{"item": 99, "key": "cut by the ki')
    c = run_batch(suite, BatchConfig(str(out), progress=False))
    assert c["skipped"] == len(before) - 1 and c["done"] == len(prompts) - c["skipped"] and not c["failed"]
    after = records(out)
    assert sorted(r["item"] for r in after) == list(range(1, len(prompts) + 1))  # once each, nothing lost
    for r in after:
        assert r["status"] == "done" and sha256(out / r["file"]) == r["sha256"]
        assert r["sha256"] == reference(prompt=prompts[r["item"] - 1], seed=r["item"], num_inference_steps=6)
        if r["item"] in before and r["item"] != damaged:
            assert r == before[r["item"]]  # skipped: the record (worker, timings) is the first run's
    assert not list(out.glob(".*.partial"))


def _kill_when_running(stop: threading.Event, plan: dict, killed: list) -> None:
    """plan: item line -> times to SIGKILL the actor running it, once it is past its first step."""
    prefix = f"vidrt-batch-{os.getpid()}-"
    while not stop.is_set():
        for a in ray.util.list_named_actors(all_namespaces=True):
            if not a["name"].startswith(prefix):
                continue
            try:
                st = ray.get(ray.get_actor(a["name"], namespace=a["namespace"]).status.remote(), timeout=2)
            except Exception:  # restarting, or gone: look again
                continue
            pid = int(st["worker"].split(":")[1])
            if plan.get(st["item"], 0) > 0 and st["step"] >= 1 and pid not in [p for _, p in killed]:
                plan[st["item"]] -= 1
                killed.append((st["item"], pid))
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def test_batch_actor_killed_mid_item_is_retried_then_failed(cluster, reference, tmp_path):
    # item 2 is killed on both attempts: 400 steps keep it running until the killer (polling every 0.05 s, each
    # status call up to 2 s on a loaded machine) sees it; with 40 a second attempt once finished first (CI, f51a9c3)
    suite = write_jsonl(tmp_path / "suite.jsonl", [{"prompt": RED, "steps": 40, "seed": 1},
                                                   {"prompt": YELLOW, "steps": 400, "seed": 2},
                                                   {"prompt": YELLOW, "steps": 2, "seed": 3}])
    stop, killed, plan = threading.Event(), [], {1: 1, 2: 5}
    killer = threading.Thread(target=_kill_when_running, args=(stop, plan, killed), daemon=True)
    killer.start()
    try:
        c = run_batch(suite, BatchConfig(str(tmp_path / "out"), retries=1, progress=False))
    finally:
        stop.set()
        killer.join(10)
    recs = {r["item"]: r for r in records(tmp_path / "out")}
    assert c == {"done": 2, "skipped": 0, "failed": 1, "invalid": 0}
    assert [i for i, _ in killed].count(1) == 1 and [i for i, _ in killed].count(2) == 2
    assert recs[1]["attempts"] == 2 and recs[1]["sha256"] == reference(prompt=RED, seed=1, num_inference_steps=40)
    assert recs[1]["worker"].split(":")[1] != str(dict(killed)[1])  # finished by another process
    assert recs[2]["status"] == "failed" and recs[2]["attempts"] == 2
    assert "worker died during item 2" in recs[2]["error"]
    assert recs[3]["sha256"] == reference(prompt=YELLOW, seed=3, num_inference_steps=2)


@pytest.fixture(scope="module")
def server(cluster):
    """One `vidrt serve` app on loopback: 1 replica, 1 queued job at most, 3 s ttl and queue timeout."""
    import socket

    from ray import serve

    from vidrt.app.serve import ServeConfig, start
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    yield start(ServeConfig(max_queued=1, ttl_s=3, queue_timeout_s=3, port=port, api_keys=(KEY,)))
    serve.shutdown()


def http(method: str, url: str, body: dict | bytes | None = None, key: str | None = KEY) -> tuple[int, dict | bytes,
                                                                                                 dict]:
    import urllib.error
    import urllib.request
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    req = urllib.request.Request(url, method=method, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            status, data, headers = r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        status, data, headers = e.code, e.read(), dict(e.headers)
    return status, (json.loads(data) if headers.get("content-type", "").startswith("application/json") else data), \
        headers


def wait_for(url: str, done, limit_s: float = 90) -> dict:
    deadline = time.time() + limit_s
    while time.time() < deadline:
        status, v, _ = http("GET", url)
        if status != 200 or done(v):
            return v
        time.sleep(0.05)
    raise AssertionError(f"{url} still {v['status']} after {limit_s} s")


def test_serve_generates_the_in_process_video_then_expires(server, reference):
    assert http("GET", f"{server}/v1/models")[1]["data"][0]["id"] == "tiny"
    assert http("GET", f"{server}/healthz")[1] == {"status": "ok"}
    status, v, _ = http("POST", f"{server}/v1/videos", {"prompt": RED, "seed": 4, "num_inference_steps": 3,
                                                         "size": "32x32", "seconds": 1})
    assert status == 200 and v["status"] == "queued" and v["object"] == "video" and v["num_frames"] == 9
    url = f"{server}/v1/videos/{v['id']}"
    v = wait_for(url, lambda v: v["status"] not in ("queued", "in_progress"))
    status, data, headers = http("GET", f"{url}/content")
    assert v["status"] == "completed" and v["progress"] == 100 and status == 200
    assert headers["content-type"] == "video/mp4" and hashlib.sha256(data).hexdigest() == v["sha256"]
    assert v["sha256"] == reference(prompt=RED, seed=4, num_inference_steps=3)
    assert any(x["id"] == v["id"] for x in http("GET", f"{server}/v1/videos")[1]["data"])
    time.sleep(max(0, v["expires_at"] - time.time()) + 1.1)  # ttl 3 s
    assert http("GET", url)[1]["status"] == "expired"
    status, err, _ = http("GET", f"{url}/content")
    assert status == 410 and err["error"]["code"] == "expired"
    time.sleep(3.1)  # and the job itself ttl later
    assert http("GET", url)[0] == 404


@pytest.mark.parametrize("body, param", [({"prompt": RED, "num_frames": 10}, None),
                                         ({"prompt": RED, "num_inference_steps": 0}, None),
                                         ({"prompt": RED, "seed": "abc"}, "seed"),
                                         ({"prompt": RED, "colour": "red"}, "colour"),
                                         ({"prompt": RED, "size": "big"}, None),
                                         ({"prompt": "   "}, None),
                                         ({"negative_prompt": "x"}, "prompt")])
def test_serve_refuses_invalid_requests_with_422(server, body, param):
    status, err, _ = http("POST", f"{server}/v1/videos", body)
    assert status == 422 and err["error"]["message"] and err["error"]["param"] == param


def test_serve_with_the_official_openai_sdk(server, reference):
    """The OpenAI SDK unchanged (multipart create, poll helper, download): the mp4 is the in-process one of the same
    seed; vidrt's own fields travel as extra_body."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)
    v = client.videos.create_and_poll(prompt=RED, size="32x32", seconds="1",
                                      extra_body={"seed": 4, "num_inference_steps": 3})
    assert (v.status, v.progress, v.size, v.seconds, v.object) == ("completed", 100, "32x32", "1.125", "video")
    data = client.videos.download_content(v.id).read()
    assert hashlib.sha256(data).hexdigest() == reference(prompt=RED, seed=4, num_inference_steps=3)
    assert client.videos.retrieve(v.id).id == v.id


def test_serve_keys_and_limits(server):
    """401 without or with a wrong key (health stays open), 413 past the body limit before it is read, 422 for a
    prompt past the limit and for an input_reference upload (text-to-video only), all as OpenAI errors."""
    openai = pytest.importorskip("openai")
    status, err, _ = http("GET", f"{server}/v1/videos", key=None)
    assert status == 401 and err["error"]["type"] == "authentication_error"
    assert http("GET", f"{server}/v1/models", key="wrong-key-123")[0] == 401
    assert http("GET", f"{server}/healthz", key=None)[0] == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong-key-123", max_retries=0).videos.list()
    status, err, _ = http("POST", f"{server}/v1/videos", b"x" * (2 << 20))
    assert status == 413 and err["error"]["code"] == "body_too_large"
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.videos.create(prompt="a red circle " * 400)  # 5200 characters
    assert e.value.body["param"] == "prompt" and "4096" in e.value.body["message"]
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.videos.create(prompt=RED, input_reference=("frame.png", b"\x89PNG", "image/png"))
    assert e.value.body["param"] == "input_reference"


def test_serve_refuses_to_listen_beyond_loopback_without_a_key(monkeypatch):
    from vidrt.app.serve import ServeConfig, check_auth
    monkeypatch.delenv("VIDRT_API_KEY", raising=False)
    check_auth(ServeConfig(host="127.0.0.1"))
    with pytest.raises(ValueError, match="--api-key KEY"):
        check_auth(ServeConfig(host="0.0.0.0"))
    check_auth(ServeConfig(host="0.0.0.0", insecure_no_auth=True))
    check_auth(ServeConfig(host="0.0.0.0", api_keys=("long-enough-key",)))
    with pytest.raises(ValueError, match="at least 8"):
        check_auth(ServeConfig(host="0.0.0.0", api_keys=("short",)))
    monkeypatch.setenv("VIDRT_API_KEY", "from-the-env-1, from-the-env-2")
    assert ServeConfig(host="0.0.0.0").keys == ("from-the-env-1", "from-the-env-2")
    check_auth(ServeConfig(host="0.0.0.0"))


def test_serve_not_found_and_not_ready(server):
    assert http("GET", f"{server}/v1/videos/video_nope")[0] == 404
    assert http("DELETE", f"{server}/v1/videos/video_nope")[0] == 404
    status, err, _ = http("POST", f"{server}/v1/videos", {"prompt": RED, "model": "sora"})
    assert status == 404 and err["error"]["code"] == "model_not_found"


def test_serve_queue_full_429_queue_timeout_and_cancel(server, reference):
    post = lambda **kw: http("POST", f"{server}/v1/videos", {"prompt": YELLOW} | kw)  # noqa: E731
    _, long, _ = post(num_inference_steps=100000, seed=1)  # hours on CPU: it only ends by DELETE
    running = wait_for(f"{server}/v1/videos/{long['id']}", lambda v: v["status"] != "queued" and v["progress"] > 0)
    assert running["status"] == "in_progress"
    status, queued, _ = post(num_inference_steps=2, seed=2)
    assert status == 200 and queued["status"] == "queued"
    status, err, headers = post(num_inference_steps=2, seed=3)
    assert status == 429 and err["error"]["code"] == "queue_full" and headers["retry-after"] == "1"
    v = wait_for(f"{server}/v1/videos/{queued['id']}", lambda v: v["status"] != "queued", 15)
    assert v["status"] == "expired" and v["error"]["code"] == "queue_timeout"  # 3 s in the queue
    status, again, _ = post(num_inference_steps=2, seed=4)  # its place is free again
    assert status == 200
    status, v, _ = http("DELETE", f"{server}/v1/videos/{again['id']}")
    assert status == 200 and v["status"] == "cancelled"
    status, v, _ = http("DELETE", f"{server}/v1/videos/{long['id']}")
    assert status == 200 and v["status"] == "cancelled" and v["progress"] < 100
    assert http("GET", f"{server}/v1/videos/{long['id']}/content")[0] == 409
    t0 = time.time()  # the replica stopped the long job: a short one runs now, not after 1000 steps
    _, short, _ = post(num_inference_steps=2, seed=5)
    v = wait_for(f"{server}/v1/videos/{short['id']}", lambda v: v["status"] not in ("queued", "in_progress"), 60)
    assert v["status"] == "completed" and v["sha256"] == reference(prompt=YELLOW, seed=5, num_inference_steps=2)
    assert time.time() - t0 < 60  # the long job's steps left alone would take hours
    status, gone, _ = http("DELETE", f"{server}/v1/videos/{short['id']}")
    assert status == 200 and gone["deleted"] and http("GET", f"{server}/v1/videos/{short['id']}")[0] == 404


def test_batch_item_timeout_restarts_the_actor_and_reports(cluster, reference, tmp_path):
    suite = write_jsonl(tmp_path / "suite.jsonl", [{"prompt": RED, "steps": 100000}, {"prompt": RED, "steps": 2}])
    t0 = time.time()
    c = run_batch(suite, BatchConfig(str(tmp_path / "out"), retries=0, item_timeout_s=5, progress=False))
    recs = {r["item"]: r for r in records(tmp_path / "out")}
    assert c == {"done": 1, "skipped": 0, "failed": 1, "invalid": 0}, [(r["status"], r.get("error")) for r in
                                                                         recs.values()]
    assert time.time() - t0 < 90  # not hours
    assert "ran over --item-timeout 5 s" in recs[1]["error"]
    assert recs[2]["sha256"] == reference(prompt=RED, seed=2, num_inference_steps=2)


def test_serve_job_survives_its_replica_being_killed(server, reference):
    """On its own app: the shared one's 3 s queue timeout is shorter than a replica restart here."""
    from ray import serve

    from vidrt.app.serve import ServeConfig, app
    serve.run(app(ServeConfig(queue_timeout_s=120)), name="retry", route_prefix="/retry")
    _, v, _ = http("POST", f"{server}/retry/v1/videos", {"prompt": RED, "seed": 6, "num_inference_steps": 60})
    url = f"{server}/retry/v1/videos/{v['id']}"
    running = wait_for(url, lambda v: v["status"] == "in_progress" and v["progress"] > 0)
    os.kill(int(running["worker"].split(":")[1]), signal.SIGKILL)
    v = wait_for(url, lambda v: v["status"] not in ("queued", "in_progress"), 120)
    assert v["status"] == "completed" and v["attempts"] == 2 and v["worker"] != running["worker"]
    assert v["sha256"] == reference(prompt=RED, seed=6, num_inference_steps=60)
    serve.delete("retry")
