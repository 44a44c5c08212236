"""The OpenAI server started by ``vllm-cast serve`` with method "cast"."""

from __future__ import annotations

from conftest import tree_spec
from vllm import SamplingParams

from vllm_cast.prompts import TASKS, load_prompts
from vllm_cast.serving import complete, served

PROMPTS = [load_prompts(task, limit=1)[0] for task in TASKS]


def test_served_cast_greedy_equals_offline_vanilla(tmp_path, target_dir, draft_dir, vanilla_llm):
    expected = [o.outputs[0].text for o in vanilla_llm.generate(
        PROMPTS, SamplingParams(temperature=0.0, max_tokens=32), use_tqdm=False)]
    spec = tree_spec(draft_dir)
    with served(target_dir, spec, tmp_path / "server.log") as url:
        got = [complete(url, target_dir, prompt, max_tokens=32) for prompt in PROMPTS]
    log = (tmp_path / "server.log").read_text()
    assert "CastSpeculativeConfig(method='cast'" in log or "method='cast'" in log, "server did not run CAST"
    assert got == expected
