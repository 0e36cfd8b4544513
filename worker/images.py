"""Decode one uploaded image into the RGB square stored in the dataset cache."""

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from shared.modeling.transforms import center_square

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class ImageRejected(ValueError):
    pass


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        high = array.max() or 1.0
        image = Image.fromarray((array * (255.0 / max(high, 255.0))).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes, *, side: int, max_pixels: int, min_side: int) -> np.ndarray:
    """bytes -> uint8 HxWx3 square of ``side``; raises ImageRejected with a reason a user can act on."""
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if image.width * image.height > max_pixels:
                    raise ImageRejected(
                        f"{image.width}x{image.height} exceeds the {max_pixels} pixel limit"
                    )
                image.seek(0)
                image.load()
                image = ImageOps.exif_transpose(image) or image
                if min(image.size) < min_side:
                    raise ImageRejected(f"{image.width}x{image.height} is smaller than {min_side} px")
                rgb = _to_rgb(image)
                return np.asarray(center_square(rgb, side), dtype=np.uint8)
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected(f"decompression bomb refused: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageRejected("not a recognised image format") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageRejected(f"corrupt or truncated image: {exc}") from exc
