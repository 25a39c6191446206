"""Diagnostic: can the model learn the env's reading rule by plain supervised fine-tuning, and how fast?

    python tools/probe_reading.py --config configs/sokoban_bench_coords.yaml            # SmolLM2-135M
    python tools/probe_reading.py --config configs/sokoban_bench_coords.yaml --steps 40 --lr 5e-5
    python tools/probe_reading.py --config configs/sokoban_cpu.yaml --set model=tiny --steps 2 --every 1

When RL does not learn to read the observation, either the model cannot map what it reads to
the right action in the budget (capacity, prompt), or the RL signal does not carry it there
(credit assignment). This separates the two: the same model, LoRA, prompts (the flat agent's,
first turn of a room) and answer restriction as `action_choices: true`, trained with
cross-entropy on the env's hand-written rule (EnvSpec.rule, e.g. Sokoban's "step toward the
box") as labels. It prints one table: optimiser steps, CPU seconds of training, the batch loss,
and on held-out rooms (the validation range, never the reported evaluation rooms) the share of
greedy first moves the rule agrees with and which moves were picked. Row 0 is the untrained
model; the share of the most common rule label is the best a constant could agree.

`--rl K` swaps the labels for the RL signal in its simplest form, a one-step contextual bandit
on the same first turns: K answers sampled per room (temperature 1, the same restriction), each
scored by the env's reward for that one move (`--set shaping=1` pays a step toward the box at
once), advantages centred on the room's K (`--rl-std` also divides by their std, Eq. 2), loss
-sum(A * log p) per room. If this learns at the supervised pace, the multi-turn runs lose the
signal in credit assignment over whole episodes; if it does not, the policy gradient itself
(which answers happen to be sampled) is too noisy at this batch.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from envs import get_spec  # noqa: E402
from envs.seeds import VALIDATION_OFFSET, eval_seeds, task_seeds  # noqa: E402
from himac import choices, executor, models  # noqa: E402
from himac.experiment import config_arguments, config_from_args  # noqa: E402
from himac.policy import Policy  # noqa: E402


def labelled(spec, env_cfg, seeds: list[int]) -> list[tuple[str, object, str, int]]:
    """(task, first observation, the rule's action, seed) of each room."""
    out = []
    for s in seeds:
        env = spec.make(env_cfg)
        obs = env.reset(s)
        out.append((env.task, obs, spec.rule(env), s))
        env.close()
    return out


def first_move_reward(spec, env_cfg, seed: int, action: str) -> float:
    env = spec.make(env_cfg)
    try:
        env.reset(seed)
        return float(env.step(action)[1])
    finally:
        env.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    config_arguments(ap)
    ap.add_argument("--steps", type=int, default=20, help="optimiser steps")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--train", type=int, default=400, help="labelled training rooms")
    ap.add_argument("--held-out", type=int, default=128, help="held-out rooms (validation range)")
    ap.add_argument("--every", type=int, default=10, help="evaluate every this many steps")
    ap.add_argument("--rl", type=int, default=0, metavar="K",
                    help="train by a one-step bandit policy gradient with K samples per room instead of labels")
    ap.add_argument("--rl-std", action="store_true", help="with --rl: divide advantages by the room's std")
    args = ap.parse_args(argv)
    cfg = config_from_args(ap, args)
    spec = get_spec(cfg.run.env)
    if spec.rule is None:
        ap.error(f"env {cfg.run.env!r} has no reading rule (EnvSpec.rule) to learn")
    torch.manual_seed(cfg.run.seed)
    rng = random.Random(cfg.run.seed)
    train = labelled(spec, cfg.env, task_seeds(cfg.run.seed, 0, args.train))
    held = labelled(spec, cfg.env, eval_seeds(args.held_out, VALIDATION_OFFSET))
    model, tok = models.load(cfg.model)
    policy = Policy(model, tok)
    prompts = spec.prompts

    def encode(task, obs) -> list[int]:
        return policy.encode(executor.build_flat_messages(prompts, task, [], obs), prompts.flat_prefix)

    def candidates(obs) -> tuple[list[str], list[list[int]]]:
        names = list(obs.admissible or spec.actions)
        return names, choices.encode(policy.tokenize, [f" {a}" for a in names])

    def agreement() -> tuple[float, Counter]:
        model.eval()
        picks, hits = Counter(), 0
        with torch.no_grad():
            for task, obs, rule, _ in held:
                names, cands = candidates(obs)
                out = policy.generate([encode(task, obs)], max(len(c) for c in cands) + 1, 0.0, choices=[cands])[0]
                pick = names[[c for c in cands].index(out.ids[:-1])] if out.ids[:-1] in cands else "?"
                picks[pick] += 1
                hits += pick == rule
        model.train()
        return hits / len(held), picks

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)
    labels = Counter(rule for _, _, rule, _ in held)
    signal = f"bandit policy gradient, {args.rl} samples a room" if args.rl else "rule labels"
    print(f"config {args.config}  model {cfg.model.model}  lr {args.lr}  batch {args.batch}  {signal}  "
          f"{len(train)} training rooms, {len(held)} held-out (validation range)")
    print(f"held-out rule labels: {dict(labels)}; a constant agrees at most {max(labels.values()) / len(held):.2f}\n")
    print("| step | rooms seen | train CPU s | batch loss | sampled reward | held-out agreement | greedy picks |")
    print("|---:|---:|---:|---:|---:|---:|---|")
    share, picks = agreement()
    print(f"| 0 | 0 | 0 | | | {share:.3f} | {dict(picks.most_common())} |", flush=True)
    cpu, order = 0.0, []
    for step in range(1, args.steps + 1):
        if len(order) < args.batch:
            order += rng.sample(train, len(train))
        batch, order = order[:args.batch], order[args.batch:]
        tic = time.process_time()
        rows, allowed, weight, sampled = [], [], [], []
        for task, obs, rule, seed in batch:
            names, cands = candidates(obs)
            prompt = encode(task, obs)
            if not args.rl:
                picks, adv = [rule], [1.0]
            else:
                model.eval()
                with torch.no_grad():
                    outs = policy.generate([prompt] * args.rl, max(len(c) for c in cands) + 1, 1.0,
                                           choices=[cands] * args.rl)
                model.train()
                picks = [names[cands.index(o.ids[:-1])] for o in outs]
                rewards = torch.tensor([first_move_reward(spec, cfg.env, seed, a) for a in picks])
                sampled += rewards.tolist()
                centred = rewards - rewards.mean()
                adv = (centred / (rewards.std() + 1e-6) if args.rl_std else centred).tolist()
            for pick, a in zip(picks, adv):
                target = cands[names.index(pick)] + [policy.eos_ids[0]]
                rows.append((prompt, target))
                allowed.append(choices.path(cands, target, policy.eos_ids))
                weight.append(a / len(picks))
        loss = 0.0
        for at in range(0, len(rows), args.batch):  # micro-batches of `batch` rows: --rl has K times as many
            part = slice(at, at + args.batch)
            logp, mask = policy.logprobs([p for p, _ in rows[part]], [t for _, t in rows[part]],
                                         allowed=allowed[part])  # (R, C)
            w = torch.tensor(weight[part], dtype=logp.dtype).unsqueeze(1)  # (R, 1)
            part_loss = -(w * logp * mask).sum() / len(batch)  # labels: cross-entropy per room; --rl: -A log p
            part_loss.backward()
            loss += part_loss.item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        cpu += time.process_time() - tic
        if step % args.every == 0 or step == args.steps:
            share, picks = agreement()
            reward = f"{sum(sampled) / len(sampled):.3f}" if sampled else ""
            print(f"| {step} | {step * args.batch} | {cpu:.0f} | {loss:.3f} | {reward} | {share:.3f} | "
                  f"{dict(picks.most_common())} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
