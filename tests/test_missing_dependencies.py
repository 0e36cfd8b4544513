"""A test whose module, binary or server is missing skips loudly on a developer's machine and fails on CI,
where everything must be installed (.ci/run sets CI=true)."""

import shutil

import pytest

import tests.processes
from tests.processes import require_binary, require_module

NO_MODULE = "tuneserve_no_such_module"
NO_BINARY = "tuneserve-no-such-binary"


@pytest.mark.parametrize(("in_ci", "outcome"), [(True, pytest.fail.Exception), (False, pytest.skip.Exception)])
def test_a_missing_module_fails_on_ci_and_skips_elsewhere(monkeypatch, in_ci, outcome):
    monkeypatch.setattr(tests.processes, "IN_CI", in_ci)
    with pytest.raises(outcome, match=f"Python module {NO_MODULE} is not importable .*; pip install it"):
        require_module(NO_MODULE, "pip install it")


@pytest.mark.parametrize(("in_ci", "outcome"), [(True, pytest.fail.Exception), (False, pytest.skip.Exception)])
def test_a_missing_binary_fails_on_ci_and_skips_elsewhere(monkeypatch, tmp_path, in_ci, outcome):
    monkeypatch.setattr(tests.processes, "IN_CI", in_ci)
    with pytest.raises(outcome, match=f"^(CI=true and|SKIPPING LOUDLY:) {NO_BINARY} is not installed; get it$"):
        require_binary(NO_BINARY, "get it", str(tmp_path / "*" / NO_BINARY))


def test_a_present_binary_is_the_glob_match_else_the_one_on_path(tmp_path):
    (tmp_path / "16").mkdir()
    (tmp_path / "16" / "tool").touch()
    assert require_binary("tool", "", str(tmp_path / "*" / "tool")) == str(tmp_path / "16" / "tool")
    assert require_binary("sh", "", str(tmp_path / "none" / "sh")) == shutil.which("sh")
    assert require_module("json", "").dumps([1]) == "[1]"
