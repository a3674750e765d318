"""Config validation: every problem reported with its path; serve refuses before binding."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dicom_node.config import (
    ConfigError,
    NodeConfig,
    ObjectStoreSection,
    load_config,
    parse_config,
)

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


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    """ "Path does not point to a file" alone left the engineer to guess which one."""
    missing = tmp_path / "no-such.pem"
    with pytest.raises(ConfigError) as err:
        parse_config(
            {"node": {"ae_title": "A", "tls": {"certificate": missing, "private_key": missing}}}
        )
    assert err.value.problems == [
        f"node.tls.certificate: Path does not point to a file: {missing}",
        f"node.tls.private_key: Path does not point to a file: {missing}",
    ]


def test_every_rule_test_and_keyword_is_one_line_each() -> None:
    """A test of the wrong shape gave a line per member of pydantic's union, and a bad
    keyword next to it went unreported until that was fixed."""
    route = {"name": "r", "pipeline": "ct-chest", "send_to": ["source"]}
    when = {
        "Modality": {"equal": "CT"},  # a misspelt operator
        "Modalty": "CT",  # a misspelt keyword
        "ReferencedImageSequence": "x",  # a sequence
        "BodyPartExamined": None,  # every entry commented out
        "ContrastBolusAgent": True,
        "ImageType": ["ORIGINAL", {"not": "LOCALIZER"}],
        "SeriesDescription": {"regex": "("},
        "ProtocolName": {"contains": "lung"},  # fine
    }
    with pytest.raises(ConfigError) as err:
        parse_config({**MINIMAL, "routes": [{**route, "when": when}]})
    assert err.value.problems == [
        "routes.0.when.Modality: unknown operator 'equal' (one of equals, one_of, not,"
        " contains, regex, present)",
        "routes.0.when.Modalty: 'Modalty' is not a DICOM keyword",
        "routes.0.when.ReferencedImageSequence: 'ReferencedImageSequence' is a sequence;"
        " rules test plain attributes",
        "routes.0.when.BodyPartExamined: no value to test; give a value, a list of values,"
        " or one of equals, one_of, not, contains, regex, present",
        "routes.0.when.ContrastBolusAgent: true is not a value to compare; to test presence:"
        " {present: true}",
        "routes.0.when.ImageType: a list of values must hold plain values (text or numbers) only",
        "routes.0.when.SeriesDescription: regex '(' does not compile: missing ), unterminated"
        " subpattern at position 0",
    ]


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


def _problems_of(tmp_path: Path, content: bytes | str) -> list[str]:
    path = tmp_path / "node.yaml"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    return err.value.problems


def test_a_key_given_twice_is_refused_at_any_level(tmp_path: Path) -> None:
    content = (
        "node:\n"  # 1
        "  ae_title: AINODE\n"
        "  allowed_calling_aets: [CT1]\n"
        "node:\n"  # 4
        "  ae_title: AINODE\n"
        "web:\n"  # 6
        "  port: 8081\n"  # 7
        "  port: 8082\n"  # 8
        "routes:\n"
        "  - {name: r, name: s, pipeline: ct-chest, send_to: [source]}\n"  # 10
    )
    assert _problems_of(tmp_path, content) == [
        "not valid YAML: key 'node' appears twice (lines 1 and 4)",
        "not valid YAML: key 'routes.0.name' appears twice (line 10)",
        "not valid YAML: key 'web.port' appears twice (lines 7 and 8)",
    ]
    bad = _cli("check-config", "--config", str(tmp_path / "node.yaml"))
    assert bad.returncode == 2
    assert "key 'node' appears twice (lines 1 and 4)" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_a_merge_key_may_be_overridden(tmp_path: Path) -> None:
    path = tmp_path / "node.yaml"
    path.write_text(
        "node: {ae_title: AINODE}\n"
        "destinations:\n"
        "  a: &peer {ae_title: PACS, host: pacs.example.org, port: 104}\n"
        "  b: {<<: *peer, port: 11112}\n"
    )
    config = load_config(path)
    assert (config.destinations["b"].host, config.destinations["b"].port) == (
        "pacs.example.org",
        11112,
    )


def test_a_file_that_is_not_utf8_is_a_clear_error(tmp_path: Path) -> None:
    problems = _problems_of(tmp_path, b"# f\xfcr\nnode:\n  ae_title: AINODE\n")
    assert len(problems) == 1, problems
    assert problems[0].startswith("not UTF-8 text: byte 0xfc on line 1, column 4"), problems
    bad = _cli("check-config", "--config", str(tmp_path / "node.yaml"))
    assert bad.returncode == 2, bad.stderr
    assert "not UTF-8 text: byte 0xfc on line 1, column 4" in bad.stderr
    assert "Traceback" not in bad.stderr
    bom = tmp_path / "bom.yaml"
    bom.write_bytes(b"\xef\xbb\xbf# f\xc3\xbcr\nnode:\n  ae_title: AINODE\n")
    assert load_config(bom).node.ae_title == "AINODE"


def test_a_date_that_does_not_exist_is_a_yaml_error(tmp_path: Path) -> None:
    problems = _problems_of(tmp_path, "node: {ae_title: AINODE}\nrelease: 2024-13-01\n")
    assert problems == [
        "not valid YAML: '2024-13-01' is not a valid date: month must be in 1..12 (line 2)"
    ]


def test_empty_hosts_are_refused() -> None:
    destination = {"ae_title": "PACS", "port": 104}
    for host in ("", " ", "pacs .example.org"):
        with pytest.raises(ConfigError) as err:
            parse_config(
                {
                    "node": {"ae_title": "AINODE", "host": host},
                    "web": {"host": host},
                    "destinations": {"pacs": {**destination, "host": host}},
                }
            )
        paths = [p.split(":")[0] for p in err.value.problems]
        assert paths == ["node.host", "destinations.pacs.host", "web.host"], err.value.problems
    ok = parse_config({"node": {"ae_title": "AINODE", "host": "0.0.0.0"}, "web": {"host": "::"}})
    assert (ok.node.host, ok.web.host) == ("0.0.0.0", "::")


def _seconds_fields() -> list[tuple[str, str]]:
    """(section path, field) of every duration in the configuration."""
    found = []
    sections: list[tuple[str, type]] = [
        (name, field.annotation)  # type: ignore[misc]
        for name, field in NodeConfig.model_fields.items()
        if isinstance(field.annotation, type)
    ]
    sections.append(("storage.object_store", ObjectStoreSection))
    for path, model in sections:
        found += [(path, key) for key in model.model_fields if key.endswith("_seconds")]
    return found


def _with(path: str, key: str, value: object) -> dict[str, object]:
    data: dict[str, object] = {"node": {"ae_title": "AINODE"}}
    if path == "storage.object_store":
        data["storage"] = {"object_store": {"bucket": "images", key: value}}
    else:
        section = data.setdefault(path, {})
        assert isinstance(section, dict)
        section[key] = value
    return data


@pytest.mark.parametrize(("path", "key"), _seconds_fields())
def test_every_duration_is_finite_and_bounded(path: str, key: str) -> None:
    for value in (float("inf"), float("nan"), 1e12, "1e400"):
        with pytest.raises(ConfigError) as err:
            parse_config(_with(path, key, value))
        assert any(p.startswith(f"{path}.{key}: ") for p in err.value.problems), (
            value,
            err.value.problems,
        )


def test_the_durations_are_all_checked() -> None:
    fields = {f"{path}.{key}" for path, key in _seconds_fields()}
    assert {
        "sending.timeout_seconds",
        "web.echo_interval_seconds",
        "node.drain_seconds",
        "storage.object_store.timeout_seconds",
        "cluster.lease_seconds",
    } <= fields


def test_client_tls_key_and_certificate_come_together(tmp_path: Path) -> None:
    pem = tmp_path / "client.pem"
    pem.write_text("not checked here\n")
    peer = {"ae_title": "PACS", "host": "pacs.example.org", "port": 2762}
    with pytest.raises(ConfigError) as err:
        parse_config({**MINIMAL, "destinations": {"pacs": {**peer, "tls": {"private_key": pem}}}})
    assert err.value.problems == ["destinations.pacs.tls.private_key: given without certificate"]
    for tls in ({"certificate": str(pem), "private_key": str(pem)}, {"certificate": str(pem)}):
        # a certificate alone: one file holding the key too (dicom_node.tls loads it so)
        config = parse_config({**MINIMAL, "destinations": {"pacs": {**peer, "tls": tls}}})
        assert config.destinations["pacs"].tls is not None
    assert parse_config({**MINIMAL, "destinations": {"pacs": {**peer, "tls": {}}}})


def test_an_empty_section_is_read_as_empty(tmp_path: Path) -> None:
    path = tmp_path / "node.yaml"
    path.write_text(
        "node:\n  ae_title: AINODE\n"
        "destinations:\n  # pacs: {ae_title: PACS, host: h, port: 104}\n"
        "routes:\nweb:\nsending:\n"
    )
    config = load_config(path)
    assert config.destinations == {}
    assert config.routes == []
    assert config.web.port == 8080
    with pytest.raises(ConfigError) as err:
        parse_config({"node": None})
    assert [p.split(":")[0] for p in err.value.problems] == ["node"]


def test_a_number_for_a_title_and_a_network_with_host_bits_say_what_to_write() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(
            {
                "node": {"ae_title": 1234, "allowed_networks": ["10.1.2.3/8", "not-a-net"]},
                "destinations": {"pacs": {"ae_title": "PACS", "host": "pacs", "port": 104}},
            }
        )
    assert err.value.problems == [
        "node.ae_title: Input should be a valid string (YAML reads 1234 as a number: quote"
        ' it, "1234")',
        "node.allowed_networks.0: value is not a valid IPv4 or IPv6 network (10.1.2.3/8 has"
        " host bits set; the network is 10.0.0.0/8)",
        "node.allowed_networks.1: value is not a valid IPv4 or IPv6 network",
    ]


def test_the_web_server_and_the_dicom_listener_on_one_port_is_a_config_problem() -> None:
    """check-config said OK, and serve then blamed "another dicom-node or another program"."""
    for web in ({"port": 11712}, {"port": 11712, "host": "0.0.0.0"}):
        with pytest.raises(ConfigError) as err:
            parse_config({"node": {"ae_title": "AINODE", "port": 11712}, "web": web})
        assert err.value.problems == [
            "web.port: 11712 is node.port too; the DICOM listener and the web server each"
            " need a port of their own"
        ]
    parse_config({"node": {"ae_title": "AINODE", "port": 11712}, "web": {"port": 11713}})
    parse_config({"node": {"ae_title": "A", "port": 0}, "web": {"port": 0}})  # any free ones
    parse_config(
        {"node": {"ae_title": "A", "port": 11712}, "web": {"port": 11712, "enabled": False}}
    )


def test_a_short_web_token_says_characters() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"node": {"ae_title": "AINODE"}, "web": {"token": "short"}})
    assert err.value.problems == ["web.token: at least 16 characters"]
