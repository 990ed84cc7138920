"""The run config: defaults, layering, coercion and validation."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedsqueeze.config import (
    DEFAULTS,
    ConfigError,
    load_toml,
    parse_set_option,
    resolve_config,
    to_toml,
)

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_app_config_matches_defaults() -> None:
    """`flwr run .` reads [tool.flwr.app.config] and refuses --run-config keys not in it."""
    app_cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert set(app_cfg) == set(DEFAULTS)
    for key, value in app_cfg.items():
        assert value == DEFAULTS[key], key
    # and it resolves as-is
    assert resolve_config(app_cfg) == resolve_config()


def test_layers_later_wins_and_strings_coerce() -> None:
    cfg = resolve_config({"num-rounds": 3}, {"num-rounds": "7", "secagg": "true", "lr": "0.1"})
    assert cfg["num-rounds"] == 7
    assert cfg["secagg"] is True
    assert cfg["lr"] == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("layer", "fragment"),
    [
        ({"num-round": 3}, "did you mean 'num-rounds'"),
        ({"num-rounds": "three"}, "expected an integer"),
        ({"num-rounds": 0}, "must be >= 1"),
        ({"lr": -1}, "must be a finite number > 0"),
        ({"lr": "nan"}, "must be a finite number > 0"),
        ({"partition": "random"}, "must be one of"),
        ({"dataset": "cifar"}, "digits, mnist1d or npz:PATH"),
        ({"model": "resnet"}, "unknown model"),
        ({"codec": "topk(0.01)+wat"}, "codec"),
        ({"clients-per-round": 20, "num-clients": 10}, "larger than num-clients"),
        ({"secagg": "maybe"}, "expected true or false"),
    ],
)
def test_invalid_values_raise_config_error(layer: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_config(layer)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_toml_round_trip(tmp_path: Path) -> None:
    cfg = resolve_config({"dataset": 'npz:/tmp/a "b".npz', "num-rounds": 4, "secagg": True})
    path = tmp_path / "c.toml"
    path.write_text(to_toml(cfg))
    assert resolve_config(load_toml(path)) == cfg


def test_set_option_parsing() -> None:
    assert parse_set_option("codec='topk(0.01)+q4'") == ("codec", "topk(0.01)+q4")
    assert parse_set_option(" num-rounds = 5") == ("num-rounds", "5")
    with pytest.raises(ConfigError):
        parse_set_option("num-rounds")


def test_bad_toml_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_toml(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("num-rounds = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml(bad)


def test_bounds_that_used_to_fail_only_inside_the_run() -> None:
    """Finding 7: these were accepted, then crashed (or hung) after Ray had started."""
    assert resolve_config({"seed": 2**63 - 1})["seed"] == 2**63 - 1
    assert resolve_config({"node-timeout": 10})["node-timeout"] == 10.0
    dp = {"dp": "central", "dp-noise-multiplier": 1.0}
    assert resolve_config(dp, {"dp-noise-multiplier": 1e6, "dp-epsilon": 1000})
    for bad, key in (
        ({"seed": 2**63}, "seed"),
        ({"node-timeout": 9.9}, "node-timeout"),
        ({"node-timeout": 0.001}, "node-timeout"),
        ({**dp, "dp-noise-multiplier": 1e308}, "dp-noise-multiplier"),
        ({**dp, "dp-epsilon": 1e308}, "dp-epsilon"),
    ):
        with pytest.raises(ConfigError, match=key):
            resolve_config(bad)
