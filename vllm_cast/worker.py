"""CAST's worker: vLLM's CPU worker with CAST's model runner and tree-capable attention.

Named in ``parallel_config.worker_cls`` by the plugin when the speculative method is
"cast"; vLLM imports it in the worker process."""

from __future__ import annotations

from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
from vllm.v1.attention.selector import _cached_get_attn_backend
from vllm.v1.worker import cpu_worker
from vllm.v1.worker.cpu_worker import CPUWorker

from vllm_cast.cpu_gemm import enlarge_primitive_caches
from vllm_cast.runner import CastCPUModelRunner

CPU_BACKEND_PATH = "vllm_cast.attention.cpu_backend.CastCPUAttentionBackend"


class CastCPUWorker(CPUWorker):
    def __init__(self, *args, **kwargs) -> None:
        register_backend(AttentionBackendEnum.CPU_ATTN, CPU_BACKEND_PATH)
        _cached_get_attn_backend.cache_clear()  # an engine built earlier in this process
        super().__init__(*args, **kwargs)

    def init_device(self) -> None:
        enlarge_primitive_caches()  # before the models load and create their matmuls
        original = cpu_worker.CPUModelRunner
        cpu_worker.CPUModelRunner = CastCPUModelRunner
        try:
            super().init_device()
        finally:
            cpu_worker.CPUModelRunner = original
        if self.use_v2_model_runner:
            raise RuntimeError("CAST needs vLLM's V1 model runner; unset VLLM_USE_V2_MODEL_RUNNER")

    def compile_or_warm_up_model(self):
        times = super().compile_or_warm_up_model()
        self.model_runner.cast_prepare_costs()
        return times

    def cast_stats(self) -> dict[str, float]:
        """CAST's running decision statistics (``LLM.collective_rpc("cast_stats")``)."""
        return self.model_runner.cast_summary()
