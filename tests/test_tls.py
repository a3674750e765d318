"""DICOM TLS: our listener fed by dcmtk and pynetdicom, our sends to a TLS storescp.

The certificates are made at test time with the openssl CLI: a test CA, a server certificate
for 127.0.0.1 / localhost, a client certificate, and a second ("wrong") CA with its own client
certificate.
"""

from __future__ import annotations

import gc
import json
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from nodes import node_settings, running_node
from peers import (
    GE_3SLICE,
    LOCALHOST,
    PeerError,
    Storescp,
    dicom_files,
    echoscu,
    require_tools,
    storescu,
    tool_path,
    wait_until,
)
from test_assemble import Clock, Harness
from test_send import job_with_results

from dicom_node.app import Node
from dicom_node.config import ClientTLS, SendingSection, ServerTLS
from dicom_node.domain import DeliveryState
from dicom_node.send import Peer, Sender, SendError, echo, store_files
from dicom_node.tls import client_context, server_context
from dicom_node.web.metrics import Metrics

# pynetdicom's AssociationSocket.connect() drops the socket of a failed connection without
# closing it (see pyproject.toml); with TLS that socket is an ssl.SSLSocket.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <ssl.SSLSocket:pytest.PytestUnraisableExceptionWarning"
)


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    wrong_ca: Path
    wrong_cert: Path  # a client certificate signed by wrong_ca
    wrong_key: Path


def _openssl(folder: Path, *args: str) -> None:
    subprocess.run(
        [tool_path("openssl"), *args], cwd=folder, check=True, capture_output=True, timeout=60
    )


def _make_ca(folder: Path, name: str) -> None:
    _openssl(
        *(folder, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"),
        *("-keyout", f"{name}.key", "-out", f"{name}.pem", "-subj", f"/CN=dicom_node {name}"),
        *("-addext", "basicConstraints=critical,CA:TRUE"),
        *("-addext", "keyUsage=critical,keyCertSign,cRLSign"),
    )


def _make_leaf(folder: Path, name: str, ca: str, extensions: str) -> None:
    _openssl(
        *(folder, "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}"),
        *("-keyout", f"{name}.key", "-out", f"{name}.csr"),
    )
    (folder / f"{name}.ext").write_text(extensions)
    _openssl(
        *(folder, "x509", "-req", "-in", f"{name}.csr", "-days", "2", "-out", f"{name}.pem"),
        *("-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial"),
        *("-extfile", f"{name}.ext"),
    )


@pytest.fixture(autouse=True)
def _collect_dropped_sockets() -> Iterator[None]:
    """Collect the sockets pynetdicom drops while this module's warning filter applies."""
    yield
    gc.collect()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    require_tools("openssl")
    folder = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "wrong-ca"):
        _make_ca(folder, ca)
    server = "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
    _make_leaf(folder, "server", "ca", server)
    _make_leaf(folder, "client", "ca", "extendedKeyUsage=clientAuth\n")
    _make_leaf(folder, "wrong-client", "wrong-ca", "extendedKeyUsage=clientAuth\n")
    return Pki(
        *(folder / "ca.pem", folder / "server.pem", folder / "server.key"),
        *(folder / "client.pem", folder / "client.key", folder / "wrong-ca.pem"),
        *(folder / "wrong-client.pem", folder / "wrong-client.key"),
    )


def _node_tls(pki: Pki, **extra: Any) -> dict[str, Any]:
    return {"certificate": str(pki.server_cert), "private_key": str(pki.server_key), **extra}


@pytest.fixture
def tls_node(tmp_path: Path, pki: Pki) -> Iterator[Node]:
    with running_node(node_settings(tmp_path / "var", node={"tls": _node_tls(pki)})) as node:
        yield node


def _peer(node: Node, tls: ClientTLS | None) -> Peer:
    return Peer("AINODE", LOCALHOST, node.receiver.address[1], tls)


def _client(pki: Pki, ca: Path | None = None, cert: str = "client") -> ClientTLS:
    pairs = {
        "client": (pki.client_cert, pki.client_key),
        "wrong": (pki.wrong_cert, pki.wrong_key),
    }
    certificate, private_key = pairs.get(cert, (None, None))
    return ClientTLS(ca_bundle=ca or pki.ca, certificate=certificate, private_key=private_key)


# --------------------------------------------------------------------------- contexts


