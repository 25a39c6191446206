"""action_choices: executor answers decoded under a constraint to the turn's candidates, trained under the same.

The model is the random tiny Qwen2 (test-only): untrained, it writes no direction word in most free-text
turns, so a constraint that leaked would show as invalid answers.
"""
import pytest
import torch

from envs.base import SerialPool
from envs.sokoban import SPEC, SokobanConfig
from helpers import SCRIPTED_SPEC, ScriptedEnvConfig
from himac import choices, executor
from himac.executor import SUB_DONE, ExecutorConfig
from himac.update import Row, UpdateConfig, policy_update

ROOMS = [3, 4, 5, 6, 7, 8]


def rollouts(policy, cfg, greedy=False, flat=False):
    pool = SerialPool(SPEC, SokobanConfig(room_size=6, max_steps=4))
    return executor.generate(policy, SPEC.prompts, SPEC.parse_action, pool, ROOMS,
                             [(i, ["Reach the box.", "Push it onto the target."]) for i in range(len(ROOMS))],
                             cfg, greedy=greedy, flat=flat)


def candidates(policy, sub_done=True):
    texts = [" up", " down", " left", " right"] + ([f" {SUB_DONE}"] if sub_done else [])
    return choices.encode(policy.tokenize, texts)


def test_allowed_follows_the_candidates_and_ends_only_a_whole_one():
    cands = [[5, 6], [5, 7, 8], [9]]
    assert choices.allowed(cands, [], [0]) == [5, 9]
    assert choices.allowed(cands, [5], [0]) == [6, 7]
    assert choices.allowed(cands, [5, 7], [0]) == [8]
    assert choices.allowed(cands, [5, 7, 8], [0, 1]) == [0, 1]
    assert choices.allowed(cands, [4], [0]) == []
    assert choices.path(cands, [5, 6, 0], [0]) == [[5, 9], [6, 7], [0]]
    with pytest.raises(ValueError, match="follows none"):
        choices.path(cands, [5, 8], [0])


@pytest.mark.parametrize("flat", [False, True])
def test_every_sampled_answer_is_a_candidate_then_a_stop(tiny_policy, flat):
    torch.manual_seed(0)
    trajs = rollouts(tiny_policy, ExecutorConfig(action_choices=True, action_max_tokens=2, subgoal_step_limit=2,
                                                 subgoal_overrun="advance"), flat=flat)
    steps = [s for t in trajs for s in t.steps]
    cands = candidates(tiny_policy, sub_done=not flat)
    assert len(steps) >= len(ROOMS)
    for s in steps:
        assert s.valid and (s.sub_done or s.action in ("up", "down", "left", "right"))
        assert s.completion_ids[:-1] in cands and s.completion_ids[-1] in tiny_policy.eos_ids  # whole, then stop
        assert s.allowed == choices.path(cands, s.completion_ids, tiny_policy.eos_ids)
    assert not flat or not any(s.sub_done for s in steps)  # the flat agent is never offered <sub_done>
    free = [s for t in rollouts(tiny_policy, ExecutorConfig(action_max_tokens=2, subgoal_step_limit=2,
                                                            subgoal_overrun="advance"), flat=flat) for s in t.steps]
    assert sum(not s.valid for s in free) > len(free) / 2  # without the constraint this model mostly misses


def test_greedy_picks_the_likeliest_allowed_first_token(tiny_policy):
    trajs = rollouts(tiny_policy, ExecutorConfig(action_choices=True, subgoal_step_limit=1), greedy=True)
    first = [t.steps[0] for t in trajs]
    for s in first:
        with torch.no_grad():
            logits = tiny_policy.model(input_ids=torch.tensor([s.prompt_ids])).logits[0, -1]  # (V,)
        ok = s.allowed[0]
        assert s.completion_ids[0] == ok[int(logits[ok].argmax())]


def test_update_log_probs_are_normalised_over_the_allowed_tokens(tiny_policy):
    """Summed over every allowed first token, pi_c is 1; over the same tokens the free softmax is far less."""
    s = rollouts(tiny_policy, ExecutorConfig(action_choices=True, subgoal_step_limit=1), greedy=True)[0].steps[0]
    ok = s.allowed[0]
    with torch.no_grad():
        masked, _ = tiny_policy.logprobs([s.prompt_ids] * len(ok), [[t] for t in ok], allowed=[[ok]] * len(ok))
        free, _ = tiny_policy.logprobs([s.prompt_ids] * len(ok), [[t] for t in ok])
    assert torch.logsumexp(masked[:, 0], 0).item() == pytest.approx(0.0, abs=1e-5)
    assert torch.logsumexp(free[:, 0], 0).item() < -1.0
    with torch.no_grad():  # a forced position (one allowed token) costs nothing
        whole, _ = tiny_policy.logprobs([s.prompt_ids], [s.completion_ids], allowed=[s.allowed])
    forced = [i for i, a in enumerate(s.allowed) if len(a) == 1]
    assert forced and all(whole[0, i].item() == 0.0 for i in forced)


