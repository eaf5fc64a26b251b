"""Checkpoint I/O: bit-exact round trips, the latest pointer, pruning, and bad files."""

import pytest
import torch
from torch import nn

from mbplan.agent import Agent, AgentConfig
from mbplan.checkpoint import (
    LATEST,
    agent_tensors,
    completed_checkpoints,
    find_checkpoint,
    load_checkpoint,
    optimizer_from_tensors,
    optimizer_to_tensors,
    restore_agent,
    save_checkpoint,
)
from mbplan.errors import UserError
from mbplan.replay import Batch


def tensor_groups() -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    flat = torch.randn(10, generator=g)
    return {
        "weights": {
            "w": torch.randn(3, 4, generator=g),
            "scalar": torch.tensor(2.5),
            "half": torch.randn(5, generator=g).to(torch.bfloat16),
            # views sharing one storage, as the agent's flat parameter buffer produces
            "view_a": flat[:4].view(2, 2),
            "view_b": flat[4:],
            "strided": flat[::3],
        },
        "replay": {
            "ints": torch.arange(7, dtype=torch.int64),
            "doubles": torch.randn(2, 3, generator=g, dtype=torch.float64),
            "empty": torch.zeros(0, 3),
        },
    }


def assert_groups_equal(a, b) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        for key in a[name]:
            x, y = a[name][key], b[name][key]
            assert x.dtype == y.dtype and x.shape == y.shape, (name, key)
            assert torch.equal(x, y), (name, key)


def test_round_trip_bit_exact(tmp_path):
    groups = tensor_groups()
    meta = {"episode": 3, "last_eval": None, "nested": {"lr": 3e-4, "betas": [0.9, 0.999]}}
    path = save_checkpoint(tmp_path, 42, groups, meta)
    assert path == tmp_path / "ckpt-000000042"
    assert sorted(p.name for p in path.iterdir()) == [
        "meta.json",
        "replay.safetensors",
        "weights.safetensors",
    ]
    for source in (tmp_path, path):  # a run folder or the checkpoint folder itself
        loaded, loaded_meta = load_checkpoint(source)
        assert_groups_equal(loaded, groups)
        assert {k: v for k, v in loaded_meta.items() if k != "sha256"} == {**meta, "step": 42}
        assert set(loaded_meta["sha256"]) == set(groups)  # a digest per file


def test_latest_pointer_and_pruning(tmp_path):
    groups = {"g": {"x": torch.zeros(1)}}
    for step in (100, 200, 300):
        groups["g"]["x"] = torch.tensor([float(step)])
        save_checkpoint(tmp_path, step, groups, {})
        assert (tmp_path / LATEST).read_text().strip() == f"ckpt-{step:09d}"
    assert [p.name for p in completed_checkpoints(tmp_path)] == ["ckpt-000000200", "ckpt-000000300"]
    assert find_checkpoint(tmp_path) == tmp_path / "ckpt-000000300"
    loaded, meta = load_checkpoint(tmp_path)
    assert meta["step"] == 300 and loaded["g"]["x"].item() == 300.0
    # keep=1 prunes down to the newest
    save_checkpoint(tmp_path, 400, groups, {}, keep=1)
    assert [p.name for p in completed_checkpoints(tmp_path)] == ["ckpt-000000400"]


def test_order_is_numeric_past_many_digits(tmp_path):
    for step in (9, 10, 123_456):
        save_checkpoint(tmp_path, step, {"g": {"x": torch.zeros(1)}}, {}, keep=3)
    assert [p.name for p in completed_checkpoints(tmp_path)][-1] == "ckpt-000123456"


def test_resaving_a_step_replaces_it(tmp_path):
    save_checkpoint(tmp_path, 5, {"g": {"x": torch.zeros(2)}, "old": {"y": torch.ones(1)}}, {})
    save_checkpoint(tmp_path, 5, {"g": {"x": torch.ones(2)}}, {"v": 2})
    groups, meta = load_checkpoint(tmp_path)
    assert set(groups) == {"g"} and torch.equal(groups["g"]["x"], torch.ones(2))
    assert meta["v"] == 2 and meta["step"] == 5


def test_stale_tmp_folder_is_ignored(tmp_path):
    save_checkpoint(tmp_path, 10, {"g": {"x": torch.ones(3)}}, {"ok": True})
    # A process killed while writing checkpoint 20 leaves a half-written temporary folder.
    stale = tmp_path / ".ckpt-000000020.tmp"
    stale.mkdir()
    (stale / "g.safetensors").write_bytes(b"\x00\x01half a file")
    assert completed_checkpoints(tmp_path) == [tmp_path / "ckpt-000000010"]
    assert find_checkpoint(tmp_path) == tmp_path / "ckpt-000000010"
    groups, meta = load_checkpoint(tmp_path)
    assert (meta["ok"], meta["step"]) == (True, 10) and torch.equal(groups["g"]["x"], torch.ones(3))
    # The next save at that step cleans it up and completes normally.
    save_checkpoint(tmp_path, 20, {"g": {"x": torch.zeros(3)}}, {})
    assert not stale.exists()
    assert load_checkpoint(tmp_path)[1]["step"] == 20


