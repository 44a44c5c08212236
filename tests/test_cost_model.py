"""Cost tables: interpolation, persistence round trip, refusal of foreign or corrupt tables."""

from __future__ import annotations

import json

import pytest
import torch

from vllm_cast.cost_model import (
    PROFILE_ROUNDS,
    CostTable,
    CostTableError,
    TableKey,
    additions_grow_with_batch,
    device_name,
    profile_table,
)

KEY = TableKey(device=device_name("cpu"), target_model="t", draft_model="d", dtype="float32")


def synthetic_table() -> CostTable:
    def timer(scale):
        return lambda b, c, n: scale * (1.0 + 0.1 * b * n + 0.001 * c)

    return profile_table(KEY, timer(1.0), timer(0.2), [1, 4, 16], [128, 1024], [1, 2, 4, 8, 16], progress=False)


def test_grid_points_are_exact_and_between_is_linear():
    table = synthetic_table()
    assert table.target(4, 1024, 8) == pytest.approx(1.0 + 3.2 + 1.024)
    assert table.draft(1, 128, 1) == pytest.approx(0.2 * (1.1 + 0.128))
    # the synthetic cost is linear in n and c for fixed b, so interpolation is exact
    assert table.target(4, 576, 3) == pytest.approx(1.0 + 1.2 + 0.576)
    # clamped outside the grid
    assert table.target(64, 99999, 99) == pytest.approx(table.target(16, 1024, 16))


def test_a_stalled_cell_is_priced_by_the_larger_cells_around_it():
    """One slow sample (a stall while timing B=1, c=128, n=1) must not price every plain
    step: the profiled grid is lowered to its monotone envelope; clean cells keep their time."""
    def timer(b, c, n):
        clean = 1.0 + 0.1 * b * n + 0.001 * c
        return clean * 3.0 if (b, c, n) == (1, 128, 1) else clean

    table = profile_table(KEY, timer, timer, [1, 4], [128, 1024], [1, 2, 4], progress=False)
    assert table.target(1, 128, 1) == pytest.approx(timer(1, 128, 2))  # the nearest larger cell
    assert table.target(4, 1024, 4) == pytest.approx(timer(4, 1024, 4))
    for axis in range(3):
        assert (table.target_seconds.diff(dim=axis) >= 0).all()


def test_a_batch_size_adding_tokens_for_less_than_a_smaller_one_is_raised(tmp_path):
    """Fast-side noise: at the largest batch size the profile priced a second token per
    sequence at nothing (the 2-core EPYC's B=32 row). Adding tokens to more sequences adds
    more rows, so the cell is raised to the smaller batch size's increment, on profiling and
    on reading a table saved without the rule; clean cells keep their time."""
    def timer(b, c, n):
        clean = 1.0 + 0.1 * b * n + 0.001 * c
        return 1.0 + 0.1 * b + 0.001 * c if (b, n) == (16, 2) else clean  # the 2nd token "free" at B=16

    table = profile_table(KEY, timer, timer, [1, 4, 16], [128, 1024], [1, 2, 4], progress=False)
    added_at_four = timer(4, 128, 2) - timer(4, 128, 1)
    assert table.target(16, 128, 2) == pytest.approx(timer(16, 128, 1) + added_at_four)
    assert table.target(16, 128, 4) == pytest.approx(timer(16, 128, 4)), "the next cell was clean"
    assert table.target(4, 1024, 4) == pytest.approx(timer(4, 1024, 4))
    for axis in range(3):
        assert (table.target_seconds.diff(dim=axis) >= 0).all()

    saved = CostTable(KEY, [1, 4, 16], [128, 1024], [1, 2, 4], *(torch.tensor(
        [[[timer(b, c, n) for n in (1, 2, 4)] for c in (128, 1024)] for b in (1, 4, 16)], dtype=torch.float64),) * 2)
    assert saved.target(16, 128, 2) < saved.target(16, 128, 1) + added_at_four
    saved.save(tmp_path / "t.json")
    assert torch.equal(CostTable.load(tmp_path / "t.json").target_seconds, table.target_seconds)
    assert torch.equal(additions_grow_with_batch(table.target_seconds), table.target_seconds), "idempotent"


def test_step_costs_are_normalised_by_one_target_token():
    costs = synthetic_table().at(batch_size=4, context=128, max_tokens=8)
    assert costs.target_ratio()[1] == pytest.approx(1.0)
    assert costs.draft.shape == (9,) and costs.draft[0] == 0
    assert (costs.target_ratio()[2:] > costs.target_ratio()[1:-1]).all()


