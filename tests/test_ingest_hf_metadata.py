"""Hugging Face imagefolder archives: a ``metadata.csv`` (``file_name,label``, paths relative to the csv's
folder) labels the images, at the top or one per split folder; one without a label column fails the dataset."""

import pytest

from shared.config import Settings
from tests.hostile import BLUE, GREEN, RED, ingest, solid, write_zip


@pytest.fixture
def settings(migrated) -> Settings:
    return Settings(cache_size=32, min_images_per_class=1)


def test_a_top_level_metadata_csv_assigns_labels_and_reports_the_rest(settings, tmp_path):
    files = {f"hf/images/{i}.png": solid(RED if i < 2 else GREEN, fmt="PNG", seed=i) for i in range(5)}
    files["hf/metadata.csv"] = (b"file_name,label,caption\nimages/0.png,apple,a red one\n./images/1.png,apple,\n"
                                b"images/2.png,pear,green\nimages/3.png,,no label\nimages/9.png,pear,gone\n")

    dataset = ingest(settings, write_zip(tmp_path / "hf.zip", files))

    assert (dataset.status, dataset.error) == ("ready", None)
    assert dataset.class_counts == {"apple": 2, "pear": 1}
    assert dataset.splits is None
    assert sorted(dataset.rejected, key=lambda r: r["path"]) == [
        {"path": "hf/images/3.png", "reason": "not listed in metadata.csv"},
        {"path": "hf/images/4.png", "reason": "not listed in metadata.csv"},
        {"path": "hf/images/9.png", "reason": "listed in metadata.csv but not in the archive"},
        {"path": "hf/metadata.csv:5", "reason": "row needs file_name,label"}]


def test_one_metadata_csv_per_split_folder_keeps_the_split(settings, tmp_path):
    files = {"train/a.jpg": solid(RED), "train/b.jpg": solid(BLUE), "train/c.jpg": solid(RED, seed=2),
             "test/x.jpg": solid(BLUE, seed=3), "validation/sub/y.jpg": solid(RED, seed=4)}
    files["train/metadata.csv"] = b"file_name,label\na.jpg,red\nb.jpg,blue\nc.jpg,red\n"
    files["test/metadata.csv"] = b"label,file_name\nblue,x.jpg\n"  # column order does not matter
    files["validation/metadata.csv"] = b"file_name,label\nsub/y.jpg,red\n"

    dataset = ingest(settings, write_zip(tmp_path / "splits.zip", files))

    assert dataset.status == "ready", dataset.error
    assert dataset.rejected == []
    assert dataset.class_counts == {"blue": 2, "red": 3}
    assert dataset.splits == {"test": {"blue": 1}, "train": {"blue": 1, "red": 2}, "val": {"red": 1}}


def test_a_metadata_csv_without_a_label_column_fails_the_dataset(settings, tmp_path):
    files = {f"{i}.jpg": solid(RED, seed=i) for i in range(3)}
    files["metadata.csv"] = b"file_name,text\n0.jpg,a photo\n1.jpg,another\n"

    dataset = ingest(settings, write_zip(tmp_path / "captions.zip", files))

    assert (dataset.status, dataset.error_code) == ("failed", "bad_manifest")
    assert dataset.error == ("metadata.csv has no 'label' column (its columns: file_name, text); a Hugging Face "
                             "metadata.csv needs a header row with file_name,label")


def test_labels_csv_wins_over_metadata_csv(settings, tmp_path):
    files = {"a.jpg": solid(RED), "b.jpg": solid(BLUE)}
    files["labels.csv"] = b"a.jpg,red\nb.jpg,blue\n"
    files["metadata.csv"] = b"file_name,text\na.jpg,ignored\n"

    dataset = ingest(settings, write_zip(tmp_path / "both.zip", files))

    assert dataset.status == "ready", dataset.error
    assert dataset.class_counts == {"blue": 1, "red": 1}
    assert dataset.rejected == [{"path": "metadata.csv", "reason": "not listed in labels.csv"}]
