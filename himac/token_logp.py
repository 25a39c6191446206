"""log pi of the sampled tokens from the LM head's logits, in bounded memory.

The update needs log pi(y_t) = z[y_t] / T - logsumexp(z / T) at each completion position, with
gradients. Written as tensor arithmetic, autograd keeps a float32 copy of the (R, C, V) logits for
the backward and builds four or five more of that size there (the softmax, the gathered term's
scatter, their sum, the temperature's quotient): at C = 512 over Qwen's 151,936-word vocabulary one
copy is 0.3 GB a row, so a 1.5B update at 16 rows reached 20.9 GiB on an H200 (docs/shapes.md).

`token_logprobs` is one autograd function that keeps nothing beyond the logits the model returned
(in their own dtype) and (R, C) log-normalisers, and works through the rows a few at a time in
float32, forward and backward:

    forward   x = z / T (masked tokens -inf);  logp = x[y] - logsumexp(x)
    backward  dL/dz = g (onehot(y) - softmax(x)) / T

The backward writes each chunk's gradient straight into one tensor of the logits' dtype, so the
head's backward sees the same gradient it would have: the function is the tensor arithmetic's
value, in less memory (tools/bench_logprobs.py measures both).
"""
from __future__ import annotations

import torch

CHUNK_BYTES = 256 * 2**20  # float32 working set per chunk of rows


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperatures: torch.Tensor | None = None,
                   banned: list[int] | None = None, keep: torch.Tensor | None = None,
                   chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """(R, C) log-probabilities of `targets` (R, C) under softmax(logits / temperature) over the vocabulary.

    logits: (R, C, V), any float dtype, with or without gradients; temperatures: (R,) or None (1);
    banned: token ids scored -inf everywhere (never sampled); keep: optional (R, C, V) bool, False where a
    position's token was not among those it could choose (-inf). A target scored -inf gets -inf.
    """
    R, C, V = logits.shape
    if targets.shape != (R, C):
        raise ValueError(f"targets shape {tuple(targets.shape)}: must be {(R, C)}, the logits' first two dims")
    if keep is not None and keep.shape != logits.shape:
        raise ValueError(f"keep shape {tuple(keep.shape)}: must be the logits' {tuple(logits.shape)}")
    temps = torch.ones(R) if temperatures is None else temperatures
    temps = temps.to(logits.device, torch.float32).reshape(R)
    banned_ids = torch.tensor(sorted(set(banned or [])), dtype=torch.long, device=logits.device)
    rows = max(1, chunk_bytes // max(1, C * V * 4))
    return _TokenLogp.apply(logits, targets.to(logits.device), temps, banned_ids, keep, rows)


def reference_token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperatures: torch.Tensor | None = None,
                             banned: list[int] | None = None, keep: torch.Tensor | None = None) -> torch.Tensor:
    """The same values as plain tensor arithmetic under autograd (what himac did before; the tests' and
    tools/bench_logprobs.py's yardstick)."""
    x = logits.float()
    if banned:
        x = x.index_fill(-1, torch.tensor(sorted(set(banned)), device=x.device), float("-inf"))
    if keep is not None:
        x = x.masked_fill(~keep, float("-inf"))
    if temperatures is not None:
        x = x / temperatures.to(x.device, torch.float32)[:, None, None]
    return x.gather(-1, targets[..., None]).squeeze(-1) - torch.logsumexp(x, -1)


def _scaled(logits: torch.Tensor, temps: torch.Tensor, banned: torch.Tensor, keep: torch.Tensor | None,
            lo: int, hi: int) -> torch.Tensor:
    """Rows lo:hi of z / T in float32, -inf on banned and not-kept tokens (a fresh tensor)."""
    x = logits[lo:hi].to(torch.float32, copy=True)  # a copy also when the logits are float32 already
    if banned.numel():
        x.index_fill_(-1, banned, float("-inf"))
    if keep is not None:
        x.masked_fill_(~keep[lo:hi], float("-inf"))
    return x.div_(temps[lo:hi, None, None])


class _TokenLogp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, temps, banned, keep, rows):
        R = logits.shape[0]
        logp = torch.empty(targets.shape, dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(logp)
        for lo in range(0, R, rows):
            hi = min(R, lo + rows)
            x = _scaled(logits, temps, banned, keep, lo, hi)
            lse[lo:hi] = torch.logsumexp(x, -1)
            logp[lo:hi] = x.gather(-1, targets[lo:hi, :, None]).squeeze(-1) - lse[lo:hi]
            del x
        ctx.save_for_backward(logits, targets, temps, banned, lse, keep)
        ctx.rows = rows
        return logp

    @staticmethod
    def backward(ctx, grad):
        logits, targets, temps, banned, lse, keep = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        grad = grad.float()
        out = torch.empty_like(logits)
        for lo in range(0, logits.shape[0], ctx.rows):
            hi = min(logits.shape[0], lo + ctx.rows)
            g = grad[lo:hi, :, None]  # (r, C, 1)
            p = _scaled(logits, temps, banned, keep, lo, hi).sub_(lse[lo:hi, :, None]).exp_()  # softmax
            p.mul_(-g).scatter_add_(-1, targets[lo:hi, :, None], g)  # g (onehot - softmax)
            out[lo:hi] = p.div_(temps[lo:hi, None, None])
            del p
        return out, None, None, None, None, None
