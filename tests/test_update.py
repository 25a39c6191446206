"""The update on a real (tiny, random, test-only) model: phase masks, exact micro-batching,
padding-invariant log-probs, and pi_ref = the adapter switched off."""
import pytest
import torch

from helpers import logits_grads

from himac.update import ACTION, BLUEPRINT, Row, UpdateConfig, make_optimizer, policy_update, row_weights, rows_loss


def rows_for(policy):
    enc = policy.tokenizer.encode
    p1 = policy.encode([{"role": "user", "content": "Map: #@$.# Task: push the box."}], "1.")
    p2 = policy.encode([{"role": "user", "content": "Sub-goal 1/2: push the box right. Which way?"}], "Direction:")
    p3 = policy.encode([{"role": "user", "content": "Go"}])
    return [
        Row(p1, enc(" Push the box right.\n2. Done"), BLUEPRINT, 0, 1.0),
        Row(p2, enc(" right"), ACTION, 1, -0.5),
        Row(p3, enc(" left<sub_done>"), ACTION, 1, -0.5),
        Row(p2, enc(" up"), ACTION, 2, 0.8),
    ]


def test_phase_a_has_no_gradient_through_action_tokens(tiny_policy):
    rows = rows_for(tiny_policy)
    grad = logits_grads(tiny_policy, rows, {BLUEPRINT})
    per_row = grad.abs().sum(dim=(1, 2))
    assert per_row[0] > 0
    assert per_row[1:].sum().item() == 0.0


def test_phase_b_has_no_gradient_through_blueprint_tokens(tiny_policy):
    rows = rows_for(tiny_policy)
    grad = logits_grads(tiny_policy, rows, {ACTION})
    per_row = grad.abs().sum(dim=(1, 2))
    assert per_row[0].item() == 0.0
    assert (per_row[1:] > 0).all()


def test_prompt_and_padding_positions_get_no_gradient(tiny_policy):
    rows = rows_for(tiny_policy)
    grad = logits_grads(tiny_policy, rows, {BLUEPRINT, ACTION})  # (R, C, V)
    for i, r in enumerate(rows):
        n = len(r.completion_ids)
        assert grad[i, :n].abs().sum() > 0
        assert grad[i, n:].abs().sum().item() == 0.0


def lora_grads(policy):
    return {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.requires_grad and p.grad is not None}


def test_two_micro_batches_give_the_gradient_of_one_batch(tiny_policy):
    torch.manual_seed(0)
    with torch.no_grad():  # a non-zero adapter, so the KL term and ref differ from pi
        for n, p in tiny_policy.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    rows = rows_for(tiny_policy)
    cfg = UpdateConfig(kl_beta=0.05)
    kinds = {BLUEPRINT, ACTION}
    w = row_weights(rows, kinds)
    loss, _ = rows_loss(tiny_policy, rows, w, cfg)
    loss.backward()
    full = lora_grads(tiny_policy)
    tiny_policy.model.zero_grad(set_to_none=True)
    # different splits pad to different widths; the sum must not change
    total = 0.0
    for part in ([0, 3], [1, 2]):
        sub = [rows[i] for i in part]
        l, _ = rows_loss(tiny_policy, sub, w[part], cfg)
        l.backward()
        total += l.item()
    split = lora_grads(tiny_policy)
    assert total == pytest.approx(loss.item(), rel=1e-5, abs=1e-7)
    assert full.keys() == split.keys() and full
    for n in full:
        assert torch.allclose(full[n], split[n], atol=1e-6, rtol=1e-4), n


def test_logprobs_do_not_depend_on_padding(tiny_policy):
    rows = rows_for(tiny_policy)
    alone, _ = tiny_policy.logprobs([rows[2].prompt_ids], [rows[2].completion_ids])
    batch, mask = tiny_policy.logprobs([r.prompt_ids for r in rows], [r.completion_ids for r in rows])
    n = len(rows[2].completion_ids)
    assert mask[2, :n].sum() == n and mask[2, n:].sum() == 0
    assert torch.allclose(alone[0, :n], batch[2, :n], atol=1e-5)


def test_logprobs_match_a_plain_forward(tiny_policy):
    row = rows_for(tiny_policy)[1]
    ids = torch.tensor([row.prompt_ids + row.completion_ids])
    with torch.no_grad():
        logits = tiny_policy.model(input_ids=ids).logits[0].float().log_softmax(-1)
        lp, _ = tiny_policy.logprobs([row.prompt_ids], [row.completion_ids])
    P = len(row.prompt_ids)
    want = torch.stack([logits[P - 1 + j, t] for j, t in enumerate(row.completion_ids)])
    assert torch.allclose(lp[0], want, atol=1e-5)


