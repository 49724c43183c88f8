"""Image files opened with a bound on what decoding them may cost.

An image's header says how large it is before any pixel is decoded; a few hundred bytes of PNG
can declare 100 000 × 100 000 pixels (30 GB as RGB). Every dataset reads its image files
through `open_image`, which refuses such a file from its header, naming it."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from raysim.data.datasets import DatasetFormatError

# 8192 × 8192: 192 MiB decoded as RGB (768 MiB as float32). The datasets raysim reads hold
# images of at most a few thousand pixels a side.
MAX_IMAGE_PIXELS = 8192 * 8192


@contextmanager
def open_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> Iterator[Any]:
    """The PIL image in `path`, opened lazily (nothing decoded yet); DatasetFormatError naming
    the file when its header declares more than `max_pixels` pixels."""
    from PIL import Image

    try:
        with warnings.catch_warnings():  # Pillow warns first, then refuses at twice its limit
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError:  # Pillow's own limit, above ours
        declared = f"it declares more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels"
        raise DatasetFormatError(_too_large(path, declared, max_pixels)) from None
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise DatasetFormatError(_too_large(path, f"it declares {width} × {height} pixels",
                                                max_pixels))
        yield image


def _too_large(path: str | Path, what: str, max_pixels: int) -> str:
    side = int(max_pixels ** 0.5)
    return (f"image {path} is too large to decode ({what}; at most {max_pixels:,} pixels, "
            f"e.g. {side} × {side}): a decompression bomb or a damaged header; replace or "
            "remove the file")
