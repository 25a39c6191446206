"""The §4.3 ablation switches and the flat baselines' advantage estimators.

Estimators are checked against numbers worked out by hand; each switch is checked
to change what it names and nothing else, on the real loop with the tiny test-only
model (spies record what the loop passes to its real collaborators)."""
import pytest
import torch

from envs.base import SerialPool
from helpers import SCRIPTED_SPEC, ScriptedEnvConfig, ScriptedPolicy
from himac import coevolve, estimators, executor, groups, planner
from himac.coevolve import Trainer, choose_blueprints
from himac.experiment import load_config, trajectory_advantages
from himac.executor import ExecutorConfig, Step, Trajectory
from himac.rundir import RunDir
from himac.update import ACTION, BLUEPRINT, UpdateConfig


# -- estimators by hand --------------------------------------------------------------
def test_rloo_leaves_one_out():
    adv = estimators.rloo_advantages(torch.tensor([1.0, 2.0, 3.0, 5.0]), torch.tensor([0, 0, 0, 1]))
    # R=1: others (2+3)/2 = 2.5 -> -1.5; R=2: (1+3)/2 = 2 -> 0; R=3: 1.5 -> 1.5; singleton -> 0
    assert adv.tolist() == pytest.approx([-1.5, 0.0, 1.5, 0.0])


def test_rloo_equal_rewards_give_zero():
    assert estimators.rloo_advantages(torch.tensor([4.0, 4.0, 4.0]), torch.zeros(3, dtype=torch.long)).abs().max() == 0


def test_discounted_returns():
    assert estimators.discounted_returns([1.0, 0.0, 2.0], 0.5) == pytest.approx([1.5, 1.0, 2.0])
    assert estimators.discounted_returns([], 0.9) == []


def test_gigpo_episode_plus_step_groups_by_hand():
    # two trajectories of one task; both start in state 7, then visit 8 and 9 (once each)
    # A^E: returns (1, 0), mean 0.5, unbiased std sqrt(0.5) -> (+0.7071, -0.7071)
    # A^S: state 7 group has step returns (1, 0.5): mean 0.75, std sqrt(0.125) -> (+0.7071, -0.7071);
    #      states 8 and 9 are groups of one -> 0
    adv = estimators.gigpo_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), torch.tensor([0, 0, 1, 1]),
                                  torch.tensor([7, 8, 7, 9]), torch.tensor([1.0, 1.0, 0.5, 0.2]), step_weight=1.0,
                                  eps=0.0)
    h = 0.5 ** 0.5
    assert adv.tolist() == pytest.approx([2 * h, h, -2 * h, -h], abs=1e-6)
    half = estimators.gigpo_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), torch.tensor([0, 0, 1, 1]),
                                   torch.tensor([7, 8, 7, 9]), torch.tensor([1.0, 1.0, 0.5, 0.2]), step_weight=0.5,
                                   eps=0.0)
    assert half.tolist() == pytest.approx([1.5 * h, h, -1.5 * h, -h], abs=1e-6)


def test_gigpo_step_groups_do_not_cross_tasks():
    # the same observation id in two different tasks is two different anchor groups (of one)
    adv = estimators.gigpo_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0, 1]), torch.tensor([0, 1]),
                                  torch.tensor([3, 3]), torch.tensor([1.0, 0.0]))
    assert adv.tolist() == [0.0, 0.0]


def _traj(task, rewards, anchors):
    t = Trajectory(task, 0, [], 1.0)
    t.steps = [Step([1], [2], "x", "x", True, False, 0, reward=r, anchor=a) for r, a in zip(rewards, anchors)]
    t.ret = sum(rewards)
    return t


def test_trajectory_advantages_gigpo_uses_observations_as_anchors():
    trajs = [_traj(0, [0.0, 1.0], ["s0", "s1"]), _traj(0, [0.0, 0.0], ["s0", "s2"])]
    adv = trajectory_advantages(trajs, UpdateConfig(advantage="gigpo", gigpo_gamma=1.0, adv_eps=1e-12))
    h = 0.5 ** 0.5  # A^E = +-h; s0 group: step returns (1, 0) -> +-h; s1, s2 alone -> 0
    assert adv[0] == pytest.approx([2 * h, h]) and adv[1] == pytest.approx([-2 * h, -h])
    grpo = trajectory_advantages(trajs, UpdateConfig(advantage="grpo", adv_eps=1e-12))
    assert grpo[0] == pytest.approx([h, h]) and grpo[1] == pytest.approx([-h, -h])  # the episode's, on each step


