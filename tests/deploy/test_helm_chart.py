"""Checks of the deployment artifacts: helm/kura chart, Dockerfile, .dockerignore.

Most tests need nothing beyond the standard library: they read the chart's
templates and values.yaml as text (a small indentation-based key extractor) and
cross-check them against app/settings.py and the Dockerfile. With PyYAML the
values are also parsed for real; with a `helm` binary on PATH the chart is
rendered with `helm template` and the rendered objects are checked.
"""
from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "kura"
TEMPLATES = CHART / "templates"
SETTINGS_PY = ROOT / "app" / "settings.py"

try:  # optional: real YAML parsing
    import yaml  # type: ignore
except ImportError:  # pragma: no cover - depends on the environment
    yaml = None

HELM = shutil.which("helm")


# --------------------------------------------------------------------------- helpers

def template_texts() -> dict[str, str]:
    files = sorted(TEMPLATES.glob("*.yaml")) + sorted(TEMPLATES.glob("*.tpl")) + [TEMPLATES / "NOTES.txt"]
    return {f.name: f.read_text() for f in files}


def settings_env_names() -> set[str]:
    """KURA_* names in the parser table of Settings.from_env."""
    names = set(re.findall(r'^\s*"(KURA_[A-Z0-9_]+)":\s*\(', SETTINGS_PY.read_text(), re.M))
    assert len(names) > 20, "could not read the KURA_* parser table of app/settings.py"
    return names


def settings_default(attr: str) -> str:
    m = re.search(rf"^    {attr}: [\w\[\], .]+ = ([^#\n]+)", SETTINGS_PY.read_text(), re.M)
    assert m, f"no default for Settings.{attr} in app/settings.py"
    return m.group(1).strip()


def _strip_comment(line: str) -> str:
    # values.yaml scalars here never contain " #" inside quotes.
    return re.split(r"\s+#", line, maxsplit=1)[0].rstrip()


def values_entries(text: str) -> list[dict]:
    """Mapping keys of a simple YAML document with their dotted path, value and docs.

    Handles block mappings, block sequences (their items are not descended into)
    and flow values; enough for a chart's values.yaml.
    """
    entries: list[dict] = []
    stack: list[tuple[int, str]] = []  # (indent, key)
    lines = text.splitlines()
    item_indent = -1  # indent of the sequence item being skipped, if any
    for i, raw in enumerate(lines):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        indent = len(raw) - len(raw.lstrip(" "))
        body = raw.strip()
        if item_indent >= 0 and indent > item_indent:
            continue  # inside a sequence item
        item_indent = -1
        if body == "-" or body.startswith("- "):
            item_indent = indent  # sequence item: its contents are a value, not chart keys
            continue
        m = re.match(r"^([A-Za-z_][A-Za-z0-9_.-]*|\"[^\"]+\"):(?:\s+(.*))?$", body)
        if not m:
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key = m.group(1).strip('"')
        path = ".".join([k for _, k in stack] + [key])
        value = _strip_comment(m.group(2) or "")
        j = i - 1
        doc: list[str] = []
        while j >= 0 and lines[j].strip().startswith("#"):
            doc.insert(0, lines[j].strip().lstrip("#").strip())
            j -= 1
        inline = ""
        if m.group(2) and re.search(r"\s#", m.group(2)):
            inline = m.group(2).split("#", 1)[1].strip()
        entries.append({"path": path, "value": value, "doc": doc, "inline": inline, "line": i + 1,
                        "indent": indent})
        if value == "":
            stack.append((indent, key))
    return entries


def values_paths() -> dict[str, str]:
    return {e["path"]: e["value"] for e in values_entries((CHART / "values.yaml").read_text())}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        ins, _, args = buf.partition(" ")
        out.append((ins.upper(), args.strip()))
        buf = ""
    assert not buf, "Dockerfile ends inside a line continuation"
    return out


def dockerfile_stages() -> list[dict]:
    instructions = dockerfile_instructions()
    args = {}
    for ins, a in instructions:
        if ins == "FROM":
            break
        if ins == "ARG" and "=" in a:
            k, v = a.split("=", 1)
            args[k] = v
    stages: list[dict] = []
    for ins, a in instructions:
        if ins == "FROM":
            parts = a.split()
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), ""), parts[0])
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else str(len(stages))
            stages.append({"image": image, "name": name, "ins": []})
        elif stages:
            stages[-1]["ins"].append((ins, a))
    return stages


