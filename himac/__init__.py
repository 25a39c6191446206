"""himac: HiMAC (hierarchical macro-micro agentic control) on one consumer GPU.

Layers, bottom up (docs/architecture.md): envs (tasks, seeds) -> groups, estimators,
config (pure math) -> models, policy (the one shared LLM) -> planner (macro),
executor (micro), update (the optimiser step) -> experiment, metrics, rundir ->
coevolve (Algorithm 1), evaluation -> export, evaluate (the CLI) -> tools.
"""
__version__ = "0.1.0"
