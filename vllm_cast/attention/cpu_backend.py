"""vLLM's CPU attention backend with tree-masked requests.

Requests named in the forward's :class:`~vllm_cast.attention.tree_plan.TreePlan` attend
with an ancestor mask through ``torch.nn.functional.scaled_dot_product_attention`` over
K/V read from the paged cache; every other request keeps vLLM's native CPU kernel. The
cache layout is forced to the ``vec`` ISA so tokens can be read and moved from Python.
Registered over ``AttentionBackendEnum.CPU_ATTN`` by CAST's worker; for engines without
CAST (another engine in the same process) it behaves exactly as vLLM's backend."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.config import get_current_vllm_config
from vllm.utils.torch_utils import is_quantized_kv_cache
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from vllm_cast.attention.paged_tree_attention import (
    PreparedTree,
    paged_tree_attention,
    prepare_tree,
)
from vllm_cast.attention.tree_plan import current_plan
from vllm_cast.config import is_cast

READABLE_ISA = "vec"


class CastCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type[CastCPUAttentionImpl]:
        return CastCPUAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[CastCPUAttentionMetadataBuilder]:
        return CastCPUAttentionMetadataBuilder


@dataclass
class CastCPUAttentionMetadata(CPUAttentionMetadata):
    tree: PreparedTree | None = None
    """Tree-masked requests of this forward (None: all causal)."""
    tree_covers_batch: bool = False
    """Whether every request is tree-masked (then vLLM's kernel is skipped)."""


class CastCPUAttentionMetadataBuilder(CPUAttentionMetadataBuilder):
    """Forces the readable ``vec`` cache layout and attaches the active tree plan."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        if not is_cast(vllm_config.speculative_config):
            return
        if is_quantized_kv_cache(self.kv_cache_dtype) or self.head_dim % 32 != 0:
            raise ValueError(
                f"CAST on CPU needs an unquantized KV cache and head_size % 32 == 0 "
                f"(got kv_cache_dtype={self.kv_cache_dtype!r}, head_size={self.head_dim})")
        self.isa = READABLE_ISA
        self._set_isa_to_layers(layer_names)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> CPUAttentionMetadata:
        base = super().build(common_prefix_len, common_attn_metadata, fast_build)
        plan = current_plan()
        if not plan:
            return base  # all causal: vLLM's metadata as is
        tree = prepare_tree(plan, base.block_table, common_attn_metadata.query_start_loc_cpu.tolist(),
                            self.block_size, common_attn_metadata.num_actual_tokens)
        return CastCPUAttentionMetadata(**vars(base), tree=tree,
                                        tree_covers_batch=len(plan.requests) == common_attn_metadata.num_reqs)


class CastCPUAttentionImpl(CPUAttentionBackendImpl):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not is_cast(get_current_vllm_config().speculative_config):
            return
        if self.alibi_slopes is not None or self.sliding_window != -1 or self.logits_soft_cap or self.sinks is not None:
            raise ValueError("CAST tree attention supports plain causal attention only "
                             "(no ALiBi, sliding window, soft-cap or sinks)")

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None) -> torch.Tensor:
        tree = getattr(attn_metadata, "tree", None)
        if tree is None or not attn_metadata.tree_covers_batch:
            super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                            output_scale, output_block_scale)
        if tree is not None:
            heads_view = output.view(output.shape[0], self.num_heads, self.head_size)
            paged_tree_attention(query, kv_cache, tree, self.scale, heads_view)
        return output
