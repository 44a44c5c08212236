"""Side-by-side decoding benchmark on the locally built model pair: vanilla decoding (twice:
the second engine's "speedup" is the noise floor), vLLM's EAGLE-3 chain (the
num_speculative_tokens best per batch size), fixed EAGLE-2 trees (paper defaults and a tuned
setting) and CAST, over the six task sets, batch sizes and temperatures 0 and 1. Each
configuration runs in its own process; all run at once and every cell is run on each
configuration in turn (median of ``--repeats``).

``python -m benchmarks.speedup`` (small grid, minutes on CPU) or ``--full``; writes
``speedup.json``, ``speedup.png`` and ``speedup.md`` to ``--out``."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from tqdm import tqdm

from benchmarks.allocator import pin_heap_for_child_processes
from vllm_cast.prompts import TASKS

FIXED_TREE = {"breadth_threshold": 1e-9, "depth_threshold": 0.0, "verify_threshold": 1e-9,
              "acceptance_calibration": False, "expansion_utility": "layer", "decline_unprofitable": False}
"""CAST's builder reduced to EAGLE-2: every layer keeps top_k, depth is fixed, the
total_token - 1 best nodes by raw path probability are verified (Theorem 4.1's limit)."""


def configurations(draft: str) -> dict[str, dict | None]:
    def chain(k: int) -> dict:
        return {"method": "eagle3", "model": draft, "num_speculative_tokens": k}

    def fixed(top_k: int, depth: int, total_tokens: int) -> dict:
        return {"method": "cast", "model": draft, "num_speculative_tokens": total_tokens - 1, "node_top_k": top_k,
                "max_depth": depth, **FIXED_TREE}

    return {
        "vanilla": None,
        "vanilla_again": None,  # a second vanilla engine: its "speedup" is this machine's noise floor
        "eagle3_chain_k1": chain(1), "eagle3_chain_k2": chain(2), "eagle3_chain_k4": chain(4),
        "eagle2_tree_default": fixed(top_k=10, depth=5, total_tokens=60),
        "eagle2_tree_tuned": fixed(top_k=4, depth=4, total_tokens=16),
        "cast": {"method": "cast", "model": draft},
        "cast_paper_c2": {"method": "cast", "model": draft, "depth_threshold": 3.0},
        "cast_c1": {"method": "cast", "model": draft, "breadth_threshold": 1.0, "depth_threshold": 1.0,
                    "verify_threshold": 1.0},
    }


class ConfigurationProcess:
    """One configuration's engine in its own process (benchmarks.run_config)."""

    def __init__(self, name: str, spec: dict | None, target: str, max_batch: int, max_tokens: int) -> None:
        self.name = name
        cmd = [sys.executable, "-m", "benchmarks.run_config", "--target", target, "--spec", json.dumps(spec),
               "--max-batch", str(max_batch), "--max-tokens", str(max_tokens)]
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"speedup_{name}.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self._expect("READY")

    def _expect(self, prefix: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return line
        raise RuntimeError(f"{self.name} exited ({self.proc.wait()}); see {self.log.name}")

    def run(self, cell: list) -> dict:
        self.proc.stdin.write(json.dumps(cell) + "\n")
        self.proc.stdin.flush()
        return {"config": self.name, **json.loads(self._expect("ROW ")[4:])}

    def close(self) -> None:
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        self.proc.wait(timeout=120)


def run_interleaved(processes: list[ConfigurationProcess], cells: list, repeats: int) -> list[dict]:
    """Every cell on every configuration in turn, ``repeats`` times, each repeat starting at
    another configuration (so no configuration always runs first after a cell change; two
    vanilla engines read 1.00-1.06x apart in a fixed order and 0.99-1.07x with the rotation,
    so that spread is this machine's noise, not the order); per (config, cell) the repeat with
    the median tokens/s is kept."""
    rows = []
    for cell in tqdm(cells, desc="cells", unit="cell"):
        samples: dict[str, list[dict]] = {p.name: [] for p in processes}
        for repeat in range(repeats):
            first = repeat * len(processes) // repeats
            for process in processes[first:] + processes[:first]:
                samples[process.name].append(process.run(cell))
        for runs in samples.values():
            runs.sort(key=lambda row: row["tokens_per_s"])
            rows.append(runs[len(runs) // 2])
    return rows


def add_derived(rows: list[dict]) -> list[dict]:
    """Speedup over vanilla per cell, and ``eagle3_chain_best``: per (temperature, batch
    size) the EAGLE-3 chain whose num_speculative_tokens has the highest mean speedup over
    the tasks (one setting serves every prompt, as a deployment chooses it; picking per
    task would pick with hindsight of each prompt set, and of each cell's noise)."""
    def cell(row: dict) -> tuple:
        return row["task"], row["temperature"], row["batch_size"]

    vanilla = {cell(r): r["tokens_per_s"] for r in rows if r["config"] == "vanilla"}
    for row in rows:
        row["speedup"] = row["tokens_per_s"] / vanilla[cell(row)]
    chains = [row for row in rows if row["config"].startswith("eagle3_chain_")]
    best: dict[tuple, tuple[float, str]] = {}
    for entry in summarise(chains, sorted({row["config"] for row in chains})):
        key = entry["temperature"], entry["batch_size"]
        best[key] = max(best.get(key, (0.0, "")), (entry["speedup"], entry["config"]))
    return rows + [{**row, "config": "eagle3_chain_best", "chain_k": int(row["config"].rsplit("k", 1)[1])}
                   for row in chains if best[row["temperature"], row["batch_size"]][1] == row["config"]]


def summarise(rows: list[dict], configs: list[str]) -> list[dict]:
    """Per (config, temperature, batch size): means over tasks."""
    out = []
    keys = sorted({(r["config"], r["temperature"], r["batch_size"]) for r in rows})
    for config, temperature, batch in keys:
        if config not in configs:
            continue
        group = [r for r in rows if (r["config"], r["temperature"], r["batch_size"]) == (config, temperature, batch)]
        entry = {"config": config, "temperature": temperature, "batch_size": batch}
        for field in ("speedup", "tokens_per_s", "mean_accepted_length", "tokens_per_step", "verified_tokens_per_step",
                      "measured_step_ms", "predicted_step_ms", "priced_step_ms", "minor_page_faults"):
            values = [r[field] for r in group if field in r]
            if values:
                entry[field] = statistics.fmean(values)
        out.append(entry)
    return out


def plot(summary: list[dict], configs: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    temperatures = sorted({s["temperature"] for s in summary})
    fig, axes = plt.subplots(1, len(temperatures), figsize=(6 * len(temperatures), 4.5), squeeze=False)
    for ax, temperature in zip(axes[0], temperatures):
        for config in configs:
            points = sorted((s["batch_size"], s["speedup"]) for s in summary
                            if s["config"] == config and s["temperature"] == temperature)
            if points:
                ax.plot(*zip(*points), marker="o", label=config)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("speedup over vanilla (tokens/s)")
        ax.set_title(f"temperature {temperature:g} (mean over tasks)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(summary: list[dict]) -> str:
    lines = ["| config | T | batch | speedup | tokens/s | mean accepted length | tokens/step | verified tokens/step | "
             "predicted / priced / measured step ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        timing = (f"{s['predicted_step_ms']:.2f} / {s['priced_step_ms']:.2f} / {s['measured_step_ms']:.2f}"
                  if "measured_step_ms" in s else "")
        lines.append(f"| {s['config']} | {s['temperature']:g} | {s['batch_size']} | {s['speedup']:.2f} | "
                     f"{s['tokens_per_s']:.0f} | {s['mean_accepted_length']:.2f} | {s['tokens_per_step']:.2f} | "
                     f"{s['verified_tokens_per_step']:.2f} | {timing} |")
    return "\n".join(lines) + "\n"


REPORTED = ["vanilla", "vanilla_again", "eagle3_chain_best", "eagle2_tree_default", "eagle2_tree_tuned", "cast", "cast_paper_c2", "cast_c1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="batch sizes 1-32, 64 tokens (default: 1/4/16, 32 tokens)")
    parser.add_argument("--size", default="ci", help="fixture recipe (ci or bench)")
    parser.add_argument("--configs", nargs="*", help="subset of configurations to run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per cell and configuration (median kept)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu"))
    args = parser.parse_args()

    from vllm_cast.fixtures.build import build_fixture

    fixture = build_fixture(args.size)
    batches = [1, 2, 4, 8, 16, 32] if args.full else [1, 4, 16]
    max_tokens = 64 if args.full else 32
    cells = [[task, temperature, batch] for temperature in (0.0, 1.0) for batch in batches for task in TASKS]
    configs = configurations(str(fixture / "eagle3"))
    names = args.configs or list(configs)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB per engine (whole GiB); all run at once
    pin_heap_for_child_processes()
    processes = [ConfigurationProcess(name, configs[name], str(fixture / "target"), max(batches), max_tokens)
                 for name in tqdm(names, desc="start engines", unit="engine")]
    try:
        rows = add_derived(run_interleaved(processes, cells, args.repeats))
    finally:
        for process in processes:
            process.close()
    summary = summarise(rows, REPORTED)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"fixture": str(fixture), "batch_sizes": batches, "max_tokens": max_tokens, "tasks": list(TASKS),
            "device": __import__("vllm_cast.cost_model", fromlist=["device_name"]).device_name()}
    (args.out / "speedup.json").write_text(json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=1))
    plot(summary, REPORTED, args.out / "speedup.png")
    table = markdown(summary)
    (args.out / "speedup.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
