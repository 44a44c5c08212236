"""CAST trees under engine pressure, each checked against vanilla greedy decoding with the
same settings: preemption and recompute (a KV cache far too small for the batch), chunked
prefill of long prompts beside decoding trees, prefix-cache hits, requests reaching
max_model_len mid-tree, mixed temperatures and structured output in one batch."""

from __future__ import annotations

import pytest
from conftest import cast_stats, make_llm, tree_spec
from vllm import SamplingParams
from vllm.sampling_params import StructuredOutputsParams

from vllm_cast.prompts import TASKS, load_prompts

PRESSURE = {"max_model_len": 768, "num_gpu_blocks_override": 32, "max_num_batched_tokens": 256,
            "enable_prefix_caching": True, "block_size": 32}
"""32 blocks of 32 tokens = 1024 tokens of KV for the whole batch; prefills chunked to 256."""


@pytest.fixture(scope="session")
def pressure_engines(target_dir, draft_dir):
    """Session-scoped like conftest's engines: a module-scoped engine's shutdown would tear
    down the distributed state that engines created earlier in the session share."""
    return make_llm(target_dir, **PRESSURE), make_llm(target_dir, tree_spec(draft_dir), **PRESSURE)


def _prompts() -> list[str]:
    """Long prompts (chunked), a shared prefix (prefix-cache hits) and short ones."""
    long = [p for task in ("sum", "qa") for p in load_prompts(task, limit=8) if 300 < len(p) < 1200][:3]
    shared = load_prompts("humaneval", limit=1)[0]
    variants = [shared + suffix for suffix in ("\n    # first", "\n    # second", "\n    # third")]
    short = [load_prompts(task, limit=1)[0][:200] for task in TASKS]
    return long + variants + short


def _texts(llm, prompts, params) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]


def test_preemption_chunked_prefill_prefix_cache_and_length_limit(pressure_engines):
    vanilla, cast = pressure_engines
    prompts = _prompts()
    params = SamplingParams(temperature=0.0, max_tokens=700)  # long prompts stop at max_model_len
    before = cast_stats(cast)
    expected = _texts(vanilla, prompts, params)
    got = _texts(cast, prompts, params)
    assert [i for i, (a, b) in enumerate(zip(expected, got)) if a != b] == []
    assert cast_stats(cast)["speculating_steps"] > before["speculating_steps"]
    # vLLM's metrics are process-global and belong to the engine created last (CAST's here).
    preemptions = sum(m.value for m in cast.get_metrics() if m.name == "vllm:num_preemptions")
    print(f"preemptions counted by vLLM: {preemptions}")
    assert preemptions > 0, "the KV cache was meant to force preemption"


def test_mixed_temperatures_and_structured_output_in_one_batch(pressure_engines):
    vanilla, cast = pressure_engines
    prompts = [load_prompts(task, limit=2)[1][:300] for task in TASKS]
    greedy = SamplingParams(temperature=0.0, max_tokens=48)
    sampled = SamplingParams(temperature=1.0, top_k=20, top_p=0.9, max_tokens=48)
    choice = SamplingParams(temperature=0.0, max_tokens=8,
                            structured_outputs=StructuredOutputsParams(choice=["yes", "no", "maybe"]))
    batch = [(p, greedy) for p in prompts] + [(p, sampled) for p in prompts] + [(prompts[0], choice)]
    outputs = cast.generate([p for p, _ in batch], [s for _, s in batch], use_tqdm=False)
    expected_greedy = _texts(vanilla, prompts, greedy)
    assert [list(o.outputs[0].token_ids) for o in outputs[: len(prompts)]] == expected_greedy
    assert all(len(o.outputs[0].token_ids) > 0 for o in outputs[len(prompts) : -1])
    assert outputs[-1].outputs[0].text in {"yes", "no", "maybe"}
    assert outputs[-1].outputs[0].text == vanilla.generate([prompts[0]], choice, use_tqdm=False)[0].outputs[0].text


def test_prompt_filling_the_context_exactly(pressure_engines):
    from vllm.inputs import TokensPrompt

    vanilla, cast = pressure_engines
    text = " ".join(load_prompts("sum", limit=3))
    ids = vanilla.get_tokenizer()(text)["input_ids"][:740]
    params = SamplingParams(temperature=0.0, max_tokens=PRESSURE["max_model_len"] - len(ids))
    expected = _texts(vanilla, [TokensPrompt(prompt_token_ids=ids)], params)
    got = _texts(cast, [TokensPrompt(prompt_token_ids=ids)], params)
    assert len(ids) + len(got[0]) == PRESSURE["max_model_len"]
    assert got == expected
