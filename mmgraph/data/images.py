"""Images a dataset names: paths confined to their folder, and files opened safely (only the
formats listed, no decompression bombs). Preprocessing, the training loader and ``generate``
all read images here."""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from typing import Optional

from mmgraph.data.transforms import square_fits


class UnsafePath(ValueError):
    """An image path that would leave its folder (absolute, ``..``, a link pointing out)."""


class BadImage(ValueError):
    """An image that cannot be read (missing, not an image, a decompression bomb)."""


def confined(folder: Optional[str | Path], name: str) -> Path:
    """``folder / name``, resolved, refused unless it stays inside ``folder``."""
    if not isinstance(name, str) or not name:
        raise UnsafePath(f"image path {name!r} is not a non-empty string")
    if Path(name).is_absolute() or "\x00" in name:
        raise UnsafePath(f"image path {name!r} is absolute; paths are relative to the image folder")
    base = _resolved(os.path.abspath(folder if folder is not None else "."))
    path = (base / name).resolve()
    if path != base and base not in path.parents:
        raise UnsafePath(f"image path {name!r} leaves the image folder {base}")
    return path


@functools.lru_cache(maxsize=64)
def _resolved(folder: str) -> Path:
    return Path(folder).resolve()


# The formats an image may have, by content (PIL otherwise picks any plug-in it has: a PostScript
# file named .png would reach Ghostscript).
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


def open_image(path: Path, decode: bool = True):
    """The image at ``path`` as RGB, fully decoded. Only ``IMAGE_FORMATS``; a decompression bomb
    is an error (PIL checks the size when it opens the file), and so is an image whose padded
    square would be one (a 1 x 60000 strip): both before any pixel is decoded. ``decode=False``
    only opens and verifies the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=IMAGE_FORMATS) as img:
                too_big = square_fits(*img.size)
                if too_big:
                    raise BadImage(f"image {path.name} is too large to decode safely: {too_big}")
                if not decode:
                    img.verify()
                    return None
                img.load()
                return img.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadImage(f"image {path.name} is too large to decode safely ({err})") from None
    except FileNotFoundError:
        raise BadImage(f"image {path} not found") from None
    except UnidentifiedImageError:
        raise BadImage(f"image {path.name} cannot be read: not one of {', '.join(IMAGE_FORMATS)}") from None
    except (OSError, SyntaxError, ValueError, MemoryError) as err:
        if isinstance(err, BadImage):
            raise
        first = str(err).splitlines()[0] if str(err) else err.__class__.__name__
        raise BadImage(f"image {path.name} cannot be read: {first}") from None
