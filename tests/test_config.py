"""Flat YAML configs: routing, types, bad keys, and every shipped config loads."""
from pathlib import Path

import pytest

from envs import REGISTRY
from himac import config as C
from himac.experiment import load_config, sections

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_every_shipped_config_loads():
    assert CONFIGS, "no configs found"
    for path in CONFIGS:
        cfg = load_config(path)
        assert cfg.run.env in REGISTRY


def test_keys_route_to_their_sections(tmp_path):
    cfg = load_config(write(tmp_path, "group_size: 3\nlr: 1e-4\nroom_size: 7\nsub_done: false\n"))
    assert cfg.planner.group_size == 3 and cfg.update.lr == 1e-4  # "1e-4" is a string to YAML 1.1
    assert cfg.env.room_size == 7 and cfg.executor.sub_done is False
    assert cfg.model.model == "smollm2-135m"  # default from the dataclass, the one place it lives


def test_no_key_is_owned_by_two_sections():
    for name in REGISTRY:
        C.route({}, sections(name), "test")  # raises TypeError on a duplicate field


def test_unknown_key_names_it_and_suggests(tmp_path):
    with pytest.raises(C.ConfigError, match=r"unknown config key 'group_sise'.*did you mean 'group_size'"):
        load_config(write(tmp_path, "group_sise: 4\n"))


@pytest.mark.parametrize("text,key", [
    ("group_size: '8'\n", "group_size"),
    ("group_size: 2.5\n", "group_size"),
    ("sub_done: 1\n", "sub_done"),
    ("lr: fast\n", "lr"),
    ("failure_keywords: deadlock\n", "failure_keywords"),
    ("model: 3\n", "model"),
])
def test_wrong_type_names_the_key(tmp_path, text, key):
    with pytest.raises(C.ConfigError, match=f"'{key}'"):
        load_config(write(tmp_path, text))


@pytest.mark.parametrize("text,key", [
    ("group_size: 0\n", "group_size"),
    ("clip_eps: 1.5\n", "clip_eps"),
    ("kl_beta: -0.1\n", "kl_beta"),
    ("executor_temperature: 0\n", "executor_temperature"),
    ("dtype: float8\n", "dtype"),
    ("env: chess\n", "env"),
])
def test_bad_value_names_the_key(tmp_path, text, key):
    with pytest.raises(C.ConfigError, match=f"'{key}'"):
        load_config(write(tmp_path, text))


def test_nested_yaml_is_rejected(tmp_path):
    with pytest.raises(C.ConfigError, match="'planner' .* nested"):
        load_config(write(tmp_path, "planner:\n  group_size: 4\n"))


def test_overrides_parse_yaml_values(tmp_path):
    over = C.parse_overrides(["failure_keywords=[deadlock, stuck]", "lr=3e-5", "sub_done=false", "model=tiny"])
    cfg = load_config(write(tmp_path, "group_size: 2\n"), over)
    assert cfg.executor.failure_keywords == ["deadlock", "stuck"]
    assert cfg.update.lr == 3e-5 and cfg.executor.sub_done is False and cfg.model.model == "tiny"
    with pytest.raises(C.ConfigError, match="key=value"):
        C.parse_overrides(["lr"])


def test_flat_round_trip(tmp_path):
    cfg = load_config(write(tmp_path, "group_size: 5\nroom_size: 8\n"))
    again = load_config(None, base=cfg.flat())
    assert again == cfg


def test_every_key_is_documented():
    for name in REGISTRY:
        for section, cls in sections(name).items():
            docs = C.field_docs(cls)
            missing = [f for f in C.field_names(cls) if not docs.get(f)]
            assert not missing, f"{section} keys without a docstring: {missing}"


def test_keys_flag_prints_the_table(capsys):
    from himac.coevolve import main
    assert main(["--keys"]) == 0
    out = capsys.readouterr().out
    assert "| `group_size` | planner | paper | `8` |" in out and "| `room_size` | env | paper |" in out
    assert "| `macro_every` | run | departure | `1` |" in out and "| `seed` | run | infra | `0` |" in out


ROOT = Path(__file__).resolve().parents[1]


def _keys_of_kind(kind):
    return sorted({f for name in REGISTRY for cls in sections(name).values()
                   for f, doc in C.field_docs(cls).items() if C.field_kind(doc)[0] == kind})


def test_every_key_says_its_kind():
    for name in REGISTRY:
        for section, cls in sections(name).items():
            unmarked = [f for f, doc in C.field_docs(cls).items() if not C.field_kind(doc)[0]]
            assert not unmarked, f"{name} {section} keys without (paper), (departure) or (infra): {unmarked}"


def test_every_departure_is_used_by_a_shipped_config_and_measured_in_the_docs():
    """A departure from the paper earns its key by a shipped config that uses it and a measured reason in
    docs/results.md's table of departures; one that did not pay goes, with its code path."""
    used = {k for path in CONFIGS for k in C.load_yaml(path)}
    results = (ROOT / "docs" / "results.md").read_text()
    table = results[results.index("## Departures"):]
    departures = _keys_of_kind("departure")
    assert departures
    assert [k for k in departures if k not in used] == []
    assert [k for k in departures if f"`{k}`" not in table] == []
