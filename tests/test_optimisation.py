"""How far one phase moves the shared weights: one optimiser per role, no step without signal,
learning-rate warm-up, zero-variance groups leaving the update, and the collapse diagnostics.
On the real tiny (test-only) model."""
import pytest
import torch

from himac import metrics
from himac.coevolve import Trainer
from himac.executor import INVALID, SUB_DONE
from himac.experiment import load_config, silent_groups, without_silent
from himac.rundir import RunDir
from himac.update import ACTION, BLUEPRINT, Optimizers, Row, UpdateConfig, make_optimizer, policy_update


def rows_for(policy, advantages=(1.0, -0.5, 0.8)):
    enc = policy.tokenizer.encode
    p1 = policy.encode([{"role": "user", "content": "Map: #@$.# Task: push the box."}], "1.")
    p2 = policy.encode([{"role": "user", "content": "Sub-goal 1/2: push the box right. Which way?"}], "Direction:")
    return [Row(p1, enc(" Push the box right."), BLUEPRINT, 0, advantages[0]),
            Row(p2, enc(" right"), ACTION, 1, advantages[1]),
            Row(p2, enc(" up"), ACTION, 2, advantages[2])]


def lora(policy):
    return [p.detach().clone() for p in policy.model.parameters() if p.requires_grad]


def test_zero_advantages_take_no_step_and_leave_every_weight_bit_identical(tiny_policy):
    cfg = UpdateConfig(lr=1e-2, kl_beta=0.0, drop_zero_variance=True)
    opt = make_optimizer(tiny_policy.model, cfg)
    policy_update(tiny_policy, opt, rows_for(tiny_policy), cfg, {BLUEPRINT, ACTION})  # momentum now non-zero
    before = lora(tiny_policy)
    stats = policy_update(tiny_policy, opt, rows_for(tiny_policy, (0.0, 0.0, 0.0)), cfg, {BLUEPRINT, ACTION})
    assert stats["steps"] == 0 and stats["steps_skipped"] == 1
    assert all(torch.equal(a, b) for a, b in zip(before, lora(tiny_policy)))
    # the defect the key fixes: without it, Adam's momentum moves every weight on a zero gradient
    off = UpdateConfig(lr=1e-2, kl_beta=0.0, drop_zero_variance=False)
    policy_update(tiny_policy, opt, rows_for(tiny_policy, (0.0, 0.0, 0.0)), off, {BLUEPRINT, ACTION})
    assert any(not torch.equal(a, b) for a, b in zip(before, lora(tiny_policy)))


def test_one_optimiser_per_role(tiny_policy):
    shared = Optimizers(tiny_policy.model, UpdateConfig(optimizer_per_role=False))
    assert shared.for_kinds({BLUEPRINT}) is shared.for_kinds({ACTION})
    per_role = Optimizers(tiny_policy.model, UpdateConfig(optimizer_per_role=True))
    planner, executor = per_role.for_kinds({BLUEPRINT}), per_role.for_kinds({ACTION})
    assert planner is not executor and per_role.for_kinds({BLUEPRINT, ACTION}) is executor
    cfg = UpdateConfig(lr=1e-3, kl_beta=0.0, optimizer_per_role=True)
    policy_update(tiny_policy, planner, rows_for(tiny_policy), cfg, {BLUEPRINT})
    assert planner.state and not executor.state  # the executor's moments never saw a blueprint gradient
    state = per_role.state_dict()
    assert set(state) == {"planner", "executor"}
    again = Optimizers(tiny_policy.model, UpdateConfig(optimizer_per_role=True))
    again.load_state_dict(state)
    assert again.for_kinds({BLUEPRINT}).state_dict()["state"].keys() == state["planner"]["state"].keys()
    with pytest.raises(ValueError, match="optimizer_per_role"):
        Optimizers(tiny_policy.model, UpdateConfig(optimizer_per_role=False)).load_state_dict(state)


def test_warmup_ramps_each_optimisers_step_linearly(tiny_policy):
    cfg = UpdateConfig(lr=1e-2, kl_beta=0.0, warmup_steps=4)
    opt = make_optimizer(tiny_policy.model, cfg)
    lrs, moved = [], []
    for _ in range(5):
        before = lora(tiny_policy)
        policy_update(tiny_policy, opt, rows_for(tiny_policy), cfg, {BLUEPRINT, ACTION})
        lrs.append(opt.param_groups[0]["lr"])
        moved.append(max(float((a - b).abs().max()) for a, b in zip(lora(tiny_policy), before)))
    assert lrs == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2, 1e-2])
    assert moved[0] <= 2.5e-3 * 1.001  # Adam's first step is a sign step of size lr: a quarter of it
    assert opt.state_dict()["param_groups"][0]["himac_steps"] == 5  # saved with the optimiser: survives resume


