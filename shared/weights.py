"""Where starting weights live, readable without torch: the API checks a job's weights up front with it,
and ``tuneserve weights download`` fills the cache the workers read.

torchvision names each ImageNet file ``<arch>-<first 8 hex of its SHA-256>.pth`` and keeps it in
``$TORCH_HOME/hub/checkpoints`` (torch.hub.get_dir()); build_model reads it from there and never
downloads. tests/test_weights.py checks this table against torchvision's own enums.
"""

import hashlib
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path

from shared.hyperparameters import Hyperparameters

URL_BASE = "https://download.pytorch.org/models/"
IMAGENET_FILES = {
    "resnet18": "resnet18-f37072fd.pth",
    "resnet34": "resnet34-b627a593.pth",
    "resnet50": "resnet50-11ad3fa6.pth",
    "resnet101": "resnet101-cd907fc2.pth",
}
_CHUNK = 1 << 20


class WeightsError(RuntimeError):
    pass


def hub_checkpoints() -> Path:
    """torch.hub.get_dir() / "checkpoints", by the same rules (TORCH_HOME, then XDG_CACHE_HOME)."""
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "torch")
    return Path(torch_home).expanduser() / "hub" / "checkpoints"


def imagenet_file(base_model: str) -> Path:
    return hub_checkpoints() / IMAGENET_FILES[base_model]


def missing_weights(hp: Hyperparameters, *, weights_dir: Path) -> str | None:
    """Why a worker sharing this machine's TORCH_HOME and WEIGHTS_DIR could not load ``hp.weights``."""
    if hp.weights == "none":
        return None
    if hp.weights == "imagenet":
        path = imagenet_file(hp.base_model)
        if path.is_file():
            return None
        return (f"ImageNet weights for {hp.base_model} are not in the torch cache ({path.parent}): run "
                f"`tuneserve weights download --base-model {hp.base_model}` where there is internet (or copy "
                f"{path.name} there), or train with weights 'none' or a file in WEIGHTS_DIR")
    if (weights_dir / hp.weights).is_file():
        return None
    return f"weights file {hp.weights} is not in WEIGHTS_DIR ({weights_dir})"


def sha256_prefix(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()[:8]


def expected_prefix(base_model: str) -> str:
    return IMAGENET_FILES[base_model].rsplit("-", 1)[1].split(".")[0]


def install(base_model: str, *, source: str | None = None, url_base: str = URL_BASE) -> tuple[Path, str]:
    """Put ``base_model``'s ImageNet file into the hub cache, checking its SHA-256 against the name;
    returns (path, "present" | "installed"). ``source`` is a local file to copy in instead of downloading
    (for hosts without internet). A file that fails the check is never left in the cache."""
    target = imagenet_file(base_model)
    want = expected_prefix(base_model)
    if source is None and target.is_file():
        if sha256_prefix(target) == want:
            return target, "present"
        target.unlink()  # a truncated or corrupt copy would fail every job that starts from it
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=".partial-", delete=False) as tmp:
        partial = Path(tmp.name)
        try:
            if source is not None:
                with open(source, "rb") as handle:
                    shutil.copyfileobj(handle, tmp, _CHUNK)
            else:
                with urllib.request.urlopen(url_base + IMAGENET_FILES[base_model], timeout=60) as response:
                    shutil.copyfileobj(response, tmp, _CHUNK)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
    got = sha256_prefix(partial)
    if got != want:
        partial.unlink()
        raise WeightsError(f"{IMAGENET_FILES[base_model]}: SHA-256 starts {got}, expected {want}; not installed")
    os.replace(partial, target)
    return target, "installed"