def test_a_slow_stretch_of_the_machine_prices_no_cell():
    """The machine runs twice as slow for a stretch of the profile as long as a third of
    one pass over the grid (a busy neighbour for seconds): every cell keeps its clean time,
    whichever cells the stretch hit."""
    cells = 2 * 2 * 3  # batch sizes x contexts x new tokens below
    calls = []

    def clean(b, c, n):
        return 1.0 + 0.1 * b * n + 0.001 * c

    def timer(b, c, n):
        calls.append((b, c, n))
        slow = cells // 2 <= len(calls) < cells // 2 + cells * 2 // 3  # calls of target and draft alternate
        return clean(b, c, n) * (2.0 if slow else 1.0)

    table = profile_table(KEY, timer, timer, [1, 4], [128, 1024], [1, 2, 4], progress=False)
    assert len(calls) == 2 * cells * PROFILE_ROUNDS
    for b in (1, 4):
        for c in (128, 1024):
            for n in (1, 2, 4):
                assert table.target(b, c, n) == pytest.approx(clean(b, c, n))
                assert table.draft(b, c, n) == pytest.approx(clean(b, c, n))


def test_round_trip(tmp_path):
    table = synthetic_table()
    path = tmp_path / "table.json"
    table.save(path)
    loaded = CostTable.load(path, expected=KEY)
    assert loaded.key == KEY and loaded.batch_sizes == table.batch_sizes
    assert torch.equal(loaded.target_seconds, table.target_seconds)
    assert torch.equal(loaded.draft_seconds, table.draft_seconds)


@pytest.mark.parametrize("field", ["device", "target_model", "draft_model", "dtype", "vllm_version"])
def test_table_for_other_hardware_or_models_is_refused(tmp_path, field):
    path = tmp_path / "table.json"
    synthetic_table().save(path)
    other = TableKey(**{**KEY.__dict__, field: "something else"})
    with pytest.raises(CostTableError, match=f"{field} is .* in the table"):
        CostTable.load(path, expected=other)


@pytest.mark.parametrize("damage", ["truncate", "negative", "shape", "format"])
def test_corrupt_table_is_refused(tmp_path, damage):
    path = tmp_path / "table.json"
    synthetic_table().save(path)
    blob = json.loads(path.read_text())
    if damage == "truncate":
        path.write_text(path.read_text()[:50])
    else:
        if damage == "negative":
            blob["target_seconds"][0][0][0] = -1.0
        elif damage == "shape":
            blob["draft_seconds"] = blob["draft_seconds"][:1]
        else:
            blob["format"] = 99
        path.write_text(json.dumps(blob))
    with pytest.raises(CostTableError):
        CostTable.load(path, expected=KEY)


def test_chain_costs_round_trip_and_default_to_tree_costs(tmp_path):
    table = synthetic_table()
    assert table.chain_target_seconds is None and table.chain_draft_seconds is None
    assert torch.equal(table.at(4, 512, 8).verify_curve(chain=True), table.at(4, 512, 8).target)
    assert torch.equal(table.at(4, 512, 8).causal_draft_curve(), table.at(4, 512, 8).draft)
    with_chain = CostTable(table.key, table.batch_sizes, table.contexts, table.new_tokens, table.target_seconds,
                           table.draft_seconds, table.target_seconds * 0.5, table.draft_seconds * 0.25)
    with_chain.save(tmp_path / "t.json")
    loaded = CostTable.load(tmp_path / "t.json")
    costs = loaded.at(4, 512, 8)
    assert torch.allclose(costs.verify_curve(chain=True), 0.5 * costs.target)
    assert torch.allclose(costs.causal_draft_curve(), 0.25 * costs.draft)


def test_engines_of_different_sizes_keep_their_own_cached_tables(tmp_path, monkeypatch):
    """An engine that needs more batch or more tokens than the cached table covers profiles
    its own; engines then alternating between the two sizes (or a smaller one) load a
    covering table instead of replacing each other's on every start."""
    from vllm_cast.config import CastParams
    from vllm_cast.cost_tables import resolve_table

    monkeypatch.setenv("VLLM_CAST_CACHE", str(tmp_path))

    def timer(b, c, n):
        return 1e-3 * (1.0 + 0.1 * b * n)

    profiled = []

    def engine(max_batch: int, max_tokens: int) -> CostTable:
        def profile() -> CostTable:
            profiled.append((max_batch, max_tokens))
            return profile_table(KEY, timer, timer, [b for b in (1, 4, 16) if b <= max_batch], [128],
                                 [n for n in (1, 2, 4, 8, 16, 64) if n <= max_tokens], progress=False)

        return resolve_table(CastParams(), KEY, profile, max_tokens, max_batch)

    wide, deep = engine(16, 8), engine(1, 64)
    assert profiled == [(16, 8), (1, 64)]
    for _ in range(2):
        assert engine(16, 8).batch_sizes == wide.batch_sizes
        assert engine(1, 64).new_tokens == deep.new_tokens
    assert engine(4, 4).batch_sizes == wide.batch_sizes  # the smallest covering table serves
    assert profiled == [(16, 8), (1, 64)]
    corrupt = next((tmp_path / "cost_tables").glob("*-b1-t64.json"))
    corrupt.write_text("{")
    engine(1, 64)
    assert profiled[-1] == (1, 64)
    with pytest.raises(CostTableError, match="profile='never'"):
        resolve_table(CastParams(profile="never"), KEY, lambda: None, 128, 1)
