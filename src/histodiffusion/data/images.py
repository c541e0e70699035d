"""Robust image decoding: any common tile format to an RGB uint8 array, or a clear failure; tiles
<-> tensors.

Grayscale is replicated to three channels, alpha is composited over white (the colour of glass
in a bright-field scan), 16-bit and float images are rescaled to 8 bits, palette images are
expanded. Truncated or corrupt files raise :class:`ImageReadError` naming the file.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")

# Large fields (a 2220 x 2967 region) are legitimate input; whole slides go through openslide.
Image.MAX_IMAGE_PIXELS = 20_000 * 20_000


class ImageReadError(Exception):
    """A file that is not a readable image; ``str()`` names the file and the reason."""


def is_image_file(path: str | Path) -> bool:
    """True when the suffix is one of the supported tile formats (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Rescale an integer or float array of any depth to uint8 (0-255)."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.integer):
        # 16-bit data stored in wider types (PIL's mode "I") still spans 0..65535.
        top = 255 if arr.max(initial=0) <= 255 else (65535 if arr.max(initial=0) <= 65535 else arr.max())
        return np.clip(np.round(arr.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)
    arr = np.nan_to_num(arr.astype(np.float64))
    top = 1.0 if arr.max(initial=0.0) <= 1.0 else arr.max()
    return np.clip(np.round(arr / top * 255.0), 0, 255).astype(np.uint8)


def _to_rgb(arr: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, 1|2|3|4) or channel-first arrays of uint8 to (H, W, 3) uint8 over white."""
    if arr.ndim == 3 and arr.shape[0] in (1, 2, 3, 4) and arr.shape[-1] not in (1, 2, 3, 4):
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise ValueError(f"unsupported array shape {arr.shape}")
    channels = arr.shape[-1]
    if channels in (2, 4):  # gray+alpha or RGBA: composite over a white background
        color, alpha = arr[..., :-1].astype(np.float32), arr[..., -1:].astype(np.float32) / 255.0
        arr = np.round(color * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
        channels -= 1
    if channels == 1:
        arr = np.repeat(arr, 3, axis=-1)
    elif channels != 3:
        raise ValueError(f"unsupported channel count {channels}")
    return np.ascontiguousarray(arr)


def _read_tiff(path: Path) -> np.ndarray:
    import tifffile

    arr = tifffile.imread(path, key=0)
    return _to_rgb(_to_uint8(np.asarray(arr)))


def _read_pil(path: Path) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL warns on odd metadata; failures still raise
        with Image.open(path) as img:
            img.load()
            if img.mode == "P":
                img = img.convert("RGBA" if "transparency" in img.info else "RGB")
            elif img.mode == "CMYK" or img.mode == "YCbCr" or img.mode == "LAB" or img.mode == "HSV":
                img = img.convert("RGB")
            elif img.mode == "PA":
                img = img.convert("RGBA")
            elif img.mode == "1":
                img = img.convert("L")
            arr = np.asarray(img)
    return _to_rgb(_to_uint8(arr))


def read_rgb(path: str | Path) -> np.ndarray:
    """Decode an image file to an (H, W, 3) uint8 RGB array.

    Raises:
        ImageReadError: the file is missing, truncated, corrupt or not an image.
    """
    path = Path(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            try:
                return _read_tiff(path)
            except Exception:  # not every TIFF is tifffile-readable (JPEG-in-TIFF): try PIL
                return _read_pil(path)
        return _read_pil(path)
    except FileNotFoundError as err:
        raise ImageReadError(f"{path}: file not found") from err
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ImageReadError(f"{path}: cannot decode image ({err})") from err


def image_size(path: str | Path) -> tuple[int, int] | None:
    """(width, height) from the file's header, without decoding the pixels; None when unknown."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as img:
                return img.size
    except Exception:  # unreadable files are reported when the tile cache decodes them
        return None


def center_square(arr: np.ndarray) -> np.ndarray:
    """Centre crop (H, W, C) to the largest square."""
    h, w = arr.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return arr[top : top + side, left : left + side]


def resize_square(arr: np.ndarray, resolution: int) -> np.ndarray:
    """Centre-crop to a square and resize to ``resolution`` px with an antialiasing filter."""
    arr = center_square(arr)
    if arr.shape[0] == resolution:
        return np.ascontiguousarray(arr)
    img = Image.fromarray(arr)
    # BOX averages whole pixels when shrinking (no aliasing of nuclei); LANCZOS when enlarging.
    resample = Image.Resampling.BOX if arr.shape[0] > resolution else Image.Resampling.LANCZOS
    return np.asarray(img.resize((resolution, resolution), resample=resample))


def load_tile(path: str | Path, resolution: int) -> np.ndarray:
    """Decode ``path`` and return a (resolution, resolution, 3) uint8 tile."""
    return resize_square(read_rgb(path), resolution)


def save_png(path: str | Path, arr: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 array as PNG atomically."""
    from histodiffusion.io import atomic_path

    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")


def tiles_to_tensor(tiles: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) uint8 tiles -> (N, 3, H, W) float32 in [-1, 1]."""
    t = tiles if isinstance(tiles, torch.Tensor) else torch.as_tensor(np.ascontiguousarray(tiles))
    return t.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def tensor_to_tiles(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) float in [-1, 1] -> (N, H, W, 3) uint8 (clamped, rounded)."""
    x = images.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()
