"""himac.token_logp: the chunked log-prob function gives the tensor arithmetic's values and gradients,
and keeps no float32 copy of the logits for the backward (random logits; no model)."""
import pytest
import torch

from himac.token_logp import reference_token_logprobs, token_logprobs


def _case(dtype=torch.float32, R=5, C=7, V=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(R, C, V, generator=g)).to(dtype).requires_grad_(True)
    targets = torch.randint(2, V, (R, C), generator=g)
    temps = torch.tensor([1.0, 0.7, 1.3, 1.0, 2.0])[:R]
    keep = torch.ones(R, C, V, dtype=torch.bool)
    keep[1, :3] = False  # row 1's first three positions chose among a few tokens
    keep[1, :3, 2:9] = True
    targets[1, :3] = 4
    return logits, targets, temps, keep


@pytest.mark.parametrize("chunk_bytes", [1, 10**9])  # one row at a time, all rows at once
def test_values_and_gradients_match_the_tensor_arithmetic(chunk_bytes):
    logits, targets, temps, keep = _case()
    banned = [0, 1]
    weights = torch.randn(targets.shape, generator=torch.Generator().manual_seed(1))
    got = token_logprobs(logits, targets, temps, banned, keep, chunk_bytes=chunk_bytes)
    (grad_got,) = torch.autograd.grad((got * weights).sum(), logits)
    want = reference_token_logprobs(logits, targets, temps, banned, keep)
    (grad_want,) = torch.autograd.grad((want * weights).sum(), logits)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_got, grad_want, rtol=1e-5, atol=1e-6)
    assert grad_got[..., banned].abs().max() == 0  # never-written tokens get no gradient
    assert grad_got[1, :3, 9:].abs().max() == 0  # nor do tokens outside a position's choices
    # the temperature, the ban and the choices each change the answer (the test would see them dropped)
    for other in (reference_token_logprobs(logits, targets, None, banned, keep),
                  reference_token_logprobs(logits, targets, temps, None, keep),
                  reference_token_logprobs(logits, targets, temps, banned, None)):
        assert (other - got).abs().max() > 1e-3


def test_bf16_logits_get_a_bf16_gradient_close_to_the_float32_one():
    logits, targets, temps, _ = _case(torch.bfloat16)
    got = token_logprobs(logits, targets, temps)
    (grad,) = torch.autograd.grad(got.sum(), logits)
    assert got.dtype == torch.float32 and grad.dtype == torch.bfloat16
    want = reference_token_logprobs(logits, targets, temps)  # float32 arithmetic on the same bf16 values
    (grad_want,) = torch.autograd.grad(want.sum(), logits)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.float(), grad_want.float(), rtol=1e-2, atol=1e-3)


def test_float32_logits_are_not_changed_in_place():
    logits, targets, temps, keep = _case()
    before = logits.detach().clone()
    token_logprobs(logits, targets, temps, [0], keep).sum().backward()
    assert torch.equal(logits.detach(), before)


def test_the_backward_keeps_no_float32_copy_of_bf16_logits():
    """What autograd holds between forward and backward: the bf16 logits themselves and (R, C) floats, where the
    tensor arithmetic keeps a float32 copy of the whole (R, C, V) tensor (twice the logits' bytes)."""
    logits, targets, temps, _ = _case(torch.bfloat16, V=4000)
    held = {}

    def pack(t):
        held[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def bytes_kept(fn):
        held.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(logits, targets, temps, [0]).sum()
        return sum(held.values())

    size = logits.untyped_storage().nbytes()
    assert bytes_kept(token_logprobs) < 1.05 * size  # the logits themselves
    assert bytes_kept(reference_token_logprobs) > 1.9 * size  # a float32 copy


def test_bad_shapes_are_named():
    logits, targets, _, _ = _case()
    with pytest.raises(ValueError, match="targets shape"):
        token_logprobs(logits, targets[:, :3])
    with pytest.raises(ValueError, match="keep shape"):
        token_logprobs(logits, targets, keep=torch.ones(1, 1, 1, dtype=torch.bool))
