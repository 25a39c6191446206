"""Environment registry: exact name -> EnvSpec. See envs/base.py for the contract."""
from __future__ import annotations

from envs.base import Env, EnvSpec, Obs, Prompts
from envs.sokoban import SPEC as _SOKOBAN
from envs.alfworld import SPEC as _ALFWORLD  # textworld/alfworld are imported only when a game loads
from envs.webshop import SPEC as _WEBSHOP  # bm25s, PyStemmer and thefuzz are imported only when its data load

REGISTRY: dict[str, EnvSpec] = {_SOKOBAN.name: _SOKOBAN}
REGISTRY[_ALFWORLD.name] = _ALFWORLD
REGISTRY[_WEBSHOP.name] = _WEBSHOP


def get_spec(name: str) -> EnvSpec:
    if name not in REGISTRY:
        raise KeyError(f"unknown env '{name}'; known: {sorted(REGISTRY)}")
    return REGISTRY[name]


__all__ = ["Env", "EnvSpec", "Obs", "Prompts", "REGISTRY", "get_spec"]
