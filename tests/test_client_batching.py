"""shared.client's pure parts: which files a predict of paths sends, and how they are split into requests."""

import pytest

from shared.client import ApiError, batches, image_files


def test_folders_are_searched_recursively_for_images_and_files_are_taken_as_given(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/2.JPG", "a/b/1.png", "a/notes.txt", "a/b/3.webp", "z.bin"):
        (tmp_path / name).write_bytes(b"x")

    found = image_files([tmp_path / "z.bin", tmp_path / "a"])

    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["z.bin", "a/2.JPG", "a/b/1.png", "a/b/3.webp"]
    with pytest.raises(ApiError) as missing:
        image_files([tmp_path / "nowhere"])
    assert (missing.value.status, missing.value.code) == (0, "not_found")


def test_requests_hold_at_most_max_files_and_max_bytes_and_a_big_file_goes_alone(tmp_path):
    sizes = [10, 10, 10, 50, 10, 10, 10]
    files = []
    for i, size in enumerate(sizes):
        files.append(tmp_path / f"{i}.jpg")
        files[-1].write_bytes(b"x" * size)

    groups = [[int(p.stem) for p in group] for group in batches(files, max_files=2, max_bytes=30)]
    by_bytes = [[int(p.stem) for p in group] for group in batches(files, max_files=10, max_bytes=30)]

    assert groups == [[0, 1], [2], [3], [4, 5], [6]]
    assert by_bytes == [[0, 1, 2], [3], [4, 5, 6]]
    assert list(batches([], max_files=2, max_bytes=30)) == []