def test_gigpo_rows_carry_per_step_advantages():
    trajs = [_traj(0, [0.0, 1.0], ["s0", "s1"]), _traj(0, [0.0, 0.0], ["s0", "s2"])]
    rows = executor.training_rows(trajs, [[1.0, 2.0], [3.0, 4.0]])
    assert [r.advantage for r in rows] == [1.0, 2.0, 3.0, 4.0] and [r.sample for r in rows] == [0, 0, 1, 1]


# -- blueprint choice ------------------------------------------------------------------
def _bp(task, valid=True, name="z"):
    return planner.Blueprint(task, [1], [2], name, [name] if valid else [], valid, 1.0)


def test_best_choice_is_argmax_first_on_ties():
    group = [_bp(0, name=f"z{i}") for i in range(4)]
    chosen = choose_blueprints([group], torch.tensor([0.0, 2.0, 2.0, 1.0]), "best", key=[0])
    assert chosen[0] is group[1]


def test_random_choice_is_the_seeded_pick_not_argmax():
    import numpy as np
    group = [_bp(0, name=f"z{i}") for i in range(4)] + [_bp(0, valid=False)]
    returns = torch.tensor([0.0, 0.0, 5.0, 0.0, -1.0])  # z* = index 2
    picks, differ = [], 0
    for key in range(20):
        chosen = choose_blueprints([group], returns, "random", key=[key])[0]
        expected = group[int(np.random.default_rng([key, 0]).integers(4))]  # valid ones are 0..3
        assert chosen is expected  # the seeded pick, never a silent fallback to z*
        differ += chosen is not group[2]
        picks.append(group.index(chosen))
    assert differ > 0 and len(set(picks)) > 1 and 4 not in picks  # invalid blueprints are never picked


def test_no_valid_blueprint_means_no_phase_b():
    assert choose_blueprints([[_bp(0, valid=False)]], torch.tensor([-1.0]), "random", key=[0]) == {}


# -- flat executor --------------------------------------------------------------------
def test_flat_rollout_has_no_subgoal_no_sub_done_and_no_t_limit(tiny_tokenizer):
    policy = ScriptedPolicy(tiny_tokenizer, {3: ["a", "<sub_done>", "a", "a", "win"]})
    pool = SerialPool(SCRIPTED_SPEC, ScriptedEnvConfig())
    cfg = ExecutorConfig(subgoal_step_limit=1, history_window=2)
    (t,) = executor.generate(policy, SCRIPTED_SPEC.prompts, SCRIPTED_SPEC.parse_action, pool, [3],
                             [(0, [])], cfg, greedy=True, flat=True)
    assert t.success and t.env_steps == 5 and t.invalid == 1  # <sub_done> is just an invalid action here
    assert pool.env(0).actions == ["a", None, "a", "a", "win"]
    assert all("Sub-goal" not in p for p in policy.prompts)
    # history spans the whole episode (no segments): the last turn sees steps 3 and 4
    assert "fb-3-3" in policy.prompts[4] and "fb-3-4" in policy.prompts[4] and "fb-3-2" not in policy.prompts[4]
    assert [s.anchor for s in t.steps][:2] == ["start-3", "obs-3-1"]


def test_fixed_budget_advances_exactly_every_t_limit_steps(tiny_tokenizer):
    cfg = ExecutorConfig(subgoal_step_limit=2, sub_done=False)
    policy = ScriptedPolicy(tiny_tokenizer, {1: ["a"] * 5 + ["win"]})
    pool = SerialPool(SCRIPTED_SPEC, ScriptedEnvConfig())
    (t,) = executor.generate(policy, SCRIPTED_SPEC.prompts, SCRIPTED_SPEC.parse_action, pool, [1],
                             [(0, ["x", "y", "z"])], cfg, greedy=True)
    assert [s.subgoal for s in t.steps] == [0, 0, 1, 1, 2, 2]
    assert t.success and "<sub_done>" not in policy.prompts[0]


# -- switches on the real loop -----------------------------------------------------------
FAST = {"model": "tiny", "iterations": 1, "tasks_per_iteration": 2, "group_size": 2, "rollouts_per_blueprint": 2,
        "blueprint_max_tokens": 8, "action_max_tokens": 3, "max_steps": 3, "subgoal_step_limit": 2,
        "min_solution_moves": 1, "max_solution_moves": 3, "micro_batch_size": 8, "lora_r": 4}


