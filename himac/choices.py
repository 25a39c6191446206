"""Answers picked from a list: the executor's `action_choices` (a departure from the paper).

The paper's executor writes free text that the env parses. A 135M model sampling at
temperature 1 writes no valid action in about half its turns, and those turns teach
nothing. With `action_choices: true` the executor's turn is decoded under a prefix
constraint: at each position only the tokens that continue one of this turn's
candidate answers (the env's actions, " <sub_done>") may be written, and a stop token
only once a candidate is complete. The policy is then

    pi_c(token_t | ...) = softmax(logits restricted to allowed(t))

which is still the model's own distribution, renormalised over what may follow; the
update computes its log-probabilities under the same restriction (each training row
carries the allowed set of every completion position), so the ratio in Eq. 3 compares
like with like. Generation needs no extra forward: the constraint is a logits mask.

A candidate's text is tokenised on its own (" up" after the prefilled "Direction:"),
so every backend that tokenises it the same way (transformers and llama.cpp on the same
vocabulary) decodes the same choices.
"""
from __future__ import annotations

import torch
from transformers import LogitsProcessor


def allowed(candidates: list[list[int]], done: list[int], ends: list[int]) -> list[int]:
    """Token ids that may follow `done`: the next token of every candidate `done` starts, plus `ends` (the
    stop tokens) when `done` is a whole candidate. [] when `done` follows no candidate."""
    n = len(done)
    nxt = {c[n] for c in candidates if len(c) > n and c[:n] == done}
    if any(c == done for c in candidates):
        nxt.update(ends)
    return sorted(nxt)


def path(candidates: list[list[int]], completion: list[int], ends: list[int]) -> list[list[int]]:
    """The allowed set at every position of `completion` (what the update restricts each softmax to)."""
    sets = [allowed(candidates, completion[:i], ends) for i in range(len(completion))]
    for i, (tok, ok) in enumerate(zip(completion, sets)):
        if tok not in ok:
            raise ValueError(f"completion token {tok} at position {i} follows none of the candidates")
    return sets


def encode(tokenize, texts: list[str]) -> list[list[int]]:
    """Candidate answers -> token ids (each tokenised alone); `tokenize(text) -> ids` is the policy's."""
    out = [list(tokenize(t)) for t in texts]
    for t, ids in zip(texts, out):
        if not ids:
            raise ValueError(f"action choice {t!r} tokenises to nothing")
    return out


class ChoiceLogits(LogitsProcessor):
    """transformers' hook: row i may only write what continues one of `candidates[i]` (None: anything)."""

    def __init__(self, candidates: list[list[list[int]] | None], ends: list[int], prompt_width: int):
        self.candidates, self.ends, self.width = candidates, ends, prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        masked = None
        for i, cands in enumerate(self.candidates):
            if not cands:
                continue
            ok = allowed(cands, input_ids[i, self.width:].tolist(), self.ends)
            if not ok:  # finished (padding after its stop token): nothing to constrain
                continue
            if masked is None:
                masked = scores.clone()
            keep = torch.zeros(scores.shape[1], dtype=torch.bool, device=scores.device)
            keep[ok] = True
            masked[i].masked_fill_(~keep, float("-inf"))
        return scores if masked is None else masked


def keep_mask(shape: tuple[int, int, int], allowed_sets: list[list[list[int]] | None] | None,
              device: torch.device | str = "cpu") -> torch.Tensor | None:
    """(R, C, V) bool, False outside each row's allowed set, position by position; rows with None (and
    positions past a row's list) keep every token. None when no row has a set."""
    if not allowed_sets or not any(allowed_sets):
        return None
    keep = torch.ones(shape, dtype=torch.bool, device=device)
    for i, sets in enumerate(allowed_sets):
        for t, ok in enumerate(sets or []):
            if t >= shape[1]:
                break
            keep[i, t] = False
            keep[i, t, ok] = True
    return keep
