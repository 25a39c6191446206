"""ALFWorld on the real TextWorld PDDL engine: generated tiny games, data discovery and its
errors, invalid commands, containment, the worker pool, real games when the shared data is
here, and one co-evolution iteration as a subprocess."""
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from envs import get_spec
from envs.alfworld import (SPEC, TASK_TYPES, AlfworldConfig, AlfworldEnv, DataError, find_games, load_engine,
                           parse_action)
from envs.alfworld_games import KINDS, planner_solution, tiny_game, write_tiny_games
from envs.base import SerialPool

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "alfworld"
TOOL_STEP = {"clean": "clean ", "heat": "heat ", "cool": "cool "}
RUNS_WITHOUT_ALFWORLD = {"test_envs_import_without_alfworld", "test_parse_action", "test_unknown_task_type_is_a_config_error"}


def needs_alfworld():
    pytest.importorskip("alfworld")
    pytest.importorskip("textworld")


@pytest.fixture(autouse=True)
def _skip_without_alfworld(request):
    if request.node.originalname not in RUNS_WITHOUT_ALFWORLD:
        needs_alfworld()


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    """One generated game of each type in train and in valid_seen, in alfworld-download's layout."""
    needs_alfworld()
    return write_tiny_games(tmp_path_factory.mktemp("alfworld"), per_type=1)


