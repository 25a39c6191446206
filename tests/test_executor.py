"""Executor mechanics (paper §3.2) with a real tokenizer/chat template, scripted answers and a
scripted env: <sub_done>, T_limit, failure keywords, segment-only context, batching."""
import pytest

from envs.base import SerialPool
from helpers import SCRIPTED_SPEC, ScriptedEnvConfig, ScriptedPolicy
from himac import executor
from himac.executor import ExecutorConfig

SUBGOALS = ["reach the door", "open the door", "leave"]


def run(tokenizer, scripts, cfg=None, subgoals=SUBGOALS, max_steps=20):
    policy = ScriptedPolicy(tokenizer, scripts)
    pool = SerialPool(SCRIPTED_SPEC, ScriptedEnvConfig(max_steps=max_steps))
    seeds = list(scripts)
    trajs = executor.generate(policy, SCRIPTED_SPEC.prompts, SCRIPTED_SPEC.parse_action, pool, seeds,
                              [(i, list(subgoals)) for i in range(len(seeds))], cfg or ExecutorConfig(), greedy=True)
    return trajs, policy, pool


def test_sub_done_advances_the_subgoal(tiny_tokenizer):
    (t,), policy, pool = run(tiny_tokenizer, {1: ["a", "<sub_done>", "b", "b", "<sub_done>", "win"]})
    assert [s.subgoal for s in t.steps] == [0, 0, 1, 1, 1, 2]
    assert [s.sub_done for s in t.steps] == [False, True, False, False, True, False]
    assert t.subgoals_done == 2 and t.success and t.end == "solved"
    assert pool.env(0).actions == ["a", "b", "b", "win"]  # <sub_done> never reaches the env
    assert t.env_steps == 4 and t.ret == pytest.approx(-0.1 * 3 + 1.0)
    assert "Sub-goal 2/3: open the door" in policy.prompts[2]


def test_sub_done_on_last_subgoal_ends_the_plan(tiny_tokenizer):
    (t,), _, _ = run(tiny_tokenizer, {1: ["<sub_done>", "a", "<sub_done>"]}, subgoals=["x", "y"])
    assert t.end == "plan_exhausted" and not t.success and t.env_steps == 1


def test_quitting_the_plan_costs_the_halt_penalty(tiny_tokenizer):
    # ending an unsolved episode by <sub_done> must not beat playing on and failing
    cfg = ExecutorConfig(halt_penalty=-2.0)
    (t,), _, _ = run(tiny_tokenizer, {1: ["<sub_done>", "<sub_done>"]}, cfg, subgoals=["x", "y"])
    assert t.end == "plan_exhausted" and t.ret == pytest.approx(-2.0)
    assert [s.reward for s in t.steps] == [0.0, -2.0] and sum(s.reward for s in t.steps) == pytest.approx(t.ret)
    (t,), _, _ = run(tiny_tokenizer, {1: ["a", "<sub_done>", "<sub_done>"]}, cfg, subgoals=["x", "y"])
    assert t.ret == pytest.approx(-0.1 - 2.0)


def test_moves_name_what_each_answer_did(tiny_tokenizer):
    (t,), _, _ = run(tiny_tokenizer, {1: ["a", "zzz", "<sub_done>", "win"]})
    assert [s.move for s in t.steps] == ["a", executor.INVALID, executor.SUB_DONE, "win"]


def test_step_limit_halts_with_penalty(tiny_tokenizer):
    cfg = ExecutorConfig(subgoal_step_limit=3, halt_penalty=-2.0)
    (t,), _, _ = run(tiny_tokenizer, {1: ["a"] * 10}, cfg)
    assert t.end == "subgoal_step_limit" and t.env_steps == 3
    assert t.ret == pytest.approx(3 * -0.1 - 2.0)


def test_overrun_can_advance_to_the_next_subgoal_and_halts_only_on_the_last(tiny_tokenizer):
    cfg = ExecutorConfig(subgoal_step_limit=2, halt_penalty=-2.0, subgoal_overrun="advance")
    (t,), policy, _ = run(tiny_tokenizer, {1: ["a"] * 10}, cfg)
    assert [s.subgoal for s in t.steps] == [0, 0, 1, 1, 2, 2]
    assert t.end == "subgoal_step_limit" and t.ret == pytest.approx(-0.6 - 2.0)
    assert "Sub-goal 2/3" in policy.prompts[2] and "fb-1-2" not in policy.prompts[2]  # a fresh segment
    (t,), _, _ = run(tiny_tokenizer, {1: ["a", "a", "a", "win"]}, cfg)  # the second segment finishes the task
    assert t.success and [s.subgoal for s in t.steps] == [0, 0, 1, 1]


