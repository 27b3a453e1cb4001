"""Mutual TLS on the internal plane, between real nodes, with a generated PKI."""
from __future__ import annotations

import hashlib
import socket
import ssl
from pathlib import Path

import pytest
import requests

from tests.certs import Issued, PeerCa
from tests.mesh import MeshNode, gradle_path, wait_until
from tests.nodes import make_node


def tls_env(ca: PeerCa, issued: Issued) -> dict[str, str]:
    return {"KURA_INTERNAL_TLS_CA_CERT_PATH": str(ca.path), "KURA_INTERNAL_TLS_CERT_PATH": str(issued.cert),
            "KURA_INTERNAL_TLS_KEY_PATH": str(issued.key)}


def https_mesh(tmp_path: Path, ca: PeerCa, names: list[str], **env: str) -> list[MeshNode]:
    members = []
    for name in names:
        node = make_node(tmp_path, name, KURA_HTTP_WORKERS="1", **env)
        issued = ca.issue(name, into=tmp_path / "pki" / name)
        node.env.update(tls_env(ca, issued))
        node.env["KURA_NODE_URL"] = f"https://127.0.0.1:{node.env['KURA_INTERNAL_PORT']}"
        members.append(MeshNode(name, node))
    for member in members:
        member.node.env["KURA_PEERS"] = ",".join(m.advertised for m in members if m is not member)
    return members


def served_identity(port: int, ca: PeerCa, client: Issued) -> str:
    """The identity (sha256 of the leaf, first 8 bytes) of the certificate a node presents."""
    context = ssl.create_default_context(cafile=str(ca.path))
    context.load_cert_chain(str(client.cert), str(client.key))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return hashlib.sha256(tls.getpeercert(binary_form=True)).digest()[:8].hex()


def test_two_nodes_replicate_and_bootstrap_over_mutual_tls(tmp_path) -> None:
    ca = PeerCa(tmp_path / "pki")
    a, b = https_mesh(tmp_path, ca, ["a", "b"])
    a.node.start(wait=False)
    a.node.wait_ready(60, path="/up")  # not ready: its peer is not up yet
    assert a.put(gradle_path("before-b"), b"seeded").status_code == 201  # b bootstraps it
    b.node.start(wait=False)
    for member in (a, b):
        member.node.wait_ready(60)
    assert a.put(gradle_path("after-b"), b"replicated").status_code == 201  # replicated to b
    wait_until(lambda: b.get(gradle_path("after-b")).content == b"replicated", 15, "replication")
    assert b.get(gradle_path("before-b")).content == b"seeded"
    progress = b.ready()["bootstrap_progress"]
    assert progress[0]["peer"] == a.advertised and progress[0]["artifacts_applied"] == 1
    assert a.advertised.startswith("https://") and b.ready()["known_peers"] == [a.advertised]
    # The peer identities appear in the logs.
    identity_a = served_identity(int(a.node.env["KURA_INTERNAL_PORT"]), ca, ca.issue("probe"))
    assert f"identity={identity_a}" in a.node.log()
    assert "event=peer_tls_connection identity=" in b.node.log()

    # Refused: no client certificate, one from another CA, an expired one.
    status = a.advertised + "/_internal/status"
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(status, verify=str(ca.path), timeout=5)
    other = PeerCa(tmp_path / "other-pki", "someone-else")
    foreign = other.issue("intruder")
    with pytest.raises(requests.exceptions.RequestException):
        requests.get(status, verify=str(ca.path), cert=(str(foreign.cert), str(foreign.key)), timeout=5)
    expired = ca.issue("old-node", expired=True)
    with pytest.raises(requests.exceptions.RequestException):
        requests.get(status, verify=str(ca.path), cert=(str(expired.cert), str(expired.key)), timeout=5)
    good = ca.issue("operator")
    assert requests.get(status, verify=str(ca.path), cert=(str(good.cert), str(good.key)),
                        timeout=5).json()["node_url"] == a.advertised
    assert "event=peer_tls_refused" in a.node.log()

    # Rotation on disk (as cert-manager does) takes effect without a restart.
    before = identity_a
    ca.issue("a", into=tmp_path / "pki" / "a")
    wait_until(lambda: served_identity(int(a.node.env["KURA_INTERNAL_PORT"]), ca, good) != before,
               15, "the rotated certificate served")
    assert b.put(gradle_path("after-rotation"), b"still meshed").status_code == 201
    wait_until(lambda: a.get(gradle_path("after-rotation")).content == b"still meshed", 15,
               "replication after the rotation")
    assert "event=peer_tls_reloaded" in a.node.log()


@pytest.mark.parametrize("change, message", [
    ({"KURA_INTERNAL_TLS_KEY_PATH": ""}, "must be set together"),
    ({"KURA_NODE_URL": "http://127.0.0.1:1"}, "KURA_NODE_URL must be an https:// URL"),
    ({"KURA_PEERS": "http://127.0.0.1:2"}, "KURA_PEERS entries must be https:// URLs"),
    ({"KURA_INTERNAL_TLS_CERT_PATH": "/nonexistent.crt"}, "do not make a usable TLS identity"),
])
def test_bad_tls_configuration_fails_at_start(tmp_path, change, message) -> None:
    ca = PeerCa(tmp_path / "pki")
    node = make_node(tmp_path, "n")
    node.env.update(tls_env(ca, ca.issue("n")))
    node.env["KURA_NODE_URL"] = "https://127.0.0.1:1"
    node.env.update(change)
    node.start(wait=False)
    assert node.process.wait(30) == 1
    assert message in node.log()


def _listening_address(port: int) -> str:
    """The local address a TCP socket listens on for ``port`` (from /proc/net/tcp)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        address, state = fields[1], fields[3]
        host_hex, port_hex = address.split(":")
        if state == "0A" and int(port_hex, 16) == port:
            return socket.inet_ntoa(bytes.fromhex(host_hex)[::-1])
    raise AssertionError(f"nothing listens on {port}")


def test_internal_port_exposure(tmp_path) -> None:
    alone = make_node(tmp_path, "alone", KURA_BIND_HOST="0.0.0.0")
    meshed = make_node(tmp_path, "meshed", KURA_BIND_HOST="0.0.0.0",
                       KURA_PEERS="http://127.0.0.1:9")
    try:
        for node in (alone, meshed):
            node.start(wait=False)
            node.wait_ready(60, path="/up")
            wait_until(lambda: "internal_api_listening" in node.log(), 30, "the internal listener")
        assert _listening_address(int(alone.env["KURA_INTERNAL_PORT"])) == "127.0.0.1"
        assert _listening_address(int(alone.env["KURA_PORT"])) == "0.0.0.0"
        assert _listening_address(int(meshed.env["KURA_INTERNAL_PORT"])) == "0.0.0.0"
        assert "event=internal_port_unauthenticated" in meshed.log()
        assert "event=internal_port_unauthenticated" not in alone.log()
    finally:
        alone.stop()
        meshed.stop()