def dockerignore_patterns() -> list[str]:
    pats = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            pats.append(line.lstrip("/").rstrip("/"))
    return pats


def ignored(path: str, patterns: list[str]) -> bool:
    """Approximation of Docker's .dockerignore matching (no '!' exceptions used here)."""
    parts = path.split("/")
    for p in patterns:
        if p.startswith("!"):
            continue
        for k in range(1, len(parts) + 1):
            prefix = "/".join(parts[:k])
            if fnmatch.fnmatchcase(prefix, p):
                return True
            if p.startswith("**/") and fnmatch.fnmatchcase(parts[k - 1], p[3:]):
                return True
    return False


# --------------------------------------------------------------------------- chart: static checks

def test_chart_has_required_files():
    for name in ("Chart.yaml", "values.yaml", "README.md", "templates/_helpers.tpl",
                 "templates/statefulset.yaml", "templates/service-headless.yaml", "templates/service.yaml",
                 "templates/pdb.yaml", "templates/configmap-extension.yaml",
                 "templates/serviceaccount.yaml", "templates/NOTES.txt"):
        assert (CHART / name).is_file(), f"helm/kura/{name} is missing"
    chart = (CHART / "Chart.yaml").read_text()
    assert re.search(r"^apiVersion: v2$", chart, re.M)
    assert re.search(r"^name: kura$", chart, re.M)
    assert re.search(r"^version: \d+\.\d+\.\d+", chart, re.M)
    assert re.search(r"^appVersion: ", chart, re.M)


def test_values_extractor_reads_nested_keys():
    # Guards the extractor the other tests rely on.
    paths = values_paths()
    assert paths["kura.tenantId"] == "default"
    assert paths["ports.internal"] == "7443"
    assert paths["probes.startup.failureThreshold"] == "180"
    assert "persistence.accessModes" in paths and "ReadWriteOnce" not in paths
    assert len(paths) > 60


def test_template_env_names_exist_in_settings():
    known = settings_env_names()
    used: set[str] = set()
    for name, text in template_texts().items():
        used |= set(re.findall(r"\bKURA_[A-Z0-9_]*[A-Z0-9]\b", text))
    assert {"KURA_NODE_URL", "KURA_DISCOVERY_DNS_NAME", "KURA_TENANT_ID", "KURA_REGION",
            "KURA_DRAIN_COMPLETION_TIMEOUT_MS", "KURA_EXTENSION_SCRIPT_PATH",
            "KURA_INTERNAL_TLS_CA_CERT_PATH", "KURA_INTERNAL_TLS_CERT_PATH",
            "KURA_INTERNAL_TLS_KEY_PATH"} <= used
    unknown = sorted(used - known)
    assert not unknown, f"templates set KURA_* variables app/settings.py does not read: {unknown}"


