"""Deployment files: example configs validate; compose, systemd and Dockerfile agree with them."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from dicom_node.config import NodeConfig, NodeSection, load_config

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
EXAMPLES = sorted((DEPLOY / "examples").glob("*.yaml"))
CONFIG_IN_CONTAINER = "/etc/dicom-node/node.yaml"
# a stop takes up to node.drain_seconds + 5 s (receiving processes' exit) + a start in progress
STOP_MARGIN = 15


def _compose() -> dict[str, Any]:
    data = yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def _node_service(compose: dict[str, Any]) -> dict[str, Any]:
    """The service built from deploy/Dockerfile."""
    built = [
        service
        for service in compose["services"].values()
        if isinstance(service.get("build"), dict)
        and service["build"].get("dockerfile") == "deploy/Dockerfile"
    ]
    assert len(built) == 1, "compose.yaml needs exactly one service built from deploy/Dockerfile"
    return built[0]


def _orthanc_service(compose: dict[str, Any]) -> dict[str, Any]:
    found = [
        service
        for service in compose["services"].values()
        if re.match(r"^(orthancteam|jodogne)/orthanc(:|$)", str(service.get("image", "")))
    ]
    assert len(found) == 1, "compose.yaml needs exactly one Orthanc service"
    return found[0]


def _mounted_config(service: dict[str, Any]) -> Path:
    """Host path of the file the service mounts at the node's config path."""
    for volume in service.get("volumes", []):
        source, target, *_ = str(volume).split(":")
        if target == CONFIG_IN_CONTAINER:
            return (DEPLOY / source).resolve()
    raise AssertionError(f"the node service mounts nothing at {CONFIG_IN_CONTAINER}")


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined; heredocs skipped."""
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    instructions: list[tuple[str, str]] = []
    lines = iter(text.splitlines())
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        while line.endswith("\\"):
            line = line[:-1] + " " + next(lines).strip()
        keyword, _, rest = line.strip().partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        heredoc = re.search(r"<<'?(\w+)'?", rest)
        if heredoc:
            for body in lines:
                if body.strip() == heredoc.group(1):
                    break
    return instructions


def _dockerfile(keyword: str) -> list[str]:
    return [rest for kw, rest in _dockerfile_instructions() if kw == keyword]


def _unit() -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for line in (DEPLOY / "dicom-node.service").read_text(encoding="utf-8").splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            values.setdefault(key.strip(), []).append(value.strip())
    return values


def test_there_are_example_configs() -> None:
    names = {path.name for path in EXAMPLES}
    assert {
        "modality-autoforward.yaml",
        "pacs-routing-rule.yaml",
        "results-to-source.yaml",
        "compose-node.yaml",
    } <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.name)
def test_example_config_validates(path: Path) -> None:
    config = load_config(path)
    assert isinstance(config, NodeConfig)
    assert config.routes, f"{path.name}: an example without routes analyses nothing"


def test_results_to_source_example_uses_source() -> None:
    config = load_config(DEPLOY / "examples" / "results-to-source.yaml")
    assert any("source" in route.send_to for route in config.routes)
    senders = {d.ae_title for d in config.destinations.values()}
    # every allowed sender can be answered: `source` finds a destination with its AE title
    assert set(config.node.allowed_calling_aets) <= senders


def test_compose_has_the_node_and_orthanc() -> None:
    compose = _compose()
    node = _node_service(compose)
    assert node["build"]["context"] == ".."
    assert (DEPLOY / node["build"]["context"] / "pyproject.toml").is_file()
    _orthanc_service(compose)


def test_compose_mounts_a_valid_node_config() -> None:
    path = _mounted_config(_node_service(_compose()))
    assert path.is_file(), f"{path} is mounted by compose.yaml but does not exist"
    config = load_config(path)
    assert config.node.host == "0.0.0.0"
    assert config.web.enabled and config.web.host == "0.0.0.0"
    assert str(config.storage.path) == "/var/lib/dicom-node"


def test_compose_node_config_and_orthanc_know_each_other() -> None:
    compose = _compose()
    config = load_config(_mounted_config(_node_service(compose)))
    node_name = next(n for n, s in compose["services"].items() if s is _node_service(compose))
    orthanc = _orthanc_service(compose)
    env = orthanc["environment"]
    # our destinations are compose services; Orthanc's AE title is the one we call
    for destination in config.destinations.values():
        assert destination.host in compose["services"]
    assert env["ORTHANC__DICOM_AET"] in {d.ae_title for d in config.destinations.values()}
    # Orthanc knows the node as a modality: [AE title, service name, port]
    modalities = json.loads(env["ORTHANC__DICOM_MODALITIES"])
    assert [config.node.ae_title, node_name, config.node.port] in modalities.values()


def test_compose_gives_the_node_time_to_drain() -> None:
    service = _node_service(_compose())
    grace = int(str(service["stop_grace_period"]).removesuffix("s"))
    assert grace >= load_config(_mounted_config(service)).node.drain_seconds + STOP_MARGIN


def test_systemd_unit_serves_with_a_config() -> None:
    unit = _unit()
    (exec_start,) = unit["ExecStart"]
    argv = shlex.split(exec_start)
    assert PurePosixPath(argv[0]).name == "dicom-node"
    assert argv[1:3] == ["serve", "--config"]
    assert argv[3] == CONFIG_IN_CONTAINER
    assert unit["User"] == ["dicom-node"]
    assert unit["KillSignal"] == ["SIGTERM"]
    drain = NodeSection.model_fields["drain_seconds"].default
    assert int(unit["TimeoutStopSec"][0]) >= drain + STOP_MARGIN
    assert unit["ReadWritePaths"] == ["/var/lib/dicom-node"]
    assert unit["CapabilityBoundingSet"] == [""]
    assert "MemoryDenyWriteExecute" not in unit


def test_dockerfile_entrypoint_and_command() -> None:
    assert [json.loads(e) for e in _dockerfile("ENTRYPOINT")] == [["dicom-node"]]
    assert [json.loads(c) for c in _dockerfile("CMD")] == [
        ["serve", "--config", CONFIG_IN_CONTAINER]
    ]
    assert _dockerfile("VOLUME") == ["/var/lib/dicom-node"]
    assert sorted(_dockerfile("EXPOSE")[0].split()) == ["11112", "8080"]
    assert _dockerfile("USER") == ["dicom-node"]


def test_dockerfile_healthcheck_hits_healthz() -> None:
    (healthcheck,) = _dockerfile("HEALTHCHECK")
    options, _, command = healthcheck.partition(" CMD ")
    argv = json.loads(command)
    assert argv[:2] == ["python", "-c"]
    assert "urllib.request.urlopen" in argv[2]
    assert "http://127.0.0.1:8080/healthz" in argv[2]
    assert "--start-period=" in options


def test_dockerfile_torch_matches_the_makefile() -> None:
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    make_spec = re.search(r"^TORCH_SPEC \?= torch==(\S+)$", makefile, re.MULTILINE)
    docker_arg = [a for a in _dockerfile("ARG") if a.startswith("TORCH_VERSION=")]
    assert make_spec is not None and docker_arg
    assert docker_arg[0] == f"TORCH_VERSION={make_spec.group(1)}"


def test_the_cluster_compose_runs_two_receivers_and_two_workers_on_one_valid_config() -> None:
    compose = yaml.safe_load((DEPLOY / "compose-cluster.yaml").read_text(encoding="utf-8"))
    services = compose["services"]
    commands = {name: service.get("command", []) for name, service in services.items()}
    receivers = [name for name, command in commands.items() if command[:1] == ["serve"]]
    workers = [name for name, command in commands.items() if command[:1] == ["worker"]]
    assert len(receivers) == 2 and len(workers) == 2
    # each receiver is named after its host name, which must differ
    assert len({services[name]["hostname"] for name in receivers}) == 2
    config = load_config(DEPLOY / "examples" / "cluster-node.yaml")
    assert config.cluster.journal_url is not None and config.cluster.broker_url is not None
    assert config.cluster.node_name is None
    for name in receivers + workers:
        mounts = services[name]["volumes"]
        assert "./examples/cluster-node.yaml:/etc/dicom-node/node.yaml:ro" in mounts
        assert any(m.endswith(f":{config.storage.path}") for m in mounts), name
    assert {"postgres", "redis"} <= services.keys()
    journal_host = config.cluster.journal_url.get_secret_value().split("@")[1].split(":")[0]
    assert journal_host in services
