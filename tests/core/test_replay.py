"""ReplayBuffer: ring-buffer order, sampling, and its state dict."""

import pytest
import torch

from mbplan.replay import FIELDS, ReplayBuffer

S, A = 3, 2


def transition(i: int):
    """A transition whose every field encodes ``i``, so stored rows are recognisable."""
    state = [float(i), i + 0.1, i + 0.2]
    action = [i / 100.0, -i / 100.0]
    next_state = [i + 1.0, i + 1.1, i + 1.2]
    return state, action, float(10 * i), next_state, i % 3 == 0


def filled(n: int, capacity: int) -> ReplayBuffer:
    buffer = ReplayBuffer(S, A, capacity)
    for i in range(n):
        buffer.add(*transition(i))
    return buffer


def expected_rows(indices) -> dict[str, torch.Tensor]:
    rows = [transition(i) for i in indices]
    return {
        "states": torch.tensor([r[0] for r in rows]),
        "actions": torch.tensor([r[1] for r in rows]),
        "rewards": torch.tensor([r[2] for r in rows]),
        "next_states": torch.tensor([r[3] for r in rows]),
        "terminated": torch.tensor([float(r[4]) for r in rows]),
    }


def test_add_and_len():
    buffer = ReplayBuffer(S, A, capacity=10)
    assert len(buffer) == 0
    for i in range(4):
        buffer.add(*transition(i))
        assert len(buffer) == i + 1
    ordered = buffer.ordered()
    for f, expected in expected_rows(range(4)).items():
        assert torch.equal(ordered[f], expected), f
    assert ordered["terminated"].dtype == torch.float32


def test_wrap_around_overwrites_oldest():
    buffer = filled(8, capacity=5)
    assert len(buffer) == 5
    ordered = buffer.ordered()
    for f, expected in expected_rows(range(3, 8)).items():
        assert torch.equal(ordered[f], expected), f


def test_exactly_full_and_one_past_full():
    buffer = filled(5, capacity=5)
    assert torch.equal(buffer.ordered()["rewards"], expected_rows(range(5))["rewards"])
    buffer.add(*transition(5))
    assert torch.equal(buffer.ordered()["rewards"], expected_rows(range(1, 6))["rewards"])


def test_capacity_must_be_positive():
    with pytest.raises(ValueError):
        ReplayBuffer(S, A, capacity=0)


def test_sample_shapes_and_rows_are_stored_rows():
    buffer = filled(8, capacity=5)
    batch = buffer.sample(64, torch.Generator().manual_seed(0))
    assert batch.states.shape == (64, S)
    assert batch.actions.shape == (64, A)
    assert batch.rewards.shape == (64,)
    assert batch.next_states.shape == (64, S)
    assert batch.terminated.shape == (64,)
    stored = expected_rows(range(3, 8))
    for b in range(64):
        # The reward identifies the row; every field of the sample must come from that same row.
        (match,) = (stored["rewards"] == batch.rewards[b]).nonzero()[:, 0].tolist()
        for f in FIELDS:
            assert torch.equal(getattr(batch, f)[b], stored[f][match]), (b, f)
    # With 64 draws over 5 rows, every stored row shows up (probability of a miss ~ 5·0.8^64).
    assert set(batch.rewards.tolist()) == set(stored["rewards"].tolist())


def test_sample_before_full_only_sees_filled_rows():
    buffer = filled(3, capacity=100)
    batch = buffer.sample(200, torch.Generator().manual_seed(1))
    assert set(batch.rewards.tolist()) == {0.0, 10.0, 20.0}


def test_same_seed_same_sample():
    buffer = filled(20, capacity=50)
    a = buffer.sample(16, torch.Generator().manual_seed(123))
    b = buffer.sample(16, torch.Generator().manual_seed(123))
    c = buffer.sample(16, torch.Generator().manual_seed(124))
    for f in FIELDS:
        assert torch.equal(getattr(a, f), getattr(b, f))
    assert not torch.equal(a.rewards, c.rewards)


def test_empty_sample_raises():
    with pytest.raises(ValueError, match="empty"):
        ReplayBuffer(S, A, capacity=4).sample(2)


def test_state_dict_round_trip():
    buffer = filled(8, capacity=5)
    sd = buffer.state_dict()
    for f, expected in expected_rows(range(3, 8)).items():
        assert torch.equal(sd[f], expected), f
        assert sd[f].is_contiguous()
    restored = ReplayBuffer(S, A, capacity=5)
    restored.load_state_dict(sd)
    assert len(restored) == 5
    for f in FIELDS:
        assert torch.equal(restored.ordered()[f], buffer.ordered()[f]), f
    # The restored buffer keeps overwriting its oldest transition first.
    restored.add(*transition(8))
    assert torch.equal(restored.ordered()["rewards"], expected_rows(range(4, 9))["rewards"])


def test_state_dict_into_larger_buffer_keeps_adding():
    restored = ReplayBuffer(S, A, capacity=10)
    restored.load_state_dict(filled(8, capacity=5).state_dict())
    assert len(restored) == 5
    restored.add(*transition(8))
    assert torch.equal(restored.ordered()["rewards"], expected_rows(range(3, 9))["rewards"])


def test_state_dict_into_smaller_buffer_keeps_newest():
    sd = filled(8, capacity=6).state_dict()  # transitions 2..7
    small = ReplayBuffer(S, A, capacity=3)
    small.load_state_dict(sd)
    assert len(small) == 3
    for f, expected in expected_rows(range(5, 8)).items():
        assert torch.equal(small.ordered()[f], expected), f
    small.add(*transition(8))
    assert torch.equal(small.ordered()["rewards"], expected_rows(range(6, 9))["rewards"])


def test_empty_state_dict_round_trip():
    restored = ReplayBuffer(S, A, capacity=4)
    restored.load_state_dict(ReplayBuffer(S, A, capacity=4).state_dict())
    assert len(restored) == 0
    with pytest.raises(ValueError):
        restored.sample(1)


@pytest.mark.parametrize(("state_dim", "action_dim"), [(S + 1, A), (S, A + 1)])
def test_load_shape_mismatch_raises(state_dim, action_dim):
    sd = filled(4, capacity=4).state_dict()
    other = ReplayBuffer(state_dim, action_dim, capacity=4)
    with pytest.raises(ValueError, match="expected"):
        other.load_state_dict(sd)
    assert len(other) == 0
