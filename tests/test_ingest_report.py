"""What a dataset tells its owner: duplicates by content, duplicates leaking across splits, labels
that disagree, imbalance, and processed/total while ingestion runs."""

from concurrent.futures import ThreadPoolExecutor

import pytest

import worker.ingest
from shared.config import Settings
from shared.db import session_scope
from shared.orm import Dataset
from tests.hostile import BLUE, RED, create_dataset, image_folder, ingest, write_zip


@pytest.fixture
def settings(migrated) -> Settings:
    return Settings(cache_size=32, min_images_per_class=2)


def test_duplicates_leakage_conflicts_and_imbalance_are_reported(settings, tmp_path):
    files = image_folder({"cats": RED}, per_class=6, prefix="train/") | image_folder({"dogs": BLUE}, per_class=2,
                                                                                     prefix="train/")
    files["test/cats/leak.jpg"] = files["train/cats/000.jpg"]   # the same photo in train and test
    files["train/cats/copy.jpg"] = files["train/cats/001.jpg"]  # a harmless copy within train
    files["val/dogs/odd.jpg"] = files["train/cats/002.jpg"]     # a cat in train, a dog in val

    dataset = ingest(settings, write_zip(tmp_path / "dupes.zip", files))

    assert dataset.status == "ready", dataset.error
    assert dataset.splits == {"test": {"cats": 1}, "train": {"cats": 7, "dogs": 2}, "val": {"dogs": 1}}
    leak = ["train/cats/000.jpg", "test/cats/leak.jpg"]
    copy = ["train/cats/001.jpg", "train/cats/copy.jpg"]
    odd = ["train/cats/002.jpg", "val/dogs/odd.jpg"]
    report = dataset.report
    assert report["duplicates"] == [leak, copy, odd]
    assert (report["duplicate_groups"], report["duplicate_images"]) == (3, 3)
    assert report["leakage"] == [leak, odd] and report["leakage_groups"] == 2
    assert report["conflicting_labels"] == [odd]
    assert report["imbalance_ratio"] == 2.667  # 8 cats / 3 dogs
    assert report["rejected_count"] == 0
    assert report["images_per_second"] > 0


def test_progress_is_visible_while_processing(settings, tmp_path, monkeypatch):
    monkeypatch.setattr(worker.ingest, "PROGRESS_SECONDS", 0.0)  # write it after every image
    files = image_folder({"cats": RED, "dogs": BLUE}, per_class=150)
    dataset_id = create_dataset(settings, write_zip(tmp_path / "many.zip", files))
    seen: list[dict] = []
    with ThreadPoolExecutor(max_workers=1) as pool:
        runner = pool.submit(worker.ingest.ingest_dataset, dataset_id=dataset_id, settings=settings)
        while not runner.done():
            with session_scope() as session:
                row = session.get(Dataset, dataset_id)
                if row.status == "processing":
                    seen.append(dict(row.progress))
        runner.result()  # re-raises what failed in the ingest thread

    with session_scope() as session:
        final = session.get(Dataset, dataset_id)
        assert (final.status, final.progress) == ("ready", {"processed": 300, "total": 300})
    midway = [p for p in seen if p["total"] == 300 and 0 < p["processed"] < 300]
    assert midway, seen[-5:]
    assert [p["processed"] for p in midway] == sorted(p["processed"] for p in midway)


def test_a_huge_duplicate_group_is_listed_in_part_and_counted_whole(settings, tmp_path):
    files = image_folder({"cats": RED, "dogs": BLUE}, per_class=3)
    files |= {f"cats/same-{i:03d}.jpg": files["cats/000.jpg"] for i in range(60)}

    report = ingest(settings, write_zip(tmp_path / "same.zip", files)).report

    assert [len(group) for group in report["duplicates"]] == [worker.ingest.GROUP_PATHS]
    assert (report["duplicate_groups"], report["duplicate_images"]) == (1, 60)
