"""Loads trained models and runs inference for /predict. The only API module that imports torch."""

import io
import logging
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from api.errors import ApiError
from shared.config import Settings
from shared.storage import model_dir

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model_id: str
    model: Any  # torch.nn.Module; typed loosely so this module imports without torch
    meta: dict[str, Any]
    device: Any

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    def infer(self, images: list[Image.Image]) -> Any:
        """Softmax probabilities (a CPU float tensor, N x classes) for PIL images."""
        import torch

        from shared.modeling import eval_transform

        batch = torch.stack([
            eval_transform(img, image_size=self.meta["image_size"], mean=tuple(self.meta["mean"]),
                           std=tuple(self.meta["std"]))
            for img in images
        ]).to(self.device)
        with torch.inference_mode():
            return torch.softmax(self.model(batch).float(), dim=1).cpu()


def decode_upload(data: bytes, filename: str, max_pixels: int) -> Image.Image:
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
            return (ImageOps.exif_transpose(image) or image).convert("RGB")
    except UnidentifiedImageError as exc:
        raise ApiError(415, "not_an_image", f"'{filename}' is not an image this service can read "
                       "(JPEG, PNG, WEBP, BMP, GIF or TIFF)") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ApiError(422, "image_too_large", f"'{filename}' has too many pixels: {exc}") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ApiError(422, "corrupt_image", f"'{filename}' is corrupt or truncated: {exc}") from exc


class Predictor:
    """A small LRU of loaded models. A model that is not loaded yet is loaded once, under a lock;
    while the newest model loads in the background, requests keep being served by the current one."""

    def __init__(self, settings: Settings, capacity: int = 3) -> None:
        self.settings = settings
        self.capacity = capacity
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Event] = {}
        self.active: str | None = None

    def _device(self) -> Any:
        import torch

        want = self.settings.device
        return torch.device("cuda" if want == "cuda" or (want == "auto" and torch.cuda.is_available()) else "cpu")

    def _load(self, model_id: str) -> LoadedModel:
        from shared.modeling import load_model_artifact

        directory: Path = model_dir(self.settings, model_id)
        device = self._device()
        model, meta = load_model_artifact(directory=directory, device=device)
        return LoadedModel(model_id=model_id, model=model, meta=meta, device=device)

    def get(self, model_id: str) -> LoadedModel:
        """The loaded model, loading it now if needed (blocking)."""
        with self._lock:
            if model_id in self._models:
                self._models.move_to_end(model_id)
                return self._models[model_id]
            event = self._loading.get(model_id)
            owner = event is None
            if owner:
                event = self._loading[model_id] = threading.Event()
        if not owner:
            event.wait()
            with self._lock:
                if model_id in self._models:
                    return self._models[model_id]
            raise ApiError(503, "model_unavailable", f"model {model_id} could not be loaded")
        try:
            loaded = self._load(model_id)
        except FileNotFoundError as exc:
            raise ApiError(503, "model_unavailable", f"model {model_id}'s files are missing") from exc
        finally:
            with self._lock:
                self._loading.pop(model_id, None)
            event.set()
        with self._lock:
            self._models[model_id] = loaded
            while len(self._models) > self.capacity:
                victim = next((k for k in self._models if k not in (self.active, model_id)), None)
                if victim is None:
                    break
                del self._models[victim]
        return loaded

    def serving(self, wanted: str) -> LoadedModel:
        """The model to serve when ``wanted`` is the newest/pinned one: swap in only once it is loaded."""
        with self._lock:
            ready = wanted in self._models
            active = self._models.get(self.active) if self.active else None
        if ready or active is None:
            loaded = self.get(wanted)
            self.active = wanted
            return loaded
        if wanted not in self._loading:
            threading.Thread(target=self._swap_in, args=(wanted,), daemon=True, name=f"load-{wanted}").start()
        return active

    def _swap_in(self, model_id: str) -> None:
        try:
            self.get(model_id)
            self.active = model_id
            log.info("now serving model %s", model_id)
        except Exception:
            log.exception("background load of model %s failed", model_id)
