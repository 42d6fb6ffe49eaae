"""Write frames to mp4 (H.264 through the ffmpeg binary shipped by imageio-ffmpeg) or gif (Pillow).

Overwrite rule: an existing file is replaced only with overwrite=True (--overwrite), and then atomically: the video is
written to a hidden temporary file in the same folder and renamed over the old one, so a killed run leaves the old file
byte-identical; its hidden `.NAME.PID.*.partial.mp4` is removed by the next save to that name."""
from __future__ import annotations

import glob
import os
import tempfile
from pathlib import Path

import numpy as np

from vidrt.core.bundle import pid_alive
from vidrt.core.errors import ConfigError
from vidrt.core.memory import memory_limit


def upscale(frames: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour upscale of uint8 (T, H, W, 3); the pixels stay the model's own."""
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    return frames if scale == 1 else frames.repeat(scale, axis=1).repeat(scale, axis=2)


def check_output(path: str | Path, overwrite: bool = False, suffixes: tuple[str, ...] = (".mp4", ".gif")) -> Path:
    """Refuse, before any work, an output that cannot be written: wrong suffix, existing file without `overwrite`,
    a folder, or a location where no file can be created (probed by creating and removing a temporary file)."""
    path = Path(path)
    if suffixes and path.suffix.lower() not in suffixes:
        raise ConfigError(f"unsupported output format {path.suffix.lower()!r} for {path}: use {' or '.join(suffixes)}")
    if path.is_dir():
        raise ConfigError(f"{path} is a folder; give a file name")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite (overwrite=True) or choose another name")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:  # save_video creates the missing folders
        folder = folder.parent
    if not folder.is_dir():
        raise ConfigError(f"cannot write {path}: {folder} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".vidrt-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"cannot write {path}: {e.strerror} in {folder}; choose another output path") from None
    return path


def save_video(frames: np.ndarray, path: str | Path, fps: int = 8, scale: int = 1, overwrite: bool = False) -> Path:
    """frames: uint8 (T, H, W, 3). The suffix picks the format: .mp4 or .gif. Written to a temporary file in the same
    folder, then moved into place in one step: a killed write never leaves a partial video, and an existing file is
    replaced only with `overwrite` (otherwise FileExistsError, also if the file appears meanwhile)."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    path = check_output(path, overwrite)
    suffix = path.suffix.lower()
    if isinstance(scale, bool) or not isinstance(scale, (int, np.integer)) or scale < 1:
        raise ConfigError(f"scale must be an integer >= 1, got {scale!r}")
    limit, source = memory_limit()
    if frames.nbytes * scale * scale > limit:  # the upscaled copy is held in memory while it is encoded
        raise ConfigError(f"saving at scale {scale} needs {frames.nbytes * scale * scale / 2 ** 30:.3g} GiB but the "
                          f"limit is {limit / 2 ** 30:.3g} GiB ({source}); use a smaller scale or raise the limit "
                          "with VIDRT_MAX_MEMORY_GB")
    frames = upscale(frames, scale)
    if suffix == ".mp4" and (frames.shape[1] % 2 or frames.shape[2] % 2):
        raise ValueError(f"H.264 needs even height and width, got {frames.shape[1]}x{frames.shape[2]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_partials(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=f".partial{suffix}", dir=path.parent)
    os.close(fd)
    try:
        _write(frames, Path(tmp), fps, suffix)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a video is as readable as any file the user writes
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if the name appeared meanwhile: nothing is clobbered
            os.unlink(tmp)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _remove_dead_partials(path: Path) -> None:
    """Temporary files of killed writers to this name (their PID is gone); a live writer's file is left alone."""
    for p in path.parent.glob(f".{glob.escape(path.name)}.*.partial{path.suffix.lower()}"):  # names may hold * ? [
        pid = p.name[len(path.name) + 2:].split(".")[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            p.unlink(missing_ok=True)


def _write(frames: np.ndarray, path: Path, fps: int, suffix: str) -> None:
    if suffix == ".mp4":
        import imageio_ffmpeg
        T, H, W, _ = frames.shape
        writer = imageio_ffmpeg.write_frames(str(path), (W, H), fps=fps, codec="libx264", pix_fmt_out="yuv420p",
                                             quality=9, macro_block_size=1, ffmpeg_log_level="error")
        writer.send(None)
        for f in frames:
            writer.send(np.ascontiguousarray(f))
        writer.close()
    else:
        from PIL import Image
        imgs = [Image.fromarray(f) for f in frames]
        imgs[0].save(path, format="GIF", save_all=True, append_images=imgs[1:], duration=int(1000 / fps), loop=0)


def read_video(path: str | Path) -> np.ndarray:
    """Read an mp4/gif back as uint8 (T, H, W, 3)."""
    path = Path(path)
    if path.suffix.lower() == ".gif":
        from PIL import Image, ImageSequence
        with Image.open(path) as im:
            return np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)])
    import imageio_ffmpeg
    gen = imageio_ffmpeg.read_frames(str(path))
    meta = next(gen)
    W, H = meta["size"]
    return np.stack([np.frombuffer(b, np.uint8).reshape(H, W, 3) for b in gen])