def test_contexts_follow_bcp195(pki: Pki) -> None:
    server = server_context(ServerTLS(certificate=pki.server_cert, private_key=pki.server_key))
    client = client_context(_client(pki))
    for context in (server, client):
        assert context.minimum_version == ssl.TLSVersion.TLSv1_2
        assert context.options & ssl.OP_NO_COMPRESSION
        tls12 = [c["name"] for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"]
        assert tls12 and all(name.startswith("ECDHE-") for name in tls12), tls12
        assert all("GCM" in name or "CHACHA20" in name for name in tls12), tls12
    assert server.verify_mode == ssl.CERT_NONE
    assert client.verify_mode == ssl.CERT_REQUIRED and client.check_hostname


# --------------------------------------------------------------------------- the listener


@pytest.mark.parametrize("processes", [1, 2])
def test_storescu_sends_over_tls_and_plain_tcp_is_refused(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture, processes: int
) -> None:
    """With two receiving processes the first connection of each goes to receiver-2,
    which makes the TLS handshake itself (node.receive_processes)."""
    require_tools("storescu", "echoscu")
    caplog.set_level("INFO", logger="dicom_node")
    node_section = {"tls": _node_tls(pki), "receive_processes": processes}
    settings = node_settings(tmp_path / "var", node=node_section)
    with running_node(settings) as node:
        port = node.receiver.address[1]
        tls = ["+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca)]
        storescu(LOCALHOST, port, "AINODE", [GE_3SLICE], extra_args=tls)
        assert node.journal.state_counts()["instances"]["total"] == 3
        plain = storescu(LOCALHOST, port, "AINODE", [GE_3SLICE], check=False, timeout=60)
        assert plain.returncode != 0
        assert echoscu(LOCALHOST, port, "AINODE", check=False).returncode != 0
        assert node.journal.state_counts()["instances"]["total"] == 3
        wait_until(  # a receiving process reports its counters every 0.5 s
            lambda: (
                (
                    node.metrics.registry.get_sample_value(
                        "dicom_node_associations_total", {"outcome": "tls_failed"}
                    )
                    or 0
                )
                >= 2
            ),
            10,
            what="two failed TLS handshakes counted",
        )
        trail = (Path(node.config.storage.path) / "audit.jsonl").read_text()
    assert "TLS on (minimum TLSv1_2, peer certificates not requested)" in caplog.text
    alerts = [json.loads(line) for line in trail.splitlines() if "connection refused" in line]
    assert alerts and all(a["detail"].startswith("TLS handshake failed") for a in alerts)


def test_pynetdicom_client_trusting_another_ca_is_refused(tls_node: Node, pki: Pki) -> None:
    echo("TESTSCU", _peer(tls_node, _client(pki, cert="none")))
    unknown_ca = r"not established \(over TLS\): .*CERTIFICATE_VERIFY_FAILED"
    with pytest.raises(SendError, match=unknown_ca):
        echo("TESTSCU", _peer(tls_node, _client(pki, ca=pki.wrong_ca, cert="none")), timeout=5)
    with pytest.raises(SendError, match="not established"):
        echo("TESTSCU", _peer(tls_node, None), timeout=5)  # plain TCP to the TLS port
    with socket.create_connection(tls_node.receiver.address):  # connects, never says hello
        echo("TESTSCU", _peer(tls_node, _client(pki, cert="none")))  # still serving


def test_client_certificates_when_required(tmp_path: Path, pki: Pki) -> None:
    tls = _node_tls(pki, ca_bundle=str(pki.ca), require_client_certificate=True)
    with running_node(node_settings(tmp_path / "var", node={"tls": tls})) as node:
        with pytest.raises(SendError, match="not established"):
            echo("TESTSCU", _peer(node, _client(pki, cert="none")), timeout=5)
        with pytest.raises(SendError, match="not established"):
            echo("TESTSCU", _peer(node, _client(pki, cert="wrong")), timeout=5)
        echo("TESTSCU", _peer(node, _client(pki)))


# --------------------------------------------------------------------------- destinations


class TlsStorescp(Storescp):
    """dcmtk storescp with TLS, requiring a client certificate signed by the test CA."""

    def __init__(self, workdir: Path, pki: Pki) -> None:
        tls = ("+tls", str(pki.server_key), str(pki.server_cert), "+cf", str(pki.ca), "-rc")
        super().__init__(workdir, extra_args=(*tls, "+xa"))
        self.client_tls = _client(pki)

    def _accepts(self) -> bool:
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise PeerError(f"storescp exited with {self._proc.returncode}")
        try:
            echo("AINODE", Peer(self.aet, self.host, self.port, self.client_tls), timeout=5)
        except SendError:
            return False
        return True


@pytest.fixture
def tls_storescp(tmp_path: Path, pki: Pki) -> Iterator[TlsStorescp]:
    require_tools("storescp")
    with TlsStorescp(tmp_path / "scp", pki) as scp:
        yield scp


def _uids(paths: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(p).SOPInstanceUID) for p in paths}


def test_store_files_over_tls(tls_storescp: TlsStorescp, pki: Pki) -> None:
    files = dicom_files(GE_3SLICE)
    peer = Peer(tls_storescp.aet, LOCALHOST, tls_storescp.port, tls_storescp.client_tls)
    store_files("AINODE", peer, files, timeout=10)
    assert _uids(tls_storescp.wait_for_files(3)) == _uids(files)
    anonymous = Peer(peer.ae_title, peer.host, peer.port, _client(pki, cert="none"))
    with pytest.raises(SendError, match="not established"):  # storescp -rc wants our cert
        store_files("AINODE", anonymous, files, timeout=5)


def test_sender_uses_the_destination_tls(
    tls_storescp: TlsStorescp, tmp_path: Path, pki: Pki
) -> None:
    harness = Harness(tmp_path / "var", Clock())
    job_id = job_with_results(harness, tls_storescp.port)  # a delivery to "pacs"
    plain = _sender(harness, {})
    assert plain.send_due() == 1
    (delivery,) = harness.journal.job_deliveries(job_id)
    assert delivery.state == DeliveryState.PENDING  # plain TCP to a TLS peer fails
    sender = _sender(harness, {"pacs": tls_storescp.client_tls})
    harness.clock.now = delivery.next_attempt_at
    assert sender.send_due() == 1
    (delivery,) = harness.journal.job_deliveries(job_id)
    assert delivery.state == DeliveryState.SENT
    tls_storescp.wait_for_files(2)


def _sender(harness: Harness, tls: dict[str, ClientTLS]) -> Sender:
    settings = SendingSection(max_attempts=3, backoff_initial_seconds=1, timeout_seconds=5)
    return Sender(
        harness.journal, harness.spool, Metrics(), "AINODE", settings, harness.clock, tls=tls
    )


def _write_config(path: Path, settings: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(settings))
    return path


def _cli(*args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "dicom_node", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def test_cli_echo_and_send_to_a_tls_destination(
    tls_storescp: TlsStorescp, tmp_path: Path, pki: Pki
) -> None:
    client = {"ca_bundle": str(pki.ca), "certificate": str(pki.client_cert)}
    client["private_key"] = str(pki.client_key)
    archive = {"ae_title": tls_storescp.aet, "host": LOCALHOST, "port": tls_storescp.port}
    settings = {"node": {"ae_title": "AINODE"}, "destinations": {"archive": archive}}
    plain = _write_config(tmp_path / "plain.yaml", settings)
    assert _cli("echo", "--config", plain, "archive").returncode == 1
    archive["tls"] = client
    config = _write_config(tmp_path / "tls.yaml", settings)
    echoed = _cli("echo", "--config", config, "archive")
    assert echoed.returncode == 0, echoed.stderr
    sent = _cli("send", "--config", config, "archive", GE_3SLICE)
    assert sent.returncode == 0, sent.stderr
    assert _uids(tls_storescp.wait_for_files(3)) == _uids(dicom_files(GE_3SLICE))


# --------------------------------------------------------------------------- configuration


def test_missing_certificate_is_a_config_error(tmp_path: Path, pki: Pki) -> None:
    tls = _node_tls(pki, certificate=str(tmp_path / "missing.pem"))
    config = _write_config(tmp_path / "node.yaml", node_settings(tmp_path, node={"tls": tls}))
    checked = _cli("check-config", "--config", config)
    assert checked.returncode == 2
    assert "node.tls.certificate" in checked.stderr


def test_serve_refuses_a_garbage_key_before_listening(tmp_path: Path, pki: Pki) -> None:
    garbage = tmp_path / "garbage.key"
    garbage.write_text("not a key\n")
    tls = _node_tls(pki, private_key=str(garbage))
    settings = node_settings(tmp_path / "var", node={"tls": tls})
    config = _write_config(tmp_path / "node.yaml", settings)
    served = _cli("serve", "--config", config, timeout=120)
    assert served.returncode == 1
    assert f"cannot start: node.tls.private_key: {garbage}" in served.stderr
    assert "listening as" not in served.stderr
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((LOCALHOST, settings["node"]["port"]), timeout=5).close()


def test_a_bad_destination_key_stops_the_start(tmp_path: Path, pki: Pki) -> None:
    tls = {"ca_bundle": str(pki.ca), "certificate": str(pki.client_cert)}
    tls["private_key"] = str(pki.server_key)  # not the certificate's key
    archive = {"ae_title": "STORESCP", "host": LOCALHOST, "port": 104, "tls": tls}
    settings = node_settings(tmp_path / "var", destinations={"archive": archive})
    served = _cli("serve", "--config", _write_config(tmp_path / "node.yaml", settings))
    assert served.returncode == 1
    assert "cannot start: destinations.archive.tls.private_key" in served.stderr
