"""Visual Sokoban: the RGB render against gym-sokoban, and the image path of the
shared policy on a tiny random Qwen2.5-VL built in-process (test-only): planner, executor,
Phase A and Phase B with image observations, the gradient masks, and the CPU twin config
run as a user runs it."""
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import logits_grads

from envs.base import SerialPool
from envs.sokoban import IMAGE_ONLY_TEXT, PROMPTS, SPEC, SokobanConfig, SokobanEnv, parse_room, render_rgb, render_text
from himac import executor, models, planner, vision
from himac.policy import Completion, Policy
from himac.update import ACTION, BLUEPRINT, UpdateConfig, make_optimizer, policy_update

ROOT = Path(__file__).resolve().parents[1]
ROOMS = ["#######\n#@_$_.#\n#__*__#\n#######",  # box, box on target, target
         "######\n#_+$_#\n#____#\n#_$._#\n######",  # player on target, two boxes
         "#####\n#.$@#\n#####"]


# -- the render ---------------------------------------------------------------------
def gym_room_to_rgb():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from gym_sokoban.envs.render_utils import room_to_rgb
    return room_to_rgb


@pytest.mark.parametrize("text", ROOMS)
def test_rgb_render_equals_gym_sokoban_pixel_for_pixel(text):
    fixed, state = parse_room(text)
    ours = render_rgb(fixed, state)
    theirs = gym_room_to_rgb()(state, fixed)
    assert ours.dtype == np.uint8 and ours.shape == (fixed.shape[0] * 16, fixed.shape[1] * 16, 3)
    assert np.array_equal(ours, theirs)


def test_rgb_render_follows_the_episode():
    env = SokobanEnv(SokobanConfig(observation="both"))
    room_to_rgb = gym_room_to_rgb()
    obs = env.reset(7)
    frames = [obs.image]
    for action in ["up", "left", "down", "right", "right"]:
        obs, *_ = env.step(action)
        assert np.array_equal(obs.image, room_to_rgb(env.room_state, env.room_fixed))
        frames.append(obs.image)
    assert any(not np.array_equal(a, b) for a, b in zip(frames, frames[1:]))  # the player moved somewhere


def test_observation_modes():
    text_env, image_env, both_env = (SokobanEnv(SokobanConfig(observation=m)) for m in ("text", "image", "both"))
    t, i, b = text_env.reset(3), image_env.reset(3), both_env.reset(3)
    assert t.image is None and t.text == render_text(text_env.room_fixed, text_env.room_state)
    assert i.text == IMAGE_ONLY_TEXT and i.image.shape == (96, 96, 3)
    assert b.text == t.text and np.array_equal(b.image, i.image)
    with pytest.raises(ValueError, match="observation"):
        SokobanConfig(observation="pixels")


# -- the image path of the policy ------------------------------------------------------
@pytest.fixture(scope="module")
def vl_policy():
    torch.manual_seed(0)
    model, tok = models.load(models.ModelConfig(model="tiny-vl", lora_r=8))
    return Policy(model, tok, gen_batch_size=8)


def frame(text):
    return render_rgb(*parse_room(text))


MESSAGES = [{"role": "system", "content": "You play Sokoban."}, {"role": "user", "content": "Which way?"}]


def test_prompt_holds_one_placeholder_per_visual_token(vl_policy):
    ids, px = vl_policy.encode_images(MESSAGES, "Direction:", [frame(ROOMS[0])])
    image_id = vl_policy.model.config.image_token_id
    # a 7x4-cell room is 112x64 px; the processor resizes to 112x56: 8x4 patches, 2x2 merged -> 8 tokens
    assert px.grid_thw.tolist() == [[1, 4, 8]] and px.pixel_values.shape == (32, 3 * 2 * 14 * 14)
    assert ids.count(image_id) == 8
    text_ids, none = vl_policy.encode_images(MESSAGES, "Direction:", [])
    assert none is None and text_ids == vl_policy.encode(MESSAGES, "Direction:")


def test_text_only_model_rejects_images(tiny_policy):
    with pytest.raises(ValueError, match="vision"):
        tiny_policy.encode_images(MESSAGES, "", [frame(ROOMS[0])])


