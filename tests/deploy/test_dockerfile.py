"""Checks of the container image build: Dockerfile and .dockerignore.

They read the files as text and cross-check them against the node's defaults
(app/settings.py) and pyproject.toml; nothing is built.
"""
from __future__ import annotations

import fnmatch
import os
import re
import tomllib
from pathlib import Path

from app.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEFAULTS = Settings()


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
    assert exposed == {str(DEFAULTS.port), str(DEFAULTS.grpc_port), str(DEFAULTS.internal_port)}
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
