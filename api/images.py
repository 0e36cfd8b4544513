"""Uploaded images made into model inputs for /predict: format allow-list and pixel limits read from the
headers, JPEGs decoded at a reduced scale, a pixel budget per request, and few decodes at once."""

import os
import threading
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from api.errors import ApiError
from shared.config import get_settings
from shared.images import IMAGE_FORMATS, to_rgb

# Wider than this and the eval resize (shorter side -> ~1.14 x image_size) would allocate a huge strip.
MAX_ASPECT_RATIO = 100
# Decoding is CPU-bound: more concurrent decodes than cores only multiplies the memory they hold. The
# API's processes (TUNESERVE_API_WORKERS) share the cores, so each takes its part.
DECODE_SLOTS = threading.BoundedSemaphore(max(2, (os.cpu_count() or 2) // get_settings().api_workers))


def open_upload(path: Path, filename: str, *, max_pixels: int, draft_side: int) -> Image.Image:
    """Open an uploaded image without decoding it: format allow-list and pixel limit from the header;
    a JPEG is set to decode at the smallest DCT scale that still covers ``draft_side``."""
    try:
        image = Image.open(path, formats=IMAGE_FORMATS)
    except UnidentifiedImageError as exc:
        raise ApiError(415, "not_an_image", f"'{filename}' is not an image this service can read "
                       "(JPEG, PNG, WEBP, BMP, GIF or TIFF)") from exc
    except Image.DecompressionBombError as exc:  # Pillow's own process-wide backstop, when ours is set higher
        raise ApiError(422, "too_many_pixels", f"'{filename}' is refused by the image decoder: {exc}") from exc
    except Exception as exc:  # whatever a malformed header makes a decoder raise, it is the file's fault
        raise ApiError(422, "corrupt_image", f"'{filename}' is corrupt or truncated: {exc}") from exc
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise ApiError(422, "too_many_pixels", f"'{filename}' is {width}x{height}, over the {max_pixels} pixel "
                       "limit (TUNESERVE_MAX_IMAGE_PIXELS)")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        image.close()
        raise ApiError(422, "bad_aspect_ratio", f"'{filename}' is {width}x{height}; the longer side may be at "
                       f"most {MAX_ASPECT_RATIO} times the shorter one")
    image.draft("RGB", (draft_side, draft_side))
    return image


def decode_upload(image: Image.Image, filename: str) -> Image.Image:
    try:
        image.load()
        return to_rgb(ImageOps.exif_transpose(image) or image)
    except Exception as exc:  # whatever a malformed file makes a decoder raise, it is the file's fault
        raise ApiError(422, "corrupt_image", f"'{filename}' is corrupt or truncated: {exc}") from exc
    finally:
        image.close()


def prepare_images(files: list[tuple[str, Path]], *, image_size: int, max_pixels: int, max_request_pixels: int,
                   draft_side: int) -> Any:
    """Decode and centre-crop uploaded files into a uint8 N x 3 x S x S tensor (the first half of eval_transform).

    Every header is read first, so a request whose images together would decode to more than
    ``max_request_pixels`` is refused before any of them is decoded."""
    import torch

    from shared.modeling.transforms import eval_uint8, resize_size_for

    opened: list[Image.Image] = []
    try:
        for name, path in files:
            opened.append(open_upload(path, name, max_pixels=max_pixels,
                                      draft_side=max(draft_side, resize_size_for(image_size))))
        total = sum(image.size[0] * image.size[1] for image in opened)
        if total > max_request_pixels:
            raise ApiError(413, "too_many_pixels", f"the images of this request decode to {total // 10**6} "
                           f"megapixels, over the {max_request_pixels // 10**6} allowed per request "
                           "(TUNESERVE_PREDICT_MAX_REQUEST_MEGAPIXELS); send fewer or smaller images")
        crops = []
        for (name, _), image in zip(files, opened, strict=True):
            with DECODE_SLOTS:
                crops.append(eval_uint8(decode_upload(image, name), image_size))
        return torch.stack(crops)
    finally:
        for image in opened:
            image.close()