def test_the_frame_changes_the_prediction_and_padding_does_not(vl_policy):
    a, pa = vl_policy.encode_images(MESSAGES, "Direction:", [frame(ROOMS[2])])
    b, pb = vl_policy.encode_images(MESSAGES, "Direction:", [frame("#####\n#@$.#\n#####")])
    text = vl_policy.encode(MESSAGES + [{"role": "user", "content": "A longer text-only turn, to pad."}], "")
    comp = vl_policy.tokenizer.encode(" left right", add_special_tokens=False)
    with torch.no_grad():
        alone_a, _ = vl_policy.logprobs([a], [comp], images=[pa])
        alone_b, _ = vl_policy.logprobs([b], [comp], images=[pb])
        batch, _ = vl_policy.logprobs([text, a, b], [comp[:1], comp, comp], images=[None, pa, pb])
        alone_t, _ = vl_policy.logprobs([text], [comp[:1]])
    assert len(a) == len(b)  # same-size rooms: only the pixels differ
    assert (alone_a - alone_b).abs().max() > 1e-4  # the image reaches the language model
    assert torch.allclose(batch[1], alone_a[0], atol=1e-5) and torch.allclose(batch[2], alone_b[0], atol=1e-5)
    assert torch.allclose(batch[0, :1], alone_t[0], atol=1e-5)  # a text row beside image rows


def captured_logits(policy):
    store = {}

    def hook(module, inputs, output):
        store.setdefault("logits", []).append(output.detach())
    return store, policy.model.get_output_embeddings().register_forward_hook(hook)


def test_update_scores_what_generation_produced(vl_policy):
    """Greedy tokens from a left-padded image batch are the argmax of the training forward's logits:
    generation and the update give image tokens the same 3-D positions."""
    a, pa = vl_policy.encode_images(MESSAGES, "Direction:", [frame(ROOMS[1])])
    long_msgs = [MESSAGES[0], {"role": "user", "content": "Which way? Think about the box and the target."}]
    b, pb = vl_policy.encode_images(long_msgs, "Direction:", [frame(ROOMS[0])])
    # Hub generation configs carry sampling defaults (Qwen2.5-VL-3B: repetition_penalty 1.05) that
    # generate() would apply to every field the policy leaves unset; the policy must override them.
    gen_cfg = vl_policy.model.generation_config
    gen_cfg.repetition_penalty = 10.0
    try:
        outs = vl_policy.generate([a, b], 6, 0.0, images=[pa, pb])
    finally:
        gen_cfg.repetition_penalty = 1.0
    store, handle = captured_logits(vl_policy)
    try:
        with torch.no_grad():
            vl_policy.logprobs([a, b], [o.ids for o in outs], images=[pa, pb])
    finally:
        handle.remove()
    logits = store["logits"][0]  # (2, C, V)
    for i, o in enumerate(outs):
        assert logits[i, :len(o.ids)].argmax(-1).tolist() == o.ids


def test_image_markers_are_never_written_and_the_update_runs_on_what_was(vl_policy):
    """A completion holding an <|image_pad|> breaks the update's forward (more image tokens than
    features). The policy's support leaves out the markers in generation and in the update alike."""
    a, pa = vl_policy.encode_images(MESSAGES, "Direction:", [frame(ROOMS[1])])
    cfg = vl_policy.model.config
    markers = [cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id]
    assert vl_policy.banned_ids == sorted(markers)

    def favour_markers(module, inputs, output):  # a model that would rather write a marker than anything
        return output.index_add(-1, torch.tensor(markers), torch.full(output.shape[:-1] + (4,), 1e4))
    handle = vl_policy.model.get_output_embeddings().register_forward_hook(favour_markers)
    banned, vl_policy.banned_ids = vl_policy.banned_ids, []
    try:
        unguarded = vl_policy.generate([a], 4, 0.0, images=[pa])[0].ids
        vl_policy.banned_ids = banned
        greedy = vl_policy.generate([a], 4, 0.0, images=[pa])[0].ids
        sampled = vl_policy.generate([a, a], 4, 1.0, images=[pa, pa])
        logp, mask = vl_policy.logprobs([a], [greedy], images=[pa])
    finally:
        handle.remove()
        vl_policy.banned_ids = banned
    assert set(unguarded) & set(markers)  # the hook works: unguarded, the policy writes markers
    written = set(greedy) | {t for o in sampled for t in o.ids}
    assert not written & set(markers)
    # scored over the same support: with the markers in, each token would score about -1e4
    assert (logp[mask.bool()] > -50).all()


def test_lora_on_the_language_model_only_and_the_vision_tower_frozen_and_unquantised():
    import bitsandbytes as bnb
    model, _ = models.load(models.ModelConfig(model="tiny-vl", lora_r=8, load_in_4bit=True,
                                              gradient_checkpointing=True))
    names = {n for n, _ in model.named_modules()}
    assert any("language_model" in n and "lora_A" in n for n in names)
    assert not any("visual" in n and "lora" in n for n in names)
    vis = [(n, p) for n, p in model.named_parameters() if ".visual." in n]
    assert vis and not any(p.requires_grad for _, p in vis)
    assert all(p.dtype == torch.float32 for _, p in vis)  # the tiny twin runs in float32
    assert not any(isinstance(m, bnb.nn.Linear4bit) for n, m in model.named_modules() if ".visual." in n)
    assert any(isinstance(m, bnb.nn.Linear4bit) for n, m in model.named_modules() if "language_model" in n)


