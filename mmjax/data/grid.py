"""Image grids: look at a batch of data or samples as one PNG.

    save_image_grid(batch["image"][:16], "samples.png", captions=texts, value_range=(-1, 1))
    grid = make_image_grid(images)        # uint8 [H, W, 3], e.g. for TensorBoard

Layout (ncols columns, rows = ceil(N / ncols), row-major; white background):

    margin | tile | margin | tile | margin        tile = image upscaled ×scale (nearest)
           | caption |       | caption |                 + caption strip under it (if captions)

Small images are upscaled by an integer factor (nearest neighbour, so pixels stay sharp squares)
until their short side is at least MIN_TILE pixels: an 8×8 digit becomes 96×96, 32×32 becomes
96×96, and images already that large are left alone. Captions are wrapped to the tile width in
PIL's default font and cut after MAX_CAPTION_LINES lines ("..." marks the cut).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

MIN_TILE = 96  # default upscaling target for the short side of a tile, pixels
MARGIN = 4  # pixels between tiles and around the grid
MAX_CAPTION_LINES = 6
_BACKGROUND = 255
_TEXT = (0, 0, 0)


def _to_uint8(images, value_range) -> np.ndarray:
    """[N, H, W, C] (C = 1 or 3) -> uint8 [N, H, W, 3]."""
    x = np.asarray(images)
    if x.ndim != 4:
        hint = (" (one image: images[None]; grey [N, H, W]: images[..., None])" if x.ndim == 3 else "")
        raise ValueError(f"images must be [N, H, W, C] with C = 1 or 3, got shape {x.shape}{hint}")
    if x.shape[-1] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels (last axis), got shape {x.shape}")
    if 0 in x.shape[:3]:
        raise ValueError(f"images must hold at least one non-empty image, got shape {x.shape}")
    if x.dtype == np.uint8:
        out = x  # Shown as they are; value_range applies to other dtypes.
    else:
        if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_) or np.iscomplexobj(x):
            raise ValueError(f"images must be real numbers, got dtype {x.dtype}")
        x = x.astype(np.float64)
        finite = np.isfinite(x)
        if not finite.all():
            warnings.warn(f"{(~finite).sum()} non-finite pixel values (NaN / inf) are drawn as the "
                          "low end of value_range", RuntimeWarning, stacklevel=3)
        if isinstance(value_range, str):
            if value_range != "auto":
                raise ValueError(f"value_range must be (low, high) or 'auto', got {value_range!r}")
            low, high = (float(x[finite].min()), float(x[finite].max())) if finite.any() else (0.0, 1.0)
            high = high if high > low else low + 1  # A constant batch: drawn at the low end (black).
        else:
            try:
                low, high = (float(v) for v in value_range)
            except (TypeError, ValueError):
                raise ValueError(f"value_range must be (low, high) or 'auto', got {value_range!r}") from None
            if not high > low:
                raise ValueError(f"value_range needs low < high, got {value_range!r}")
        unit = np.clip((np.where(finite, x, low) - low) / (high - low), 0, 1)
        out = np.round(unit * 255).astype(np.uint8)
    return np.repeat(out, 3, axis=-1) if out.shape[-1] == 1 else out


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # PIL's bundled TrueType font (needs FreeType)
    except (ImportError, OSError, TypeError):
        return ImageFont.load_default()  # the fixed-size bitmap font


def _line_height(font) -> int:
    if hasattr(font, "getmetrics"):
        ascent, descent = font.getmetrics()
        return ascent + descent + 1
    return font.getbbox("Agjy|")[3] + 2


def _wrap(text: str, font, width: int) -> list[str]:
    """Greedy word wrap to `width` pixels; words wider than a line are broken by characters;
    newlines in the text start new lines."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}" if line else word
            if font.getlength(candidate) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            line = ""
            for ch in word:  # Starts a new line; breaks the word if it is wider than one.
                if line and font.getlength(line + ch) > width:
                    lines.append(line)
                    line = ""
                line += ch
        lines.append(line)
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _cut(lines: list[str], font, width: int) -> list[str]:
    if len(lines) <= MAX_CAPTION_LINES:
        return lines
    last = lines[MAX_CAPTION_LINES - 1]
    while last and font.getlength(last + "...") > width:
        last = last[:-1]
    return lines[:MAX_CAPTION_LINES - 1] + [last + "..."]