def test_step_limit_counts_per_segment(tiny_tokenizer):
    cfg = ExecutorConfig(subgoal_step_limit=2)
    (t,), _, _ = run(tiny_tokenizer, {1: ["a", "<sub_done>", "a", "<sub_done>", "a", "win"]}, cfg)
    assert t.success and t.env_steps == 4  # never 2 steps in one segment without <sub_done>


def test_failure_keyword_in_observation_halts(tiny_tokenizer):
    cfg = ExecutorConfig(failure_keywords=["Deadlock"], halt_penalty=-1.0)
    (t,), _, _ = run(tiny_tokenizer, {1: ["a", "trap", "win"]}, cfg)
    assert t.end == "failure_keyword" and t.env_steps == 2
    assert t.ret == pytest.approx(-0.2 - 1.0)


def test_failure_keyword_in_answer_halts(tiny_tokenizer):
    cfg = ExecutorConfig(failure_keywords=["give up"])
    scripts = {1: ["a", "I give up", "win"]}
    (t,), _, _ = run(tiny_tokenizer, scripts, cfg)
    assert t.end == "failure_keyword" and t.invalid == 1


def test_context_holds_only_the_current_segment(tiny_tokenizer):
    cfg = ExecutorConfig(history_window=2)
    (t,), policy, _ = run(tiny_tokenizer, {7: ["a", "a", "<sub_done>", "b", "b", "b", "win"]}, cfg)
    p = policy.prompts
    # turn 3 (index 2) is the <sub_done> answer: it still sees segment 1, its last two steps
    assert "fb-7-1" in p[2] and "fb-7-2" in p[2] and "Now: obs-7-2" in p[2]
    # first turn of segment 2: none of segment 1's observations, only the current state
    assert "fb-7-1" not in p[3] and "fb-7-2" not in p[3] and "Now: obs-7-2" in p[3]
    # later in segment 2: its own steps, at most history_window of them
    assert "fb-7-3" in p[5] and "fb-7-4" in p[5]
    assert "fb-7-3" not in p[6] and "fb-7-4" in p[6] and "fb-7-5" in p[6]
    assert "start-7" not in p[3] and "open the door" in p[3] and "reach the door" not in p[3]


def test_fixed_budget_ablation_advances_every_t_limit(tiny_tokenizer):
    cfg = ExecutorConfig(sub_done=False, subgoal_step_limit=2)
    (t,), policy, _ = run(tiny_tokenizer, {1: ["a", "<sub_done>", "b", "b", "a", "a"]}, cfg)
    assert [s.subgoal for s in t.steps] == [0, 0, 1, 1, 2, 2]
    assert t.end == "plan_exhausted" and t.env_steps == 6 and t.invalid == 1  # "<sub_done>" is just invalid
    assert all("<sub_done>" not in p for p in policy.prompts)


def test_episodes_are_batched_and_independent(tiny_tokenizer):
    scripts = {1: ["win"], 2: ["a", "a", "win"], 3: ["a", "<sub_done>", "a", "<sub_done>", "a", "<sub_done>"]}
    trajs, policy, _ = run(tiny_tokenizer, scripts)
    assert policy.batch_sizes == [3, 2, 2, 1, 1, 1]  # one generate() per turn over all live episodes
    assert [t.end for t in trajs] == ["solved", "solved", "plan_exhausted"]
    assert [t.seed for t in trajs] == [1, 2, 3]


def test_env_errors_are_contained(tiny_tokenizer):
    scripts = {1: ["a", "boom", "a"], 2: ["a", "a", "win"], -5: ["a"]}
    trajs, _, _ = run(tiny_tokenizer, scripts)
    assert trajs[0].end == "env_error" and "engine crashed" in trajs[0].error
    assert trajs[1].success
    assert trajs[2].end == "env_error" and "cannot load" in trajs[2].error and not trajs[2].steps


def test_training_rows_carry_action_tokens_only(tiny_tokenizer):
    from himac.update import ACTION
    (t,), _, _ = run(tiny_tokenizer, {1: ["a", "<sub_done>", "win"]})
    rows = executor.training_rows([t], [[0.5] * len(t.steps)], sample_offset=10)
    assert len(rows) == 3 and all(r.kind == ACTION and r.sample == 10 and r.advantage == 0.5 for r in rows)
    assert [r.completion_ids for r in rows] == [s.completion_ids for s in t.steps]


