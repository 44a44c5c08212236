"""CAST's oneDNN primitive caches (vllm_cast.cpu_gemm) through vLLM's own CPU GEMM dispatch."""

from __future__ import annotations

import pytest
import torch

from vllm_cast.cpu_gemm import PRIMITIVE_CACHE_ENTRIES, enlarge_primitive_caches


def test_vllm_cpu_linear_layers_get_the_enlarged_cache(monkeypatch):
    from vllm import _custom_ops as ops
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    if getattr(ops, "create_onednn_mm", None) is None or not ops._supports_onednn:
        pytest.skip("this vLLM build has no oneDNN matmul")
    real, requested = ops.create_onednn_mm, []

    def recording(weight, primitive_cache_size=128):
        requested.append(primitive_cache_size)
        return real(weight, primitive_cache_size)

    monkeypatch.setattr(ops, "create_onednn_mm", recording)
    enlarge_primitive_caches()
    enlarge_primitive_caches()  # idempotent: one wrapper
    layer = torch.nn.Linear(64, 48)
    dispatch_cpu_unquantized_gemm(layer, remove_weight=False)
    assert requested == [PRIMITIVE_CACHE_ENTRIES]
    rows = torch.randn(5, 64)
    torch.testing.assert_close(layer.cpu_linear(rows, layer.weight, layer.bias), layer(rows), rtol=1e-4, atol=1e-5)

