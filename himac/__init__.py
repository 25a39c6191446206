"""himac: HiMAC (hierarchical macro-micro agentic control) on one consumer GPU.

Modules, in the order Algorithm 1 uses them: envs (tasks), models/policy (the
one shared LLM), planner (macro), executor (micro), groups (Eq. 2, Eq. 3),
update (the optimiser step), coevolve (the loop), evaluate.
"""
__version__ = "0.1.0"