def test_silent_groups_by_hand():
    per_step = [[0.5, 0.5], [-0.5, -0.5], [1e-11], [0.0, 0.0], [0.0], [0.0, 0.3]]
    group = [0, 0, 1, 1, 2, 2]  # group 2 is loud through one GiGPO step term
    assert silent_groups(per_step, group) == {1}
    cleaned, silent = without_silent(per_step, group)
    assert silent == {1} and cleaned[2] == [0.0] and cleaned[0] == [0.5, 0.5]


FAST = {"model": "tiny", "iterations": 1, "tasks_per_iteration": 3, "group_size": 2, "rollouts_per_blueprint": 2,
        "blueprint_max_tokens": 8, "action_max_tokens": 3, "max_steps": 3, "subgoal_step_limit": 2,
        "min_solution_moves": 1, "max_solution_moves": 3, "micro_batch_size": 8, "lora_r": 4}


@pytest.mark.parametrize("drop", [True, False])
def test_zero_variance_groups_leave_the_update_when_asked(tmp_path, monkeypatch, drop):
    from himac import coevolve, executor
    trainer = Trainer(load_config(None, {**FAST, "drop_zero_variance": drop, "hierarchy": False}),
                      RunDir(tmp_path / "run"))
    seen = {}
    real_generate, real_update = executor.generate, coevolve.policy_update

    def generate(*a, **k):
        seen["trajs"] = real_generate(*a, **k)
        return seen["trajs"]

    def update(policy, opt, rows, cfg, kinds):
        seen["samples"] = {r.sample for r in rows}
        return real_update(policy, opt, rows, cfg, kinds)
    monkeypatch.setattr(executor, "generate", generate)
    monkeypatch.setattr(coevolve, "policy_update", update)
    m, _ = trainer.iteration(0)
    trajs = seen["trajs"]
    by_task = {}
    for tr in trajs:
        by_task.setdefault(tr.task, set()).add(round(tr.ret, 9))
    silent = {t for t, rets in by_task.items() if len(rets) == 1}  # equal returns: Eq. 2 has nothing to compare
    assert m["micro/zero_var_groups"] == pytest.approx(len(silent) / 3)
    # the samples (trajectory indices) that reached the update
    expected = {i for i, tr in enumerate(trajs) if tr.steps and not (drop and tr.task in silent)}
    assert seen["samples"] == expected


@pytest.mark.parametrize("hierarchy", [False, True])
def test_training_rule_agreement_replays_the_sampled_moves(tmp_path, monkeypatch, hierarchy):
    from envs.sokoban import SokobanEnv, toward_box
    from himac import executor
    cfg = load_config(None, {**FAST, "hierarchy": hierarchy, "action_choices": True})
    trainer = Trainer(cfg, RunDir(tmp_path / "run"))
    seen = []
    real_generate = executor.generate

    def generate(*a, **k):
        out = real_generate(*a, **k)
        if not k.get("greedy"):
            seen.extend(out)
        return out
    monkeypatch.setattr(executor, "generate", generate)
    m, _ = trainer.iteration(0)
    agree = moves = 0
    env = SokobanEnv(cfg.env)
    for tr in seen:  # each sampled episode again, move by move, against "step toward the box"
        env.reset(tr.seed)
        for step in tr.steps:
            if step.move in ("up", "down", "left", "right"):
                moves += 1
                agree += toward_box(env) == step.move
                if env.step(step.move)[2]:
                    break
    assert moves > 0 and m["micro/rule_agreement"] == pytest.approx(agree / moves)


def test_action_histogram_by_hand():
    moves = ["up", "up", "down", SUB_DONE, INVALID, "up"]
    m = metrics.actions("micro", moves, ("up", "down", "left", "right"))
    assert m["micro/action_share/up"] == pytest.approx(0.5) and m["micro/action_share/left"] == 0.0
    assert m["micro/action_top_share"] == pytest.approx(0.5)
    assert m["micro/sub_done_share"] == pytest.approx(1 / 6) and m["micro/invalid_share"] == pytest.approx(1 / 6)
    import math
    assert m["micro/action_entropy"] == pytest.approx(-(0.5 * math.log(0.5) + 3 * (1 / 6) * math.log(1 / 6)))
    collapsed = metrics.actions("", ["down"] * 4, ("up", "down"))
    assert collapsed["action_top_share"] == 1.0 and collapsed["action_entropy"] == 0.0
    assert metrics.actions("micro", []) == {}
