"""Image decoding rules shared by ingestion and the predictor (no torch: the API imports this at start)."""

import numpy as np
from PIL import Image

# Only these decoders ever see user bytes: a file named .jpg may be anything Pillow can open,
# and some plugins (EPS) would hand it to an external program. Camera MPO files open through JPEG.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
# Rows scaled at a time when a 16-bit image comes down to 8 bits: bounds the float copy to a strip.
_STRIP_ROWS = 256


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as ingestion makes it: 16-bit greys scaled down, transparency composited onto white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image)
        scale = 255.0 / max(float(array.max()), 255.0)
        out = np.empty(array.shape, dtype=np.uint8)
        for top in range(0, array.shape[0], _STRIP_ROWS):  # never a full-size float copy
            strip = array[top:top + _STRIP_ROWS].astype(np.float32)
            out[top:top + _STRIP_ROWS] = np.clip(strip * scale, 0, 255)
        image = Image.fromarray(out, mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
