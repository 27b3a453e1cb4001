"""The local stack (docker-compose.yml and the files it mounts), checked without Docker.

The compose file is validated against the Compose Specification's own JSON schema, the
copy check-jsonschema ships (``--builtin-schema vendor.compose-spec``, taken from
compose-spec/compose-spec, Apache-2.0). What a schema cannot see is checked here: the
nodes form a mesh and use the host ports of ``python -m app.devmesh`` (app/devmesh.py
LAYOUT), every ``KURA_*`` variable set is one the node reads (app/settings.py), and
Prometheus and Grafana are pointed at what the compose file really runs and mounts.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.devmesh import LAYOUT, NODE_DEFAULTS, node_env
from app.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
PROMETHEUS_CONFIG = ROOT / "ops" / "prometheus" / "prometheus.yml"
ALERT_RULES = ROOT / "ops" / "prometheus" / "alerts.yml"  # from the metrics work (issue 12)
GRAFANA = ROOT / "ops" / "grafana"
DASHBOARDS = GRAFANA / "dashboards"
HOME_DASHBOARD = "kura-cluster.json"  # Kura's name, kept by the metrics work
NODE_NAMES = [spec.name for spec in LAYOUT]


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def service(name: str) -> dict[str, Any]:
    return compose()["services"][name]


def interpolate(value: str) -> str:
    """Compose's ``${NAME:-default}`` with every variable unset (the file's defaults)."""
    resolved = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)
    assert "$" not in resolved, f"unexpected interpolation in {value!r}"
    return resolved


def published(svc: dict[str, Any]) -> dict[int, tuple[str, int]]:
    """Container port → (host address, host port) of a service's short-syntax ports."""
    out = {}
    for entry in svc.get("ports", []):
        host_ip, host_port, container_port = interpolate(entry).split(":")
        out[int(container_port)] = (host_ip, int(host_port))
    return out


def bind_mounts(svc: dict[str, Any]) -> dict[str, Path]:
    """Container path → repository path of a service's ``./...`` bind mounts."""
    out = {}
    for entry in svc.get("volumes", []):
        source, target = entry.split(":")[:2]
        if source.startswith("./"):
            out[target] = ROOT / source
    return out


def run_schema_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
         str(path)], capture_output=True, text=True, timeout=60)