def test_vision_tower_stays_in_bf16_under_4bit():
    model, _ = models.load(models.ModelConfig(model="tiny-vl", lora_r=8, load_in_4bit=True,
                                              dtype="bfloat16"))
    dtypes = {p.dtype for n, p in model.named_parameters() if ".visual." in n}
    assert dtypes == {torch.bfloat16}  # peft's k-bit preparation had upcast it to float32


# -- planner, executor, Phase A and Phase B with image observations --------------------------
def shown_map(policy, prompt_ids) -> str:
    """The text map in a prompt (observation: both shows the map as text and as a frame)."""
    after = policy.tokenizer.decode(prompt_ids).split("row 0 is the top):\n")[1]
    return "\n".join(line for line in after.splitlines() if line and set(line) <= set("#_.$*@+")).strip()


def rollout(vl_policy):
    """Phase A blueprints and Phase B trajectories on real Sokoban with observation: both; checks the
    planner got the first frame and every executor turn the frame of the map its prompt shows."""
    cfg = SokobanConfig(observation="both", max_steps=4)
    pool = SerialPool(SPEC, cfg)
    seeds = [11, 12]
    first = pool.reset(seeds)
    pcfg = planner.PlannerConfig(group_size=2, blueprint_max_tokens=12, max_subgoals=2)
    bps = planner.generate(vl_policy, PROMPTS, list(pool.tasks), first, pcfg, 2)
    proc = vl_policy.image_processor
    for b, group in enumerate(bps):
        want = vision.process(proc, [first[b].image]).pixel_values
        for z in group:
            assert torch.equal(z.images.pixel_values, want)
    ecfg = executor.ExecutorConfig(subgoal_step_limit=2, action_max_tokens=4, history_window=1)
    episodes = [(b, ["Push the box onto the target."]) for b in range(2)]
    trajs = executor.generate(vl_policy, PROMPTS, SPEC.parse_action, pool, seeds, episodes, ecfg, greedy=False)
    steps = [s for t in trajs for s in t.steps]
    assert len(steps) >= 2
    for s in steps:  # the frame is the one of the map the same prompt shows as text: the current one
        want = vision.process(proc, [render_rgb(*parse_room(shown_map(vl_policy, s.prompt_ids)))]).pixel_values
        assert torch.equal(s.images.pixel_values, want)
    assert len({shown_map(vl_policy, s.prompt_ids) for s in steps}) >= 2  # 2 rooms at least
    return bps, trajs


def test_planner_and_executor_see_the_first_and_the_current_frame(vl_policy):
    rollout(vl_policy)


class MovingPolicy(Policy):
    """The real tiny VL policy's prompt encoding, with the *answers* scripted: it walks in a
    circle, so the room changes and a stale frame would show. Records the images of each turn."""

    def __init__(self, base: Policy):
        super().__init__(base.model, base.tokenizer, base.gen_batch_size, base.image_processor)
        self.turn, self.seen = 0, []

    def generate(self, prompts, max_new_tokens, temperature, stop_at_newline=False, images=None):
        self.seen.append((prompts, images))
        word = ["up", "left", "down", "right"][self.turn % 4]
        self.turn += 1
        return [Completion(self.tokenizer.encode(" " + word, add_special_tokens=False), " " + word) for _ in prompts]


def test_executor_sees_the_current_frame_as_the_room_changes(vl_policy):
    policy = MovingPolicy(vl_policy)
    pool = SerialPool(SPEC, SokobanConfig(observation="both", max_steps=8))
    ecfg = executor.ExecutorConfig(subgoal_step_limit=8, history_window=1)
    executor.generate(policy, PROMPTS, SPEC.parse_action, pool, [5], [(0, ["Solve it."])], ecfg, greedy=True)
    maps = []
    for (prompts, images), in zip(policy.seen):
        (ids,), (px,) = prompts, images
        maps.append(shown_map(policy, ids))
        want = vision.process(policy.image_processor, [render_rgb(*parse_room(maps[-1]))]).pixel_values
        assert torch.equal(px.pixel_values, want)
    assert len(set(maps)) >= 3  # the player moved: the frames shown were not all the first one


