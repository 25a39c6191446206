"""Sokoban dynamics, rewards, seeding and the BFS solver, on hand-made rooms, and
cross-checked against gym-sokoban's own SokobanEnv."""
import random
import warnings

import numpy as np
import pytest

from envs.sokoban import (ACTIONS, BOX, BOX_ON, PLAYER, SokobanConfig, SokobanEnv, generate, parse_action, parse_room,
                          potential, render_text, solve)


def make(text: str, max_steps: int = 15) -> SokobanEnv:
    env = SokobanEnv(SokobanConfig(max_steps=max_steps))
    env.load(*parse_room(text))
    return env


def player(env):
    return tuple(np.argwhere(env.room_state == PLAYER)[0])


def test_render_parses_back():
    text = "#####\n#@$.#\n#_*_#\n#####"
    fixed, state = parse_room(text)
    assert render_text(fixed, state) == text


def test_walk_and_wall():
    env = make("#######\n#@__$.#\n#######")
    obs, r, done, info = env.step("left")  # wall
    assert player(env) == (1, 1) and r == pytest.approx(-0.1) and not done
    assert "wall" in obs.feedback
    obs, r, done, _ = env.step("right")
    assert player(env) == (1, 2) and r == pytest.approx(-0.1)
    assert obs.text == "#######\n#_@_$.#\n#######"


def test_push_box_onto_target_solves_with_gym_reward():
    env = make("######\n#@$_.#\n######")
    _, r, done, info = env.step("right")
    assert r == pytest.approx(-0.1) and not done  # box moved, not yet on the target
    _, r, done, info = env.step("right")
    assert r == pytest.approx(-0.1 + 1 + 10) and done and info["success"]
    assert env.text() == "######\n#__@*#\n######"


def test_box_against_wall_or_box_does_not_move():
    env = make("#####\n#@$##\n#####")
    env.step("right")
    assert player(env) == (1, 1) and env.room_state[1, 2] == BOX
    env = make("######\n#@$$.#\n######")
    obs, r, _, _ = env.step("right")
    assert player(env) == (1, 1) and r == pytest.approx(-0.1)
    assert "cannot move" in obs.feedback


def test_push_box_off_target_costs_one():
    env = make("#######\n#@*_..#\n#__$__#\n#######")  # two boxes, one on a target
    assert env.boxes_on_target == 1
    _, r, done, _ = env.step("right")
    assert r == pytest.approx(-0.1 - 1) and not done
    assert env.room_state[1, 3] == BOX and env.boxes_on_target == 0


def test_invalid_action_costs_a_step_and_changes_nothing():
    env = make("#####\n#@$.#\n#####", max_steps=2)
    before = env.room_state.copy()
    obs, r, done, _ = env.step(None)
    assert (env.room_state == before).all() and r == pytest.approx(-0.1) and not done
    assert "Invalid" in obs.feedback
    _, _, done, info = env.step(None)
    assert done and not info["success"]  # max_steps reached


def test_unknown_action_is_an_error():
    with pytest.raises(ValueError, match="north"):
        make("#####\n#@$.#\n#####").step("north")


def test_deadlock_reported_for_cornered_box():
    env = make("#####\n#.__#\n#__$#\n#__@#\n#####")
    obs, _, _, _ = env.step("left")
    assert "Deadlock" not in obs.feedback
    env = make("#####\n#.__#\n#__$#\n#__@#\n#####")
    obs, _, _, _ = env.step("up")  # box into the top-right corner, off target
    assert "Deadlock" in obs.feedback


def test_parse_action():
    assert parse_action("up") == ("up", True)
    assert parse_action("Direction: Right.") == ("right", True)
    assert parse_action("left, left") == ("left", True)
    assert parse_action("up or down") == (None, False)
    assert parse_action("<sub_done>") == (None, False)
    assert parse_action("") == (None, False)
    assert parse_action("upward") == (None, False)  # whole words only


