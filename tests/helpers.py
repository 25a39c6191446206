"""Test doubles for the executor's *dependencies* (an env, a model's answers), never for
the code under test. Tiny models here are random and exist only for tests."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from envs.base import EnvSpec, Obs, Prompts
from himac.policy import Completion, chat_ids


@dataclass
class ScriptedEnvConfig:
    max_steps: int = 20


class ScriptedEnv:
    """An env whose observations name the episode and step ("obs-<seed>-<t>"), so a test
    can see exactly which observations reached the executor's prompt.

    Actions: "win" solves, "trap" puts a failure keyword ("deadlock") in the
    observation, "boom" raises, anything else ("a", "b") just steps.
    """
    task_type = "scripted"

    def __init__(self, cfg: ScriptedEnvConfig):
        self.cfg = cfg

    def reset(self, seed: int) -> Obs:
        if seed < 0:
            raise OSError(f"cannot load game {seed}")
        self.seed, self.t = seed, 0
        self.task = f"episode-{seed}"
        self.actions: list = []
        return Obs(text=f"start-{seed}")

    def step(self, action):
        if action == "boom":
            raise RuntimeError("engine crashed")
        self.t += 1
        self.actions.append(action)
        text = f"obs-{self.seed}-{self.t}" + (" deadlock" if action == "trap" else "")
        done = action == "win" or self.t >= self.cfg.max_steps
        return Obs(text=text, feedback=f"fb-{self.seed}-{self.t}"), 1.0 if action == "win" else -0.1, done, \
            {"success": action == "win"}

    def close(self):
        pass


def scripted_parse(text: str):
    word = text.replace("Answer:", "").strip()
    return (word, True) if word in {"a", "b", "win", "trap", "boom"} else (None, False)


SCRIPTED_PROMPTS = Prompts(
    planner_system="Plan at most {max_subgoals} steps.", planner_user="{task}\n{observation}",
    executor_system="Act.{sub_done_rule}",
    executor_user="{task}\nSub-goal {index}/{count}: {subgoal}\n{history}Now: {observation}",
    executor_prefix="Answer:", flat_system="Act alone.", flat_user="{task}\n{history}Now: {observation}",
    flat_prefix="Answer:")

SCRIPTED_SPEC = EnvSpec("scripted", ScriptedEnvConfig, ScriptedEnv, scripted_parse, SCRIPTED_PROMPTS)


class TextPolicy:
    """The tokenizer half of a himac.policy.AgentPolicy (real tokenizer and chat template, text only), for
    scripted stand-ins that only need to say what they answer: subclasses write generate()."""

    def __init__(self, tokenizer):
        self.tokenizer, self.eos_ids = tokenizer, [tokenizer.eos_token_id]

    def tokenize(self, text):
        return self.tokenizer.encode(text, add_special_tokens=False)

    def encode_images(self, messages, prefix, images):
        return chat_ids(self.tokenizer, messages, prefix), None

    def decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class ScriptedPolicy:
    """A himac.policy.AgentPolicy with a real tokenizer and chat template; answers come from
    per-episode scripts.

    `scripts[seed]` is the list of answers episode `seed` gives, in order. Every
    prompt and every batch size that reaches generate() is recorded.
    """

    def __init__(self, tokenizer, scripts: dict[int, list[str]]):
        self.tokenizer, self.scripts = tokenizer, {k: list(v) for k, v in scripts.items()}
        self.eos_ids = [tokenizer.eos_token_id]
        self.prompts: list[str] = []
        self.batch_sizes: list[int] = []

    def tokenize(self, text):
        return self.tokenizer.encode(text, add_special_tokens=False)

    def encode(self, messages, prefix=""):
        return chat_ids(self.tokenizer, messages, prefix)

    def encode_images(self, messages, prefix, images):
        assert not images, "scripted episodes are text-only"
        return self.encode(messages, prefix), None

    def decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def generate(self, prompts, max_new_tokens, temperature, stop_at_newline=False, images=None):
        self.batch_sizes.append(len(prompts))
        out = []
        for ids in prompts:
            text = self.tokenizer.decode(ids)
            self.prompts.append(text)
            seed = int(text.split("episode-")[1].split()[0])
            answer = " " + self.scripts[seed].pop(0)
            out.append(Completion(self.tokenizer.encode(answer, add_special_tokens=False), answer))
        return out


PLAN_PHRASES = [" Push the box onto the target.", " Move next to the box, then push it onto the target.",
                " Get behind the box.\n2. Push it onto the target."]
DIRECTIONS = ["up", "down", "left", "right"]


def warm_start_tiny(out_dir, steps: int = 120, seed: int = 0) -> str:
    """Teach the random tiny model the *format* of answers, not the task: a short SFT on
    numbered plans and on uniformly random directions for Sokoban prompts. The result
    stands in for an instruct model that follows instructions but cannot solve the
    puzzle; the learning test then asks the real RL loop to do the rest."""
    import random

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from envs.sokoban import PROMPTS, SokobanConfig, SokobanEnv
    from himac import executor, models, planner
    from himac.models import ModelConfig
    from himac.policy import Policy

    path = models.model_path(ModelConfig(model="tiny"))
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    policy = Policy(model, tok)
    rng = random.Random(seed)
    env = SokobanEnv(SokobanConfig(max_solution_moves=3))
    examples = []
    for s in range(40):
        obs = env.reset(10_000 + s)
        p = policy.encode(planner.build_messages(PROMPTS, env.task, obs, 2), PROMPTS.planner_prefix)
        examples.append((p, rng.choice(PLAN_PHRASES)))
        e = policy.encode(executor.build_messages(PROMPTS, env.task, ["Push the box onto the target."], 0, [], obs),
                          PROMPTS.executor_prefix)
        for d in DIRECTIONS:
            examples.append((e, " " + d))
    eos = tok.eos_token
    data = [(p, tok.encode(c + eos, add_special_tokens=False)) for p, c in examples]
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        batch = rng.sample(data, 16)
        lp, mask = policy.logprobs([b[0] for b in batch], [b[1] for b in batch])
        loss = -(lp * mask).sum() / mask.sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return str(out_dir)


def logits_grads(policy, rows, kinds):
    """Loss of one phase over all rows (no KL); returns d loss / d logits, (R, C, V)."""
    from himac.update import UpdateConfig, row_weights, rows_loss
    captured = {}

    def hook(module, inputs, output):
        output.retain_grad()
        captured["logits"] = output

    handle = policy.model.get_output_embeddings().register_forward_hook(hook)
    try:
        loss, _ = rows_loss(policy, rows, row_weights(rows, kinds), UpdateConfig(kl_beta=0.0))
        loss.backward()
    finally:
        handle.remove()
    policy.model.zero_grad(set_to_none=True)
    return captured["logits"].grad


def load_tool(name: str):
    """tools/<name>.py as a module (the tools are scripts, not a package)."""
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location(name, root / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