def test_pi_old_is_computed_under_the_same_restriction(tiny_policy):
    """Two steps with an optimiser that never moves theta: the ratio pi / pi_old must be 1 on every token."""
    trajs = rollouts(tiny_policy, ExecutorConfig(action_choices=True, subgoal_step_limit=2,
                                                 subgoal_overrun="advance"))
    rows = executor.training_rows(trajs, [[1.0 if i % 2 else -1.0] * len(t.steps) for i, t in enumerate(trajs)])
    assert all(isinstance(r, Row) and r.allowed for r in rows)
    cfg = UpdateConfig(mini_batches=2, kl_beta=0.0, micro_batch_size=8)

    class Still(torch.optim.SGD):
        def step(self, closure=None):
            return None

    still = Still([p for p in tiny_policy.model.parameters() if p.requires_grad], lr=1.0)
    stats = policy_update(tiny_policy, still, rows, cfg, {rows[0].kind})
    assert stats["steps"] == 2
    assert stats["approx_kl"] == pytest.approx(0.0, abs=1e-6) and stats["clipfrac"] == 0.0
    assert stats["ratio_mean"] == pytest.approx(1.0, abs=1e-6)


def test_an_env_that_lists_no_actions_is_refused(tiny_policy):
    pool = SerialPool(SCRIPTED_SPEC, ScriptedEnvConfig(max_steps=3))
    with pytest.raises(ValueError, match="action_choices"):
        executor.generate(tiny_policy, SCRIPTED_SPEC.prompts, SCRIPTED_SPEC.parse_action, pool, [1], [(0, ["x"])],
                          ExecutorConfig(action_choices=True), greedy=True)


def test_held_out_evaluation_keeps_the_restriction(tiny_policy):
    """Greedy evaluation (through the metering wrapper the CLI uses) answers from the same candidates."""
    from himac import evaluation, planner
    pool = SerialPool(SPEC, SokobanConfig(room_size=6, max_steps=3))
    report = evaluation.evaluate_agent(evaluation.Metered(tiny_policy), SPEC, pool, ROOMS[:3],
                                       planner.PlannerConfig(blueprint_max_tokens=8),
                                       ExecutorConfig(action_choices=True, subgoal_step_limit=3), flat=True)
    moves = [m for e in report["episodes"] for m in e["moves"]]
    assert moves and set(moves) <= {"up", "down", "left", "right"}


def test_an_action_with_a_free_text_slot_is_refused(tiny_policy):
    from envs.base import Obs
    obs = Obs("page", admissible=["search[<your query>]", "click[next >]"])
    with pytest.raises(ValueError, match="search"):
        executor._choices(tiny_policy, obs, ExecutorConfig(action_choices=True), flat=False)
    ok = executor._choices(tiny_policy, Obs("page", admissible=["click[next >]"]), ExecutorConfig(), flat=True)
    assert ok == [tiny_policy.tokenize(" click[next >]")]


# blueprint_choices: the planner picks its plan among the env's candidate blueprints -----------------------

def blueprints(policy, n=4, temperature=None, max_subgoals=2, choose=True):
    from himac import planner
    pool = SerialPool(SPEC, SokobanConfig(room_size=6, max_steps=4))
    first = pool.reset(ROOMS[:3])
    cfg = planner.PlannerConfig(blueprint_choices=choose, max_subgoals=max_subgoals,
                                blueprint_max_tokens=4 if choose else 16)
    return [z for g in planner.generate(policy, SPEC.prompts, list(pool.tasks), first, cfg, n,
                                        temperature=temperature) for z in g]


def test_every_sampled_blueprint_is_a_candidate_plan(tiny_policy):
    torch.manual_seed(0)
    plans = {tuple(p) for p in SPEC.prompts.blueprint_choices}
    drawn = blueprints(tiny_policy)
    for z in drawn:
        assert z.valid and tuple(z.subgoals) in plans, z.text  # whole, even past blueprint_max_tokens
        assert z.completion_ids[-1] in tiny_policy.eos_ids
        assert len(z.allowed) == len(z.completion_ids) and all(z.allowed)
    assert len({tuple(z.subgoals) for z in drawn}) > 1  # sampled, not one fixed plan
    assert {len(z.subgoals) for z in drawn} == {1, 2}  # a plan may stop after its first sub-goal
    free = blueprints(tiny_policy, choose=False)  # this untrained model's free text is no plan of the list
    assert not any(tuple(z.subgoals) in plans for z in free)


def test_blueprint_rows_carry_the_restriction_and_it_normalises_the_choice(tiny_policy):
    from himac import planner
    z = blueprints(tiny_policy, n=1, temperature=0.0)[0]
    row = planner.training_rows([z], [1.0])[0]
    assert row.allowed == z.allowed and row.kind == planner.BLUEPRINT
    branch = next(i for i, a in enumerate(z.allowed) if len(a) > 1)  # where the direction is picked
    ok, prefix = z.allowed[branch], z.completion_ids[:branch]
    with torch.no_grad():
        lp, _ = tiny_policy.logprobs([z.prompt_ids] * len(ok), [prefix + [t] for t in ok],
                                     allowed=[z.allowed[:branch] + [ok]] * len(ok))
    assert torch.logsumexp(lp[:, branch], 0).item() == pytest.approx(0.0, abs=1e-5)


def test_plans_longer_than_max_subgoals_are_not_offered_and_an_env_without_plans_is_refused(tiny_policy):
    from himac import planner
    torch.manual_seed(1)
    drawn = blueprints(tiny_policy, n=8, max_subgoals=1)
    assert drawn and all(len(z.subgoals) == 1 and "2." not in z.text for z in drawn)  # not just cut
    pool = SerialPool(SCRIPTED_SPEC, ScriptedEnvConfig(max_steps=3))
    with pytest.raises(ValueError, match="blueprint_choices"):
        planner.generate(tiny_policy, SCRIPTED_SPEC.prompts, ["x"], pool.reset([1]),
                         planner.PlannerConfig(blueprint_choices=True), 1)
