"""`vidrt batch`'s files: results.jsonl (append + fsync, atomic rewrite) and one driver per folder (a lock the kernel
drops when the driver dies, even by SIGKILL). Videos go through core/bundle.write_atomic."""
import fcntl
import json
import os
import tempfile
from pathlib import Path

from vidrt.core.errors import ConfigError


class Results:
    """results.jsonl: records are appended and fsynced as items finish; a load keeps the last valid record of each
    item (a line cut by a kill is dropped) and rewrites the file atomically, so records never repeat."""

    def __init__(self, folder: Path):
        self.path = folder / "results.jsonl"

    def load(self) -> dict[str, dict]:
        recs = {}
        if self.path.exists():
            for s in self.path.read_text().splitlines():
                try:
                    r = json.loads(s)
                    recs[r["key"]] = r
                except (ValueError, KeyError, TypeError):
                    continue
        return recs

    def rewrite(self, recs: list[dict]) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".results.", suffix=".partial", dir=self.path.parent)
        with os.fdopen(fd, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in recs)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are as readable as the videos
        os.replace(tmp, self.path)

    def append(self, rec: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _lock(folder: Path):
    """One driver per DIR; the kernel drops the lock when the driver dies, even by SIGKILL."""
    f = open(folder / ".vidrt-batch.lock", "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise ConfigError(f"another vidrt batch is writing {folder}; wait for it or choose another --out") from None
    return f