def _run_iteration(tmp_path, monkeypatch, **overrides):
    """One real iteration; spies log, in order, every call the loop makes to its collaborators."""
    cfg = load_config(None, {**FAST, **overrides})
    trainer = Trainer(cfg, RunDir(tmp_path / "run"))
    events = []

    def spy(module, name, describe):
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            events.append(describe(*args, **kwargs))
            return real(*args, **kwargs)
        monkeypatch.setattr(module, name, wrapper)

    spy(coevolve, "policy_update", lambda p, o, rows, c, kinds: (
        "update", frozenset(kinds), frozenset(r.kind for r in rows if r.kind in kinds and r.completion_ids)))
    spy(executor, "generate", lambda *a, **k: ("rollout", "greedy" if k["greedy"] else "sampled",
                                               "flat" if k.get("flat") else "hier"))
    spy(planner, "generate", lambda *a, **k: ("plan",))
    metrics, _ = trainer.iteration(0)
    return trainer, metrics, events


B, A = frozenset({BLUEPRINT}), frozenset({ACTION})


def test_coevolution_updates_planner_before_phase_b_rollouts(tmp_path, monkeypatch):
    trainer, _, events = _run_iteration(tmp_path, monkeypatch)
    assert events == [("plan",), ("rollout", "greedy", "hier"), ("update", B, B),
                      ("rollout", "sampled", "hier"), ("update", A, A)]
    assert {int(s["step"]) for s in trainer.optimizers.for_kinds({ACTION}).state.values()} == {2}


def test_without_coevolution_one_step_carries_both_masks(tmp_path, monkeypatch):
    trainer, _, events = _run_iteration(tmp_path, monkeypatch, coevolution=False)
    assert events == [("plan",), ("rollout", "greedy", "hier"), ("rollout", "sampled", "hier"),
                      ("update", B | A, B | A)]  # both phases roll out with the starting policy
    assert {int(s["step"]) for s in trainer.optimizers.for_kinds({ACTION}).state.values()} == {1}


def test_flat_agent_never_plans_and_trains_actions_only(tmp_path, monkeypatch):
    _, metrics, events = _run_iteration(tmp_path, monkeypatch, hierarchy=False)
    assert events == [("rollout", "sampled", "flat"), ("update", A, A)]
    assert metrics["env/steps"] > 0 and "macro/blueprint_valid_rate" not in metrics


def test_macro_every_scores_blueprints_only_on_its_iterations(tmp_path, monkeypatch):
    """macro_every: 2: iteration 1 is light: one greedy blueprint per task is z*, no greedy scoring,
    no planner step; iteration 2 is a full Phase A again."""
    cfg = load_config(None, {**FAST, "macro_every": 2, "sample_log": 2, "optimizer_per_role": True})
    trainer = Trainer(cfg, RunDir(tmp_path / "run"))
    events, plans = [], []
    real_plan, real_gen, real_update = planner.generate, executor.generate, coevolve.policy_update

    def plan(*a, **k):  # the random tiny model's greedy text parses as no plan: give each task a plan of its own
        plans.append(real_plan(*a, **k))
        for b, group in enumerate(plans[-1]):
            for z in group:
                z.text = f"1. task {b} first\n2. task {b} then"
                z.subgoals, z.valid = planner.parse_output(z.text, 4)
        events.append(("plan", a[5], k.get("temperature")))
        return plans[-1]

    def gen(*a, **k):
        events.append(("rollout", "greedy" if k["greedy"] else "sampled", sorted({tuple(s) for _, s in a[5]})))
        return real_gen(*a, **k)
    monkeypatch.setattr(planner, "generate", plan)
    monkeypatch.setattr(executor, "generate", gen)
    monkeypatch.setattr(coevolve, "policy_update", lambda p, o, rows, c, kinds: (
        events.append(("update", frozenset(kinds))) or real_update(p, o, rows, c, kinds)))
    planner_steps = lambda: {int(s["step"]) for s in trainer.optimizers.for_kinds({BLUEPRINT}).state.values()}
    trainer.iteration(0)
    steps_after_0 = planner_steps()
    events.clear()
    m, samples = trainer.iteration(1)
    assert [e[:2] for e in events] == [("plan", 1), ("rollout", "sampled"), ("update", A)]
    assert events[0][2] == 0.0  # the one blueprint is greedy
    greedy_plans = {tuple(z.subgoals) for group in plans[-1] for z in group if z.valid}
    assert set(events[1][2]) == greedy_plans  # Phase B runs under exactly those blueprints
    assert planner_steps() == steps_after_0  # no planner step on a light iteration
    assert m["macro/scored"] == 0.0 and "macro/z_star_success_rate" not in m
    assert all(bp["return"] is None for s in samples for bp in s["blueprints"])
    events.clear()
    trainer.iteration(2)
    assert [e[:2] for e in events] == [("plan", 2), ("rollout", "greedy"), ("update", B), ("rollout", "sampled"),
                                       ("update", A)]