def make_image_grid(images, *, captions: Sequence[str | None] | None = None, ncols: int | None = None,
                    value_range: tuple[float, float] | str = (0, 1), scale: int | None = None,
                    font_size: int | None = None) -> np.ndarray:
    """Tiles N images into one uint8 [H, W, 3] picture (the layout in the module docstring).

    Args:
      images: [N, H, W, C], C = 1 (grey) or 3 (RGB); uint8 as it is, or any real dtype (NumPy,
        JAX, lists) mapped from value_range to 0..255.
      captions: N strings (None or "" for none), drawn under the tiles.
      ncols: columns; default ceil(sqrt(N)); more than N gives N.
      value_range: (low, high) of non-uint8 images, values outside clipped; "auto": the batch's
        own min and max (one range for all images, so their brightness stays comparable).
      scale: integer upscaling factor (nearest); default the smallest that makes the short side
        at least MIN_TILE (96) pixels, 1 for images already that large.
      font_size: caption font size in pixels; default tile width / 8, within 10..18.

    Returns:
      uint8 [rows·(h + c) + (rows + 1)·MARGIN, ncols·w + (ncols + 1)·MARGIN, 3] with h, w the tile
      size and c the caption strip height (0 without captions).
    """
    pixels = _to_uint8(images, value_range)
    n, h, w, _ = pixels.shape
    if scale is None:
        scale = max(1, math.ceil(MIN_TILE / min(h, w)))
    if not isinstance(scale, (int, np.integer)) or isinstance(scale, bool) or scale < 1:
        raise ValueError(f"scale must be a positive int, got {scale!r}")
    if ncols is None:
        ncols = math.ceil(math.sqrt(n))
    if not isinstance(ncols, (int, np.integer)) or isinstance(ncols, bool) or ncols < 1:
        raise ValueError(f"ncols must be a positive int, got {ncols!r}")
    ncols = min(int(ncols), n)
    nrows = math.ceil(n / ncols)
    if captions is not None and (isinstance(captions, str) or len(captions) != n):
        got = "a string" if isinstance(captions, str) else f"{len(captions)}"
        raise ValueError(f"captions must be a sequence of {n} strings (one per image), got {got}")
    tiles = pixels.repeat(scale, axis=1).repeat(scale, axis=2)
    tile_h, tile_w = h * scale, w * scale

    font = wrapped = None
    caption_h = 0
    if captions is not None:
        font = _font(font_size or min(18, max(10, tile_w // 8)))
        wrapped = [_cut(_wrap(str(c), font, tile_w), font, tile_w) if c else [] for c in captions]
        most = max(len(lines) for lines in wrapped)
        caption_h = most * _line_height(font) + 2 if most else 0

    cell_h = tile_h + caption_h
    canvas = np.full((nrows * cell_h + (nrows + 1) * MARGIN, ncols * tile_w + (ncols + 1) * MARGIN, 3),
                     _BACKGROUND, np.uint8)
    for i, tile in enumerate(tiles):
        row, col = divmod(i, ncols)
        top, left = MARGIN + row * (cell_h + MARGIN), MARGIN + col * (tile_w + MARGIN)
        canvas[top:top + tile_h, left:left + tile_w] = tile
    if not caption_h:
        return canvas

    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    line_h = _line_height(font)
    for i, lines in enumerate(wrapped):
        row, col = divmod(i, ncols)
        top = MARGIN + row * (cell_h + MARGIN) + tile_h + 2
        left = MARGIN + col * (tile_w + MARGIN)
        for k, line in enumerate(lines):
            draw.text((left, top + k * line_h), line, fill=_TEXT, font=font)
    return np.asarray(picture)


def save_image_grid(images, path: str | os.PathLike, *, captions: Sequence[str | None] | None = None,
                    ncols: int | None = None, value_range: tuple[float, float] | str = (0, 1),
                    scale: int | None = None, font_size: int | None = None) -> Path:
    """Writes `make_image_grid(images, ...)` to `path` as a PNG (whatever the suffix; parent
    folders are created) and returns the path. Arguments as in `make_image_grid`."""
    grid = make_image_grid(images, captions=captions, ncols=ncols, value_range=value_range,
                           scale=scale, font_size=font_size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path, format="PNG")
    return path
