"""role_adapters: one LoRA adapter per role on the one base model, on the tiny test-only model
(export and llama.cpp: tests/test_export.py).

The planner writes and trains with its adapter, the executor with its own, so neither
role's steps can move the other; pi_ref stays the base model; a checkpoint keeps both."""
import pytest
import torch

from envs.base import SerialPool
from helpers import SCRIPTED_SPEC, ScriptedEnvConfig
from himac import executor, models, planner
from himac.config import ConfigError
from himac.evaluation import Metered
from himac.executor import ExecutorConfig
from himac.experiment import load_config
from himac.policy import Policy
from himac.rundir import RunDir
from himac.update import ACTION, BLUEPRINT, Optimizers, UpdateConfig, policy_update
from test_update import rows_for


@pytest.fixture
def role_policy():
    torch.manual_seed(0)
    model, tok = models.load(models.ModelConfig(model="tiny", lora_r=8, role_adapters=True))
    return Policy(model, tok, gen_batch_size=8)


def _snapshot(model, adapter):
    return [p.detach().clone() for p in models.adapter_params(model, adapter)]


def _moved(model, adapter, before) -> float:
    return max(float((p.detach() - b).abs().max()) for p, b in zip(models.adapter_params(model, adapter), before))


def test_each_phase_steps_its_own_adapter_and_leaves_the_other_bit_identical(role_policy):
    model = role_policy.model
    cfg = UpdateConfig(lr=1e-3, kl_beta=0.01)
    opts = Optimizers(model, cfg)
    rows = rows_for(role_policy)
    for kinds, mine, other in (({BLUEPRINT}, models.PLANNER_ADAPTER, models.EXECUTOR_ADAPTER),
                               ({ACTION}, models.EXECUTOR_ADAPTER, models.PLANNER_ADAPTER)):
        before_mine, before_other = _snapshot(model, mine), _snapshot(model, other)
        out = policy_update(role_policy, opts.for_kinds(kinds), rows, cfg, kinds)
        assert out["steps"] == 1.0
        assert _moved(model, mine, before_mine) > 1e-4, kinds
        assert _moved(model, other, before_other) == 0.0, kinds
        assert model.active_adapter == models.EXECUTOR_ADAPTER  # switched back after the update


def test_each_roles_optimiser_holds_only_its_adapters_weights(role_policy):
    model = role_policy.model
    opts = Optimizers(model, UpdateConfig())
    held = {role: {id(p) for g in opts.by_role[role].param_groups for p in g["params"]} for role in opts.by_role}
    assert held["planner"] == {id(p) for p in models.adapter_params(model, models.PLANNER_ADAPTER)}
    assert held["executor"] == {id(p) for p in models.adapter_params(model, models.EXECUTOR_ADAPTER)}
    assert held["planner"] and not held["planner"] & held["executor"]
    assert set(opts.state_dict()) == {"planner", "executor"}


def test_the_roles_read_with_their_own_adapter_and_the_reference_with_none(role_policy):
    torch.manual_seed(1)
    with torch.no_grad():  # give the two adapters different, non-zero weights
        for p in models.adapter_params(role_policy.model, models.PLANNER_ADAPTER):
            p.normal_(0, 0.05)
    prompt = role_policy.encode([{"role": "user", "content": "Which way?"}])
    answer = role_policy.tokenize(" left")
    logp = {}
    for role in ("planner", "executor"):
        with role_policy.role(role), torch.no_grad():
            logp[role] = role_policy.logprobs([prompt], [answer])[0]
            with role_policy.reference():
                logp[role + "_ref"] = role_policy.logprobs([prompt], [answer])[0]
    assert not torch.allclose(logp["planner"], logp["executor"])
    assert torch.equal(logp["planner_ref"], logp["executor_ref"])
    assert torch.allclose(logp["executor"], logp["executor_ref"])  # the executor's B is still 0: pi = pi_ref


def _spy_adapters(policy) -> list[str]:
    seen, real = [], policy.generate

    def generate(*a, **k):
        seen.append(policy.model.active_adapter)
        return real(*a, **k)
    policy.generate = generate
    return seen


