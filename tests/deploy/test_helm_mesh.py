"""The Helm chart's default values describe a mesh that becomes Ready.

The chart is rendered with the real Helm engine (helm-python-sdk, no binary), and the
StatefulSet's pods are then run for real: three nodes with exactly the environment the
chart gives each pod (``$(POD_NAME)``/``$(POD_NAMESPACE)`` expanded as the kubelet does).
The only local stand-ins are what a cluster provides: each pod's own loopback address,
a data directory, its memory volume for the run directory, and a DNS server answering for the headless Service and the pods'
names (``KURA_DISCOVERY_DNS_SERVER``) the way cluster DNS does.
"""
from __future__ import annotations

from app.run_dir import default_run_dir
from app.settings import Settings
from tests.deploy.chart import NAMESPACE, container, one, pod_env, render
from tests.mesh import MeshNode, start, wait_until
from tests.nodes import make_node


def test_default_values_describe_a_mesh_that_becomes_ready(tmp_path, dns_server) -> None:
    docs = render()
    statefulset = one(docs, "StatefulSet")
    headless = one(docs, "Service", lambda d: d["spec"].get("clusterIP") == "None")
    node_container = container(statefulset)
    # Peers must find each other before they are ready, and the probes gate on /ready.
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert statefulset["spec"]["serviceName"] == headless["metadata"]["name"]
    assert headless["spec"]["selector"].items() <= statefulset["spec"]["template"]["metadata"]["labels"].items()
    internal = next(p for p in node_container["ports"] if p["name"] == "peer")["containerPort"]
    assert any(p["port"] == internal for p in headless["spec"]["ports"])
    assert node_container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert node_container["livenessProbe"]["httpGet"]["path"] == "/up"
    replicas = statefulset["spec"]["replicas"]
    assert replicas == 3

    envs = [pod_env(statefulset, i) for i in range(replicas)]
    domain = f"{headless['metadata']['name']}.{NAMESPACE}.svc.cluster.local"
    for i, env in enumerate(envs):
        settings = Settings.from_env(env)  # the chart's environment is a valid configuration
        assert settings.discovery_dns_name == domain
        assert settings.resolved_node_url == f"http://{statefulset['metadata']['name']}-{i}.{domain}:{internal}"
        # Every ordinal is seeded, this pod's own URL included (the node skips it).
        assert settings.peers == tuple(f"http://{statefulset['metadata']['name']}-{j}.{domain}:{internal}"
                                       for j in range(replicas))
        assert settings.tenant_id == envs[0]["KURA_TENANT_ID"]

    # Run the pods: loopback addresses stand in for pod IPs, a DNS server for cluster DNS.
    addresses = [f"127.0.0.{50 + i}" for i in range(replicas)]
    records = {domain: addresses}
    for i, address in enumerate(addresses):
        records[f"{statefulset['metadata']['name']}-{i}.{domain}"] = [address]
    dns = dns_server(records)
    members = []
    for i, env in enumerate(envs):
        node = make_node(tmp_path, f"pod{i}")
        local = {k: v for k, v in node.env.items() if not k.startswith("KURA_")}
        assert env["KURA_RUN_DIR"] == "/run/kura"  # the chart's memory emptyDir
        node.env = {**local, **env, "KURA_DATA_DIR": str(node.data_dir), "KURA_BIND_HOST": addresses[i],
                    "KURA_RUN_DIR": default_run_dir(str(node.data_dir)),
                    "KURA_DISCOVERY_DNS_SERVER": f"127.0.0.1:{dns.port}",
                    "KURA_DRAIN_COMPLETION_TIMEOUT_MS": "5000"}
        members.append(MeshNode(f"pod{i}", node))
    try:
        start(members, timeout=90)
        for member in members:
            doc = member.ready()
            assert doc["ready"] and len(doc["known_peers"]) == replicas - 1
            assert doc["bootstrapped_peers"] == doc["known_peers"]
        tenant = envs[0]["KURA_TENANT_ID"]
        r = members[0].session.put(members[0].url + f"/api/cache/gradle/k?tenant_id={tenant}", data=b"v")
        assert r.status_code == 201
        wait_until(lambda: all(m.get(f"/api/cache/gradle/k?tenant_id={tenant}").content == b"v"
                               for m in members), 15, "the write on every pod")
    finally:
        for member in members:
            member.node.stop()


def test_network_policy_admits_the_internal_port_only_from_the_mesh() -> None:
    docs = render()
    statefulset = one(docs, "StatefulSet")
    policy = one(docs, "NetworkPolicy")
    pod_labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    rules = {tuple(p["port"] for p in rule["ports"]): rule.get("from") for rule in policy["spec"]["ingress"]}
    internal_from = rules[("peer",)]
    assert len(internal_from) == 1 and internal_from[0]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert rules[("http", "grpc")] is None  # clients from anywhere by default
    names = {p["name"] for p in statefulset["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert {"peer", "http", "grpc"} <= names
    assert not [d for d in render({"networkPolicy": {"enabled": False}}) if d["kind"] == "NetworkPolicy"]


def test_tls_values_give_an_https_mesh_with_the_secret_mounted() -> None:
    docs = render({"peerTls": {"enabled": True, "secretName": "kura-peer-tls"}})
    statefulset = one(docs, "StatefulSet")
    pod = statefulset["spec"]["template"]["spec"]
    env = pod_env(statefulset, 0)
    settings = Settings.from_env({k: v for k, v in env.items()})
    assert settings.internal_tls and settings.resolved_node_url.startswith("https://")
    mount = next(m for m in container(statefulset)["volumeMounts"] if m["name"] == "peer-tls")
    assert env["KURA_INTERNAL_TLS_CERT_PATH"].startswith(mount["mountPath"] + "/")
    volume = next(v for v in pod["volumes"] if v["name"] == "peer-tls")
    assert volume["secret"]["secretName"] == "kura-peer-tls"
    assert "subPath" not in mount  # a subPath mount would never see cert-manager's rotations
