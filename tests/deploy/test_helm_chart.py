"""The helm/kura chart: Kura's values surface, rendered, linted and schema-checked for real.

Everything goes through the real Helm engine (helm-python-sdk: Helm v4 as a library):
values.schema.json validation, template rendering and ``helm lint``. Every rendered
object is validated against the Kubernetes OpenAPI schemas of a pinned Kubernetes
version (kubernetes-validate, strict: unknown fields fail), and the pods' environment is
fed to the node's own configuration parser.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml

from app.settings import Settings
from tests.deploy.chart import (CHART, NAMESPACE, RELEASE, Doc, container, notes, one, pod_env, render,
                                render_files, schema_keys)

# The chart's floor (Chart.yaml kubeVersion) and a current release: every rendered object
# must be valid for both. kubernetes-validate ships the schemas (offline).
KUBERNETES_VERSIONS = ("1.29.0", "1.35.0")
KURA_VALUES = Path(__file__).with_name("values-kura.yaml")
DEFAULTS = Settings()

# Node settings a pod never needs from the chart: the node's default is right in a pod.
NOT_FROM_THE_CHART = {
    "KURA_BIND_HOST": "all interfaces (the default) is what a pod wants",
    "KURA_TMP_DIR": "staging stays on the data volume (<data>/tmp, the default)",
    "KURA_DISCOVERY_DNS_SERVER": "the cluster's resolver (the default) answers for the headless Service",
}
# Settings Kura's chart takes only through extraEnv/extraEnvFrom: a signing key is a secret, and
# the public TLS listener (KURA_PUBLIC_TLS_*, KURA_HTTPS_PORT) is documented there as `extraEnv`
# (with extraVolumes for the certificate), since an ingress usually terminates TLS.
PASSED_THROUGH_PREFIXES = ("KURA_ANALYTICS_", "KURA_PUBLIC_TLS_", "KURA_HTTPS_PORT")

# Every optional feature on, every config.* setting away from its default.
EVERYTHING: dict[str, Any] = {
    "replicaCount": 4,
    "config": {
        "tenantId": "acme", "region": "eu-west-1", "logLevel": "debug", "httpWorkers": 4, "grpcWorkers": 3,
        "workerConnections": 500, "httpHeaderTimeoutMs": 20_000, "tmpDirMaxBytes": 1 << 30, "casCapacityBytes": 50 << 30,
        "multipartUploadTtlMs": 3_600_000, "segmentMaxBytes": 64 << 20, "lmdbMapSize": 8 << 30,
        "extraSeedPeers": ["https://edge-0.example.net:7443"],
        "memory": {"maxKeyvalueBytes": 2 << 20},
        "shutdown": {"drainCompletionTimeoutMs": 60_000},
        "replication": {"bandwidthLimitBytesPerSecond": 0, "publicLatencyTargetMs": 50,
                        "outboxMaxDepth": 5000, "peerConnectTimeoutMs": 2000,
                        "peerIdleTimeoutMs": 20_000, "peerLossTimeoutMs": 10_000},
        "bootstrap": {"timeoutMs": 600_000, "maxConcurrentPeers": 4},
        "telemetry": {"otlpTracesEndpoint": "http://otel-collector:4318/v1/traces",
                      "deploymentEnvironment": "staging"},
        "discovery": {"enabled": True},
    },
    "extension": {"enabled": True, "script": "function authenticate(ctx) return {anonymous=true} end",
                  "hookTimeoutMs": 50},
    "peerTls": {"enabled": True, "secretName": "kura-peer-tls", "caCertFileName": "ca.crt"},
    "ingress": {"enabled": True, "className": "nginx", "tls": [{"secretName": "t", "hosts": ["kura.local"]}]},
    "grpcIngress": {"enabled": True, "className": "nginx"},
    "service": {"type": "LoadBalancer", "loadBalancerIP": "203.0.113.7", "externalTrafficPolicy": "Local",
                "labels": {"team": "build"}},
    "serviceAccount": {"create": True, "annotations": {"eks.amazonaws.com/role-arn": "arn"}},
    "persistence": {"storageClass": "fast", "accessModes": ["ReadWriteOncePod"], "annotations": {"a": "b"},
                    "retentionPolicy": {"whenDeleted": "Retain", "whenScaled": "Delete"}},
    "updateStrategy": {"rollingUpdatePartition": 2},
    "pdb": {"minAvailable": 2},
    "extraEnv": [{"name": "KURA_CONTROL_PLANE_URL", "value": "https://tuist.example.com"},
                 {"name": "KURA_ANALYTICS_SIGNING_KEY",
                  "valueFrom": {"secretKeyRef": {"name": "analytics", "key": "signing-key"}}}],
    "extraEnvFrom": [{"secretRef": {"name": "kura-extension"}}],
    "extraVolumes": [{"name": "cache-scratch", "emptyDir": {"medium": "Memory"}}],
    "extraVolumeMounts": [{"name": "cache-scratch", "mountPath": "/scratch"}],
    "networkPolicy": {"clientFrom": [{"namespaceSelector": {"matchLabels": {"ci": "true"}}}]},
    "grafanaDashboard": {"enabled": True, "annotations": {"grafana_folder": "Kura"}},
    "imagePullSecrets": [{"name": "regcred"}],
    "priorityClassName": "build-infra",
    "tolerations": [{"key": "role", "operator": "Equal", "value": "cache", "effect": "NoSchedule"}],
    "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
                                   "whenUnsatisfiable": "ScheduleAnyway"}],
}


def kura_values() -> dict[str, Any]:
    return yaml.safe_load(KURA_VALUES.read_text())


def statefulset(values: dict[str, Any] | None = None) -> Doc:
    return one(render(values), "StatefulSet")


def env_names(sts: Doc) -> list[str]:
    return [e["name"] for e in container(sts)["env"]]


def node_settings(env: dict[str, str], tmp_path: Path | None = None) -> Settings:
    """The node's parse of a pod's environment (the extension script written where it points)."""
    env = dict(env)
    if "KURA_EXTENSION_SCRIPT_PATH" in env:
        assert tmp_path is not None
        script = tmp_path / Path(env["KURA_EXTENSION_SCRIPT_PATH"]).name
        script.write_text("")
        env["KURA_EXTENSION_SCRIPT_PATH"] = str(script)
    return Settings.from_env(env)


def node_setting_names() -> set[str]:
    """The KURA_* names Settings.from_env asks the environment for."""
    asked: set[str] = set()

    class Asking(dict):  # type: ignore[type-arg]
        def get(self, key: str, default: Any = None) -> Any:
            asked.add(key)
            return super().get(key, default)

    Settings.from_env(Asking())
    assert len(asked) > 20
    return asked


def schema_error(values: dict[str, Any]) -> str:
    """The message of the values-schema error Helm refuses ``values`` with."""
    with pytest.raises(helm_python.HelmValuesError) as caught:
        render_files(values)
    return str(caught.value)


# --------------------------------------------------------------------------- Helm engine: lint, schema

def test_chart_has_required_files() -> None:
    for name in ("Chart.yaml", "values.yaml", "values.schema.json", "README.md", "templates/_helpers.tpl",
                 "templates/statefulset.yaml", "templates/service-headless.yaml", "templates/service.yaml",
                 "templates/ingress.yaml", "templates/pdb.yaml", "templates/networkpolicy.yaml",
                 "templates/configmap-extension.yaml", "templates/configmap-grafana-dashboard.yaml",
                 "templates/serviceaccount.yaml", "dashboards/kura-cluster.json",
                 "templates/NOTES.txt"):
        assert (CHART / name).is_file(), f"helm/kura/{name} is missing"
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "kura"
    assert chart["kubeVersion"] == f">={KUBERNETES_VERSIONS[0]}-0"


@pytest.mark.parametrize("case", ["defaults", "kura-values", "everything"])
def test_helm_lint_passes(case: str) -> None:
    values = {"defaults": {}, "kura-values": kura_values(), "everything": EVERYTHING}[case]
    for version in KUBERNETES_VERSIONS:
        report = helm_python.lint(str(CHART), values, strict=True, namespace=NAMESPACE,
                                  kube_version=f"v{version}")
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert not report["errors"] and not problems, (report["errors"], problems)


@pytest.mark.parametrize("case", ["defaults", "kura-values", "everything", "minimal"])
def test_every_rendered_object_is_valid_kubernetes(case: str) -> None:
    values = {"defaults": {}, "kura-values": kura_values(), "everything": EVERYTHING,
              "minimal": {"replicaCount": 1, "persistence": {"enabled": False},
                          "networkPolicy": {"enabled": False}, "tmpStorage": {"sizeLimit": ""},
                          "affinity": {"nodeAffinity": {}}, "metricsAnnotations": False}}[case]
    docs = render(values)
    assert any(d["kind"] == "StatefulSet" for d in docs)
    for doc in docs:
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} invalid for Kubernetes {version} at "
                            f"{'.'.join(str(p) for p in exc.path)}: {exc.message}")


@pytest.mark.parametrize("values, key", [
    ({"replicaCont": 2}, "replicaCont"),
    ({"config": {"tenantID": "acme"}}, "tenantID"),
    ({"config": {"replication": {"bandwidthLimitBytesPerSec": 0}}}, "bandwidthLimitBytesPerSec"),
    ({"peerTls": {"enable": True}}, "enable"),
    ({"service": {"httpport": 8080}}, "httpport"),
    ({"extension": {"scriptFilename": "x.lua"}}, "scriptFilename"),
    ({"podLifecycle": {"preStopDelay": 5}}, "preStopDelay"),
])
def test_a_misspelt_key_fails_install_and_lint(values: dict[str, Any], key: str) -> None:
    assert f"additional properties '{key}' not allowed" in schema_error(values)
    report = helm_python.lint(str(CHART), values)
    assert any(key in error for error in report["errors"]), report


@pytest.mark.parametrize("values, message", [
    ({"config": {"tenantId": ""}}, "/config/tenantId"),
    ({"config": {"replication": {"publicLatencyTargetMs": 0}}}, "minimum: got 0, want 1"),
    ({"peerTls": {"internalPort": "7443"}}, "/peerTls/internalPort"),
    ({"config": {"extraSeedPeers": ["node-1:7443"]}}, "/config/extraSeedPeers/0"),
])
def test_a_value_of_the_wrong_shape_fails_install(values: dict[str, Any], message: str) -> None:
    assert message in schema_error(values)


@pytest.mark.parametrize("old, new", [
    ({"kura": {"tenantId": "acme"}}, "config.tenantId"),
    ({"tls": {"enabled": True}}, "peerTls"),
    ({"ports": {"internal": 7443}}, "peerTls.internalPort"),
    ({"env": [{"name": "A", "value": "1"}]}, "extraEnv"),
    ({"envFrom": []}, "extraEnvFrom"),
    ({"podDisruptionBudget": {"maxUnavailable": 1}}, "pdb"),
    ({"drain": {"preStopSleepSeconds": 5}}, "podLifecycle.preStopDelaySeconds"),
    ({"tmpSizeLimit": "1Gi"}, "tmpStorage.sizeLimit"),
    ({"persistence": {"storageClassName": "fast"}}, "persistence.storageClass"),
    ({"extension": {"scriptKey": "kura.lua"}}, "extension.scriptFileName"),
    ({"extension": {"mountPath": "/etc/kura/extension"}}, "extension.mountDir"),
    ({"updateStrategy": {"type": "OnDelete"}}, "rollingUpdatePartition"),
])
def test_the_old_chart_keys_fail_naming_their_new_names(old: dict[str, Any], new: str) -> None:
    error = schema_error(old)
    assert "removed in chart 0.2.0" in error and new in error


def test_nulling_a_value_fails_unless_null_means_the_node_default() -> None:
    """Helm drops a key set to null; a template would then read nothing (an empty tenant
    becomes the node's "default" tenant), so the schema requires such keys."""
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    checked = 0
    for path, sub in schema_keys():
        default: Any = defaults
        for part in path.split("."):
            default = default.get(part) if isinstance(default, dict) else None
        types = sub.get("type", [])
        if default is None or "null" in types or any("null" in alt.get("type", []) for alt in sub.get("anyOf", [])):
            continue
        *parents, leaf = path.split(".")
        values: dict[str, Any] = {}
        node = values
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = None
        assert f"missing property '{leaf}'" in schema_error(values), path
        checked += 1
    assert checked > 40


def test_kura_built_in_authorization_is_refused_rather_than_serving_everyone() -> None:
    for auth in ({"enabled": True}, {"tuistUrl": "https://tuist.dev"}):
        error = schema_error({"auth": auth})
        assert "extension" in error and "tuist.lua" in error
    render({"auth": {"enabled": False, "tuistUrl": ""}})  # Kura's default block is fine


def test_kura_keys_without_effect_are_accepted_and_named_after_install() -> None:
    inert = [(path, sub) for path, sub in schema_keys() if sub.get("description", "").startswith("Kura only")]
    assert len(inert) >= 15
    default_env = container(statefulset())["env"]
    sample = {"integer": 0, "boolean": False, "string": "x"}  # set, though falsy
    for path, sub in inert:
        types = sub["type"] if isinstance(sub["type"], list) else [sub["type"]]
        values: dict[str, Any] = {}
        node = values
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = sample[types[0]]
        assert container(statefulset(values))["env"] == default_env, path
        assert re.search(rf"no effect on kura-py.*\b{re.escape(path)}\b", notes(values)), path
    assert "no effect" not in notes()


# --------------------------------------------------------------------------- values: documentation and defaults

def test_every_values_key_is_documented_in_the_readme() -> None:
    readme = (CHART / "README.md").read_text()
    documented = set(re.findall(r"`([A-Za-z][\w.]*)`", readme))
    paths = [path for path, _ in schema_keys()]
    leaves = [path for path in paths if not any(other.startswith(path + ".") for other in paths)]
    missing = [path for path in leaves if path not in documented]
    assert not missing, "values keys missing from helm/kura/README.md:\n" + "\n".join(missing)


def test_templates_reference_only_keys_the_schema_accepts() -> None:
    keys = {path for path, _ in schema_keys()}
    missing = []
    for template in sorted((CHART / "templates").iterdir()):
        text = template.read_text()
        refs = set(re.findall(r"\.Values((?:\.[A-Za-z_]\w*)+)", text))
        for alias, base in re.findall(r"\$(\w+)\s*:=\s*\.Values((?:\.[A-Za-z_]\w*)+)", text):
            refs |= {base + sub for sub in re.findall(rf"\${alias}((?:\.[A-Za-z_]\w*)+)", text)}
        missing += [f"{template.name}: .Values{ref}" for ref in refs if ref.lstrip(".") not in keys]
    assert not missing, "templates read values the schema does not define:\n" + "\n".join(sorted(missing))


def test_values_defaults_are_the_node_defaults() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    config = values["config"]
    assert values["service"]["httpPort"] == DEFAULTS.port
    assert values["service"]["grpcPort"] == DEFAULTS.grpc_port
    assert values["peerTls"]["internalPort"] == DEFAULTS.internal_port
    assert config["tenantId"] == DEFAULTS.tenant_id and config["region"] == DEFAULTS.region
    assert config["tmpDirMaxBytes"] == DEFAULTS.tmp_dir_max_bytes
    assert config["memory"]["maxKeyvalueBytes"] == DEFAULTS.max_keyvalue_bytes
    assert config["shutdown"]["drainCompletionTimeoutMs"] == DEFAULTS.drain_completion_timeout_ms
    assert (config["replication"]["bandwidthLimitBytesPerSecond"]
            == DEFAULTS.replication_bandwidth_limit_bytes_per_second)
    assert config["replication"]["publicLatencyTargetMs"] == DEFAULTS.replication_public_latency_target_ms
    # Rendered with its defaults, every pod's environment is a valid node configuration.
    env = pod_env(statefulset(), 0)
    settings = Settings.from_env(env)
    assert settings.tenant_id == DEFAULTS.tenant_id and settings.http_workers == config["httpWorkers"]
    assert settings.grpc_workers == config["grpcWorkers"]


def test_every_node_setting_has_a_chart_value(tmp_path: Path) -> None:
    sts = statefulset(EVERYTHING)
    extra = {e["name"] for e in EVERYTHING["extraEnv"]}
    rendered = {name for name in env_names(sts) if name.startswith("KURA_")} - extra
    wanted = {name for name in node_setting_names() - set(NOT_FROM_THE_CHART)
              if not name.startswith(PASSED_THROUGH_PREFIXES)}
    assert not wanted - rendered, f"node settings the chart cannot set: {sorted(wanted - rendered)}"
    unknown = rendered - node_setting_names()
    assert not unknown, f"the chart sets variables the node does not read: {sorted(unknown)}"
    # Each value arrives as the node parses it.
    settings = node_settings(pod_env(sts, 1), tmp_path)
    config = EVERYTHING["config"]
    assert (settings.tenant_id, settings.region, settings.log_level) == ("acme", "eu-west-1", "debug")
    assert (settings.http_workers, settings.worker_connections) == (4, 500)
    assert settings.http_header_timeout_ms == 20_000
    assert (settings.tmp_dir_max_bytes, settings.cas_capacity_bytes) == (1 << 30, 50 << 30)
    assert (settings.segment_max_bytes, settings.lmdb_map_size) == (64 << 20, 8 << 30)
    assert settings.multipart_upload_ttl_ms == 3_600_000
    assert settings.max_keyvalue_bytes == 2 << 20 and settings.drain_completion_timeout_ms == 60_000
    assert settings.replication_bandwidth_limit_bytes_per_second == 0  # 0 (off) is not "unset"
    assert (settings.replication_public_latency_target_ms, settings.outbox_max_depth) == (50, 5000)
    assert (settings.peer_connect_timeout_ms, settings.peer_idle_timeout_ms,
            settings.peer_loss_timeout_ms) == (2000, 20_000, 10_000)
    assert (settings.bootstrap_timeout_ms, settings.bootstrap_max_concurrent_peers) == (600_000, 4)
    assert settings.extension_hook_timeout_ms == 50 and settings.extensions_active
    assert settings.internal_tls
    assert config["extraSeedPeers"][0] in settings.peers
    assert settings.otlp_traces_endpoint == "http://otel-collector:4318/v1/traces"
    assert (settings.otel_service_name, settings.otel_deployment_environment) == (f"{RELEASE}-1", "staging")
    assert Settings.from_env(pod_env(statefulset(), 0)).otlp_traces_endpoint == ""  # off by default


# --------------------------------------------------------------------------- a Kura values file, unchanged

def test_a_kura_values_file_installs_with_its_tenant_region_and_peer_mtls(tmp_path: Path) -> None:
    values = kura_values()
    docs = render(values)
    sts = one(docs, "StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    node = container(sts)
    replicas = values["replicaCount"]
    domain = f"{RELEASE}-headless.{NAMESPACE}.svc.cluster.local"
    port = values["peerTls"]["internalPort"]
    for ordinal in range(replicas):
        env = pod_env(sts, ordinal)
        settings = node_settings(env, tmp_path)
        assert settings.tenant_id == "tuist" and settings.region == "eu-central"
        # Peer mTLS: https node URL, https seeds for every ordinal, files from the Secret.
        assert settings.internal_tls
        assert settings.resolved_node_url == f"https://{RELEASE}-{ordinal}.{domain}:{port}"
        assert settings.peers == tuple(f"https://{RELEASE}-{i}.{domain}:{port}" for i in range(replicas))
        assert settings.discovery_dns_name == domain
        assert (settings.internal_tls_ca_cert_path, settings.internal_tls_cert_path,
                settings.internal_tls_key_path) == ("/etc/kura/peer-tls/ca.pem", "/etc/kura/peer-tls/tls.crt",
                                                    "/etc/kura/peer-tls/tls.key")
        assert settings.cas_capacity_bytes == 107374182400 and settings.tmp_dir_max_bytes == 8589934592
    mount = next(m for m in node["volumeMounts"] if m["name"] == "peer-tls")
    assert mount == {"name": "peer-tls", "mountPath": "/etc/kura/peer-tls", "readOnly": True}  # no subPath
    volume = next(v for v in pod["volumes"] if v["name"] == "peer-tls")
    assert volume["secret"]["secretName"] == "kura-peer-tls" and "items" not in volume["secret"]
    ports = {p["name"]: p["containerPort"] for p in node["ports"]}
    assert ports == {"http": 4000, "grpc": 50051, "peer": 7443}
    # The rest of Kura's surface.
    assert node["image"] == "ghcr.io/example/kura-py:0.1.0"
    claim = sts["spec"]["volumeClaimTemplates"][0]["spec"]
    assert claim["storageClassName"] == "hcloud-volumes" and claim["accessModes"] == ["ReadWriteOncePod"]
    assert claim["resources"]["requests"]["storage"] == "200Gi"
    assert sts["spec"]["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"partition": 2}}
    assert pod["terminationGracePeriodSeconds"] == 240 + 20 + 15
    assert node["lifecycle"]["preStop"]["exec"]["command"][-1] == "kill -USR1 1; sleep 20"
    assert pod["nodeSelector"] == {"tuist.dev/role": "kura"} and pod["tolerations"][0]["value"] == "kura"
    assert one(docs, "PodDisruptionBudget")["spec"]["minAvailable"] == 2
    service = one(docs, "Service", lambda d: d["spec"].get("clusterIP") != "None")
    assert service["spec"]["type"] == "LoadBalancer" and service["spec"]["loadBalancerIP"] == "203.0.113.10"
    assert service["spec"]["externalTrafficPolicy"] == "Local"
    ingresses = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Ingress"}
    assert set(ingresses) == {RELEASE, f"{RELEASE}-grpc"}
    http_backend = ingresses[RELEASE]["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    grpc_backend = ingresses[f"{RELEASE}-grpc"]["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert http_backend == {"name": RELEASE, "port": {"name": "http"}}
    assert grpc_backend == {"name": RELEASE, "port": {"name": "grpc"}}
    assert ingresses[f"{RELEASE}-grpc"]["metadata"]["annotations"] == {
        "nginx.ingress.kubernetes.io/backend-protocol": "GRPC"}
    assert ingresses[RELEASE]["spec"]["tls"] == values["ingress"]["tls"]
    # Extension: Kura's mountDir/scriptFileName, the inline script in the ConfigMap.
    env = pod_env(sts, 0)
    assert env["KURA_EXTENSION_SCRIPT_PATH"] == "/etc/kura/extensions/hooks.lua"
    config_map = one(docs, "ConfigMap")
    assert config_map["data"]["hooks.lua"].strip() == values["extension"]["script"].strip()
    # extra*, telemetry, pod annotations (Kura's prometheus.io/* win over the chart's).
    assert env["KURA_CONTROL_PLANE_URL"] == "https://tuist.example.com"
    assert node["envFrom"] == values["extraEnvFrom"]
    assert {"name": "geoip", "mountPath": "/var/lib/geoip"} in node["volumeMounts"]
    assert {"name": "geoip", "emptyDir": {}} in pod["volumes"]
    assert env["KURA_OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] == values["config"]["telemetry"]["otlpTracesEndpoint"]
    assert sts["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port-name"] == "http"
    assert one(docs, "ServiceAccount")["metadata"]["name"] == RELEASE
    # Kura tuning the node has no use for is named, not silently dropped; null is "unset".
    inert = re.search(r"no effect on kura-py.*: (.*)", notes(values)).group(1).split(", ")
    assert "config.fileDescriptors.acquireTimeoutMs" in inert and "config.metadataStore.maxOpenFiles" in inert
    assert "config.fileDescriptors.poolSize" not in inert and "config.memory.softLimitBytes" not in inert


# --------------------------------------------------------------------------- rendered objects

def test_default_render() -> None:
    docs = render()
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in docs)
    assert kinds == [("NetworkPolicy", RELEASE), ("PodDisruptionBudget", RELEASE), ("Service", RELEASE),
                     ("Service", f"{RELEASE}-headless"), ("StatefulSet", RELEASE)]
    sts = one(docs, "StatefulSet")
    spec = sts["spec"]
    assert spec["serviceName"] == f"{RELEASE}-headless" and spec["podManagementPolicy"] == "Parallel"
    assert spec["updateStrategy"] == {"type": "RollingUpdate"}
    assert spec["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["fsGroup"] == 10001
    node = container(sts)
    assert env_names(sts)[:2] == ["POD_NAME", "POD_NAMESPACE"]
    env = {e["name"]: e.get("value") for e in node["env"]}
    assert env["KURA_NODE_URL"] == f"http://$(POD_NAME).{RELEASE}-headless.$(POD_NAMESPACE).svc.cluster.local:7443"
    assert env["KURA_DISCOVERY_DNS_NAME"] == f"{RELEASE}-headless.$(POD_NAMESPACE).svc.cluster.local"
    assert env["KURA_DATA_DIR"] == "/data"
    assert {"name": "data", "mountPath": "/data"} in node["volumeMounts"]
    assert node["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert node["livenessProbe"]["httpGet"]["path"] == "/up"
    assert node["startupProbe"]["httpGet"]["path"] == "/up"
    assert node["lifecycle"]["preStop"]["exec"]["command"] == ["/bin/sh", "-c", "kill -USR1 1; sleep 20"]
    assert pod["terminationGracePeriodSeconds"] == 240 + 20 + 15
    assert spec["template"]["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true", "prometheus.io/port": "4000", "prometheus.io/path": "/metrics"}
    headless = one(docs, "Service", lambda d: d["spec"].get("clusterIP") == "None")
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert one(docs, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    service = one(docs, "Service", lambda d: d["spec"].get("clusterIP") != "None")
    assert {p["name"] for p in service["spec"]["ports"]} == {"http", "grpc"}  # never the peer port
    assert not {"loadBalancerIP", "externalTrafficPolicy"} & set(service["spec"])


@pytest.mark.parametrize("drain_ms, delay, extra", [(240_000, 20, 15), (1, 0, 0), (90_500, 5, 30)])
def test_the_grace_period_covers_the_drain(drain_ms: int, delay: int, extra: int) -> None:
    pod = statefulset({"config": {"shutdown": {"drainCompletionTimeoutMs": drain_ms}},
                       "podLifecycle": {"preStopDelaySeconds": delay,
                                        "terminationGraceExtraSeconds": extra}})["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == math.ceil(drain_ms / 1000) + delay + extra


def test_peers_are_seeded_for_every_ordinal_and_extra_seeds_follow() -> None:
    sts = statefulset({"replicaCount": 5, "config": {"extraSeedPeers": ["http://edge-0.example.net:7443"]}})
    settings = Settings.from_env(pod_env(sts, 3))
    domain = f"{RELEASE}-headless.{NAMESPACE}.svc.cluster.local"
    assert settings.peers == tuple(f"http://{RELEASE}-{i}.{domain}:7443" for i in range(5)) + (
        "http://edge-0.example.net:7443",)
    assert settings.resolved_node_url in settings.peers  # the node skips its own URL
    # With peer mTLS a plain-HTTP seed would stop every node at start: the render fails instead.
    with pytest.raises(helm_python.HelmRenderError, match="extraSeedPeers.*https://"):
        render({"peerTls": {"enabled": True}, "config": {"extraSeedPeers": ["http://edge-0.example.net:7443"]}})


def test_peer_tls_secret_defaults_to_kuras_name_and_extension_needs_a_script() -> None:
    sts = statefulset({"peerTls": {"enabled": True}})
    volume = next(v for v in sts["spec"]["template"]["spec"]["volumes"] if v["name"] == "peer-tls")
    assert volume["secret"]["secretName"] == f"{RELEASE}-peer-tls"
    with pytest.raises(helm_python.HelmRenderError, match="extension.script or extension.existingConfigMap"):
        render({"extension": {"enabled": True}})
    docs = render({"extension": {"enabled": True, "existingConfigMap": "hooks"}})
    assert not [d for d in docs if d["kind"] == "ConfigMap"]
    volume = next(v for v in one(docs, "StatefulSet")["spec"]["template"]["spec"]["volumes"]
                  if v["name"] == "extension")
    assert volume["configMap"] == {"name": "hooks"}


def test_extra_env_follows_the_charts_own_and_wins() -> None:
    sts = statefulset({"extraEnv": [{"name": "KURA_LOG_LEVEL", "value": "debug"}]})
    names = env_names(sts)
    assert names.count("KURA_LOG_LEVEL") == 2 and names[-1] == "KURA_LOG_LEVEL"
    assert Settings.from_env(pod_env(sts, 0)).log_level == "debug"  # the kubelet keeps the last


def test_pdb_and_update_strategy() -> None:
    assert not [d for d in render({"replicaCount": 1}) if d["kind"] == "PodDisruptionBudget"]
    assert not [d for d in render({"pdb": {"enabled": False}}) if d["kind"] == "PodDisruptionBudget"]
    pdb = one(render({"pdb": {"minAvailable": "50%"}}), "PodDisruptionBudget")["spec"]
    assert pdb["minAvailable"] == "50%" and "maxUnavailable" not in pdb
    assert statefulset({"updateStrategy": {"rollingUpdatePartition": 0}})["spec"]["updateStrategy"] == {
        "type": "RollingUpdate", "rollingUpdate": {"partition": 0}}


def test_pod_annotations_win_over_the_metrics_annotations() -> None:
    meta = statefulset({"podAnnotations": {"prometheus.io/scrape": "false", "team": "build"}})
    annotations = meta["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "false" and annotations["team"] == "build"
    assert "annotations" not in statefulset({"metricsAnnotations": False})["spec"]["template"]["metadata"]


def test_grafana_dashboard_configmap_holds_the_repositorys_dashboard() -> None:
    def dashboards(docs: list[Doc]) -> list[Doc]:
        return [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-grafana-dashboard")]

    assert dashboards(render()) == []  # off by default
    [configmap] = dashboards(render({"grafanaDashboard": {"enabled": True, "namespace": "monitoring",
                                                          "annotations": {"grafana_folder": "Kura"}}}))
    meta = configmap["metadata"]
    assert meta["labels"]["grafana_dashboard"] == "1" and meta["labels"]["app.kubernetes.io/name"] == "kura"
    assert meta["namespace"] == "monitoring" and meta["annotations"] == {"grafana_folder": "Kura"}
    assert configmap["data"]["kura-cluster.json"] == (CHART / "dashboards" / "kura-cluster.json").read_text().rstrip("\n")
    assert json.loads(configmap["data"]["kura-cluster.json"])["uid"] == "kura-cluster"
    [configmap] = dashboards(render({"grafanaDashboard": {"enabled": True, "labels": {"dashboards": "kura"}}}))
    assert configmap["metadata"]["namespace"] == NAMESPACE and configmap["metadata"]["labels"]["dashboards"] == "kura"
