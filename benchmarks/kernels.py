"""Time each Triton kernel against its torch reference and against the bytes it must move.

``python -m benchmarks.kernels --out DIR`` (CUDA required) writes ``kernels.json`` and
``kernels.png`` (achieved bandwidth per case) to DIR and prints a table.
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm
from vllm_cast.kernels.tree_attention import tree_attention, tree_attention_reference
from vllm_cast.kernels.tree_mask import tree_meta, tree_meta_reference
from vllm_cast.kernels.tree_topk import tree_topk, tree_topk_reference


def cuda_ms(fn, repeats: int = 50) -> float:
    """Median milliseconds of one ``fn()`` call, host launch overhead included, over
    ``repeats`` CUDA-event-timed calls (after warm-up)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def device_ms(fn, calls: int = 20) -> float:
    """Milliseconds of GPU work per ``fn()`` call: ``calls`` calls captured in a CUDA graph
    and replayed, so host launch overhead is excluded (as when vLLM replays graphs)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return cuda_ms(graph.replay, repeats=20) / calls


def random_parents(batch: int, nodes: int) -> torch.Tensor:
    parents = torch.full((batch, nodes), -1, dtype=torch.int64)
    for i in range(1, nodes):
        parents[:, i] = torch.randint(0, i, (batch,))
    return parents


def mask_cases():
    for batch, nodes in ((8, 32), (32, 64), (64, 128)):
        parents = random_parents(batch, nodes).cuda()
        lengths = torch.full((batch,), nodes, device="cuda")
        depth = nodes - 1
        moved = batch * nodes * (8 + nodes + 4 + 4 * (depth + 1) + 1)
        yield (f"tree_meta B={batch} N={nodes}", partial(tree_meta, parents, lengths, depth),
               partial(tree_meta_reference, parents, lengths, depth), moved)


def topk_cases():
    for batch, width, vocab, k in ((1, 8, 32000, 8), (16, 8, 32000, 8), (32, 4, 128256, 10)):
        probs = torch.rand(batch, width, vocab, device="cuda").softmax(-1)
        parent_values = torch.rand(batch, width, device="cuda")
        moved = probs.numel() * 4 + batch * width * k * 12
        yield (f"tree_topk B={batch} W={width} V={vocab} K={k}", partial(tree_topk, probs, parent_values, k, k),
               partial(tree_topk_reference, probs, parent_values, k, k), moved)


def attention_cases():
    block, hq, hkv, d = 16, 32, 8, 128
    for batch, context, nodes in ((1, 1024, 64), (8, 1024, 32), (16, 4096, 32), (32, 2048, 16)):
        parents = random_parents(batch, nodes)
        mask = tree_meta_reference(parents, torch.full((batch,), nodes), nodes - 1)[0].cuda()
        seq = context + nodes
        per_req = (seq + block - 1) // block
        key_cache = torch.randn(per_req * batch, block, hkv, d, device="cuda", dtype=torch.bfloat16)
        value_cache = torch.randn_like(key_cache)
        block_table = torch.randperm(per_req * batch, device="cuda").view(batch, per_req).int()
        seq_lens = torch.full((batch,), seq, device="cuda")
        qsl = torch.arange(batch + 1, device="cuda") * nodes
        q = torch.randn(batch * nodes, hq, d, device="cuda", dtype=torch.bfloat16)
        args = (q, key_cache, value_cache, block_table, seq_lens, qsl, mask, d ** -0.5)
        moved = batch * seq * hkv * d * 2 * 2 + 2 * q.numel() * 2 + mask.numel()
        yield (f"tree_attention B={batch} ctx={context} N={nodes} bf16 Hq={hq} Hkv={hkv} D={d}",
               partial(tree_attention, *args), partial(tree_attention_reference, *args), moved)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench_results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.kernels needs a CUDA device")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    rows = []
    cases = [*mask_cases(), *topk_cases(), *attention_cases()]
    for name, kernel, reference, moved in tqdm(cases, desc="kernel benchmarks"):
        call_ms = cuda_ms(kernel)
        kernel_ms = device_ms(kernel)
        reference_ms = cuda_ms(reference, repeats=5)
        rows.append({"case": name, "triton_call_ms": call_ms, "triton_device_ms": kernel_ms,
                     "torch_reference_ms": reference_ms, "speedup_vs_reference": reference_ms / call_ms,
                     "bytes": moved, "achieved_GBps": moved / kernel_ms / 1e6})
    device = torch.cuda.get_device_name()
    (args.out / "kernels.json").write_text(json.dumps({"device": device, "rows": rows}, indent=2))
    print(f"device: {device}")
    print(f"{'case':66s} {'call ms':>9s} {'device ms':>9s} {'torch ms':>9s} {'x':>7s} {'GB/s':>8s}")
    for r in rows:
        print(f"{r['case']:66s} {r['triton_call_ms']:9.4f} {r['triton_device_ms']:9.4f} "
              f"{r['torch_reference_ms']:9.3f} {r['speedup_vs_reference']:7.1f} {r['achieved_GBps']:8.1f}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    ax.barh([r["case"] for r in rows], [r["achieved_GBps"] for r in rows])
    ax.set_xlabel("achieved GB/s (bytes the kernel must move / graph-replayed device time)")
    ax.set_title(f"vllm_cast Triton kernels on {device}")
    fig.tight_layout()
    fig.savefig(args.out / "kernels.png", dpi=120)


if __name__ == "__main__":
    main()
