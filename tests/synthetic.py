"""Learnable generated image datasets: each class has its own colour, plus noise and a random shape."""

import io
import random
import zipfile
from pathlib import Path

from PIL import Image, ImageDraw

PALETTE = {
    "red": (200, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 200), "yellow": (220, 200, 40),
    "purple": (140, 50, 170), "cyan": (40, 190, 200), "orange": (230, 130, 30), "gray": (128, 128, 128),
}


def make_image(label: str, rng: random.Random, size: int = 48) -> Image.Image:
    base = PALETTE[label]
    jitter = [max(0, min(255, c + rng.randint(-25, 25))) for c in base]
    image = Image.new("RGB", (size + rng.randint(0, 16), size + rng.randint(0, 16)), tuple(jitter))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x, y = rng.randint(0, size - 8), rng.randint(0, size - 8)
        r = rng.randint(4, size // 3)
        shade = tuple(rng.randint(0, 255) for _ in range(3))
        draw.ellipse((x, y, x + r, y + r), fill=shade) if rng.random() < 0.5 else draw.rectangle(
            (x, y, x + r, y + r), fill=shade)
    return image


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def make_zip(path: Path, *, classes: list[str], per_class: int, seed: int = 0, size: int = 48,
             wrapper: str = "") -> Path:
    """A zip of class sub-folders (optionally inside one wrapper folder), JPEG images."""
    rng = random.Random(seed)
    with zipfile.ZipFile(path, "w") as archive:
        for label in classes:
            for i in range(per_class):
                archive.writestr(f"{wrapper}{label}/{label}_{i:04d}.jpg", jpeg_bytes(make_image(label, rng, size)))
    return path


def make_heldout(classes: list[str], per_class: int, seed: int = 999, size: int = 48) -> list[tuple[str, bytes]]:
    rng = random.Random(seed)
    return [(label, jpeg_bytes(make_image(label, rng, size))) for label in classes for _ in range(per_class)]