def test_random_blueprint_switch_reaches_phase_b(tmp_path, monkeypatch):
    calls = []
    real = coevolve.choose_blueprints
    monkeypatch.setattr(coevolve, "choose_blueprints", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    _run_iteration(tmp_path, monkeypatch, blueprint_choice="random")
    assert calls == ["random"]


@pytest.mark.parametrize("key,value", [("blueprint_choice", "worst"), ("advantage", "ppo"), ("macro_every", 0)])
def test_bad_switch_values_name_the_key(key, value):
    from himac.config import ConfigError
    with pytest.raises(ConfigError, match=key):
        load_config(None, {**FAST, key: value})


def test_progress_plot_draws_a_flat_run(tmp_path, monkeypatch):
    trainer, metrics, _ = _run_iteration(tmp_path, monkeypatch, hierarchy=False)
    trainer.run.log(metrics)
    assert trainer.run.plot().stat().st_size > 10_000


INVALID_AT = [[1], [0, 1], []]  # which of each task's 3 blueprints are made unparseable: returns differ by task


def _rows_of_one_iteration(tmp_path, monkeypatch, **overrides):
    """One real iteration; returns (metrics, samples, [(kinds, rows)] of each update).

    The random tiny model writes a parseable plan nearly always, so a wrapper around the real
    planner turns the blueprints INVALID_AT into unparseable text, as a real model's sometimes are.
    """
    cfg = load_config(None, {**FAST, "tasks_per_iteration": 3, "group_size": 3, "sample_log": 3,
                             "blueprint_max_tokens": 6, **overrides})
    trainer = Trainer(cfg, RunDir(tmp_path / "run"))
    updates = []
    real, real_generate = coevolve.policy_update, planner.generate

    def generate(*a, **k):
        groups_ = real_generate(*a, **k)
        for b, group in enumerate(groups_):
            for i in INVALID_AT[b]:
                group[i].text, (group[i].subgoals, group[i].valid) = "???", planner.parse_output("???", 4)
        return groups_
    monkeypatch.setattr(planner, "generate", generate)

    def spy(policy, opt, rows, c, kinds):
        updates.append((frozenset(kinds), list(rows)))
        return real(policy, opt, rows, c, kinds)
    monkeypatch.setattr(coevolve, "policy_update", spy)
    m, samples = trainer.iteration(0)
    return m, samples, updates


def test_each_tasks_blueprints_are_their_own_eq2_group(tmp_path, monkeypatch):
    _, samples, updates = _rows_of_one_iteration(tmp_path, monkeypatch, halt_penalty=-3.5)
    (kinds, rows), _ = updates
    assert kinds == B
    by_task = [[bp["return"] for bp in s["blueprints"]] for s in samples]  # (B, G) as logged
    want = [a for rets in by_task for a in groups.group_advantages(torch.tensor(rets), torch.zeros(3, dtype=torch.long))]
    assert [r.advantage for r in rows] == pytest.approx([float(a) for a in want], abs=1e-5)
    assert len({tuple(sorted(r)) for r in by_task}) == 3  # tasks differ, so mixing groups would change the numbers


def test_an_unparseable_blueprint_scores_the_halt_penalty(tmp_path, monkeypatch):
    _, samples, _ = _rows_of_one_iteration(tmp_path, monkeypatch, halt_penalty=-3.5)
    bps = [bp for s in samples for bp in s["blueprints"]]
    assert any(not bp["valid"] for bp in bps)  # a random tiny model writes some of each
    assert all(bp["return"] == -3.5 for bp in bps if not bp["valid"])
    assert all(bp["return"] != -3.5 for bp in bps if bp["valid"])


def test_without_coevolution_blueprint_and_action_rows_never_share_a_sample_id(tmp_path, monkeypatch):
    _, _, updates = _rows_of_one_iteration(tmp_path, monkeypatch, coevolution=False)
    ((kinds, rows),) = updates
    assert kinds == B | A
    blueprint_ids = {r.sample for r in rows if r.kind == BLUEPRINT}
    action_ids = {r.sample for r in rows if r.kind == ACTION}
    assert blueprint_ids and action_ids and not blueprint_ids & action_ids
