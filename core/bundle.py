"""Engine bundle: a self-describing directory with manifest.json, written atomically, verified on load.
The SHA-256s and digest in the manifest catch accidental corruption (a truncated copy, a flipped bit, a hand edit);
anyone can recompute them, so they do not stop deliberate edits. For that, set VIDRT_BUNDLE_KEY: writers then sign
the manifest (HMAC-SHA256) and loaders with the same key refuse a bundle whose signature does not match."""
from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import hmac
import json
import os
import secrets
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path

from vidrt.core.trt import engine_incompatibility, trt_version

MANIFEST = "manifest.json"
FORMAT = 2  # 2: parts say which graph each runtime uses ("runtimes")
KINDS = ("vidrt-bundle", "vidrt-calibration")
KEY_ENV = "VIDRT_BUNDLE_KEY"
FIX = {"engine bundle": "re-run export-engines", "calibration set": "re-run `vidrt calibrate`"}


class BundleError(RuntimeError):
    """A corrupt, partial or mismatched bundle. The message names the file and what to do."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _digest(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k not in ("digest", "signature")}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _sign(key: str, digest: str) -> str:
    # the digest covers every field and, through the SHA-256s, every file: signing it signs the bundle
    return hmac.new(key.encode(), digest.encode(), hashlib.sha256).hexdigest()


def versions() -> dict:
    import onnx
    import torch
    out = {"torch": torch.__version__, "onnx": onnx.__version__}
    try:
        import onnxruntime
        out["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        out["onnxruntime"] = None
    out["tensorrt"] = trt_version()
    return out


def _log(msg: str) -> None:
    print(f"vidrt: {msg}", file=sys.stderr, flush=True)


def _mode(directory: bool) -> int:
    mask = os.umask(0)  # the only way to read the umask is to set it; put it straight back
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def write_atomic(path: Path, data: bytes) -> None:
    """One file written whole or not at all: a temp file in the same folder, fsynced, renamed over `path`, so readers
    and a crash see the old file or the new one. Its mode follows the umask, like any file the user makes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _mode(False))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (another user's counts): writers name their temp files with their PID."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _size_mb(p: Path) -> float:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink()) / 1e6


def _not_replaceable(out: Path) -> str | None:
    """Why `out` may not be replaced, or None if it may: an empty directory, or a vidrt bundle or calibration set
    that holds nothing but its manifest and the files it lists (so no user file is ever deleted)."""
    if out.is_symlink():
        return "it is a symlink"
    if not out.is_dir():
        return "it is not a directory"
    if not any(out.iterdir()):
        return None
    mpath = out / MANIFEST
    try:
        m = json.loads(mpath.read_text()) if not mpath.is_symlink() else None
    except (OSError, ValueError, RecursionError):
        m = None
    legacy = isinstance(m, dict) and m.get("format") == FORMAT and isinstance(m.get("parts"), dict)  # no "kind" yet
    if not isinstance(m, dict) or not (m.get("kind") in KINDS or legacy) or not isinstance(m.get("files"), dict):
        return f"it has no vidrt {MANIFEST}"
    for dirpath, dirs, names in os.walk(out):
        for n in dirs + names:
            p = Path(dirpath) / n
            rel = p.relative_to(out).as_posix()
            if p.is_symlink():
                return f"{rel} is a symlink"
            if n in names and rel != MANIFEST and rel not in m["files"]:
                return f"it holds {rel}, which its manifest does not list"
    return None


def check_out(out: str | Path, overwrite: bool) -> None:
    """Refuse, before any work, an --out that exists without --overwrite, or that --overwrite must not delete."""
    out = Path(os.path.abspath(out))
    if not (out.exists() or out.is_symlink()):
        return
    if not overwrite:
        raise BundleError(f"{out} exists; pass overwrite=True (--overwrite) or choose another --out")
    try:
        why = _not_replaceable(out)
    except OSError as e:
        why = str(e)
    if why:
        raise BundleError(f"{out} exists and is not a vidrt bundle or calibration set ({why}); --overwrite only "
                          "replaces those: choose another --out")


@contextlib.contextmanager
def _signals_held():
    """SIGINT/SIGTERM wait until the block ends: the swap of old and new bundle is never left half done. (Handlers,
    not a signal mask: any thread may receive the signal, and Python runs its handler in the main thread.)"""
    if threading.current_thread() is not threading.main_thread():
        yield  # Python handlers only ever raise in the main thread: nothing can interrupt this one
        return
    got = []
    old = {s: signal.signal(s, lambda n, _: got.append(n)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if got:
            signal.raise_signal(got[0])  # now that the swap is done


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt("SIGTERM")  # timeout, docker stop and systemd send it: unwind and clean up as on Ctrl-C


class BundleWriter:
    """with BundleWriter(out) as w: write files under w.dir, then w.finish(manifest). Nothing appears at `out`
    until finish() renames the complete temp directory into place; on error or SIGINT/SIGTERM the temp directory is
    removed. One writer per `out` at a time (a lock file beside it); temp directories of killed writers (their PID is
    in the name) are removed, or an old bundle set aside by a killed swap is put back, by the next writer."""

    def __init__(self, out: str | Path, overwrite: bool = False, log=_log):
        self.out, self.overwrite, self.log = Path(os.path.abspath(out)), overwrite, log
        self.dir, self._lock, self._sigterm = None, None, None
        check_out(self.out, overwrite)
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self._lock = self._take_lock()
            self._recover()
            check_out(self.out, overwrite)  # again: a recovered bundle may be back
            self.dir = self.out.with_name(f".{self.out.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
            self.dir.mkdir(mode=0o777)  # the umask decides, as for any folder the user makes
            if threading.current_thread() is threading.main_thread():
                self._sigterm = signal.signal(signal.SIGTERM, _on_sigterm)
        except OSError as e:
            self._release()
            raise BundleError(f"cannot write {self.out}: {e}; choose another --out") from e
        except BaseException:
            self._release()
            raise

    def _take_lock(self) -> int:
        path = self.out.with_name(f".{self.out.name}.lock")
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, _mode(False))
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise BundleError(f"another process (pid {holder}) is writing {self.out}; wait for it to finish or "
                                  "choose another --out") from None
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                return fd
            os.close(fd)  # the last holder removed the file as we opened it: lock the new one

    def _recover(self) -> None:
        """Under the lock: remove what killed writers left, and put back an old bundle a killed swap set aside."""
        for p in sorted(self.out.parent.glob(f".{glob.escape(self.out.name)}.*-*")):  # a name may hold * ? [
            kind, _, rest = p.name[len(self.out.name) + 2:].partition("-")
            pid = rest.split("-")[0]
            if kind not in ("partial", "old") or not pid.isdigit() or (pid_alive(int(pid)) and int(pid) != os.getpid()):
                continue
            if kind == "old" and not (self.out.exists() or self.out.is_symlink()):
                os.rename(p, self.out)
                self.log(f"restored {self.out} from {p.name}: process {pid} was killed while replacing it")
                continue
            mb = _size_mb(p)
            shutil.rmtree(p, ignore_errors=True)
            self.log(f"removed {p} ({mb:.1f} MB), left by process {pid}, which was killed before it finished")

    def _release(self) -> None:
        if self._sigterm is not None:
            signal.signal(signal.SIGTERM, self._sigterm)
            self._sigterm = None
        if self._lock is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.out.with_name(f".{self.out.name}.lock"))
            os.close(self._lock)
            self._lock = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        try:
            if self.dir is not None and self.dir.exists():
                shutil.rmtree(self.dir, ignore_errors=True)
        finally:
            self._release()
        return False

    def finish(self, manifest: dict) -> Path:
        """Write manifest.json and move the bundle to `out`; returns `out`."""
        dmode, fmode = _mode(True), _mode(False)
        for p in [self.dir, *self.dir.rglob("*")]:  # some writers (safetensors) make 0600 files: shared bundles
            os.chmod(p, dmode if p.is_dir() else fmode)
        files = sorted(p for p in self.dir.rglob("*") if p.is_file())
        manifest = {"format": FORMAT, "kind": KINDS[0], **manifest, "versions": versions(),
                    "files": {p.relative_to(self.dir).as_posix(): {"sha256": sha256(p), "bytes": p.stat().st_size}
                              for p in files}}  # a calibration set gives its own format and kind
        manifest["digest"] = _digest(manifest)  # any later edit of the manifest itself is detected
        if os.environ.get(KEY_ENV):
            manifest["signature"] = {"hmac-sha256": _sign(os.environ[KEY_ENV], manifest["digest"])}
        (self.dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        os.chmod(self.dir / MANIFEST, fmode)
        old = None
        with _signals_held():
            if self.out.exists() or self.out.is_symlink():  # it may have appeared while we wrote
                if not self.overwrite:
                    raise BundleError(f"{self.out} appeared while this run was writing it; nothing was replaced: "
                                      "pass --overwrite or choose another --out")
                check_out(self.out, True)
                old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
                os.rename(self.out, old)
            try:
                os.rename(self.dir, self.out)
            except OSError as e:
                if old is not None:
                    os.rename(old, self.out)
                raise BundleError(f"cannot move the new bundle to {self.out} ({e}); nothing was replaced") from e
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out


def _inside(root: Path, name, where: str, fix: str) -> Path:
    """root/name for a file the manifest names; refuses any name that could reach outside the bundle."""
    parts = name.split("/") if isinstance(name, str) else []
    if not parts or name.startswith("/") or any(c in ("", ".", "..") or "\\" in c or "\0" in c for c in parts):
        raise BundleError(f"{root / MANIFEST}: {where} names {name!r}, which is not a plain relative path inside the "
                          f"bundle (absolute paths, '..' and '.' are refused); the manifest was altered, {fix}")
    p = root
    for c in parts:
        p = p / c
        if p.is_symlink():
            raise BundleError(f"{root}: {p.relative_to(root)} is a symlink; bundles hold plain files only, so nothing "
                              f"outside them is read; {fix}")
    return p


def _check_types(m, mpath: Path, fix: str) -> None:
    """Malformed manifests are refused with a message, not a traceback."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise BundleError(f"{mpath}: {what}; the manifest is malformed, {fix}")

    need(isinstance(m, dict), f"the top level is {type(m).__name__}, not an object")
    need(isinstance(m.get("files", {}), dict), "'files' is not an object")
    need(isinstance(m.get("engines", {}), dict), "'engines' is not an object")
    for name, info in m.get("files", {}).items():
        need(isinstance(info, dict) and isinstance(info.get("sha256"), str) and type(info.get("bytes")) is int,
             f"files[{name!r}] needs 'sha256' (a string) and 'bytes' (an integer)")
    parts = m.get("parts", {})
    need(isinstance(parts, dict) and all(isinstance(p, dict) for p in parts.values()), "'parts' is not an object "
         "of objects")
    for pname, p in parts.items():
        for k in ("onnx", "engine"):
            need(p.get(k) is None or isinstance(p[k], str), f"parts[{pname!r}].{k} is not a string")
        rts = p.get("runtimes", {})
        need(isinstance(rts, dict) and all(isinstance(r, dict) and isinstance(r.get("graph", ""), str)
                                           for r in rts.values()), f"parts[{pname!r}].runtimes is malformed")
        ext = p.get("external_data", [])
        need(isinstance(ext, list) and all(isinstance(x, str) for x in ext), f"parts[{pname!r}].external_data is not "
             "a list of names")
    v = m.get("versions", {})
    need(isinstance(v, dict) and all(x is None or isinstance(x, str) for x in v.values()), "'versions' is malformed")


def load_manifest(bundle: str | Path, check_versions: bool = True, fmt: int = FORMAT,
                  kind: str = "engine bundle") -> dict:
    """Read and verify a bundle (kind "engine bundle") or calibration set: every listed file a plain file inside it
    with its SHA-256, no unlisted files, no symlinks, format and library versions compatible, and the signature if
    VIDRT_BUNDLE_KEY is set. Raises BundleError naming the problem and the fix."""
    root, fix = Path(bundle), FIX.get(kind, "re-export it")
    mpath = root / MANIFEST
    if mpath.is_symlink() or not mpath.is_file():
        raise BundleError(f"{root} is not {'an' if kind[0] in 'aeiou' else 'a'} {kind} (no {MANIFEST}); {fix}")
    try:
        m = json.loads(mpath.read_text())
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BundleError(f"{mpath} is not valid JSON ({e}); it is corrupt, {fix}") from e
    _check_types(m, mpath, fix)
    if m.get("digest") != _digest(m):
        raise BundleError(f"{mpath} was edited after export (its digest does not match); {fix}")
    key = os.environ.get(KEY_ENV)
    if key:
        sig = m.get("signature")
        sig = sig.get("hmac-sha256") if isinstance(sig, dict) else None
        if not isinstance(sig, str) or not hmac.compare_digest(sig, _sign(key, m["digest"])):
            raise BundleError(f"{mpath}: {'no' if sig is None else 'wrong'} signature for the key in {KEY_ENV}: it was "
                              f"not written with this key, or was edited since; {fix} with the key set")
    if m.get("format") != fmt:
        raise BundleError(f"{mpath}: format {m.get('format')!r}, this vidrt reads {fmt}; {fix}")
    files = m.get("files", {})
    paths = {name: _inside(root, name, "files", fix) for name in files}  # before any file is opened
    for dirpath, dirs, names in os.walk(root):
        for n in dirs + names:
            if (Path(dirpath) / n).is_symlink():
                raise BundleError(f"{root}: {(Path(dirpath) / n).relative_to(root)} is a symlink; bundles hold plain "
                                  f"files only, so nothing outside them is read; {fix}")
    for name, info in files.items():
        p = paths[name]
        if not p.is_file():
            raise BundleError(f"{root}: {name} is missing (partial {kind}); {fix}")
        if p.stat().st_size != info["bytes"] or sha256(p) != info["sha256"]:
            raise BundleError(f"{root}: {name} does not match its SHA-256 in {MANIFEST} (corrupt or edited); {fix}")
    extra = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()
                   and p.relative_to(root).as_posix() != MANIFEST and p.relative_to(root).as_posix() not in files)
    if extra:
        raise BundleError(f"{root}: files not in {MANIFEST}: {', '.join(extra)}; the {kind} was modified, {fix}")
    for pname, part in m.get("parts", {}).items():
        named = [part.get("onnx"), part.get("engine"), *part.get("external_data", [])] + \
            [r.get("graph") for r in part.get("runtimes", {}).values()]
        for f in (f for f in named if f is not None):  # "" too is refused: it would name the bundle itself
            _inside(root, f, f"parts[{pname!r}]", fix)
            if f not in files:
                raise BundleError(f"{mpath}: part file {f} is not listed with a hash; {fix}")
    if check_versions:
        have = versions()
        for lib in ("onnx", "tensorrt"):
            want = m.get("versions", {}).get(lib)
            if lib == "tensorrt" and not any(p.get("engine") for p in m.get("parts", {}).values()):
                continue  # no engines: any TensorRT (or none) is fine
            if lib == "tensorrt" and want and have.get(lib):  # engines: exact version unless version-compatible
                why = engine_incompatibility(want, have[lib], m.get("engines", {}).get("version_compatible", False))
                if why:
                    raise BundleError(f"bundle {root}: {why}")
            elif want and have.get(lib) and want.split(".")[0] != have[lib].split(".")[0]:
                raise BundleError(f"bundle built with {lib} {want}, this machine has {have[lib]}: "
                                  f"engines and graphs do not carry across major versions; re-export here")
            if lib == "tensorrt" and want and not have.get(lib):
                raise BundleError(f"bundle has TensorRT {want} engines but TensorRT is not installed; install "
                                  "it or load the ONNX parts with the onnxruntime backend")
    return m
