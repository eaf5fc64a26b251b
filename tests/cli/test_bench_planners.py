"""``mbplan bench planners`` (with its step-size sweep), ``gap`` and ``iterations`` (subprocess)."""

import pytest
from cli_helpers import PNG_SIGNATURE, one_line_error, read_csv, run_cli

from mbplan.bench.planners import SWEEP_LRS

pytestmark = [pytest.mark.mujoco, pytest.mark.slow]


SMOKE = {
    "planners": (["--states", 3, "--iters", 8, "--horizon", 2, "--sweep-states", 2,
                  "--sweep-iters", 3],
                 ["planner", "setting", "lr", "iteration", "n_evals", "seconds", "objective"]),
    "gap": (["--states", 3, "--max-iters", 20, "--patience", 10, "--eval-samples", 8,
             "--finetune-steps", 3, "--finetune-states", 8],
            ["planner", "state", "objective_before", "objective_after", "gap", "iterations"]),
    "iterations": (["--episodes", 2, "--max-steps", 5, "--extra-adam", 3, "--extra-iters", 2],
                   ["contender", "episode", "return", "steps", "ms_per_action", "J_gain"]),
}  # fmt: skip


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """``smoke(command)`` → (completed process, out folder); each command runs once."""
    cache = {}

    def get(command):
        if command not in cache:
            folder = tmp_path_factory.mktemp(command)
            cache[command] = run_cli("bench", command, *SMOKE[command][0], "--out", folder), folder
        return cache[command]

    return get