def test_real_tiny_model_rollout_terminates_within_budget(tiny_policy):
    """The untrained tiny model answers gibberish: every episode must still end, on budget."""
    cfg = ExecutorConfig(subgoal_step_limit=3, action_max_tokens=5)
    pool = SerialPool(SCRIPTED_SPEC, ScriptedEnvConfig(max_steps=20))
    trajs = executor.generate(tiny_policy, SCRIPTED_SPEC.prompts, SCRIPTED_SPEC.parse_action, pool, [1, 2, 3, 4],
                              [(i, ["x", "y"]) for i in range(4)], cfg, greedy=False)
    for t in trajs:
        assert t.end in {"subgoal_step_limit", "plan_exhausted", "solved", "max_steps"}
        assert t.env_steps <= 2 * 3
        assert all(1 <= len(s.completion_ids) <= 5 for s in t.steps)


def test_prompt_budget_drops_the_oldest_segment_steps(tiny_tokenizer):
    cfg = ExecutorConfig(history_window=10, max_prompt_tokens=0)
    (_, policy, _) = run(tiny_tokenizer, {4: ["a", "a", "a", "a", "win"]}, cfg)
    last_unbounded = policy.prompts[-1]
    n_unbounded = len(tiny_tokenizer.encode(last_unbounded, add_special_tokens=False))
    cfg = ExecutorConfig(history_window=10, max_prompt_tokens=n_unbounded - 5)
    (t,), policy, _ = run(tiny_tokenizer, {4: ["a", "a", "a", "a", "win"]}, cfg)
    last = policy.prompts[-1]
    assert "fb-4-1" in last_unbounded and "fb-4-1" not in last and "fb-4-4" in last  # oldest step dropped
    assert len(tiny_tokenizer.encode(last, add_special_tokens=False)) <= n_unbounded - 5
    assert t.success


def test_prompt_budget_cuts_a_long_subgoal_once_no_steps_are_left_to_drop(tiny_tokenizer):
    """A sampled blueprint that never breaks its line is one sub-goal of blueprint_max_tokens: the
    executor's prompt must still keep to max_prompt_tokens (the memory budget assumes it)."""
    long_goal = "push the box " + " ".join(f"word{i}" for i in range(300))
    (_, policy, _) = run(tiny_tokenizer, {4: ["a", "win"]}, ExecutorConfig(), subgoals=[long_goal, "y"])
    n_unbounded = len(tiny_tokenizer.encode(policy.prompts[0], add_special_tokens=False))
    budget = n_unbounded - 200
    (t,), policy, _ = run(tiny_tokenizer, {4: ["a", "win"]}, ExecutorConfig(max_prompt_tokens=budget),
                          subgoals=[long_goal, "y"])
    assert all(len(tiny_tokenizer.encode(p, add_special_tokens=False)) <= budget for p in policy.prompts)
    assert "Sub-goal 1/2: push the box word0" in policy.prompts[0]  # cut from its end
    assert "word299" not in policy.prompts[0] and t.subgoals[0] == long_goal  # the blueprint itself is kept
    assert t.success


def test_sub_done_wins_over_an_action_word_in_the_same_answer(tiny_tokenizer):
    action, done, valid = executor.parse_output("Answer: a <sub_done>", lambda t: ("a", True))
    assert done and valid and action is None
    (t,), _, pool = run(tiny_tokenizer, {1: ["a <sub_done>", "win"]})
    assert t.steps[0].sub_done and t.steps[0].subgoal == 0 and t.steps[1].subgoal == 1
    assert pool.env(0).actions == ["win"]  # the action word beside <sub_done> never reached the env
    _, done, _ = executor.parse_output("a <sub_done>", lambda t: ("a", True), sub_done=False)
    assert not done  # unless the executor was not told about <sub_done> (the ablation)


@pytest.mark.parametrize("answers,cfg,end", [
    (["a"] * 10, ExecutorConfig(subgoal_step_limit=3, halt_penalty=-2.0), "subgoal_step_limit"),
    (["a", "trap"], ExecutorConfig(failure_keywords=["deadlock"], halt_penalty=-3.0), "failure_keyword"),
    (["a", "zz", "<sub_done>", "<sub_done>", "<sub_done>"], ExecutorConfig(halt_penalty=-2.0), "plan_exhausted"),
])
def test_after_any_end_the_step_rewards_sum_to_the_return(tiny_tokenizer, answers, cfg, end):
    (t,), _, _ = run(tiny_tokenizer, {1: answers}, cfg)
    assert t.end == end and t.ret < -1.0  # the penalty is in the return...
    assert sum(s.reward for s in t.steps) == pytest.approx(t.ret)  # ...and in a step reward (GiGPO reads them)