class ReadRecorder(Mapping[str, str]):
    """An environment that records which names its reader looks up one by one (``get``,
    ``[]``, ``in``), as opposed to those it only sees while listing everything."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self._values = dict(values)
        self.looked_up: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.looked_up.add(key)
        return self._values[key]

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        self.looked_up.add(key)
        return self._values.get(key, default)

    def __contains__(self, key: object) -> bool:
        self.looked_up.add(str(key))
        return key in self._values

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def items(self):  # type: ignore[no-untyped-def, override]
        return self._values.items()


def local_stack_environments() -> Iterator[tuple[str, dict[str, str]]]:
    """The KURA_* environment of every node of both local stacks."""
    for name in NODE_NAMES:
        yield f"compose:{name}", dict(service(name)["environment"])
    for spec in LAYOUT:
        yield f"devmesh:{spec.name}", {**NODE_DEFAULTS, **node_env(spec, LAYOUT, Path("/d"))}


def test_compose_file_is_valid_against_the_compose_spec_schema() -> None:
    result = run_schema_check(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_schema_check_rejects_a_misspelt_key(tmp_path: Path) -> None:
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("stop_grace_period:", "stop_grace_periods:"))
    result = run_schema_check(broken)
    assert result.returncode == 1
    assert "'stop_grace_periods' was unexpected" in result.stdout


def test_nodes_are_the_devmesh_layout_on_the_same_host_ports() -> None:
    services = compose()["services"]
    built = sorted(name for name, svc in services.items() if "build" in svc)
    assert built == sorted(NODE_NAMES)
    for spec in LAYOUT:
        svc = services[spec.name]
        env = svc["environment"]
        assert svc["build"] == {"context": ".", "dockerfile": "Dockerfile"}
        assert (ROOT / "Dockerfile").is_file()
        assert env["KURA_REGION"] == spec.region
        assert env["KURA_TENANT_ID"] == NODE_DEFAULTS["KURA_TENANT_ID"]
        # The public HTTP and gRPC ports on the devmesh's host ports, on loopback only; the
        # internal (peer) port is not published.
        assert published(svc) == {int(env["KURA_PORT"]): ("127.0.0.1", spec.http_port),
                                  int(env["KURA_GRPC_PORT"]): ("127.0.0.1", spec.grpc_port)}
    assert len({services[n]["environment"]["KURA_REGION"] for n in NODE_NAMES}) == len(LAYOUT)


def test_nodes_form_a_full_mesh_over_the_compose_network() -> None:
    services = compose()["services"]
    urls = {}
    for name in NODE_NAMES:
        env = services[name]["environment"]
        # Compose resolves a service name on its network; the node URL is that name.
        assert services[name]["hostname"] == name
        urls[name] = f"http://{name}:{env['KURA_INTERNAL_PORT']}"
        assert env["KURA_NODE_URL"] == urls[name]
    for name in NODE_NAMES:
        peers = services[name]["environment"]["KURA_PEERS"].split(",")
        assert sorted(peers) == sorted(url for other, url in urls.items() if other != name)


def test_each_node_keeps_its_data_in_a_volume_of_its_own() -> None:
    spec = compose()
    mounts = {}
    for name in NODE_NAMES:
        svc = spec["services"][name]
        (volume,) = [v for v in svc["volumes"] if v.split(":")[1] == svc["environment"]["KURA_DATA_DIR"]]
        mounts[name] = volume.split(":")[0]
        assert mounts[name] in spec["volumes"], f"{name}: volume {mounts[name]} is not declared"
    assert len(set(mounts.values())) == len(NODE_NAMES)


@pytest.mark.parametrize("stack_node,environment", list(local_stack_environments()))
def test_local_stacks_set_only_variables_the_node_reads(stack_node: str,
                                                        environment: dict[str, str]) -> None:
    assert all(isinstance(v, str) and "$" not in v for v in environment.values()), environment
    recorder = ReadRecorder(environment)
    settings = Settings.from_env(recorder)  # also validates every value
    unread = sorted(k for k in environment if k.startswith("KURA_") and k not in recorder.looked_up)
    assert unread == [], f"{stack_node} sets variables the node never reads: {unread}"
    assert settings.node_url == environment["KURA_NODE_URL"]
    assert settings.peers == tuple(environment["KURA_PEERS"].split(","))


def test_read_recorder_tells_a_variable_the_node_ignores() -> None:
    # The check above would pass vacuously if every name counted as looked up.
    recorder = ReadRecorder({"KURA_REGION": "us-east", "KURA_NO_SUCH_SETTING": "1"})
    Settings.from_env(recorder)
    assert "KURA_REGION" in recorder.looked_up
    assert "KURA_NO_SUCH_SETTING" not in recorder.looked_up


def test_bind_mounts_come_from_the_repository() -> None:
    for name, svc in compose()["services"].items():
        for target, source in bind_mounts(svc).items():
            assert source.exists(), f"{name}: {source} (mounted at {target}) is not in the repository"


def test_prometheus_scrapes_every_node_labelled_with_its_region() -> None:
    services = compose()["services"]
    prometheus = services["prometheus"]
    config_arg = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    config_path = Path(config_arg.split("=", 1)[1])
    assert bind_mounts(prometheus)[str(config_path.parent)] / config_path.name == PROMETHEUS_CONFIG
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    (job,) = config["scrape_configs"]
    targets = {tuple(group["targets"]): group["labels"]["region"] for group in job["static_configs"]}
    envs = {name: services[name]["environment"] for name in NODE_NAMES}
    assert targets == {(f"{name}:{env['KURA_PORT']}",): env["KURA_REGION"] for name, env in envs.items()}
    assert job.get("metrics_path", "/metrics") == "/metrics"
    # Rule files resolve against the config file's directory: the metrics work's alert rules.
    assert [PROMETHEUS_CONFIG.parent / f for f in config["rule_files"]] == [ALERT_RULES]


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool (Debian's prometheus package, .ci/apt-packages-ops.txt) missing")
@pytest.mark.xfail(not ALERT_RULES.exists(), strict=True,
                   reason="ops/prometheus/alerts.yml comes with the metrics and alerts work")
def test_prometheus_config_and_its_rules_pass_promtool() -> None:
    result = subprocess.run(["promtool", "check", "config", str(PROMETHEUS_CONFIG)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_provisions_prometheus_and_the_dashboards_directory() -> None:
    services = compose()["services"]
    grafana = services["grafana"]
    mounts = bind_mounts(grafana)
    assert mounts["/etc/grafana/provisioning/datasources"] == GRAFANA / "provisioning" / "datasources"
    assert mounts["/etc/grafana/provisioning/dashboards"] == GRAFANA / "provisioning" / "dashboards"

    datasources = yaml.safe_load((GRAFANA / "provisioning/datasources/datasources.yml").read_text())
    (source,) = datasources["datasources"]
    assert (source["type"], source["uid"]) == ("prometheus", "prometheus")
    (prometheus_port,) = published(services["prometheus"])
    assert source["url"] == f"http://prometheus:{prometheus_port}"
    assert "prometheus" in grafana["depends_on"]

    providers = yaml.safe_load((GRAFANA / "provisioning/dashboards/dashboards.yml").read_text())
    (provider,) = providers["providers"]
    dashboards_in_container = provider["options"]["path"]
    assert mounts[dashboards_in_container] == DASHBOARDS
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards_in_container}/{HOME_DASHBOARD}"
    # Every dashboard shipped queries the provisioned datasource, directly or through a
    # template variable (none is here before the metrics work adds kura-cluster.json).
    for path in DASHBOARDS.glob("*.json"):
        uids = {uid for uid in datasource_uids(json.loads(path.read_text())) if not uid.startswith("$")}
        assert uids <= {source["uid"]}, f"{path.name} uses datasources {uids}"


def datasource_uids(node: Any) -> Iterator[str]:
    """The uid of every ``datasource`` reference in a dashboard, at any depth."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                uid = value.get("uid") if isinstance(value, dict) else value
                if uid:
                    yield str(uid)
            else:
                yield from datasource_uids(value)
    elif isinstance(node, list):
        for item in node:
            yield from datasource_uids(item)