# -- BFS solver --------------------------------------------------------------------------------
@pytest.mark.parametrize("room,optimum", [
    ("#####\n#@$.#\n#####", 1),
    ("######\n#@_$.#\n######", 2),
    # the player walks round to the box's far side (left, left, left, up) and pushes right once
    ("######\n#_$.##\n#___@#\n######", 5),
    ("#####\n#@*_#\n#####", 0),
])
def test_solver_optimum_on_hand_made_rooms(room, optimum):
    fixed, state = parse_room(room)
    plan = solve(fixed, state)
    assert plan is not None and len(plan) == optimum
    env = SokobanEnv(SokobanConfig())
    env.load(fixed, state)
    info = {"success": optimum == 0}
    for a in plan:
        _, _, _, info = env.step(a)
    assert info["success"]


def test_solver_detects_unsolvable():
    fixed, state = parse_room("#####\n#$_.#\n#@__#\n#####")  # box in a corner
    assert solve(fixed, state) is None


# -- generation and seeding ----------------------------------------------------------------------
def test_same_seed_same_room_and_global_rng_untouched():
    cfg = SokobanConfig()
    random.seed(123)
    np.random.seed(123)
    expect_py, expect_np = random.random(), np.random.rand()
    random.seed(123)
    np.random.seed(123)
    a = SokobanEnv(cfg).reset(42).text
    assert random.random() == expect_py and np.random.rand() == expect_np
    assert SokobanEnv(cfg).reset(42).text == a
    others = {SokobanEnv(cfg).reset(s).text for s in range(43, 53)}
    assert len(others) > 5


def test_difficulty_filter_and_optimal_moves():
    cfg = SokobanConfig(min_solution_moves=3, max_solution_moves=5)
    for seed in range(15):
        env = SokobanEnv(cfg)
        env.reset(seed)
        assert 3 <= env.optimal_moves <= 5
        assert len(solve(env.room_fixed, env.room_state)) == env.optimal_moves


def test_generated_rooms_code_boxes_on_targets():
    for seed in range(30):
        fixed, state, _ = generate(SokobanConfig(room_size=7, num_boxes=2), seed)
        on_target = fixed == 2
        assert not ((state == BOX) & on_target).any()
        assert not ((state == BOX_ON) & ~on_target).any()


def test_bad_config_names_the_key():
    from himac.config import ConfigError
    with pytest.raises(ConfigError, match="max_solution_moves"):
        SokobanConfig(min_solution_moves=4, max_solution_moves=2)


# -- cross-check against gym-sokoban's SokobanEnv --------------------------------------------------
def test_dynamics_match_gym_sokoban_on_random_actions():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from gym_sokoban.envs.sokoban_env import SokobanEnv as GymSokoban
    rng = np.random.default_rng(0)
    names = ["up", "down", "left", "right"]
    checked = 0
    for seed in range(12):
        cfg = SokobanConfig(room_size=7, num_boxes=2, max_steps=40)
        ours = SokobanEnv(cfg)
        ours.reset(seed)
        gym = GymSokoban(dim_room=ours.room_fixed.shape, max_steps=40, num_boxes=2, reset=False)
        gym.room_fixed, gym.room_state = ours.room_fixed.copy(), ours.room_state.copy()
        gym.player_position = np.argwhere(gym.room_state == PLAYER)[0]
        gym.num_env_steps, gym.reward_last = 0, 0
        gym.boxes_on_target = ours.boxes_on_target  # gym starts at 0 (departure (1) in envs/sokoban.py)
        for _ in range(40):
            a = names[rng.integers(4)]
            _, r_ours, d_ours, _ = ours.step(a)
            _, r_gym, d_gym, _ = gym.step(1 + names.index(a))  # gym's push actions 1..4
            assert (ours.room_state == gym.room_state).all()
            assert r_ours == pytest.approx(r_gym) and d_ours == d_gym
            checked += 1
            if d_ours:
                break
    assert checked > 100


def _shortest_by_exhaustive_search(env: SokobanEnv, limit: int) -> int | None:
    """The fewest moves that solve the room, by trying every action sequence up to `limit` (no cleverness)."""
    from itertools import product
    fixed, state = env.room_fixed.copy(), env.room_state.copy()
    for n in range(1, limit + 1):
        for seq in product(ACTIONS, repeat=n):
            env.load(fixed, state, optimal_moves=0)
            if any(env.step(a)[3]["success"] for a in seq):
                return n
    return None


