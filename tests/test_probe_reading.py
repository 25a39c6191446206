"""tools/probe_reading.py on the tiny random model (test-only): the rule's labels are learnt (loss falls on
the few rooms it sees again) and the table has one row per evaluation."""
from pathlib import Path

from helpers import load_tool

ROOT = Path(__file__).resolve().parents[1]


def load():
    return load_tool("probe_reading")


def test_supervised_probe_lowers_the_loss_on_the_rule_labels(capsys):
    probe = load()
    assert probe.main(["--config", str(ROOT / "configs" / "sokoban_bench_coords.yaml"), "--set", "model=tiny",
                       "--steps", "8", "--every", "1", "--train", "4", "--held-out", "4", "--batch", "4",
                       "--lr", "3e-3"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    body = [r for r in rows if r[0].strip().isdigit()]
    assert [int(r[0]) for r in body] == list(range(9))
    losses = [float(r[3]) for r in body[1:]]
    assert losses[-1] < losses[0] - 0.2  # the same 4 rooms each step: cross-entropy on their labels falls
    assert all(0.0 <= float(r[5]) <= 1.0 for r in body)


def test_bandit_probe_raises_the_sampled_reward(capsys):
    """--rl: the policy gradient on one-step shaped rewards moves the tiny model's samples toward the moves
    the reward pays for, on the one room it sees every step (untrained step 1 against steps 11-15; with the
    advantage's sign flipped the reward falls below step 1's instead)."""
    probe = load()
    assert probe.main(["--config", str(ROOT / "configs" / "sokoban_bench_coords.yaml"), "--set", "model=tiny",
                       "--set", "shaping=1.0", "--rl", "8", "--steps", "15", "--every", "1", "--train", "1",
                       "--held-out", "1", "--batch", "2", "--lr", "1e-2"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    reward = [float(r[4]) for r in rows if r[0].strip().isdigit() and r[4].strip()]
    assert len(reward) == 15
    assert sum(reward[-5:]) / 5 > reward[0] + 0.2