def test_values_referenced_by_templates_exist():
    paths = values_paths()
    missing = []
    for name, text in template_texts().items():
        refs = {m for m in re.findall(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)", text)}
        aliases = dict(re.findall(r"\$(\w+)\s*:=\s*\.Values((?:\.[A-Za-z_]\w*)+)", text))
        for alias, base in aliases.items():
            for sub in re.findall(rf"\${alias}((?:\.[A-Za-z_]\w*)+)", text):
                refs.add(base + sub)
        for ref in refs:
            path = ref.lstrip(".")
            if path not in paths:
                missing.append(f"{name}: .Values.{path}")
    assert not missing, "templates reference values missing from values.yaml:\n" + "\n".join(sorted(missing))


def _documents_subtree(entry: dict | None) -> bool:
    return bool(entry and entry["doc"] and entry["doc"][0].startswith("--"))


def test_every_value_is_documented():
    """helm-docs convention: a key is documented by the comment above it (or inline).

    A comment starting with "--" documents the whole subtree; under a plain
    section comment every child key needs its own.
    """
    entries = values_entries((CHART / "values.yaml").read_text())
    by_path = {e["path"]: e for e in entries}
    undocumented = []
    for e in entries:
        parts = e["path"].split(".")
        covered = any(_documents_subtree(by_path.get(".".join(parts[:k]))) for k in range(1, len(parts)))
        if covered:
            continue
        if not (e["doc"] or e["inline"]):
            undocumented.append(f"line {e['line']}: {e['path']}")
    assert not undocumented, "values without a comment:\n" + "\n".join(undocumented)


def test_values_defaults_match_node_defaults():
    paths = values_paths()
    assert paths["ports.http"] == settings_default("port")
    assert paths["ports.grpc"] == settings_default("grpc_port")
    assert paths["ports.internal"] == settings_default("internal_port")
    assert int(paths["kura.drainCompletionTimeoutMs"]) == int(
        settings_default("drain_completion_timeout_ms").replace("_", ""))
    assert paths["podManagementPolicy"] == "Parallel"
    assert paths["podSecurityContext.runAsNonRoot"] == "true"


def test_default_grace_period_exceeds_drain_timeout():
    # Mirrors kura.terminationGracePeriodSeconds in _helpers.tpl.
    helpers = (TEMPLATES / "_helpers.tpl").read_text()
    assert re.search(r"add \$drain \(\.Values\.drain\.preStopSleepSeconds \| int\) (\d+)", helpers)
    margin = int(re.search(r"add \$drain \(\.Values\.drain\.preStopSleepSeconds \| int\) (\d+)", helpers).group(1))
    paths = values_paths()
    drain_s = int(paths["kura.drainCompletionTimeoutMs"]) / 1000
    sleep_s = int(paths["drain.preStopSleepSeconds"])
    explicit = paths["drain.terminationGracePeriodSeconds"].strip('"')
    grace = int(explicit) if explicit else int(-(-drain_s // 1)) + sleep_s + margin
    assert grace > drain_s + sleep_s
    assert margin >= 10


def test_includes_are_defined_and_blocks_balanced():
    texts = template_texts()
    defined = set(re.findall(r'{{-?\s*define\s+"([^"]+)"', texts["_helpers.tpl"]))
    for name, text in texts.items():
        for inc in re.findall(r'include\s+"([^"]+)"', text):
            assert inc in defined, f"{name} includes undefined template {inc!r}"
        code = re.sub(r"{{-?\s*/\*.*?\*/\s*-?}}", "", text, flags=re.S)
        opens = len(re.findall(r"{{-?\s*(?:if|range|with|define)\b", code))
        ends = len(re.findall(r"{{-?\s*end\s*-?}}", code))
        assert opens == ends, f"{name}: {opens} blocks opened, {ends} closed"


def test_statefulset_essentials():
    sts = (TEMPLATES / "statefulset.yaml").read_text()
    assert "kind: StatefulSet" in sts
    assert re.search(r"serviceName: {{ \$headless }}", sts)
    assert "volumeClaimTemplates:" in sts and "mountPath: /data" in sts
    assert "podManagementPolicy: {{ .Values.podManagementPolicy }}" in sts
    # Probes: liveness and startup on /up, readiness on /ready.
    for probe, path in (("startupProbe", "/up"), ("livenessProbe", "/up"), ("readinessProbe", "/ready")):
        m = re.search(rf"{probe}:\n\s+httpGet:\n\s+path: (\S+)", sts)
        assert m and m.group(1) == path, probe
    # Drain: SIGUSR1 to PID 1 (gunicorn) from preStop.
    assert re.search(r"preStop:[\s\S]*kill -USR1 1", sts)
    assert "terminationGracePeriodSeconds: {{ include \"kura.terminationGracePeriodSeconds\" . }}" in sts
    # Stable identity from the downward API and the headless Service.
    assert re.search(r"name: POD_NAME\n\s+valueFrom:\n\s+fieldRef:\n\s+fieldPath: metadata.name", sts)
    node_url = re.search(r"name: KURA_NODE_URL\n\s+value: (.+)", sts).group(1)
    assert "$(POD_NAME).{{ $domain }}:{{ .Values.ports.internal }}" in node_url
    assert 'include "kura.internalScheme"' in node_url
    assert re.search(r'\$domain := printf "%s\.\$\(POD_NAMESPACE\)\.svc\.%s" \$headless', sts)


def test_services():
    headless = (TEMPLATES / "service-headless.yaml").read_text()
    assert "clusterIP: None" in headless
    assert "publishNotReadyAddresses: true" in headless
    assert 'name: {{ include "kura.headlessName" . }}' in headless
    assert "port: {{ .Values.ports.internal }}" in headless
    svc = (TEMPLATES / "service.yaml").read_text()
    assert re.search(r"name: grpc\n\s+port: {{ \.Values\.service\.grpcPort }}\n[\s\S]*?appProtocol: grpc", svc)
    assert "ports.internal" not in svc, "the client Service must not expose the peer port"


# --------------------------------------------------------------------------- Dockerfile

def test_dockerfile_is_multistage_slim_and_non_root():
    stages = dockerfile_stages()
    assert len(stages) >= 2, "expected a build stage and a runtime stage"
    for s in stages:
        assert s["image"] == "python:3.11-slim", s["image"]
    final = stages[-1]
    users = [a for ins, a in final["ins"] if ins == "USER"]
    assert users, "the runtime stage must switch to a non-root USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), user
    assert any(ins == "COPY" and a.startswith(f"--from={stages[0]['name']} ") for ins, a in final["ins"])
    # No build toolchain in the runtime stage.
    assert not any(ins == "RUN" and re.search(r"\bgcc\b|build-essential", a) for ins, a in final["ins"])


def test_dockerfile_runs_gunicorn_from_its_config_dir():
    final = dockerfile_stages()[-1]["ins"]
    cmds = [a for ins, a in final if ins == "CMD"]
    assert cmds and cmds[-1].replace(" ", "") == '["gunicorn","-c","gunicorn.conf.py"]'
    assert not any(ins == "ENTRYPOINT" for ins, _ in final)
    workdir = None
    conf_dir = None
    for ins, a in final:
        if ins == "WORKDIR":
            workdir = a if a.startswith("/") else os.path.join(workdir or "/", a)
        if ins == "COPY" and "gunicorn.conf.py" in a.split()[:-1]:
            dest = a.split()[-1]
            conf_dir = os.path.normpath(dest if dest.startswith("/") else os.path.join(workdir or "/", dest))
    assert conf_dir is not None, "gunicorn.conf.py is not copied into the runtime image"
    assert os.path.normpath(workdir) == conf_dir


def test_dockerfile_ports_volume_and_data_dir():
    final = dockerfile_stages()[-1]["ins"]
    exposed = {p.split("/")[0] for ins, a in final if ins == "EXPOSE" for p in a.split()}
    assert exposed == {settings_default("port"), settings_default("grpc_port"),
                       settings_default("internal_port")}
    env = " ".join(a for ins, a in final if ins == "ENV")
    assert re.search(r"\bKURA_DATA_DIR=/data\b", env)
    assert any(ins == "VOLUME" and "/data" in a for ins, a in final)
    assert any(ins == "HEALTHCHECK" and "/up" in a and "python" in a for ins, a in final)


def test_dockerfile_build_context_has_what_pip_install_needs():
    """`pip install .` needs pyproject.toml, its readme and the package directory."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {"pyproject.toml"}
    readme = project["project"].get("readme")
    if isinstance(readme, str):
        needed.add(readme)
    for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]:
        needed.add(pattern.rstrip("*").rstrip("."))
    build = dockerfile_stages()[0]["ins"]
    copied = set()
    for ins, a in build:
        if ins == "COPY" and not a.startswith("--from"):
            copied |= {p.rstrip("/") for p in a.split()[:-1] if not p.startswith("--")}
    assert needed <= copied, f"build stage does not COPY {sorted(needed - copied)}"


def test_dockerignore_excludes_local_state_but_not_sources():
    pats = dockerignore_patterns()
    for must in (".git", ".venv", "data", ".pytest_cache"):
        assert ignored(must, pats), f".dockerignore does not exclude {must}"
    assert ignored("app/storage/__pycache__", pats)
    sources = set()
    for stage in dockerfile_stages():
        for ins, a in stage["ins"]:
            if ins == "COPY" and not a.startswith("--from"):
                sources |= {p.rstrip("/") for p in a.split()[:-1] if not p.startswith("--")}
    for src in sorted(sources):
        assert (ROOT / src).exists(), f"Dockerfile COPYs {src}, which is not in the repository"
        assert not ignored(src, pats), f".dockerignore excludes {src}, which the Dockerfile COPYs"
        if (ROOT / src).is_dir():
            for f in (ROOT / src).rglob("*.py"):
                rel = f.relative_to(ROOT).as_posix()
                assert "__pycache__" in rel or not ignored(rel, pats), f".dockerignore excludes {rel}"


# --------------------------------------------------------------------------- optional: PyYAML, helm

@pytest.mark.skipif(yaml is None, reason="PyYAML not installed")
def test_values_parse_as_yaml_and_match_extractor():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for path, raw in values_paths().items():
        node = values
        for part in path.split("."):
            assert isinstance(node, dict) and part in node, path
            node = node[part]
        if raw not in ("", "|", ">"):
            assert yaml.safe_load(raw) == node, path
    assert yaml.safe_load((CHART / "Chart.yaml").read_text())["apiVersion"] == "v2"


def helm_template(*set_args: str) -> list[dict]:
    cmd = [HELM, "template", "rel", str(CHART), "--namespace", "cache"]
    for s in set_args:
        cmd += ["--set", s]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container["env"]}


@pytest.mark.skipif(HELM is None or yaml is None, reason="helm binary or PyYAML not available")
def test_helm_template_default_render():
    docs = helm_template()
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("StatefulSet", "rel-kura") in kinds
    assert ("Service", "rel-kura-headless") in kinds and ("Service", "rel-kura") in kinds
    assert ("PodDisruptionBudget", "rel-kura") in kinds
    assert not any(k == "ConfigMap" for k, _ in kinds)
    sts = next(d for d in docs if d["kind"] == "StatefulSet")
    spec = sts["spec"]
    assert spec["serviceName"] == "rel-kura-headless" and spec["podManagementPolicy"] == "Parallel"
    assert spec["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["fsGroup"]
    c = pod["containers"][0]
    env = _env(c)
    assert env["KURA_NODE_URL"] == "http://$(POD_NAME).rel-kura-headless.$(POD_NAMESPACE).svc.cluster.local:7443"
    assert env["KURA_DISCOVERY_DNS_NAME"] == "rel-kura-headless.$(POD_NAMESPACE).svc.cluster.local"
    assert [e["name"] for e in c["env"]][:2] == ["POD_NAME", "POD_NAMESPACE"]
    assert pod["terminationGracePeriodSeconds"] > int(env["KURA_DRAIN_COMPLETION_TIMEOUT_MS"]) / 1000
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/up"
    assert "kill -USR1 1" in " ".join(c["lifecycle"]["preStop"]["exec"]["command"])
    headless = next(d for d in docs if d["metadata"]["name"] == "rel-kura-headless")
    assert headless["spec"]["publishNotReadyAddresses"] is True and headless["spec"]["clusterIP"] == "None"


@pytest.mark.skipif(HELM is None or yaml is None, reason="helm binary or PyYAML not available")
def test_helm_template_tls_and_extension():
    docs = helm_template("tls.enabled=true", "tls.secretName=peer-tls", "extension.enabled=true",
                         "extension.script=return 1")
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    assert cm["data"]["kura.lua"].strip() == "return 1"
    c = next(d for d in docs if d["kind"] == "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    env = _env(c)
    assert env["KURA_NODE_URL"].startswith("https://")
    assert env["KURA_EXTENSION_SCRIPT_PATH"] == "/etc/kura/extension/kura.lua"
    for name in ("CA_CERT", "CERT", "KEY"):
        assert env[f"KURA_INTERNAL_TLS_{name}_PATH"].startswith("/etc/kura/tls/")
    # Misconfiguration fails the render instead of a crash-looping node.
    out = subprocess.run([HELM, "template", "rel", str(CHART), "--set", "tls.enabled=true"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "tls.secretName" in out.stderr