def test_planner_and_executor_generate_with_their_adapters_also_through_evaluations_meter(role_policy):
    seen = _spy_adapters(role_policy)
    pool = SerialPool(SCRIPTED_SPEC, ScriptedEnvConfig(max_steps=2))
    first = pool.reset([1, 2])
    pcfg = planner.PlannerConfig(blueprint_max_tokens=4)
    planner.generate(Metered(role_policy), SCRIPTED_SPEC.prompts, list(pool.tasks), first, pcfg, 2)
    assert seen and set(seen) == {models.PLANNER_ADAPTER}
    seen.clear()
    executor.generate(Metered(role_policy), SCRIPTED_SPEC.prompts, SCRIPTED_SPEC.parse_action, pool, [1, 2],
                      [(0, ["x"]), (1, ["y"])], ExecutorConfig(subgoal_step_limit=1, action_max_tokens=2), greedy=True)
    assert seen and set(seen) == {models.EXECUTOR_ADAPTER}
    assert role_policy.model.active_adapter == models.EXECUTOR_ADAPTER


def test_a_checkpoint_keeps_both_adapters(tmp_path, role_policy):
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in role_policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    run = RunDir(tmp_path / "run")
    run.save_checkpoint(role_policy.model, Optimizers(role_policy.model, UpdateConfig()), 0)
    cfg = models.ModelConfig(model="tiny", lora_r=8, role_adapters=True)
    loaded, _ = models.load(cfg, adapter_dir=run.adapter_dir)
    for adapter in (models.PLANNER_ADAPTER, models.EXECUTOR_ADAPTER):
        for a, b in zip(models.adapter_params(loaded, adapter), models.adapter_params(role_policy.model, adapter)):
            assert torch.equal(a, b), adapter
    assert loaded.active_adapter == models.EXECUTOR_ADAPTER
    assert all(p.requires_grad for p in models.adapter_params(loaded, models.PLANNER_ADAPTER))
    single = models.ModelConfig(model="tiny", lora_r=8)
    plain, _ = models.load(single)
    plain.save_pretrained(tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match="role_adapters"):
        models.load(cfg, adapter_dir=tmp_path / "plain")


def test_role_adapters_are_refused_where_there_is_one_role_or_one_joint_step(role_policy):
    for variant in ({"hierarchy": False}, {"coevolution": False}):
        with pytest.raises(ConfigError, match="role_adapters"):
            load_config(None, {"model": "tiny", "role_adapters": True, **variant})
    load_config(None, {"model": "tiny", "role_adapters": True})  # the full method takes it
    with pytest.raises(ValueError, match="role_adapters"):
        policy_update(role_policy, Optimizers(role_policy.model, UpdateConfig()).for_kinds({ACTION}),
                      rows_for(role_policy), UpdateConfig(), {BLUEPRINT, ACTION})


def test_the_summary_and_model_card_say_what_export_writes_and_how_to_load_the_planner(tmp_path, role_policy):
    from himac import reporting
    run = RunDir(tmp_path / "run")
    flat = load_config(None, {"model": "tiny", "lora_r": 8, "role_adapters": True}).flat()
    run.save_checkpoint(role_policy.model, Optimizers(role_policy.model, UpdateConfig()), 0)
    for roles in (True, False):
        summary = reporting.run_summary(run, dict(flat, role_adapters=roles), 1.0, checkpoint_iteration=0)
        assert ("LoRA GGUFs" in summary) == roles and ("Modelfile" in summary) != roles
        card = reporting.model_card(run, dict(flat, role_adapters=roles), 0, "base")
        assert ("load_adapter" in card) == roles and ("planner-lora.gguf" in card) == roles
        assert (str(run.adapter_dir / "planner") in card) == roles
    assert (run.adapter_dir / "planner" / "adapter_config.json").is_file()


def test_a_run_directory_loads_with_its_own_adapters_whatever_config_the_caller_built(tmp_path, role_policy):
    """Tools build their config from --config; the run's checkpoint still decides it has two adapters."""
    from himac.evaluate import load_backend
    torch.manual_seed(3)
    with torch.no_grad():
        for p in models.adapter_params(role_policy.model, models.PLANNER_ADAPTER):
            p.normal_(0, 0.05)
    run = RunDir(tmp_path / "run")
    run.write_config(load_config(None, {"model": "tiny", "lora_r": 8, "role_adapters": True}).flat())
    run.save_checkpoint(role_policy.model, Optimizers(role_policy.model, UpdateConfig()), 0)
    policy = load_backend("hf", str(run.path), load_config(None, {"model": "tiny"}))  # no role_adapters in it
    assert models.has_role_adapters(policy.model)
    for a, b in zip(models.adapter_params(policy.model, models.PLANNER_ADAPTER),
                    models.adapter_params(role_policy.model, models.PLANNER_ADAPTER)):
        assert torch.equal(a, b)
