"""tools/bench_memory.py on the tiny model (a stand-in, for tests only): one row per phase of a real iteration,
each printed to stderr as its phase ends (a slow run stopped part-way keeps what it measured), and the JSON."""
import json
import re
from pathlib import Path

from helpers import load_tool

ROOT = Path(__file__).resolve().parents[1]


def load():
    return load_tool("bench_memory")


def test_one_row_per_phase_printed_as_each_phase_ends(tmp_path, capsys):
    out = tmp_path / "mem.json"
    args = [str(ROOT / "configs" / "sokoban_cpu.yaml"), "--model", "tiny", "--set", "tasks_per_iteration=1",
            "--set", "group_size=2", "--set", "rollouts_per_blueprint=2", "--set", "max_steps=1",
            "--json", str(out)]
    assert load().main(args) == 0
    cap = capsys.readouterr()
    phases = [p["phase"] for p in json.loads(out.read_text())["phases"]]
    assert phases[0] == "A: blueprints" and "B: rollouts" in phases and phases[-1] == "B: update"
    table = re.findall(r"^\| (A: [^|]+|B: [^|]+) \| (\d+\.\d\d) \|", cap.out, re.MULTILINE)
    assert [name.strip() for name, _ in table] == phases
    live = re.findall(r"^  (A: .+|B: .+): peak (\d+\.\d\d) GiB", cap.err, re.MULTILINE)
    assert [name for name, _ in live] == phases and [gib for _, gib in live] == [gib for _, gib in table]
    assert re.search(r"^  loaded in \d+\.\d s: \d+\.\d\d GiB held", cap.err, re.MULTILINE)
