"""Decode one uploaded image into the RGB square stored in the dataset cache."""

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from shared.images import IMAGE_FORMATS as FORMATS
from shared.images import to_rgb
from shared.modeling.transforms import center_square

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class ImageRejected(ValueError):
    pass


def decode_image(data: bytes, *, side: int, max_pixels: int, min_side: int) -> np.ndarray:
    """bytes -> uint8 ``side`` x ``side`` x 3 square; raises ImageRejected with a reason a user can act on."""
    # The limit is checked here, from the header, before a single pixel is decoded. Pillow's own
    # process-wide MAX_IMAGE_PIXELS stays a backstop: setting it per call would leak into other threads
    # and into the predictor's process.
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageRejected(f"{width}x{height} exceeds the {max_pixels} pixel limit "
                                    "(TUNESERVE_MAX_IMAGE_PIXELS); it may be a decompression bomb")
            if min(width, height) < min_side:
                raise ImageRejected(f"{width}x{height} is smaller than {min_side} px on its shorter side")
            image.seek(0)
            # A JPEG can decode straight at 1/2, 1/4 or 1/8 scale; draft keeps both sides >= side.
            image.draft("RGB", (side, side))
            image.load()
            upright = ImageOps.exif_transpose(image) or image
            return np.asarray(center_square(to_rgb(upright), side), dtype=np.uint8)
    except ImageRejected:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageRejected(f"decompression bomb refused: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageRejected("not a JPEG, PNG, WEBP, BMP, GIF or TIFF image") from exc
    except (OSError, SyntaxError, EOFError) as exc:
        raise ImageRejected(f"corrupt or truncated image: {exc}") from exc
    except Exception as exc:  # decoders raise many types on hostile bytes; one bad file must not end the dataset
        raise ImageRejected(f"could not decode the image: {type(exc).__name__}: {exc}") from exc
