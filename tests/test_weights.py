"""Starting weights: the file table matches torchvision, `tuneserve weights download` installs only files
whose SHA-256 matches their name, and POST /v1/jobs refuses weights no worker on this host could load."""

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from torchvision import models

from shared import weights
from shared.cli import main
from shared.db import session_scope
from shared.modeling import WeightsUnavailable, build_model
from shared.orm import Job
from tests.helpers import ready_dataset


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_file_table_is_torchvisions_own() -> None:
    enums = {"resnet18": models.ResNet18_Weights.IMAGENET1K_V1, "resnet34": models.ResNet34_Weights.IMAGENET1K_V1,
             "resnet50": models.ResNet50_Weights.IMAGENET1K_V2, "resnet101": models.ResNet101_Weights.IMAGENET1K_V2}
    assert {name: Path(enum.url).name for name, enum in enums.items()} == weights.IMAGENET_FILES
    assert {weights.URL_BASE + name for name in weights.IMAGENET_FILES.values()} == {e.url for e in enums.values()}


def test_hub_directory_follows_torch(torch_home: Path) -> None:
    assert weights.hub_checkpoints() == Path(torch.hub.get_dir()) / "checkpoints" == torch_home


def _fake_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A real file and a table entry named after its hash, as torchvision names its files."""
    source = tmp_path / "made.pth"
    torch.save({"w": torch.arange(6.0)}, source)
    prefix = hashlib.sha256(source.read_bytes()).hexdigest()[:8]
    monkeypatch.setitem(weights.IMAGENET_FILES, "tiny", f"tiny-{prefix}.pth")
    return source


def test_install_checks_the_hash_and_keeps_only_good_files(torch_home: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    source = _fake_entry(tmp_path, monkeypatch)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not the file")
    with pytest.raises(weights.WeightsError, match="expected"):
        weights.install("tiny", source=str(junk))
    assert list(torch_home.iterdir()) == []  # neither the bad file nor a partial one is left

    path, outcome = weights.install("tiny", source=str(source))
    assert (outcome, path.read_bytes()) == ("installed", source.read_bytes())
    assert weights.install("tiny") == (path, "present")  # no download: the cached copy checks out

    path.write_bytes(b"truncated")
    with pytest.raises(OSError):  # a corrupt copy is removed and fetched again (here: from a dead mirror)
        weights.install("tiny", url_base="http://127.0.0.1:9/")
    assert not path.exists()


def test_cli_refuses_a_wrong_file_and_lists_the_cache(torch_home: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"x" * 100)
    with pytest.raises(SystemExit) as exited:
        main(["weights", "download", "--base-model", "resnet18", "--from", str(junk)])
    assert exited.value.code == 1
    assert "expected f37072fd; not installed" in " ".join(capsys.readouterr().out.split())  # rich wraps lines
    assert not (torch_home / "resnet18-f37072fd.pth").exists()
    with pytest.raises(SystemExit) as exited:
        main(["weights", "download", "--base-model", "vgg16"])
    assert exited.value.code == 2
    with pytest.raises(SystemExit) as exited:
        main(["weights", "list", "--json"])
    assert exited.value.code == 0
    assert '"present": false' in capsys.readouterr().out


def test_jobs_whose_weights_no_worker_has_are_422_up_front(make_app: Callable[..., TestClient], torch_home: Path,
                                                           tmp_path: Path) -> None:
    weights_dir = tmp_path / "weights"
    weights_dir.mkdir()
    with make_app(TUNESERVE_CHECK_WEIGHTS="true", TUNESERVE_WEIGHTS_DIR=str(weights_dir)) as client:
        dataset_id = ready_dataset()
        for hyperparameters, needle in (({}, "tuneserve weights download --base-model resnet50"),
                                        ({"base_model": "resnet18"}, "resnet18"),
                                        ({"weights": "mine.safetensors"}, "mine.safetensors is not in WEIGHTS_DIR")):
            response = client.post("/v1/jobs", json={"dataset_id": dataset_id, "hyperparameters": hyperparameters})
            assert response.status_code == 422, response.text
            assert response.json()["code"] == "weights_unavailable"
            assert needle in response.json()["detail"]
        with session_scope() as session:
            assert session.scalar(select(func.count()).select_from(Job)) == 0

        (weights_dir / "mine.safetensors").write_bytes(b"0")
        torch_home.mkdir(parents=True)
        (torch_home / "resnet18-f37072fd.pth").write_bytes(b"0")
        for hyperparameters in ({"weights": "none"}, {"weights": "mine.safetensors"}, {"base_model": "resnet18"}):
            response = client.post("/v1/jobs", json={"dataset_id": dataset_id, "hyperparameters": hyperparameters})
            assert response.status_code == 202, response.text


@pytest.mark.parametrize(("content", "says"), [
    ("wrong_shapes", "do not fit resnet18"),
    ("garbage", "could not be read: "),
])
def test_a_weights_file_that_does_not_fit_is_weights_unavailable(tmp_path: Path, content: str, says: str) -> None:
    """The job fails as weights_unavailable (the user's file), not as a training_error (ours)."""
    if content == "wrong_shapes":  # every name resnet18 has, conv1 from a 4-channel stem
        state = models.resnet18().state_dict()
        state["conv1.weight"] = torch.zeros(64, 4, 7, 7)
        torch.save(state, tmp_path / "w.pth")
    else:
        (tmp_path / "w.pth").write_bytes(b"PK\x03\x04 not a checkpoint")
    with pytest.raises(WeightsUnavailable) as raised:
        build_model(base_model="resnet18", num_classes=3, weights="w.pth", weights_dir=tmp_path)
    assert raised.value.code == "weights_unavailable"
    assert says in str(raised.value)
