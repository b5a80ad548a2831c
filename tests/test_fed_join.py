"""`join` failures before any training: data checks, CA file, unreachable server."""

from __future__ import annotations

import numpy as np
import pytest

from nephrolith.client.federation import JoinError, diagnose, join, supernode_command
from nephrolith.common.errors import ConfigError, DataError
from nephrolith.server.certs import make_certs
from nephrolith.server.processes import free_port


def _png_folder(root):
    import cv2

    for label in ("stone", "normal"):
        (root / label).mkdir(parents=True)
        for index in range(2):
            image = np.full((32, 32), 40 * (index + 1), np.uint8)
            cv2.imwrite(str(root / label / f"{index}.png"), image)
    return root


def test_missing_ca_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="CA certificate not found"):
        join("127.0.0.1:1", tmp_path / "nope.pem", _png_folder(tmp_path / "data"))


def test_broken_file_fails_the_data_check(tmp_path):
    certs = make_certs(tmp_path / "certs")
    data = _png_folder(tmp_path / "data")
    (data / "stone" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DataError, match="1 file\\(s\\) failed the checks"):
        join("127.0.0.1:1", certs.ca_cert, data, workdir=tmp_path / "node")


def test_unreachable_server_is_named(tmp_path):
    certs = make_certs(tmp_path / "certs")
    data = _png_folder(tmp_path / "data")
    address = f"127.0.0.1:{free_port()}"  # nothing listens here
    with pytest.raises(JoinError, match=f"cannot reach the federation server at {address}"):
        join(address, certs.ca_cert, data, workdir=tmp_path / "node", max_wait_s=3)
    assert (tmp_path / "node" / "supernode.log").stat().st_size > 0


def test_node_config_quotes_paths_and_rejects_quotes(tmp_path):
    command = supernode_command("h:1", tmp_path / "ca.pem", tmp_path / "my data", "site a", None, 5)
    node_config = command[command.index("--node-config") + 1]
    assert node_config == f"data-dir='{tmp_path / 'my data'}' site-id='site a'"
    with pytest.raises(ConfigError, match="quotes"):
        supernode_command("h:1", tmp_path, tmp_path / "it's", "a", None, 5)


def test_diagnose_wrong_ca_before_unreachable():
    output = (
        "Handshake failed with error SSL_ERROR_SSL: CERTIFICATE_VERIFY_FAILED: unable to get "
        "local issuer certificate\nfailed to connect to all addresses"
    )
    message = diagnose(output, "10.0.0.1:9092", "ca.pem")
    assert message.startswith("TLS handshake failed: the server's certificate was not issued")
