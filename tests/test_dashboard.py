"""The dashboard in a real browser (Debian's headless chromium), the REST API and web auth."""

from __future__ import annotations

import base64
import copy
import http.client
import json
import logging
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from nodes import node_settings, running_node, send
from peers import (
    GE_3SLICE,
    LOCALHOST,
    REPO_ROOT,
    Storescp,
    free_port,
    require_tools,
    tool_path,
    wait_until,
)
from pydicom.uid import generate_uid

ARTIFACTS = REPO_ROOT / ".artifacts"
HOSTILE_NAME = "<script>document.title='pwned'</script>"
HOSTILE_DESCRIPTION = "<img src=x onerror=alert(1)>Chest"


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def post(url: str, headers: dict[str, str]) -> int:
    request = urllib.request.Request(url, data=b"", method="POST", headers=headers)
    opener = urllib.request.build_opener(NoRedirect())
    try:
        with opener.open(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def hostile_study() -> list[pydicom.Dataset]:
    datasets = [pydicom.dcmread(p) for p in sorted(GE_3SLICE.glob("*.dcm"))]
    for ds in datasets:
        ds.PatientName = HOSTILE_NAME
        ds.StudyDescription = HOSTILE_DESCRIPTION
    return datasets


def another_study(datasets: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
    study, series = generate_uid(), generate_uid()
    copies = []
    for ds in datasets:
        new = copy.deepcopy(ds)
        new.StudyInstanceUID, new.SeriesInstanceUID = study, series
        new.SOPInstanceUID = new.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        new.PatientName = "Other^Patient"
        copies.append(new)
    return copies


def chromium(url: str, *args: str, user_data: Path) -> str:
    command = [
        tool_path("chromium"),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={user_data}",
        *args,
        url,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def processed_node(tmp_path: Path, scp: Storescp) -> dict:
    return node_settings(
        tmp_path / "var",
        destinations={"archive": {"ae_title": scp.aet, "host": LOCALHOST, "port": scp.port}},
        routes=[
            {
                "name": "chest",
                "when": {"Modality": "CT", "PatientName": {"not": "Other^Patient"}},
                "pipeline": "ct-chest",
                "send_to": ["archive"],
            },
            {
                "name": "back",
                "when": {"PatientName": "Other^Patient"},
                "pipeline": "ct-chest",
                "send_to": ["source"],
            },
        ],
        web={"refresh_seconds": 0, "echo_interval_seconds": 0.5},
    )


def test_dashboard_in_a_browser(tmp_path: Path) -> None:
    require_tools("chromium", "storescp", "echoscu")
    with Storescp(tmp_path / "scp") as scp, running_node(processed_node(tmp_path, scp)) as node:
        base = f"http://{LOCALHOST}:{node.web.address[1]}" if node.web else ""
        hostile = hostile_study()
        assert send(node, hostile) == [0, 0, 0]
        assert send(node, another_study(hostile), calling="NOWHERE") == [0, 0, 0]
        jobs = wait_until(lambda: _settled(base), 180, 0.3, "both studies to settle")
        wait_until(
            lambda: json.loads(get(f"{base}/api/destinations")[1])["archive"], 30, 0.2, "an echo"
        )
        dom = chromium(base + "/", "--dump-dom", user_data=tmp_path / "chrome")
        ARTIFACTS.mkdir(exist_ok=True)
        screenshot = ARTIFACTS / "dashboard.png"
        screenshot.unlink(missing_ok=True)
        chromium(
            base + "/",
            f"--screenshot={screenshot}",
            "--window-size=1400,1300",
            user_data=tmp_path / "chrome",
        )
        _check_what_a_person_sees(dom, jobs)
        assert screenshot.stat().st_size > 20_000
        _check_retry_button(base, next(j for j in jobs if j["state"] == "dead_letter"))


def _settled(base: str) -> list[dict] | None:
    jobs = json.loads(get(f"{base}/api/jobs")[1])
    states = sorted(job["state"] for job in jobs)
    return jobs if states == ["dead_letter", "done"] else None


def _check_what_a_person_sees(dom: str, jobs: list[dict]) -> None:
    assert "<title>dicom_node</title>" in dom  # the hostile name did not run
    assert "&lt;script&gt;document.title='pwned'&lt;/script&gt;" in dom
    assert "&lt;img src=x onerror=alert(1)&gt;Chest" in dom
    assert "<img" not in dom and dom.count("<script") == 0
    studies = dom[dom.index('id="studies"') : dom.index("</table>", dom.index('id="studies"'))]
    assert studies.count("<tr>") == 3  # header + two studies
    assert "NOWHERE" in studies and "complete" in studies
    assert re.search(r"#\d+ chest: done", studies)
    assert re.search(r"analyse \d+\.\d s / encode \d+\.\d s / send \d+\.\d s", studies)
    problems = dom[dom.index('id="problems"') :]
    dead = next(j for j in jobs if j["state"] == "dead_letter")
    assert f'action="/jobs/{dead["id"]}/retry"' in problems
    assert "source: no destination is configured with the sending AE title" in problems
    assert "echo OK" in dom[dom.index('id="destinations"') :]
    config = dom[dom.index('id="config"') :]
    assert '"ae_title": "AINODE"' in config and '"not": "Other^Patient"' in config
    assert "null" not in config


def _check_retry_button(base: str, dead: dict) -> None:
    url = f"{base}/jobs/{dead['id']}/retry"
    assert post(url, {"Origin": "http://evil.example"}) == 403
    before = json.loads(get(f"{base}/api/jobs/{dead['id']}")[1])["deliveries"][0]["updated_at"]
    assert post(url, {"Origin": base}) == 303
    wait_until(
        lambda: (
            (d := json.loads(get(f"{base}/api/jobs/{dead['id']}")[1]))["state"] == "dead_letter"
            and d["deliveries"][0]["updated_at"] > before
        ),
        60,
        0.2,
        "the retried delivery to run out of attempts again",
    )


def test_web_auth_and_api(tmp_path: Path) -> None:
    token = "s3cret-token-0123456789"
    settings = node_settings(
        tmp_path / "var",
        web={"token": token, "basic_auth": {"username": "ops", "password": "pa55word"}},
    )
    with running_node(settings) as node:
        assert node.web is not None
        base = f"http://{LOCALHOST}:{node.web.address[1]}"
        assert get(f"{base}/healthz")[0] == 200  # for load balancers, always open
        for path in ("/", "/metrics", "/api/status", "/api/config"):
            assert get(base + path)[0] == 401, path
            assert get(base + path, {"Authorization": "Bearer wrong-token-0123456789"})[0] == 401
        bearer = {"Authorization": f"Bearer {token}"}
        basic = {"Authorization": "Basic " + base64.b64encode(b"ops:pa55word").decode()}
        assert get(f"{base}/api/status", basic)[0] == 200
        status, body = get(f"{base}/api/config", bearer)
        assert status == 200 and token.encode() not in body and b"pa55word" not in body
        assert json.loads(body)["web"]["token"] == "**********"
        spec = json.loads(get(f"{base}/api/openapi.json", bearer)[1])
        assert "/api/jobs/{job_id}/retry" in spec["paths"]
        assert get(f"{base}/api/jobs?state=nonsense", bearer)[0] == 400
        assert get(f"{base}/api/jobs/999", bearer)[0] == 404
        assert post(f"{base}/api/jobs/999/retry", bearer) == 404


TOKEN = "s3cret-token-0123456789"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


def call(
    port: int, method: str, path: str, headers: dict[str, str] | None = None
) -> tuple[int, http.client.HTTPResponse, bytes]:
    """Any method, HEAD and PUT included (urllib would follow or refuse some of them)."""
    connection = http.client.HTTPConnection(LOCALHOST, port, timeout=10)
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response, response.read()
    finally:
        connection.close()


@pytest.fixture(scope="module")
def web_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A node with both a token and basic auth; its web port."""
    settings = node_settings(
        tmp_path_factory.mktemp("web") / "var",
        web={"token": TOKEN, "basic_auth": {"username": "ops", "password": "pa55word"}},
    )
    with running_node(settings) as node:
        assert node.web is not None
        yield node.web.address[1]


def test_job_ids_too_large_for_the_journal_are_unknown_jobs(
    web_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    huge, enormous = "9" * 23, "1" * 5000  # past SQLite's 64-bit INTEGER; past int()'s limit
    with caplog.at_level(logging.WARNING):
        for job_id in (huge, enormous, "9223372036854775808", "0" * 30 + "999"):
            status, response, body = call(web_port, "GET", f"/api/jobs/{job_id}", BEARER)
            assert (status, json.loads(body)) == (404, {"error": "no such job"}), job_id
            status, _, body = call(web_port, "POST", f"/api/jobs/{job_id}/retry", BEARER)
            assert status == 404 and "error" in json.loads(body), job_id
            assert call(web_port, "POST", f"/jobs/{job_id}/retry", BEARER)[0] == 404, job_id
        for limit in (huge, enormous, "-" + huge):
            assert call(web_port, "GET", f"/api/jobs?limit={limit}", BEARER)[0] == 200
            assert call(web_port, "GET", f"/api/studies?limit={limit}", BEARER)[0] == 200
    assert not [r for r in caplog.records if r.name.startswith("dicom_node.web")]


def test_a_cross_site_post_is_refused_everywhere(web_port: int) -> None:
    evil = {"Origin": "http://evil.example"}
    ours = {"Origin": f"http://{LOCALHOST}:{web_port}"}
    for path in ("/api/jobs/999/retry", "/jobs/999/retry"):
        for cross_site in (evil, {"Referer": "http://evil.example/page"}, {"Origin": "null"}):
            status, response, body = call(web_port, "POST", path, {**BEARER, **cross_site})
            assert status == 403, (path, cross_site)
            assert b"cross-site request refused" in body
        # from our own pages, or from curl and scripts (neither header): on to the job
        assert call(web_port, "POST", path, {**BEARER, **ours})[0] == 404, path
        assert call(web_port, "POST", path, BEARER)[0] == 404, path
        assert call(web_port, "POST", path, evil)[0] == 401, path  # authentication first
    status, response, body = call(web_port, "POST", "/api/jobs/999/retry", {**BEARER, **evil})
    assert response.getheader("Content-Type") == "application/json"  # the API's error style
    assert json.loads(body) == {"error": "cross-site request refused"}


def test_head_is_answered_like_get_without_a_body(web_port: int) -> None:
    for path, headers in (("/healthz", {}), ("/api/status", BEARER), ("/", BEARER)):
        got, got_response, got_body = call(web_port, "GET", path, headers)
        status, response, body = call(web_port, "HEAD", path, headers)
        assert (status, body) == (got, b"") and status == 200, path
        assert response.getheader("Content-Type") == got_response.getheader("Content-Type")
        if path != "/":  # the dashboard shows the time, its length may change
            assert response.getheader("Content-Length") == str(len(got_body)), path
    status, response, body = call(web_port, "HEAD", "/api/status")  # auth rules unchanged
    assert status == 401 and body == b"" and response.getheader("WWW-Authenticate")
    assert call(web_port, "HEAD", "/nowhere", BEARER)[0] == 404


def test_a_wrong_method_on_a_known_path_is_405_with_allow(web_port: int) -> None:
    for method, path, allow in (
        ("POST", "/healthz", "GET, HEAD"),
        ("FROB", "/healthz", "GET, HEAD"),
        ("PUT", "/", "GET, HEAD"),
        ("OPTIONS", "/metrics", "GET, HEAD"),
        ("DELETE", "/api/jobs/1", "GET, HEAD"),
        ("PATCH", "/api/config", "GET, HEAD"),
        ("GET", "/api/jobs/1/retry", "POST"),
        ("HEAD", "/jobs/1/retry", "POST"),
    ):
        status, response, body = call(web_port, method, path, BEARER)
        assert (status, response.getheader("Allow")) == (405, allow), (method, path)
        if method != "HEAD":
            if path.startswith("/api/"):
                assert json.loads(body) == {"error": "method not allowed"}
            else:
                assert body == b"method not allowed\n"
    for method in ("PUT", "DELETE", "OPTIONS", "POST"):
        assert call(web_port, method, "/nowhere", BEARER)[0] == 404  # unknown stays unknown
        assert call(web_port, method, "/api/status")[0] == 401  # auth first, as for GET


def test_auth_schemes_are_case_insensitive(web_port: int) -> None:
    basic = base64.b64encode(b"ops:pa55word").decode()
    for authorization in (
        f"bearer {TOKEN}",
        f"BEARER {TOKEN}",
        f"Bearer  {TOKEN}",
        f"basic {basic}",
        f"BASIC {basic}",
    ):
        assert call(web_port, "GET", "/api/status", {"Authorization": authorization})[0] == 200
    for authorization in (
        f"bearer {TOKEN.upper()}",  # the credentials themselves are not
        f"basic {base64.b64encode(b'OPS:pa55word').decode()}",
        f"Basic {TOKEN}",
        f"Bearer {basic}",
        TOKEN,
        f"Token {TOKEN}",
    ):
        assert call(web_port, "GET", "/api/status", {"Authorization": authorization})[0] == 401


def test_a_destination_down_from_the_start_is_logged_once_and_its_return_too(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from dicom_node.config import Destination
    from dicom_node.web.echo import DestinationMonitor

    port = free_port()  # nothing listens there yet
    monitor = DestinationMonitor(
        "AINODE", {"pacs": Destination(ae_title="PACS", host=LOCALHOST, port=port)}, 30, time.time
    )
    with caplog.at_level(logging.WARNING):
        monitor.check_all()
        monitor.check_all()  # still down: nothing new
        with Storescp(tmp_path / "scp", aet="PACS", port=port):
            monitor.check_all()
    lines = [r.getMessage() for r in caplog.records if r.name == "dicom_node.web.echo"]
    assert len(lines) == 2, lines
    assert lines[0].startswith("destination pacs is DOWN: ") and "PACS@" in lines[0]
    assert lines[0].endswith("Connection refused")  # the socket's own reason
    assert lines[1] == "destination pacs is now up"
    # pynetdicom's own ERROR lines for each failed connection are not repeated
    assert not [r for r in caplog.records if r.name.startswith("pynetdicom")]


def test_a_dashboard_open_to_the_network_without_auth_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """docs/operations.md 6.1: with web.host beyond loopback and no token, anyone who
    reaches the port sees patient names; the node started without a word."""
    caplog.set_level(logging.WARNING, logger="dicom_node")
    with running_node(node_settings(tmp_path / "open", web={"host": "0.0.0.0"})):
        pass
    assert "web.host 0.0.0.0: the dashboard and the API" in caplog.text
    caplog.clear()
    token = {"host": "0.0.0.0", "token": "a-long-enough-token-1234"}
    with running_node(node_settings(tmp_path / "closed", web=token)):
        pass
    with running_node(node_settings(tmp_path / "local")):
        pass
    assert "the dashboard and the API" not in caplog.text