def test_solver_is_optimal_against_exhaustive_search():
    # a depth-first solver still finds *a* solution; only a comparison with every shorter sequence shows it is
    # the shortest (DFS gave 23 moves for a 5-move room)
    # (rooms are not filtered by the solver under test: max_solution_moves 0)
    env = SokobanEnv(SokobanConfig(max_steps=100, min_solution_moves=1, max_solution_moves=0))
    lengths = []
    for seed in range(16):
        env.reset(seed)
        fixed, state = env.room_fixed.copy(), env.room_state.copy()
        path = solve(fixed, state)
        shortest = _shortest_by_exhaustive_search(env, 5)
        if shortest is None:
            assert len(path) > 5, seed
        else:
            assert len(path) == shortest, seed
        env.load(fixed, state, optimal_moves=len(path))
        assert any(env.step(a)[3]["success"] for a in path)  # and the path really solves it
        lengths.append(len(path))
    assert len(set(lengths)) >= 3 and min(lengths) <= 5  # rooms of several difficulties, some checked exhaustively


def test_coords_observation_says_where_box_and_target_are():
    env = SokobanEnv(SokobanConfig(max_steps=15, observation="text+coords"))
    room = "######\n#@___#\n#_$__#\n#___.#\n######"
    obs = env.load(*parse_room(room))
    assert obs.text.startswith(room)  # the map is still there, the words come after it
    assert "From you: box: 1 down, 1 right; target: 2 down, 3 right." in obs.text
    assert "Wall next to you: up, left." in obs.text
    obs, *_ = env.step("right")  # now straight above the box
    assert "box: 1 down;" in obs.text and "target: 2 down, 2 right." in obs.text
    assert "Wall next to you: up." in obs.text


def test_coords_observation_drops_targets_with_a_box_and_reads_back_the_solution():
    env = SokobanEnv(SokobanConfig(max_steps=15, observation="text+coords"))
    obs = env.load(*parse_room("######\n#@$_.#\n######"))
    assert "box: 1 right; target: 3 right." in obs.text
    assert "Wall next to you: up, down, left." in obs.text
    env.step("right")
    obs, _, done, info = env.step("right")
    assert info["success"] and "Every box is on a target." in obs.text
    plain = SokobanEnv(SokobanConfig(max_steps=15)).load(*parse_room("######\n#@$_.#\n######"))
    assert "From you" not in plain.text  # the plain text observation is unchanged


# -- potential-based shaping (`shaping`) ------------------------------------------------------------
def test_shaping_pays_each_step_toward_the_box_and_toward_the_target():
    text = "########\n#@__$_.#\n########"
    plain, shaped = make(text), SokobanEnv(SokobanConfig(shaping=0.5))
    shaped.load(*parse_room(text))
    moves = [("right", 0.5), ("left", -0.5), ("right", 0.5), ("right", 0.5), ("right", 0.5), ("left", -0.5)]
    for move, gain in moves:  # walk toward the box: +w, away: -w; push it toward the target: +w
        _, r_plain, _, _ = plain.step(move)
        _, r, _, _ = shaped.step(move)
        assert r == pytest.approx(r_plain + gain), move
    shaped.step("right")
    _, r, done, info = shaped.step("right")  # the push onto the target: box distance 1 -> 0
    assert done and info["success"] and r == pytest.approx(-0.1 + 1 + 10 + 0.5)


def test_shaping_telescopes_over_any_episode_and_leaves_success_alone():
    cfg = dict(room_size=7, min_solution_moves=2, max_solution_moves=4, max_steps=6)
    plain, shaped = SokobanEnv(SokobanConfig(**cfg)), SokobanEnv(SokobanConfig(**cfg, shaping=0.3))
    rng = random.Random(0)
    for seed in range(20):
        plain.reset(seed)
        shaped.reset(seed)
        start = potential(shaped.room_fixed, shaped.room_state)
        extra, done = 0.0, False
        while not done:
            move = rng.choice(list(ACTIONS))
            _, r_plain, done, info_plain = plain.step(move)
            _, r, done_s, info = shaped.step(move)
            assert done_s == done and info["success"] == info_plain["success"]
            extra += r - r_plain
        assert extra == pytest.approx(0.3 * (potential(shaped.room_fixed, shaped.room_state) - start))


def test_shaping_must_not_be_negative():
    from himac.config import ConfigError
    with pytest.raises(ConfigError, match="shaping"):
        SokobanConfig(shaping=-0.5)