def test_phase_a_and_phase_b_gradients_only_where_the_masks_say(vl_policy):
    bps, trajs = rollout(vl_policy)
    flat = [z for g in bps for z in g]
    rows = planner.training_rows(flat, [1.0, -1.0, 0.5, -0.5])
    rows += executor.training_rows(trajs, [[a] * len(t.steps) for t, a in zip(trajs, [1.0, -1.0])],
                                   sample_offset=len(flat))
    rows = [r for r in rows if r.completion_ids]
    assert all(r.images is not None for r in rows)
    for kinds, trained in (({BLUEPRINT}, BLUEPRINT), ({ACTION}, ACTION)):
        grad = logits_grads(vl_policy, rows, kinds)
        for i, r in enumerate(rows):
            n = len(r.completion_ids)
            if r.kind == trained:
                assert grad[i, :n].abs().sum(-1).gt(0).all(), (kinds, i)  # every completion token
            else:
                assert grad[i].abs().sum().item() == 0.0, (kinds, i)
            assert grad[i, n:].abs().sum().item() == 0.0  # right padding


def test_phase_updates_move_lora_and_leave_the_vision_tower():
    torch.manual_seed(1)
    model, tok = models.load(models.ModelConfig(model="tiny-vl", lora_r=8))
    vl_policy = Policy(model, tok, gen_batch_size=8)  # its own: this test changes the weights
    bps, trajs = rollout(vl_policy)
    flat = [z for g in bps for z in g]
    vis_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".visual." in n}
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    cfg = UpdateConfig(lr=1e-3, micro_batch_size=2)
    opt = make_optimizer(model, cfg)
    m_a = policy_update(vl_policy, opt, planner.training_rows(flat, [1.0, -1.0, 0.5, -0.5]), cfg, {BLUEPRINT})
    per_step = [[a] * len(t.steps) for t, a in zip(trajs, [1.0, -1.0])]
    m_b = policy_update(vl_policy, opt, executor.training_rows(trajs, per_step), cfg, {ACTION})
    assert m_a["grad_norm"] > 0 and m_b["grad_norm"] > 0
    assert any(not torch.equal(p, lora_before[n]) for n, p in model.named_parameters() if n in lora_before)
    assert all(torch.equal(p, vis_before[n]) for n, p in model.named_parameters() if n in vis_before)


# -- the CPU twin, as a user runs it ---------------------------------------------------------
def test_one_iteration_of_the_visual_cpu_config(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "himac.coevolve", "configs/sokoban_vl_cpu.yaml", "--set",
                           "iterations=1", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (m,) = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert m["iteration"] == 0 and m["macro/tokens"] > 0 and m["micro/tokens"] > 0 and "eval/success_rate" in m
    cfg = (out / "config.yaml").read_text()
    assert "model: tiny-vl" in cfg and "observation: image" in cfg
    assert (out / "checkpoint" / "adapter" / "adapter_model.safetensors").is_file()


def test_a_vl_tokenizer_without_a_template_takes_the_processors(tmp_path):
    """Some VL repos keep the chat template only in the processor's chat_template.json."""
    import shutil
    src = Path(models.model_path(models.ModelConfig(model="tiny-vl")))
    shutil.copytree(src, tmp_path / "vl")
    template = (tmp_path / "vl" / "chat_template.jinja").read_text()
    (tmp_path / "vl" / "chat_template.jinja").unlink()
    cfg = json.loads((tmp_path / "vl" / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (tmp_path / "vl" / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "vl" / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    _, tok = models.load(models.ModelConfig(model=str(tmp_path / "vl"), lora_r=4))
    assert tok.chat_template == template
    (tmp_path / "vl" / "chat_template.json").unlink()
    with pytest.raises(ValueError, match="chat template"):
        models.load(models.ModelConfig(model=str(tmp_path / "vl"), lora_r=4))


def test_image_observations_keep_gigpo_anchor_states_apart(vl_policy):
    """With observation: image every obs.text is the same placeholder; the anchor state must still
    group steps exactly as the map text does."""
    partitions = []
    for mode in ("both", "image"):
        policy = MovingPolicy(vl_policy)
        pool = SerialPool(SPEC, SokobanConfig(observation=mode, max_steps=8))
        ecfg = executor.ExecutorConfig(subgoal_step_limit=8, history_window=1)
        (traj,) = executor.generate(policy, PROMPTS, SPEC.parse_action, pool, [5], [(0, ["Solve it."])], ecfg,
                                    greedy=True)
        first = {}
        partitions.append([first.setdefault(s.anchor, i) for i, s in enumerate(traj.steps)])
    assert partitions[0] == partitions[1] and len(set(partitions[1])) >= 3