def test_missing_or_dangling_latest_falls_back_to_newest_completed(tmp_path):
    save_checkpoint(tmp_path, 1, {"g": {"x": torch.zeros(1)}}, {})
    save_checkpoint(tmp_path, 2, {"g": {"x": torch.zeros(1)}}, {})
    (tmp_path / LATEST).unlink()  # killed between the rename and the pointer update
    assert find_checkpoint(tmp_path) == tmp_path / "ckpt-000000002"
    (tmp_path / LATEST).write_text("ckpt-000000099\n")  # names a folder that is gone
    assert find_checkpoint(tmp_path) == tmp_path / "ckpt-000000002"


def test_missing_path_raises_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(UserError, match="no completed checkpoint"):
        load_checkpoint(tmp_path)  # exists, but empty


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_safetensors_raises_user_error(tmp_path, damage):
    path = save_checkpoint(tmp_path, 1, tensor_groups(), {})
    weights = path / "weights.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(
        {"truncate": data[: len(data) // 2], "garbage": b"not a safetensors file", "empty": b""}[
            damage
        ]
    )
    with pytest.raises(UserError, match="corrupt checkpoint"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", ""])
def test_corrupt_meta_raises_user_error(tmp_path, text):
    path = save_checkpoint(tmp_path, 1, {"g": {"x": torch.zeros(1)}}, {})
    (path / "meta.json").write_text(text)
    with pytest.raises(UserError, match="corrupt checkpoint"):
        load_checkpoint(tmp_path)


def _loss(model: nn.Module, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 4, generator=g), torch.randn(16, 2, generator=g)
    return (model(x) - y).square().mean()


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
    optimizer.zero_grad()
    _loss(model, seed).backward()
    optimizer.step()


@pytest.mark.parametrize("amsgrad", [False, True])
def test_optimizer_round_trip_restores_adam_exactly(tmp_path, amsgrad):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    optimizer = torch.optim.Adam(
        model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=1e-3, amsgrad=amsgrad
    )
    for seed in range(3):
        _step(model, optimizer, seed)

    tensors, settings = optimizer_to_tensors(optimizer)
    save_checkpoint(
        tmp_path, 3, {"model": model.state_dict(), "optim": tensors}, {"adam": settings}
    )
    groups, meta = load_checkpoint(tmp_path)

    torch.manual_seed(1)  # a fresh model with other weights and a fresh optimizer
    model2 = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    model2.load_state_dict(groups["model"])
    optimizer2 = torch.optim.Adam(model2.parameters(), lr=0.5)
    optimizer_from_tensors(optimizer2, groups["optim"], meta["adam"])
    assert optimizer2.param_groups[0]["lr"] == 1e-2
    assert optimizer2.param_groups[0]["betas"] == (0.8, 0.95)
    assert optimizer2.param_groups[0]["amsgrad"] == amsgrad
    for p, p2 in zip(model.parameters(), model2.parameters()):
        for key, value in optimizer.state[p].items():
            assert torch.equal(optimizer2.state[p2][key], value), key

    _step(model, optimizer, seed=10)
    _step(model2, optimizer2, seed=10)
    for p, p2 in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, p2)


def _batch(B: int, S: int, A: int, seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(
        torch.randn(B, S, generator=g),
        torch.rand(B, A, generator=g) * 2 - 1,
        torch.randn(B, generator=g),
        torch.randn(B, S, generator=g),
        (torch.rand(B, generator=g) < 0.2).float(),
    )


def _assert_state_dicts_equal(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("kind", ["direct", "iterative"])
def test_agent_round_trip_restores_weights_and_optimizer(tmp_path, kind):
    S, A = 3, 2
    config = AgentConfig(agent=kind, n_samples=3, n_iters=2, hidden=32)
    torch.manual_seed(0)
    agent = Agent(S, A, config)
    g = torch.Generator().manual_seed(0)
    for seed in range(3):
        agent.update(_batch(8, S, A, seed), g)

    groups, settings = agent_tensors(agent)
    save_checkpoint(tmp_path, 3, groups, {"optimizers": settings})
    groups, meta = load_checkpoint(tmp_path)

    torch.manual_seed(1)
    restored = Agent(S, A, config)
    restore_agent(restored, groups, meta)
    _assert_state_dicts_equal(agent, restored)

    torch.manual_seed(1)
    weights_only = Agent(S, A, config)
    restore_agent(weights_only, groups, {})  # no optimizer settings: fresh Adam moments
    _assert_state_dicts_equal(agent, weights_only)

    batch = _batch(8, S, A, seed=99)
    for a in (agent, restored, weights_only):
        a.update(batch, torch.Generator().manual_seed(5))
    _assert_state_dicts_equal(agent, restored)
    sa, sw = agent.state_dict(), weights_only.state_dict()
    assert any(not torch.equal(sa[k], sw[k]) for k in sa), "optimizer state made no difference"


def test_restore_agent_of_other_shape_raises_user_error(tmp_path):
    agent = Agent(3, 2, AgentConfig(hidden=16))
    groups, settings = agent_tensors(agent)
    with pytest.raises(UserError, match="does not fit"):
        restore_agent(Agent(4, 2, AgentConfig(hidden=16)), groups, {"optimizers": settings})
    with pytest.raises(UserError, match="does not fit"):
        restore_agent(Agent(3, 2, AgentConfig(agent="iterative", hidden=16)), groups, {})