def test_envs_import_without_alfworld(tmp_path):
    """himac and envs import, and alfworld is registered, with alfworld/textworld absent; using it says what to install."""
    code = (
        "import sys\n"
        "for m in ('alfworld', 'textworld', 'fast_downward'): sys.modules[m] = None  # as if not installed\n"
        "import himac.coevolve, envs\n"
        "from envs.alfworld import AlfworldConfig\n"
        "spec = envs.get_spec('alfworld')\n"
        f"try: spec.pool(AlfworldConfig(data_path={str(tmp_path)!r}))\n"
        "except ImportError as e: print('ImportError:', e)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ImportError: the alfworld env needs ['alfworld', 'textworld', 'fast_downward']" in proc.stdout
    assert "pip install -e '.[alfworld]'" in proc.stdout


def env_on(root, **kw) -> AlfworldEnv:
    return AlfworldEnv(AlfworldConfig(data_path=str(root), **kw))


def seed_of(env: AlfworldEnv, kind: str) -> int:
    return [t for _, t in env.games].index(kind)


def replay(env, seed, commands):
    obs = env.reset(seed)
    out = []
    for c in commands:
        assert c in obs.admissible, (c, obs.admissible)
        obs, reward, done, info = env.step(c)
        out.append((obs, reward, done, info))
        if done:
            break
    return out


# -- tiny games: won by the planner's solution, lost by a wrong one ------------------------------
@pytest.mark.parametrize("kind", list(KINDS))
def test_tiny_game_is_won_by_its_plan_and_lost_without_the_key_step(tiny_root, kind):
    env = env_on(tiny_root, max_steps=12)
    seed = seed_of(env, kind)
    data = json.loads(Path(env.games[seed][0]).read_text())
    plan = planner_solution(data)  # textworld's policy_commands, asked again now
    assert plan == data["walkthrough"]
    steps = replay(env, seed, plan)
    assert len(steps) == len(plan)
    (*_, (obs, reward, done, info)) = steps
    assert done and info["success"] and reward == 10.0 and info["invalid_commands"] == 0
    assert all(r == 0.0 and not d for _, r, d, _ in steps[:-1])
    assert env.task_type == kind and env.task == tiny_game(kind, 0, plan=False).task

    # wrong: skip the step that makes it count (clean/heat/cool, lamp, last put), then idle
    key = next((c for c in plan if c.startswith(TOOL_STEP.get(kind, "\0"))), None) or \
        ("use " if kind == "look" else plan[-1])
    wrong = [c for c in plan if not c.startswith(key)]
    steps = replay(env, seed, wrong)
    assert not any(i["success"] for *_, i in steps) and all(r <= 0 for _, r, _, _ in steps)
    obs, reward, done, info = steps[-1]
    while not done:
        obs, reward, done, info = env.step("look")
    assert not info["success"] and info["steps"] == 12


def test_tiny_games_vary_with_the_seed():
    a, b = tiny_game("heat", 0, plan=False), tiny_game("heat", 1, plan=False)
    assert a.data["pddl_problem"] != b.data["pddl_problem"]
    assert tiny_game("heat", 0, plan=False).data == a.data  # same seed, same game
    with pytest.raises(ValueError, match="'boil'"):
        tiny_game("boil")


def test_memoised_translation_plays_the_same_game(tiny_root, monkeypatch):
    """The fast-downward memo (envs.alfworld.memoise_translation) changes no text or command."""
    import fast_downward
    path = find_games(str(tiny_root / "json_2.1.1"), "train", ("cool",))[0][0]
    plan = json.loads(Path(path).read_text())["walkthrough"]

    def play():
        e = load_engine(path)
        trace = []
        for _ in range(2):  # the second episode runs on a reset engine: translations come from the memo
            s = e.reset()
            trace.append((s.feedback, s["admissible_commands"]))
            for c in plan:
                s, _, _ = e.step(c)
                trace.append((s.feedback, s["admissible_commands"], s["won"]))
        return trace

    memoised = play()
    original = fast_downward.pddl2sas.__wrapped__

    def plain(*args, **kwargs):
        return original(*args, **kwargs)
    plain.himac_memo = True  # keeps load_engine from memoising again
    monkeypatch.setattr(fast_downward, "pddl2sas", plain)
    assert play() == memoised
    assert memoised[len(plan)][-1] is True  # and the plan wins


# -- the env's contract ---------------------------------------------------------------------------
@pytest.mark.parametrize("text,expected", [
    ("Action: go to fridge 1", ("go to fridge 1", True)),
    ("Action:  Take Apple 1 from CounterTop 1.\nmore text", ("take apple 1 from countertop 1", True)),
    ("Action: `open drawer 2`", ("open drawer 2", True)),
    ("Action: \n\nlook", ("look", True)),
    ("Action: - go to cabinet 10", ("go to cabinet 10", True)),
    ("Action: 2. examine desk 1", ("examine desk 1", True)),
    ("Action: go to armchair 1, go to armchair 2, go to", ("go to armchair 1", True)),  # a copied list
    ("Action: I think I should open the fridge", (None, False)),
    ("Action: fly to the moon", (None, False)),
    ("Action:", (None, False)),
    ("Action: goto fridge 1", (None, False)),
])
def test_parse_action(text, expected):
    assert parse_action(text) == expected


def test_invalid_and_inadmissible_commands_cost_a_step_and_change_nothing(tiny_root):
    env = env_on(tiny_root, max_steps=20)
    seed = seed_of(env, "pick")
    first = env.reset(seed)
    assert "You are in the middle of a room" in first.text and "Your task" not in first.text
    assert first.admissible and "help" not in first.admissible
    assert first.text.endswith("Admissible commands: " + ", ".join(first.admissible) + ".")
    obs, reward, done, info = env.step("take apple 1 from fridge 1")  # command-shaped, not admissible
    assert (obs.feedback, reward, done, info["invalid"]) == ("Nothing happens.", -0.1, False, True)
    assert obs.admissible == first.admissible
    obs, reward, done, info = env.step(None)  # unparseable: the executor adds its own penalty
    assert (reward, info["invalid"], info["invalid_commands"], info["steps"]) == (0.0, True, 2, 2)
    plan = json.loads(Path(env.games[seed][0]).read_text())["walkthrough"]
    for c in plan:
        obs, reward, done, info = env.step(c)
    assert info["success"] and info["invalid_commands"] == 2 and info["steps"] == 2 + len(plan)


def test_seed_picks_a_game_deterministically(tiny_root):
    env = env_on(tiny_root)
    n = len(env.games)
    assert n == 6 and [g for g, _ in env.games] == sorted(g for g, _ in env.games)
    tasks = []
    for seed in (3, 3 + n, 3 + 7 * n):
        env.reset(seed)
        tasks.append((env.game, env.task))
    assert len(set(tasks)) == 1
    env.reset(4)
    assert env.game != tasks[0][0]
    assert {t for _, t in env.games} == set(TASK_TYPES.values())


def test_task_types_filter_and_eval_split(tiny_root):
    cfg = AlfworldConfig(data_path=str(tiny_root), task_types=["heat", "cool"])
    env = AlfworldEnv(cfg)
    assert sorted(t for _, t in env.games) == ["cool", "heat"]
    ev = AlfworldEnv(cfg, evaluation=True)
    assert all("/valid_seen/" in g for g, _ in ev.games)
    assert not set(g for g, _ in ev.games) & set(g for g, _ in env.games)


def test_evaluation_plays_each_game_of_the_split_once(tiny_root):
    from envs.seeds import eval_seeds
    pool = SPEC.pool(AlfworldConfig(data_path=str(tiny_root), num_workers=0), evaluation=True)
    try:
        pool.reset(eval_seeds(6))
        games = [pool.env(i).game for i in range(6)]
        assert len(set(games)) == 6 and all("/valid_seen/" in g for g in games)
        assert sorted(pool.task_types) == sorted(TASK_TYPES.values())
        first3 = pool.reset(eval_seeds(3)) and [pool.env(i).game for i in range(3)]
        assert first3 == games[:3]  # the same seeds, the same games
    finally:
        pool.close()


# -- data path errors -------------------------------------------------------------------------------
def test_missing_data_path_says_how_to_get_data(monkeypatch, tmp_path):
    monkeypatch.delenv("ALFWORLD_DATA", raising=False)
    with pytest.raises(DataError, match="alfworld-download"):
        AlfworldEnv(AlfworldConfig())
    with pytest.raises(DataError, match=f"'{tmp_path / 'nowhere'}' does not exist.*alfworld-download"):
        AlfworldEnv(AlfworldConfig(data_path=str(tmp_path / "nowhere")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no json_2.1.1"):
        AlfworldEnv(AlfworldConfig(data_path=str(tmp_path / "empty")))
    (tmp_path / "empty" / "json_2.1.1" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="no game.tw-pddl files under .*train.*alfworld-download"):
        AlfworldEnv(AlfworldConfig(data_path=str(tmp_path / "empty")))
    with pytest.raises(DataError, match="split 'valid_unseen' not found.*has: \\['train'\\]"):
        AlfworldEnv(AlfworldConfig(data_path=str(tmp_path / "empty"), eval_split="valid_unseen"), evaluation=True)
    # the pool checks the path at start-up, in the trainer, not in every episode
    with pytest.raises(DataError, match="alfworld-download"):
        SPEC.pool(AlfworldConfig(data_path=str(tmp_path / "nowhere")))


def test_data_found_through_env_var_and_tarball(tiny_root, monkeypatch, tmp_path):
    monkeypatch.setenv("ALFWORLD_DATA", str(tiny_root))
    assert len(AlfworldEnv(AlfworldConfig()).games) == 6
    tarball = tmp_path / "alfworld_tiny.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(tiny_root / "json_2.1.1", arcname="json_2.1.1")
    monkeypatch.setenv("HIMAC_CACHE", str(tmp_path / "cache"))
    env = AlfworldEnv(AlfworldConfig(data_path=str(tarball)))
    assert len(env.games) == 6 and str(tmp_path / "cache" / "alfworld" / "alfworld_tiny") in env.games[0][0]
    assert env.reset(0).admissible


def test_unknown_task_type_is_a_config_error():
    from himac.config import ConfigError
    with pytest.raises(ConfigError, match="'task_types'.*'pik'"):
        AlfworldConfig(task_types=["pik"])


# -- containment: a corrupt game, an engine that raises mid-episode ---------------------------------------
@pytest.fixture
def broken_root(tiny_root, tmp_path):
    """The tiny games plus a corrupt game file and a game whose grammar lacks the 'take' feedback."""
    root = tmp_path / "broken"
    shutil.copytree(tiny_root, root)
    bad = root / "json_2.1.1" / "train" / "pick_and_place_simple-Zzz-None-Shelf-9" / "trial_corrupt"
    bad.mkdir(parents=True)
    (bad / "game.tw-pddl").write_text('{"pddl_domain": "(define (domain')
    game = tiny_game("pick", 5)
    game.data["grammar"] = game.data["grammar"].replace('"PickupObject.feedback"', '"PickupObject.gone"')
    raising = root / "json_2.1.1" / "train" / "pick_and_place_simple-Zzy-None-Shelf-9" / "trial_raises"
    raising.mkdir(parents=True)
    (raising / "game.tw-pddl").write_text(json.dumps(game.data))
    return root, game.data["walkthrough"]


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_game_and_raising_engine_fail_only_their_episode(broken_root, workers):
    root, raising_plan = broken_root
    cfg = AlfworldConfig(data_path=str(root), task_types=["pick", "heat"], num_workers=workers)
    pool = SPEC.pool(cfg)
    try:
        assert isinstance(pool, SerialPool) == (workers == 0)
        games = AlfworldEnv(cfg).games
        kinds = [Path(g).parent.name for g, _ in games]
        corrupt, raising = kinds.index("trial_corrupt"), kinds.index("trial_raises")
        heat = next(i for i, (_, t) in enumerate(games) if t == "heat")
        obs = pool.reset([corrupt, raising, heat])
        assert list(pool.failed) == [0] and "JSONDecodeError" in pool.failed[0]
        assert pool.task_types[1:] == ["pick", "heat"] and pool.tasks[2].startswith("put a hot")
        assert obs[1].admissible and obs[2].admissible
        heat_plan = json.loads(Path(games[heat][0]).read_text())["walkthrough"]
        results = pool.step([1, 2], [raising_plan[0], heat_plan[0]])
        assert all("error" not in info for *_, info in results)
        (_, _, done, info), (_, _, done2, info2) = pool.step([1, 2], [raising_plan[1], heat_plan[1]])
        assert done and "PickupObject" in info["error"] and not info["success"]
        assert not done2 and "error" not in info2  # the other episode goes on ...
        for c in heat_plan[2:]:
            (_, reward, done2, info2), = pool.step([2], [c])
        assert done2 and info2["success"] and reward == 10.0  # ... and is won
        # the next batch is healthy again, the raising game included (its broken engine was dropped)
        pool.reset([raising, heat])
        assert not pool.failed
    finally:
        pool.close()


# -- the worker pool on games ---------------------------------------------------------------------------
def test_worker_pool_plays_the_same_games_as_this_process(tiny_root):
    cfg = AlfworldConfig(data_path=str(tiny_root), num_workers=2)
    pool, serial = SPEC.pool(cfg), SPEC.pool(AlfworldConfig(data_path=str(tiny_root), num_workers=0))
    try:
        seeds = list(range(6))
        a, b = pool.reset(seeds), serial.reset(seeds)
        assert [o.text for o in a] == [o.text for o in b] and pool.tasks == serial.tasks
        assert sorted(pool.task_types) == sorted(TASK_TYPES.values())
        assert [info["game"] for info in pool.infos] == [serial.env(i).game for i in seeds]
        assert all("optimal_moves" not in info for info in pool.infos)  # a walkthrough is no proven optimum
        plans = [json.loads(Path(serial.env(i).game).read_text())["walkthrough"] for i in seeds]
        live, won = set(seeds), set()
        for t in range(max(map(len, plans))):
            slots = [i for i in sorted(live) if t < len(plans[i])]
            ra = pool.step(slots, [plans[i][t] for i in slots])
            rb = serial.step(slots, [plans[i][t] for i in slots])
            assert [(o.text, r, d) for o, r, d, _ in ra] == [(o.text, r, d) for o, r, d, _ in rb]
            won |= {i for i, (*_, info) in zip(slots, ra) if info["success"]}
        assert won == set(seeds)
    finally:
        pool.close()
        serial.close()


def test_registered_and_documented():
    spec = get_spec("alfworld")
    assert spec is SPEC and spec.task_types == ("pick", "look", "clean", "heat", "cool", "pick2")
    assert "admissible" in spec.prompts.executor_user or "admissible" in spec.prompts.executor_system


# -- real games (the shared data, when present) ---------------------------------------------------------------
@pytest.mark.skipif(not (SHARED / "alfworld_valid_seen.tar.gz").is_file(), reason="shared ALFWorld data absent")
def test_real_walkthroughs_replay_to_a_win(monkeypatch, tmp_path):
    """One game of each of the six types from valid_seen (the middle one of its type), through the worker pool."""
    monkeypatch.setenv("HIMAC_CACHE", str(tmp_path))
    cfg = AlfworldConfig(data_path=str(SHARED / "alfworld_valid_seen.tar.gz"), train_split="valid_seen",
                         num_workers=2)
    games = AlfworldEnv(cfg).games
    assert len(games) == 140
    picks = []
    for kind in TASK_TYPES.values():
        idx = [i for i, (_, t) in enumerate(games) if t == kind]
        picks.append(idx[len(idx) // 2])
    plans = [json.loads(Path(games[i][0]).read_text())["walkthrough"] for i in picks]
    pool = SPEC.pool(cfg)
    try:
        obs = pool.reset(picks)
        assert not pool.failed and sorted(set(pool.task_types)) == sorted(TASK_TYPES.values())
        live, won = set(range(len(picks))), set()
        for t in range(max(map(len, plans))):
            slots = [i for i in sorted(live) if t < len(plans[i])]
            for i in slots:
                assert plans[i][t] in obs[i].admissible, (games[picks[i]][0], plans[i][t])
            for i, res in zip(slots, pool.step(slots, [plans[i][t] for i in slots])):
                obs[i], _, done, info = res
                if info["success"]:
                    won.add(i)
                if done:
                    live.discard(i)
        assert won == set(range(len(picks)))
    finally:
        pool.close()


# -- one co-evolution iteration, as a user runs it ---------------------------------------------------------------
def test_one_coevolve_iteration_on_tiny_games(tiny_root, tmp_path):
    out = tmp_path / "run"
    args = ["configs/alfworld_cpu.yaml", "--out", str(out), "--set", f"data_path={tiny_root}",
            "--set", "model=tiny", "--set", "load_in_4bit=false", "--set", "iterations=1",
            "--set", "tasks_per_iteration=2", "--set", "group_size=2", "--set", "rollouts_per_blueprint=2",
            "--set", "blueprint_max_tokens=12", "--set", "action_max_tokens=8", "--set", "max_steps=3",
            "--set", "eval_episodes=6"]
    proc = subprocess.run([sys.executable, "-m", "himac.coevolve", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (m,) = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert m["iteration"] == 0 and m["env/steps"] > 0 and m["env/end_env_error"] == 0.0
    assert 0.0 <= m["env/invalid_action_rate"] <= 1.0
    evals = [json.loads(x) for x in (out / "eval.jsonl").read_text().splitlines()]
    assert [e["iteration"] for e in evals] == [-1, 0]
    for e in evals:  # one held-out game of each type: success per type like Table 1
        assert e["eval/episodes_run"] == 6
        assert {k.split("/")[-1] for k in e if k.startswith("eval/success_rate/")} == set(TASK_TYPES.values())
    assert "data_path: " + str(tiny_root) in (out / "config.yaml").read_text()
