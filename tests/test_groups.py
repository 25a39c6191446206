"""Eq. 2 and Eq. 3 against numbers worked out by hand."""
import math

import pytest
import torch

from himac import groups
from himac.groups import clipped_surrogate, group_advantages, kl_k3, sample_token_weights

EPS = 1e-6


# -- Eq. 2 ---------------------------------------------------------------------------------
def test_advantages_one_group_by_hand():
    # R = [1, 2, 3]: mean 2, unbiased std sqrt(((-1)^2 + 0 + 1^2) / 2) = 1
    adv = group_advantages(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 0, 0]), eps=EPS)
    assert adv.tolist() == pytest.approx([-1 / (1 + EPS), 0.0, 1 / (1 + EPS)], abs=1e-7)


def test_advantages_two_interleaved_groups_by_hand():
    # group 7: R = [0, 1] -> mean .5, std sqrt(.5) = .70711; group 3: R = [10, 10, 13] -> mean 11, std sqrt(3)
    returns = torch.tensor([0.0, 10.0, 1.0, 10.0, 13.0])
    index = torch.tensor([7, 3, 7, 3, 3])
    adv = group_advantages(returns, index, eps=EPS)
    s2, s3 = math.sqrt(0.5), math.sqrt(3.0)
    want = [-0.5 / (s2 + EPS), -1 / (s3 + EPS), 0.5 / (s2 + EPS), -1 / (s3 + EPS), 2 / (s3 + EPS)]
    assert adv.tolist() == pytest.approx(want, abs=1e-6)


def test_advantages_group_of_one_is_zero_not_nan():
    adv = group_advantages(torch.tensor([5.0, 1.0, 3.0]), torch.tensor([0, 1, 1]))
    assert adv[0].item() == 0.0
    assert not torch.isnan(adv).any()


def test_advantages_equal_rewards_are_zero():
    adv = group_advantages(torch.tensor([2.5, 2.5, 2.5, 2.5]), torch.tensor([0, 0, 0, 0]))
    assert adv.tolist() == [0.0, 0.0, 0.0, 0.0]


def test_advantages_without_std_scaling_are_centred_returns():
    adv = group_advantages(torch.tensor([1.0, 4.0, 10.0, 20.0]), torch.tensor([0, 0, 1, 1]), scale_std=False)
    assert adv.tolist() == pytest.approx([-1.5, 1.5, -5.0, 5.0])


def test_advantages_epsilon_matters_for_tiny_spread():
    # R = [0, 2e-6]: std = sqrt(2) * 1e-6; with eps = 1e-6 the advantage is 1e-6 / (1.414e-6 + 1e-6)
    adv = group_advantages(torch.tensor([0.0, 2e-6]), torch.tensor([0, 0]), eps=1e-6)
    assert adv[1].item() == pytest.approx(1 / (math.sqrt(2) + 1), rel=1e-4)


# -- token weights (the aggregation) ---------------------------------------------------------
def test_sample_token_weights_by_hand():
    # sample 0: rows of 2 and 3 tokens (5 tokens); sample 1: one row of 1 token. N = 2 samples.
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.float32)
    w = sample_token_weights(mask, torch.tensor([0, 0, 1]))
    want = torch.tensor([[0.1, 0.1, 0], [0.1, 0.1, 0.1], [0.5, 0, 0]])
    assert torch.allclose(w, want)
    assert w.sum().item() == pytest.approx(1.0)


def test_sample_token_weights_fully_masked_row_and_batch():
    mask = torch.tensor([[0, 0], [1, 1]], dtype=torch.float32)
    w = sample_token_weights(mask, torch.tensor([0, 1]))
    assert w[0].tolist() == [0.0, 0.0] and w[1].tolist() == [0.5, 0.5]  # sample 0 has no token: N = 1
    w_all = sample_token_weights(torch.zeros(2, 3), torch.tensor([0, 1]))
    assert w_all.abs().sum().item() == 0.0 and not torch.isnan(w_all).any()


# -- Eq. 3 -----------------------------------------------------------------------------------
def test_kl_k3_by_hand():
    # pi = .5, pi_ref = .25: r = log(.5), k3 = .5 - log(.5) - 1 = 0.193147
    val = kl_k3(torch.tensor(math.log(0.5)), torch.tensor(math.log(0.25)))
    assert val.item() == pytest.approx(0.5 - math.log(0.5) - 1)
    assert kl_k3(torch.tensor(-1.3), torch.tensor(-1.3)).item() == 0.0


@pytest.mark.parametrize("ratio,adv,objective,clipped", [
    (1.5, 1.0, 1.2, True),    # positive advantage: ratio capped at 1 + eps
    (1.5, -1.0, -1.5, True),  # negative advantage: min keeps the unclipped, more pessimistic term
    (0.5, 1.0, 0.5, True),    # positive advantage, small ratio: min keeps 0.5
    (0.5, -1.0, -0.8, True),  # negative advantage, small ratio: clipped at 1 - eps
    (1.1, 2.0, 2.2, False),   # inside the trust region
])
def test_clipped_surrogate_by_hand(ratio, adv, objective, clipped):
    logp = torch.tensor([[math.log(ratio)]])
    old = torch.zeros(1, 1)
    loss, stats = clipped_surrogate(logp, old, None, torch.tensor([adv]), torch.ones(1, 1), clip_eps=0.2, beta=0.0)
    assert loss.item() == pytest.approx(-objective, rel=1e-6)
    assert stats["clipfrac"].item() == (1.0 if clipped else 0.0)