def test_update_moves_pi_but_not_pi_ref(tiny_policy):
    rows = rows_for(tiny_policy)
    cfg = UpdateConfig(lr=2e-3, kl_beta=0.01, micro_batch_size=2)
    prompts, comps = [r.prompt_ids for r in rows], [r.completion_ids for r in rows]
    with torch.no_grad():
        before, _ = tiny_policy.logprobs(prompts, comps)
        with tiny_policy.reference():
            ref_before, _ = tiny_policy.logprobs(prompts, comps)
    opt = make_optimizer(tiny_policy.model, cfg)
    stats = policy_update(tiny_policy, opt, rows, cfg, {BLUEPRINT, ACTION})
    stats = policy_update(tiny_policy, opt, rows, cfg, {BLUEPRINT, ACTION})
    with torch.no_grad():
        after, mask = tiny_policy.logprobs(prompts, comps)
        with tiny_policy.reference():
            ref_after, _ = tiny_policy.logprobs(prompts, comps)
    assert torch.allclose(ref_before, ref_after)  # the adapter-free model is untouched
    assert (after - before).abs().max() > 1e-4
    assert stats["kl"] > 0
    # a small step raises the surrogate sum w * A * log pi (rows share tokens, so not every row must move)
    w = row_weights(rows, {BLUEPRINT, ACTION})[:, :after.shape[1]]
    adv = torch.tensor([r.advantage for r in rows])[:, None]
    assert (w * adv * (after - before) * mask).sum() > 0


def test_several_steps_use_a_frozen_old_policy(tiny_policy):
    rows = rows_for(tiny_policy)
    cfg = UpdateConfig(lr=5e-2, kl_beta=0.0, mini_batches=3, micro_batch_size=4)
    stats = policy_update(tiny_policy, make_optimizer(tiny_policy.model, cfg), rows, cfg, {BLUEPRINT, ACTION})
    assert stats["ratio_mean"] != pytest.approx(1.0, abs=1e-6)  # later steps see pi != pi_old


def test_update_with_no_selected_rows_is_a_no_op(tiny_policy):
    rows = [r for r in rows_for(tiny_policy) if r.kind == ACTION]
    opt = make_optimizer(tiny_policy.model, UpdateConfig())
    assert policy_update(tiny_policy, opt, rows, UpdateConfig(), {BLUEPRINT}) == {}


def _largest_move(policy, step) -> float:
    params = [p for p in policy.model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    step()
    return max(float((p.detach() - b).abs().max()) for p, b in zip(params, before))


def test_planner_lr_sets_the_step_of_blueprint_only_updates(tiny_policy):
    """Adam's first step moves each parameter by ~lr whatever the gradient's size: Phase A
    steps by planner_lr, Phase B and the joint (w/o co-evolution) step by lr."""
    rows = rows_for(tiny_policy)
    cfg = UpdateConfig(lr=1e-2, planner_lr=1e-4, kl_beta=0.0)
    for kinds, lr in (({BLUEPRINT}, 1e-4), ({ACTION}, 1e-2), ({BLUEPRINT, ACTION}, 1e-2)):
        opt = make_optimizer(tiny_policy.model, cfg)
        moved = _largest_move(tiny_policy, lambda: policy_update(tiny_policy, opt, rows, cfg, kinds))
        assert 0.5 * lr < moved <= lr * 1.001, (kinds, moved)


class _Recorder(torch.optim.SGD):
    """An optimiser that records the gradient it is asked to step on, and steps by 0."""

    def __init__(self, params):
        super().__init__(params, lr=0.0)
        self.grads: list[list[torch.Tensor]] = []

    def step(self, closure=None):
        self.grads.append([p.grad.clone() for g in self.param_groups for p in g["params"] if p.grad is not None])


def _nonzero_adapter(policy):
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in policy.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)


def test_policy_update_micro_batching_gives_the_same_loss_and_gradient(tiny_policy):
    _nonzero_adapter(tiny_policy)
    rows = rows_for(tiny_policy) * 2  # 8 rows of unequal lengths, two of each sample id
    out = {}
    for size in (1, 3, 8):
        opt = _Recorder([p for p in tiny_policy.model.parameters() if p.requires_grad])
        stats = policy_update(tiny_policy, opt, rows, UpdateConfig(kl_beta=0.05, micro_batch_size=size),
                              {BLUEPRINT, ACTION})
        out[size] = (stats["loss"], opt.grads[0])
    for size in (1, 3):
        assert out[size][0] == pytest.approx(out[8][0], rel=1e-5, abs=1e-7)
        assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(out[size][1], out[8][1]))


def test_kl_beta_and_row_temperature_reach_loss_and_gradient(tiny_policy):
    _nonzero_adapter(tiny_policy)  # pi != pi_ref, so the KL term is not zero

    def loss_and_grad(cfg, temps):
        rows = rows_for(tiny_policy)
        for r, t in zip(rows, temps):
            r.temperature = t
        opt = _Recorder([p for p in tiny_policy.model.parameters() if p.requires_grad])
        stats = policy_update(tiny_policy, opt, rows, cfg, {BLUEPRINT, ACTION})
        return stats["loss"], torch.cat([g.flatten() for g in opt.grads[0]])

    base_loss, base_grad = loss_and_grad(UpdateConfig(kl_beta=0.0), [1.0] * 4)
    kl_loss, kl_grad = loss_and_grad(UpdateConfig(kl_beta=0.5), [1.0] * 4)
    assert kl_loss > base_loss and not torch.allclose(kl_grad, base_grad)
    hot_loss, hot_grad = loss_and_grad(UpdateConfig(kl_beta=0.5), [1.0, 0.5, 1.0, 1.0])  # one row sampled at T = 0.5
    assert hot_loss != pytest.approx(kl_loss) and not torch.allclose(hot_grad, kl_grad)
