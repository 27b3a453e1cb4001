"""The helm/kura chart as the tests see it: rendered by the real Helm engine.

helm-python-sdk carries Helm v4 as a shared library, so rendering, values-schema
validation and lint are Helm's own, with no ``helm`` binary. The pod environment is
built the way the kubelet builds it (``$(VAR)`` references expanded in order).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Iterator

import helm_python
import yaml

CHART = Path(__file__).resolve().parents[2] / "helm" / "kura"
NAMESPACE = "cache"
RELEASE = "kura"

Doc = dict[str, Any]


def render_files(values: dict[str, Any] | None = None) -> dict[str, str]:
    """Template path → rendered text (NOTES.txt included), as ``helm install`` renders it.

    Raises ``helm_python.HelmValuesError`` when the values break values.schema.json and
    ``helm_python.HelmRenderError`` when a template fails.
    """
    chart = helm_python.Chart.load(str(CHART))
    try:
        return chart.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    finally:
        chart.close()


def render(values: dict[str, Any] | None = None) -> list[Doc]:
    """Every Kubernetes object the chart renders for ``values``."""
    docs: list[Doc] = []
    for name, text in render_files(values).items():
        if name.endswith(".yaml"):
            docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def notes(values: dict[str, Any] | None = None) -> str:
    """The install notes Helm prints for ``values``."""
    return render_files(values)[f"{CHART.name}/templates/NOTES.txt"]


def one(docs: list[Doc], kind: str, predicate: Callable[[Doc], bool] = lambda d: True) -> Doc:
    found = [d for d in docs if d["kind"] == kind and predicate(d)]
    assert len(found) == 1, f"expected one {kind}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def container(statefulset: Doc) -> Doc:
    """The node container of the StatefulSet's pods."""
    return statefulset["spec"]["template"]["spec"]["containers"][0]


def pod_env(statefulset: Doc, ordinal: int) -> dict[str, str]:
    """The node container's environment in pod ``ordinal``, as the kubelet builds it."""
    fields = {"metadata.name": f"{statefulset['metadata']['name']}-{ordinal}",
              "metadata.namespace": NAMESPACE}
    env: dict[str, str] = {}
    for var in container(statefulset)["env"]:
        if "valueFrom" in var:
            if "fieldRef" in var["valueFrom"]:  # Secrets and ConfigMaps are not here to read
                env[var["name"]] = fields[var["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)),
                                      str(var.get("value", "")))
    return env


def schema() -> Doc:
    """values.schema.json, parsed."""
    return json.loads((CHART / "values.schema.json").read_text())


def schema_keys(node: Doc | None = None, prefix: str = "") -> Iterator[tuple[str, Doc]]:
    """(dotted path, schema) of every key values.schema.json accepts, parents included.

    Descends into closed objects (``additionalProperties: false``); free-form maps and
    lists of Kubernetes objects are leaves.
    """
    root = schema()
    node = root if node is None else node
    for key, sub in node.get("properties", {}).items():
        if "$ref" in sub:
            sub = root["definitions"][sub["$ref"].rsplit("/", 1)[1]]
        path = f"{prefix}{key}"
        yield path, sub
        if sub.get("additionalProperties") is False:
            yield from schema_keys(sub, path + ".")