def test_clipped_surrogate_kl_term_and_weights_by_hand():
    # two tokens, weights .25 and .75, ratio 1, A = 2, KL of token 2 = k3(pi=.5, ref=.25)
    logp = torch.tensor([[math.log(0.5), math.log(0.5)]])
    ref = torch.tensor([[math.log(0.5), math.log(0.25)]])
    w = torch.tensor([[0.25, 0.75]])
    beta = 0.1
    loss, stats = clipped_surrogate(logp, logp.clone(), ref, torch.tensor([2.0]), w, beta=beta)
    k = 0.5 - math.log(0.5) - 1
    assert loss.item() == pytest.approx(-(0.25 * 2 + 0.75 * (2 - beta * k)), rel=1e-6)
    assert stats["kl"].item() == pytest.approx(k / 2, rel=1e-6)


def test_gradient_at_ratio_one_is_minus_weight_times_advantage():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.7]], requires_grad=True)
    w = torch.tensor([[0.3, 0.2], [0.5, 0.0]])
    adv = torch.tensor([1.5, -2.0])
    loss, _ = clipped_surrogate(logp, logp.detach(), logp.detach(), adv, w, beta=0.01)
    loss.backward()
    # d/dlogp of -(w * rho * A) at rho = 1 is -w * A; the k3 gradient vanishes where pi = pi_ref
    want = -(w * adv[:, None])
    assert torch.allclose(logp.grad, want, atol=1e-7)


def test_fully_masked_row_with_garbage_logprobs_gives_no_nan():
    logp = torch.tensor([[-1.0, -1.0], [1e4, -1e4]], requires_grad=True)
    old = torch.tensor([[-1.0, -1.0], [-1e4, 1e4]])
    ref = torch.tensor([[-1.0, -1.2], [-3e4, 3e4]])
    w = torch.tensor([[0.5, 0.5], [0.0, 0.0]])
    loss, stats = clipped_surrogate(logp, old, ref, torch.tensor([1.0, 5.0]), w, beta=0.01)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(stats["kl"])
    assert logp.grad[1].abs().sum().item() == 0.0
    assert logp.grad[0].abs().sum().item() > 0.0


def test_two_micro_batches_equal_one_batch():
    torch.manual_seed(0)
    logp = torch.randn(6, 4, requires_grad=True)
    old = (logp.detach() + 0.3 * torch.randn(6, 4))
    ref = logp.detach() + 0.2 * torch.randn(6, 4)
    mask = (torch.rand(6, 4) > 0.3).float()
    w = sample_token_weights(mask, torch.tensor([0, 0, 1, 2, 2, 2]))  # fixed once, for the whole batch
    adv = torch.randn(6)
    full, _ = clipped_surrogate(logp, old, ref, adv, w)
    (g_full,) = torch.autograd.grad(full, logp)
    a, _ = clipped_surrogate(logp[:2], old[:2], ref[:2], adv[:2], w[:2])
    b, _ = clipped_surrogate(logp[2:], old[2:], ref[2:], adv[2:], w[2:])
    (g_split,) = torch.autograd.grad(a + b, logp)
    assert torch.allclose(full, a + b, atol=1e-6)
    assert torch.allclose(g_full, g_split, atol=1e-7)


def test_std_floor_keeps_noise_groups_small_by_hand():
    # an all-fail group spread only by step costs: Eq. 2 makes it unit-size, a floor of 1 keeps it in reward units
    returns, g = torch.tensor([-0.3, -0.3, -0.4, -1.1]), torch.zeros(4, dtype=torch.long)
    mean = -0.525
    plain = groups.group_advantages(returns, g, eps=0.0)
    assert plain.abs().max() > 1.0
    floored = groups.group_advantages(returns, g, eps=0.0, std_floor=1.0)
    assert floored.tolist() == pytest.approx([-0.3 - mean, -0.3 - mean, -0.4 - mean, -1.1 - mean], abs=1e-6)
    # a group with a real success has std above the floor: unchanged
    win = torch.tensor([10.0, -0.3, -0.4, -0.3])
    assert groups.group_advantages(win, g, std_floor=1.0).tolist() == pytest.approx(
        groups.group_advantages(win, g).tolist())


def test_token_weights_per_turn_and_per_token_by_hand():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])  # rows 0, 1 = sample 0; row 2 = sample 1
    samples = torch.tensor([0, 0, 1])
    by_sample = groups.token_weights(mask, samples, "sample")  # sample 0's 3 tokens share 1/2, sample 1's 3 too
    assert by_sample[0, 0] == pytest.approx(1 / 6) and by_sample[2, 0] == pytest.approx(1 / 6)
    by_turn = groups.token_weights(mask, samples, "turn")  # each of 3 rows 1/3, split over its tokens
    assert by_turn[0].tolist() == pytest.approx([1 / 6, 1 / 6, 0]) and by_turn[1, 0] == pytest.approx(1 / 3)
    assert by_turn[2].tolist() == pytest.approx([1 / 9] * 3)
    by_token = groups.token_weights(mask, samples, "token")  # 6 tokens, 1/6 each
    assert by_token.flatten().tolist() == pytest.approx((mask / 6).flatten().tolist())
    for w in (by_sample, by_turn, by_token):
        assert float(w.sum()) == pytest.approx(1.0)
    assert groups.token_weights(torch.zeros(2, 2), torch.tensor([0, 1]), "token").sum() == 0
