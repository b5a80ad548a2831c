"""The inference API as a real waitress server process on 127.0.0.1, checked over HTTP."""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request

import pytest
from api_support import (
    PATIENT_ID,
    REPO_ROOT,
    make_checkpoint,
    multipart,
    phantom_slice,
    server_command,
    start_server,
    stop_server,
    write_dicom,
)

NORMAL_JPG = ("images", "Normal", "Normal- (1).jpg")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    process, port = start_server(
        server_command(checkpoint), log_path, env={"NEPHROLITH_MAX_UPLOAD_MB": "2"}
    )
    yield {"process": process, "url": f"http://127.0.0.1:{port}", "log": log_path}
    stop_server(process)


def http(method, url, body=None, content_type=None, timeout=60):
    request = urllib.request.Request(url, data=body, method=method)
    if content_type:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def test_server_healthz(server):
    status, headers, body = http("GET", server["url"] + "/healthz")

    assert status == 200
    assert json.loads(body)["status"] == "ok"
    assert headers["Server"] == "nephrolith"


def test_server_predict_real_slice(server, islam_subset):
    body, content_type = multipart(
        "file", "scan.jpg", islam_subset.joinpath(*NORMAL_JPG).read_bytes()
    )

    status, _, raw = http("POST", server["url"] + "/v1/predict?heatmap=1", body, content_type)

    assert status == 200, raw
    answer = json.loads(raw)
    assert 0.0 <= answer["probability"] <= 1.0
    assert answer["heatmap_png"]


def test_server_upload_limit_from_env(server):
    body, content_type = multipart("file", "big.png", b"\x89PNG\r\n\x1a\n" + bytes(3 * 2**20))

    status, headers, raw = http("POST", server["url"] + "/v1/predict", body, content_type)

    assert status == 413
    assert headers["Content-Type"] == "application/json"
    assert "2 MiB" in json.loads(raw)["error"]


def test_server_bad_then_good(server, tmp_path, islam_subset):
    dicom = write_dicom(tmp_path / "x.dcm", phantom_slice(32), modality="MR").read_bytes()
    bad, bad_type = multipart("file", f"{PATIENT_ID}.dcm", dicom)
    good, good_type = multipart("file", "ok.jpg", islam_subset.joinpath(*NORMAL_JPG).read_bytes())

    assert http("POST", server["url"] + "/v1/predict", bad, bad_type)[0] == 422
    assert http("POST", server["url"] + "/v1/predict", good, good_type)[0] == 200


@pytest.mark.slow
def test_server_fuzzed_from_openapi_has_no_server_error(server, tmp_path):
    # Schemathesis generates requests from /openapi.json (bounded: 100 examples per
    # operation, one worker) and checks statuses, content types and response schemas.
    command = [
        str(REPO_ROOT / ".venv" / "bin" / "schemathesis"),
        "run",
        server["url"] + "/openapi.json",
        "--max-examples",
        "100",
        "--workers",
        "1",
        "--seed",
        "7",
        "--checks",
        "not_a_server_error,status_code_conformance,content_type_conformance,"
        "response_schema_conformance",
        "--generation-database",
        "none",
        "--request-timeout",
        "60",
        "--no-color",
        "--report",
        "junit",
        "--report-dir",
        str(tmp_path),
    ]

    # Run in tmp_path: schemathesis keeps a .schemathesis cache folder in its working directory.
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path
    )

    assert result.returncode == 0, result.stdout[-4000:]
    assert "passed" in result.stdout
    assert "-> 500" not in server["log"].read_text()


def test_server_stops_and_logs(server):
    exit_code = stop_server(server["process"])

    log = server["log"].read_text()
    assert exit_code == 0
    assert "serving model sha256:" in log
    assert "stopped" in log
    assert "POST /v1/predict -> 200" in log
    assert "POST /v1/predict -> 422" in log
    assert "GET /healthz -> 200" in log
    assert PATIENT_ID not in log
    assert "scan.jpg" not in log


def test_module_entry_point_help():
    result = subprocess.run(
        [str(REPO_ROOT / ".venv" / "bin" / "python"), "-m", "nephrolith.client.serve", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0
    assert "NEPHROLITH_CHECKPOINT" in result.stdout


def test_missing_checkpoint_exits_1(tmp_path):
    result = subprocess.run(
        server_command(tmp_path / "nothing-here", console_script=False),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1
    assert "nothing-here" in result.stderr
