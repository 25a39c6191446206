"""The import layering of docs/architecture.md: each module imports only from its own layer
or the layers below, the import graph has no circle, and the envs know nothing of himac.

Every import counts, also the ones inside functions. A new module must be placed in
LAYERS (the test fails until it is), so the picture in docs/architecture.md stays true."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

LAYERS = [  # bottom first
    ("envs", ["envs/__init__.py", "envs/base.py", "envs/cache.py", "envs/seeds.py", "envs/sokoban.py",
              "envs/alfworld.py", "envs/alfworld_games.py", "envs/procpool.py", "envs/webshop_data.py",
              "envs/webshop_reward.py", "envs/webshop.py"]),
    ("math", ["himac/__init__.py", "himac/config.py", "himac/groups.py", "himac/estimators.py",
              "himac/token_logp.py", "himac/distributed.py"]),
    ("model and policy", ["himac/vision.py", "himac/choices.py", "himac/tiny.py", "himac/shapes.py", "himac/models.py", "himac/policy.py",
                          "himac/llamacpp.py", "himac/llamacpp_server.py"]),
    ("roles and update", ["himac/update.py", "himac/planner.py", "himac/executor.py"]),
    ("experiment", ["himac/experiment.py", "himac/metrics.py", "himac/rundir.py", "himac/plots.py",
                    "himac/reporting.py", "himac/quiet.py"]),
    ("loop and evaluation", ["himac/evaluation.py", "himac/loop.py", "himac/launch.py", "himac/coevolve.py"]),
    ("export", ["himac/export.py", "himac/deploy.py", "himac/evaluate.py"]),
    ("tools", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tools").glob("*.py"))),
]
LAYER = {f: i for i, (_, files) in enumerate(LAYERS) for f in files}


def module_file(name: str) -> str | None:
    """'himac.models' -> 'himac/models.py', 'envs' -> 'envs/__init__.py'; None outside the project."""
    parts = name.split(".")
    if parts[0] not in ("himac", "envs"):
        return None
    path = ROOT.joinpath(*parts)
    if path.with_suffix(".py").is_file():
        return str(path.with_suffix(".py").relative_to(ROOT))
    if (path / "__init__.py").is_file():
        return str((path / "__init__.py").relative_to(ROOT))
    return None


def imports(file: str, text: str | None = None) -> set[str]:
    """Project files that `file` (or `text` standing for it) imports, anywhere in it, function-level too."""
    out = set()
    for node in ast.walk(ast.parse((ROOT / file).read_text() if text is None else text)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # `from himac import models` names a module; `from envs import REGISTRY` the package
            names = [f"{node.module}.{a.name}" if module_file(f"{node.module}.{a.name}") else node.module
                     for a in node.names]
        else:
            continue
        out |= {f for f in map(module_file, names) if f and f != file}
    return out


def project_files() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for d in ("himac", "envs", "tools") for p in (ROOT / d).glob("*.py"))


def test_every_module_has_a_layer():
    assert [f for f in project_files() if f not in LAYER] == []


def upward(graph: dict[str, set[str]]) -> list[str]:
    return [f"{f} (layer '{LAYERS[LAYER[f]][0]}') imports {g} (layer '{LAYERS[LAYER[g]][0]}')"
            for f in sorted(graph) for g in sorted(graph[f]) if LAYER[g] > LAYER[f]]


def test_imports_run_only_downward():
    assert upward({f: imports(f) for f in project_files()}) == []


def test_no_import_circle():
    graph = {f: imports(f) for f in project_files()}
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(f, path):
        state[f] = 1
        for g in sorted(graph[f]):
            if state.get(g) == 1:
                pytest.fail("import circle: " + " -> ".join(path[path.index(g):] + [g]))
            if g not in state:
                visit(g, path + [g])
        state[f] = 2

    for f in graph:
        if f not in state:
            visit(f, [f])


def test_the_checker_sees_an_upward_import_inside_a_function():
    # the knot this layering undid: an env reaching up into evaluation for its seeds
    text = (ROOT / "envs/alfworld.py").read_text() + "\n\ndef f():\n    from himac import evaluation\n"
    assert upward({"envs/alfworld.py": imports("envs/alfworld.py", text)}) == [
        "envs/alfworld.py (layer 'envs') imports himac/evaluation.py (layer 'loop and evaluation')"]


def test_importing_envs_imports_no_himac_and_no_torch():
    code = ("import sys, envs, envs.sokoban, envs.alfworld, envs.procpool, envs.seeds, envs.cache, envs.alfworld_games\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('himac', 'torch', 'transformers'))\n"
            "print(bad)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
