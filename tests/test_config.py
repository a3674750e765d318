"""Config validation: every problem reported with its path; serve refuses before binding."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dicom_node.config import ConfigError, NodeConfig, load_config, parse_config

REPO = Path(__file__).resolve().parents[1]

MINIMAL = {"node": {"ae_title": "AINODE"}}


def test_example_config_is_valid() -> None:
    config = load_config(REPO / "config" / "node.yaml")
    assert config.node.ae_title == "AINODE"
    assert config.routes[0].pipeline == "ct-chest"
    assert config.routes[0].send_to == ["pacs"]


def test_defaults_for_everything_but_the_ae_title() -> None:
    config = parse_config(MINIMAL)
    assert isinstance(config, NodeConfig)
    assert config.node.port == 11112
    assert config.node.allowed_calling_aets == []
    assert str(config.storage.path) == "var"
    assert config.completion.study_idle_seconds == 10
    assert config.web.port == 8080


def test_missing_ae_title_is_reported_with_its_path() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"node": {}})
    assert err.value.problems == ["node.ae_title: Field required"]


def test_every_bad_key_is_reported() -> None:
    data = {
        "node": {"ae_title": "A\\B", "port": 70000, "colour": "blue"},
        "storage": {"path": "./var", "size": 3},
        "completion": {"study_idle_seconds": -1},
        "destinations": {"pacs": {"ae_title": "PACS", "host": "h"}},
        "routes": [
            {"name": "r", "when": {"NotAKeyword": 1}, "pipeline": "ct-chest", "send_to": []}
        ],
        "extra_section": {},
    }
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    problems = err.value.problems
    expected_paths = [
        "node.ae_title",
        "node.port",
        "node.colour: unknown key",
        "storage.size: unknown key",
        "completion.study_idle_seconds",
        "destinations.pacs.port",
        "routes.0.when",
        "routes.0.send_to",
        "extra_section: unknown key",
    ]
    for path in expected_paths:
        assert any(p.startswith(path) for p in problems), (path, problems)
    assert len(problems) == len(expected_paths), problems


def test_cross_references_are_checked() -> None:
    data = {
        **MINIMAL,
        "destinations": {"pacs": {"ae_title": "PACS", "host": "h", "port": 104}},
        "routes": [
            {"name": "a", "pipeline": "no-such", "send_to": ["pacs", "nowhere"]},
            {"name": "a", "pipeline": "ct-chest", "send_to": ["source"]},
        ],
    }
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    problems = err.value.problems
    unknown = [p for p in problems if "no-such" in p or "model packages are looked for" in p]
    assert len(unknown) == 1, problems  # whole, once: its text holds "; " (it was split too)
    assert unknown[0].startswith("routes.0.pipeline: unknown pipeline 'no-such' (known: ")
    assert unknown[0].endswith(")")
    assert "routes.0.send_to: unknown destination 'nowhere'" in problems
    assert "routes.1.name: 'a' is used twice" in problems
    assert len(problems) == 4, problems  # routes.0.name is reported too


def test_rule_operators_are_validated() -> None:
    route = {"name": "r", "pipeline": "ct-chest", "send_to": ["source"]}
    ok = parse_config(
        {**MINIMAL, "routes": [{**route, "when": {"SeriesDescription": {"contains": "lung"}}}]}
    )
    assert ok.routes[0].when["SeriesDescription"].contains == "lung"  # type: ignore[union-attr]
    for bad in ({"contains": "a", "regex": "b"}, {"regex": "("}, {"between": [1, 2]}):
        with pytest.raises(ConfigError) as err:
            parse_config({**MINIMAL, "routes": [{**route, "when": {"SeriesDescription": bad}}]})
        assert all(p.startswith("routes.0.when.SeriesDescription") for p in err.value.problems), (
            err.value.problems
        )


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicom_node", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_check_config_cli(tmp_path: Path) -> None:
    good = _cli("check-config", "--config", str(REPO / "config" / "node.yaml"))
    assert good.returncode == 0, good.stderr
    bad_file = tmp_path / "bad.yaml"
    bad_file.write_text(
        yaml.safe_dump({"node": {"ae_title": "X", "prot": 1}, "web": {"port": "x"}})
    )
    bad = _cli("check-config", "--config", str(bad_file))
    assert bad.returncode == 2
    assert "node.prot: unknown key" in bad.stderr
    assert "web.port:" in bad.stderr


def test_serve_refuses_bad_config_before_opening_a_port(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    bad_file = tmp_path / "bad.yaml"
    bad_file.write_text(
        yaml.safe_dump(
            {
                "node": {"ae_title": "X", "port": port},
                "storage": {"path": str(tmp_path / "var")},
                "routes": [{"name": "r", "pipeline": "nope", "send_to": ["source"]}],
            }
        )
    )
    result = _cli("serve", "--config", str(bad_file))
    assert result.returncode == 2
    assert "routes.0.pipeline: unknown pipeline 'nope'" in result.stderr
    assert not (tmp_path / "var").exists()  # nothing was created, no port was opened


def test_config_from_environment_variable(tmp_path: Path) -> None:
    import os

    env = {**os.environ, "DICOM_NODE_CONFIG": str(REPO / "config" / "node.yaml")}
    assert _cli("check-config", env=env).returncode == 0
    env.pop("DICOM_NODE_CONFIG")
    missing = _cli("check-config", env=env)
    assert missing.returncode == 2
    assert "DICOM_NODE_CONFIG" in missing.stderr


def test_field_errors_and_dangling_names_are_reported_together() -> None:
    data = {
        "node": {"ae_title": "N", "bogus": 1},
        "routes": [{"name": "r", "pipeline": "nope", "send_to": ["nowhere"]}],
    }
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    problems = err.value.problems
    assert "node.bogus: unknown key" in problems
    assert any(p.startswith("routes.0.pipeline: unknown pipeline 'nope'") for p in problems)
    assert "routes.0.send_to: unknown destination 'nowhere'" in problems
    assert len(problems) == 3, problems
