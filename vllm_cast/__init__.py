"""vllm_cast: CAST cost-aware dynamic-tree speculative decoding as a vLLM plugin.

Importing this package checks that the installed vLLM is exactly the version the plugin
was written against (it patches private vLLM internals)."""

from vllm_cast.version_guard import SUPPORTED_VLLM_VERSION, check_vllm_version

check_vllm_version()

__all__ = ["SUPPORTED_VLLM_VERSION"]
__version__ = "0.1.0"
