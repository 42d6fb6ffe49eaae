"""Write frames to mp4 (H.264 through the ffmpeg binary shipped by imageio-ffmpeg) or gif (Pillow)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def upscale(frames: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour upscale of uint8 (T, H, W, 3); the pixels stay the model's own."""
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    return frames if scale == 1 else frames.repeat(scale, axis=1).repeat(scale, axis=2)


def save_video(frames: np.ndarray, path: str | Path, fps: int = 8, scale: int = 1) -> Path:
    """frames: uint8 (T, H, W, 3). The suffix picks the format: .mp4 or .gif."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    path = Path(path)
    frames = upscale(frames, scale)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".mp4":
        import imageio_ffmpeg
        T, H, W, _ = frames.shape
        if H % 2 or W % 2:
            raise ValueError(f"H.264 needs even height and width, got {H}x{W}")
        writer = imageio_ffmpeg.write_frames(str(path), (W, H), fps=fps, codec="libx264", pix_fmt_out="yuv420p",
                                             quality=9, macro_block_size=1, ffmpeg_log_level="error")
        writer.send(None)
        for f in frames:
            writer.send(np.ascontiguousarray(f))
        writer.close()
    elif suffix == ".gif":
        from PIL import Image
        imgs = [Image.fromarray(f) for f in frames]
        imgs[0].save(path, save_all=True, append_images=imgs[1:], duration=int(1000 / fps), loop=0)
    else:
        raise ValueError(f"unsupported video format {suffix!r}: use .mp4 or .gif")
    return path


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
