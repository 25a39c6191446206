"""The estimator registry: every entry reads the same Samples and returns one advantage per step,
checked against numbers worked out by hand."""
import pytest
import torch

from himac.estimators import ESTIMATORS, Params, Samples

H = 0.5 ** 0.5

# Two trajectories of one task: returns 1 and 0. Both start in state 7 (one step group),
# then visit 8 and 9 once each. Step rewards (1, 0) and (0.5, -0.5), gamma = 1.
TWO = Samples(returns=torch.tensor([1.0, 0.0]), group=torch.tensor([0, 0]),
              step_sample=torch.tensor([0, 0, 1, 1]), step_anchor=torch.tensor([7, 8, 7, 9]),
              step_reward=torch.tensor([1.0, 0.0, 0.5, -0.5], dtype=torch.float64))
P = Params(eps=0.0, gamma=1.0, step_weight=1.0)


def test_grpo_gives_each_step_its_episode_advantage():
    # mean 0.5, unbiased std sqrt(0.5): A = +-0.5 / 0.7071 = +-0.7071
    assert ESTIMATORS["grpo"](TWO, P).tolist() == pytest.approx([H, H, -H, -H])


def test_rloo_gives_each_step_its_leave_one_out_advantage():
    # R - mean of the other: 1 - 0 = 1, 0 - 1 = -1
    assert ESTIMATORS["rloo"](TWO, P).tolist() == pytest.approx([1.0, 1.0, -1.0, -1.0])


def test_gigpo_adds_the_anchor_state_group():
    # state 7: step returns 1 + 0 = 1 and 0.5 - 0.5 = 0 -> A^S = +-0.7071; states 8, 9 alone -> 0
    assert ESTIMATORS["gigpo"](TWO, P).tolist() == pytest.approx([2 * H, H, -2 * H, -H])


def test_gigpo_step_returns_follow_each_samples_own_steps_when_interleaved():
    # the same trajectories with their steps listed out of order give the same per-step advantages
    order = torch.tensor([2, 0, 3, 1])
    mixed = Samples(TWO.returns, TWO.group, TWO.step_sample[order], TWO.step_anchor[order], TWO.step_reward[order])
    assert ESTIMATORS["gigpo"](mixed, P).tolist() == pytest.approx([-2 * H, 2 * H, -H, H])


def test_step_grpo_pools_a_groups_step_returns_and_keeps_groups_apart():
    # step returns (gamma 1): sample 0 (1, 0), sample 1 (0, -0.5); pooled mean 0.125, unbiased std
    # sqrt(1.1875 / 3). A third sample in another group, rewards (0, 2), step returns (2, 2): spread 0 -> 0.
    three = Samples(returns=torch.tensor([1.0, 0.0, 4.0]), group=torch.tensor([0, 0, 1]),
                    step_sample=torch.tensor([0, 2, 0, 1, 1, 2]), step_anchor=torch.tensor([7, 5, 8, 7, 9, 6]),
                    step_reward=torch.tensor([1.0, 0.0, 0.0, 0.5, -0.5, 2.0], dtype=torch.float64))
    std = (1.1875 / 3) ** 0.5
    expected = [0.875 / std, 0.0, -0.125 / std, -0.125 / std, -0.625 / std, 0.0]
    assert ESTIMATORS["step_grpo"](three, P).tolist() == pytest.approx(expected)


def test_step_grpo_with_gamma_zero_scores_each_step_by_its_own_reward():
    # gamma 0 (the shaped Sokoban setting): step returns are the step rewards 1, 0, 0.5, -0.5, whatever
    # follows them; pooled mean 0.25, unbiased std sqrt(1.25 / 3). With gamma 1 the first step would
    # carry its successor's reward too (1 + 0, then 0.5 - 0.5 = 0 for the other sample's first step).
    std = (1.25 / 3) ** 0.5
    expected = [0.75 / std, -0.25 / std, 0.25 / std, -0.75 / std]
    assert ESTIMATORS["step_grpo"](TWO, Params(eps=0.0, gamma=0.0)).tolist() == pytest.approx(expected)


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_blueprints_are_one_step_samples_and_gigpo_falls_back_to_grpo(name):
    returns, group = torch.tensor([3.0, 1.0, 2.0, 5.0, 5.0]), torch.tensor([0, 0, 0, 1, 1])
    adv = ESTIMATORS[name](Samples.one_step_each(returns, group), Params(eps=0.0))
    assert adv.shape == (5,)
    if name == "rloo":  # 3 - 1.5, 1 - 2.5, 2 - 2; equal returns -> 0
        assert adv.tolist() == pytest.approx([1.5, -1.5, 0.0, 0.0, 0.0])
    else:  # mean 2, std 1 -> (1, -1, 0); equal returns -> 0
        assert adv.tolist() == pytest.approx([1.0, -1.0, 0.0, 0.0, 0.0])
