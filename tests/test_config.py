"""Method "cast" goes through vLLM's real EngineArgs; bad input fails early and clearly."""

from __future__ import annotations

import json
import shutil

import pytest
from vllm.engine.arg_utils import EngineArgs

from vllm_cast.config import CastConfigError, CastParams, CastSpeculativeConfig


def engine_config(target: str, spec: dict | None, **kwargs):
    return EngineArgs(model=target, max_model_len=1024, speculative_config=spec, **kwargs).create_engine_config()


def test_cast_builds_eagle3_config_with_cast_params(target_dir, draft_dir):
    spec = {"method": "cast", "model": draft_dir, "num_speculative_tokens": 24, "breadth_threshold": 2.0,
            "max-depth": 5}
    config = engine_config(target_dir, spec).speculative_config
    assert isinstance(config, CastSpeculativeConfig)
    assert config.method == "eagle3" and config.use_eagle()
    assert config.num_speculative_tokens == 24
    assert config.cast == CastParams(breadth_threshold=2.0, max_depth=5)
    assert "method='cast'" in repr(config)


def test_cli_spec_flags_select_cast(target_dir, draft_dir):
    config = engine_config(target_dir, None, spec_method="cast", spec_model=draft_dir).speculative_config
    assert isinstance(config, CastSpeculativeConfig)


def test_other_methods_untouched(target_dir, draft_dir):
    config = engine_config(target_dir, {"method": "eagle3", "model": draft_dir, "num_speculative_tokens": 2})
    assert type(config.speculative_config).__name__ == "SpeculativeConfig"


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"bogus_key": 1}, "bogus_key"),
        ({"breadth_threshold": 0}, "breadth_threshold"),
        ({"verify_threshold": float("nan")}, "verify_threshold"),
        ({"depth_threshold": -0.5}, "depth_threshold"),
        ({"depth_threshold": "3"}, "depth_threshold"),
        ({"node_top_k": 0}, "node_top_k"),
        ({"node_top_k": 2.5}, "node_top_k"),
        ({"max_depth": 33}, "max_depth"),
        ({"ratio_buffer_size": True}, "ratio_buffer_size"),
        ({"profile": "sometimes"}, "profile"),
        ({"decision_scope": "global"}, "decision_scope"),
        ({"batch_utility": "median"}, "batch_utility"),
        ({"cost_table": 5}, "cost_table"),
        ({"acceptance_calibration": "yes"}, "acceptance_calibration"),
        ({"decline_unprofitable": 1}, "decline_unprofitable"),
        ({"num_speculative_tokens": 129}, "num_speculative_tokens"),
        ({"num_speculative_tokens": 0}, "num_speculative_tokens"),
        ({"model": None}, "model"),
    ],
)
def test_bad_cast_keys_name_the_key(target_dir, draft_dir, extra, named):
    spec = {"method": "cast", "model": draft_dir, **extra}
    with pytest.raises(CastConfigError, match=f"'{named}'"):
        engine_config(target_dir, spec)


def test_non_eagle3_draft_is_refused(target_dir):
    with pytest.raises(CastConfigError, match="not an EAGLE-3 draft head"):
        engine_config(target_dir, {"method": "cast", "model": target_dir})


def test_missing_draft_folder_is_refused(target_dir, tmp_path):
    with pytest.raises(CastConfigError, match="cannot read the draft config"):
        engine_config(target_dir, {"method": "cast", "model": str(tmp_path / "nowhere")})


@pytest.mark.parametrize(("key", "value", "message"), [("vocab_size", 999, "vocab_size"),
                                                        ("target_hidden_size", 8, "hidden size")])
def test_mismatched_draft_is_refused(target_dir, draft_dir, tmp_path, key, value, message):
    bad = tmp_path / "draft"
    shutil.copytree(draft_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    config[key] = value
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CastConfigError, match=message):
        engine_config(target_dir, {"method": "cast", "model": str(bad)})


def _table(target_dir: str, draft_dir: str, **key_changes):
    import torch

    from vllm_cast.cost_model import CostTable
    from vllm_cast.cost_tables import table_key

    key = table_key(target_dir, draft_dir, "float32", "cpu")
    key = type(key)(**{**key.__dict__, **key_changes})
    grid = torch.ones(1, 1, 2, dtype=torch.float64)
    return CostTable(key, [1], [128], [1, 2], grid, grid)


def test_cost_table_from_other_hardware_is_refused_at_start_up(target_dir, draft_dir, tmp_path):
    path = tmp_path / "table.json"
    _table(target_dir, draft_dir, device="cpu:Some Other CPU:64threads").save(path)
    spec = {"method": "cast", "model": draft_dir, "cost_table": str(path)}
    with pytest.raises(CastConfigError, match="'cost_table'.*device"):
        engine_config(target_dir, spec, dtype="float32")


def test_corrupt_cost_table_is_refused_at_start_up(target_dir, draft_dir, tmp_path):
    path = tmp_path / "table.json"
    path.write_text('{"format": 1, "key": {')
    with pytest.raises(CastConfigError, match="'cost_table'.*corrupt"):
        engine_config(target_dir, {"method": "cast", "model": draft_dir, "cost_table": str(path)}, dtype="float32")


def test_matching_cost_table_is_accepted(target_dir, draft_dir, tmp_path):
    path = tmp_path / "table.json"
    _table(target_dir, draft_dir).save(path)
    config = engine_config(target_dir, {"method": "cast", "model": draft_dir, "cost_table": str(path)}, dtype="float32")
    assert config.speculative_config.cast.cost_table == str(path)