@pytest.mark.parametrize("command", sorted(SMOKE))
def test_bench_writes_csv_and_png(command, smoke):
    out, folder = smoke(command)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = read_csv(folder / f"bench-{command}.csv")
    assert rows and list(rows[0]) == SMOKE[command][1]
    png = (folder / f"bench-{command}.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000
    assert "wrote" in out.stdout


@pytest.mark.parametrize("command", ["planners", "gap"])
def test_bench_states_from_several_episodes(command, smoke):
    out, _ = smoke(command)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "3 on-policy states from 3 episodes (resets seeds 0–2" in out.stdout  # one per episode


def test_planners_table_and_curves(smoke):
    out, folder = smoke("planners")
    assert out.returncode == 0, out.stderr[-3000:]
    for label in ("iterative", "adam (lr 0.01, reference)", "cem (lr 0.9, default)", "direct"):
        assert label in out.stdout
    per_run = {}
    for row in read_csv(folder / "bench-planners.csv"):
        per_run.setdefault((row["planner"], row["setting"]), []).append(int(row["iteration"]))
    assert sorted(per_run) == [
        ("adam", "reference"), ("adam", "tuned"), ("cem", "default"), ("cem", "tuned"),
        ("direct", ""), ("iterative", ""),
    ]  # fmt: skip
    assert per_run["direct", ""] == [1]  # a single point
    for run in per_run.keys() - {("direct", "")}:
        assert per_run[run] == list(range(9))  # λ_0 … λ_8


def test_planners_sweep_picks_one_lr_per_baseline(smoke):
    out, folder = smoke("planners")
    assert out.returncode == 0, out.stderr[-3000:]
    sweep = read_csv(folder / "bench-planners-sweep.csv")
    assert list(sweep[0]) == ["planner", "lr", "score", "final", "chosen"]
    for name in ("adam", "cem"):
        points = [r for r in sweep if r["planner"] == name]
        assert [float(r["lr"]) for r in points] == list(SWEEP_LRS[name])
        chosen = [r for r in points if r["chosen"] == "True"]
        assert len(chosen) == 1
        assert float(chosen[0]["score"]) == max(float(r["score"]) for r in points)
        tuned = {r["lr"] for r in read_csv(folder / "bench-planners.csv")
                 if r["planner"] == name and r["setting"] == "tuned"}  # fmt: skip
        assert tuned == {chosen[0]["lr"]}
        assert f"{name} (lr {float(chosen[0]['lr']):g}, tuned)" in out.stdout
        verdict = next(x for x in out.stdout.splitlines() if x.startswith(f"{name}: lr "))
        assert verdict.startswith(f"{name}: lr {float(chosen[0]['lr']):g} won")
        lrs = [float(r["lr"]) for r in points]
        at_edge = float(chosen[0]["lr"]) in (min(lrs), max(lrs))
        assert ("WARNING" in verdict) == at_edge


def test_planners_sweep_flags_a_winner_at_the_grid_edge(tmp_path):
    out = run_cli("bench", "planners", "--states", 2, "--iters", 4, "--horizon", 2,
                  "--planners", "iterative", "adam", "--adam-lrs", 1e-5, 1e-2,
                  "--sweep-states", 2, "--sweep-iters", 4, "--out", tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    verdict = next(x for x in out.stdout.splitlines() if x.startswith("adam: lr "))
    assert verdict.startswith("adam: lr 0.01 won") and "highest" in verdict, verdict
    assert "extend --adam-lrs" in verdict


def test_planners_no_sweep(tmp_path):
    out = run_cli("bench", "planners", "--states", 2, "--iters", 3, "--horizon", 2,
                  "--planners", "iterative", "adam", "--adam-lr", 0.05, "--no-sweep",
                  "--out", tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    runs = {(r["planner"], r["setting"]) for r in read_csv(tmp_path / "bench-planners.csv")}
    assert runs == {("iterative", ""), ("adam", "fixed")}
    assert not (tmp_path / "bench-planners-sweep.csv").exists()
    assert "held-out" not in out.stdout and "tuned" not in out.stdout


def test_gap_rows_per_planner_and_state(smoke):
    out, folder = smoke("gap")
    assert out.returncode == 0, out.stderr[-3000:]
    rows = read_csv(folder / "bench-gap.csv")
    assert sorted((r["planner"], r["state"]) for r in rows) == [
        (p, str(i)) for p in ("direct", "direct-finetuned", "iterative") for i in range(3)
    ]
    for r in rows:
        gap = float(r["objective_after"]) - float(r["objective_before"])
        assert abs(float(r["gap"]) - gap) < 1e-4 and 0 <= int(r["iterations"]) <= 20
    assert "direct-finetuned: a copy of the direct policy trained 3 Adam steps" in out.stdout
    assert "8 on-policy states from 5 episodes (resets seeds 20000–20004" in out.stdout


def test_gap_without_finetuning(tmp_path):
    out = run_cli("bench", "gap", *SMOKE["gap"][0], "--finetune-steps", 0, "--planners", "direct",
                  "--out", tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert {r["planner"] for r in read_csv(tmp_path / "bench-gap.csv")} == {"direct"}
    assert "finetuned" not in out.stdout


def test_iterations_four_contenders(smoke):
    out, folder = smoke("iterations")
    assert out.returncode == 0, out.stderr[-3000:]
    rows = read_csv(folder / "bench-iterations.csv")
    names = list(dict.fromkeys(r["contender"] for r in rows))
    assert len(names) == 4 and "direct" in names
    assert sorted((r["contender"], r["episode"]) for r in rows) == sorted(
        (n, str(e)) for n in names for e in range(2)
    )
    assert "population SD over the 2 episodes of each contender" in out.stdout
    assert "0 of 8 episodes already finished" in out.stdout


def test_iterations_resumes_per_episode(smoke, tmp_path):
    out, folder = smoke("iterations")
    assert out.returncode == 0, out.stderr[-3000:]
    first = (folder / "bench-iterations.csv").read_text()
    for name in ("bench-iterations.csv", "bench-iterations-episodes.json"):  # a copy to rerun in
        (tmp_path / name).write_text((folder / name).read_text())
    again = run_cli("bench", "iterations", *SMOKE["iterations"][0], "--out", tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "8 of 8 episodes already finished" in again.stdout and ", episode " not in again.stdout
    assert (tmp_path / "bench-iterations.csv").read_text() == first
    more = run_cli("bench", "iterations", *SMOKE["iterations"][0], "--episodes", 3,
                   "--out", tmp_path)  # fmt: skip
    assert more.returncode == 0, more.stderr[-3000:]
    assert "8 of 12 episodes already finished" in more.stdout
    assert more.stdout.count(", episode 3/3:") == 4 and ", episode 1/3" not in more.stdout
    other = run_cli("bench", "iterations", *SMOKE["iterations"][0], "--max-steps", 4,
                    "--out", tmp_path)  # fmt: skip
    assert other.returncode == 0, other.stderr[-3000:]
    assert "other settings or weights: starting afresh" in other.stdout


BAD = [
    ["--checkpoint", "/nonexistent/run"],
    ["--objective", "newton"],
]


@pytest.mark.parametrize("command", sorted(SMOKE))
@pytest.mark.parametrize("bad", BAD)
def test_bench_bad_input(command, bad, tmp_path):
    one_line_error(run_cli("bench", command, *SMOKE[command][0], *bad, "--out", tmp_path))


@pytest.mark.parametrize(
    "command, bad",
    [
        ("planners", ["--states", 0]),
        ("gap", ["--states", 0]),
        ("planners", ["--planners", "newton"]),
        ("planners", ["--sweep-states", 0]),
        ("planners", ["--cem-lrs", 0.5, 1.5]),
        ("gap", ["--planners", "adam"]),
        ("gap", ["--finetune-steps", -1]),
        ("gap", ["--state-episodes", 0]),
        ("planners", ["--state-episodes", 0]),
        ("iterations", ["--episodes", 0]),
    ],
)
def test_bench_bad_numbers_and_planners(command, bad, tmp_path):
    one_line_error(run_cli("bench", command, *SMOKE[command][0], *bad, "--out", tmp_path))
