"""End to end with a real Bazel client (Debian's bazel-bootstrap, Bazel 4.2.3).

A workspace of genrules is built against ``--remote_cache=grpc://...`` served by
``python -m app.reapi``; after ``bazel clean`` every action must be a remote
cache hit and every output byte-identical. CI installs the client from
``.ci/apt-packages-reapi.txt``; without it locally the test is skipped.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

BAZEL = shutil.which("bazel")
# bazel-bootstrap ships an unpacked install base (its binary carries no embedded one); Debian's
# /etc/bazel/bazelrc passes these two startup flags, which --nosystem_rc turns off, so pass them.
INSTALL_BASE_FLAGS = ["--install_base=/usr/share/bazel", "--trust_install_base"]
GENRULES = 10

pytestmark = pytest.mark.skipif(BAZEL is None, reason="bazel not installed (apt-get install bazel-bootstrap)")


def _workspace(root: Path) -> list[str]:
    """Ten genrules, two outputs each, chained, one with a multi-MiB random output."""
    root.mkdir()
    (root / "WORKSPACE").write_text('workspace(name = "kura_e2e")\n')
    (root / "input.txt").write_text("kura e2e input\n" * 100)
    rules, outputs = [], []
    for i in range(GENRULES):
        a, b = f"g{i}_a.out", f"g{i}_b.out"
        outputs += [a, b]
        srcs = '["input.txt"]' if i == 0 else f'[":g{i - 1}"]'
        if i == 4:
            # Not reproducible on purpose: a hit must return the first build's bytes.
            cmd = f"head -c 3000000 /dev/urandom > $(location {a}); cat $(SRCS) | sha256sum > $(location {b})"
        else:
            cmd = (f"cat $(SRCS) | sha256sum > $(location {a}); "
                   f"for n in $$(seq 1 {200 * (i + 1)}); do echo line-{i}-$$n; done > $(location {b})")
        rules.append(f'genrule(\n    name = "g{i}",\n    srcs = {srcs},\n'
                     f'    outs = ["{a}", "{b}"],\n    cmd = "{cmd}",\n)\n')
    (root / "BUILD").write_text("\n".join(rules))
    return outputs


def test_bazel_build_is_fully_cached_after_clean(tmp_path: Path, spawn) -> None:  # type: ignore[no-untyped-def]
    reapi = spawn()
    reapi.wait_listening(timeout=60)
    workspace = tmp_path / "ws"
    outputs = _workspace(workspace)
    startup = [BAZEL, *INSTALL_BASE_FLAGS, f"--output_user_root={tmp_path / 'bazel-root'}",
               "--nohome_rc", "--nosystem_rc", "--max_idle_secs=120"]
    build_flags = [f"--remote_cache=grpc://127.0.0.1:{reapi.port}", "--remote_instance_name=e2e/main",
                   "--spawn_strategy=local", "--color=no", "--curses=no", "--noshow_progress",
                   "--remote_timeout=60"]

    def bazel(*args: str) -> str:
        result = subprocess.run([*startup, *args], cwd=workspace, capture_output=True, text=True,
                                timeout=240)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stderr

    try:
        first = bazel("build", *build_flags, "//...")
        bin_dir = workspace / "bazel-bin"
        before = {name: (bin_dir / name).read_bytes() for name in outputs}
        bazel("clean")
        assert not (bin_dir / outputs[0]).exists()
        second = bazel("build", *build_flags, "//...")
        hits = re.search(r"(\d+) remote cache hit", second)
        assert hits is not None, second
        assert int(hits.group(1)) == GENRULES, second
        assert not re.search(r"\d+ (local|linux-sandbox|processwrapper-sandbox)", second), second
        after = {name: (bin_dir / name).read_bytes() for name in outputs}
        assert after == before
        assert len(before["g4_a.out"]) == 3_000_000
        print(f"first build: {_summary(first)}\nafter clean: {_summary(second)}")
    finally:
        subprocess.run([*startup, "shutdown"], cwd=workspace, capture_output=True, timeout=60)


def _summary(stderr: str) -> str:
    match = re.search(r"INFO: \d+ processes?:.*", stderr)
    return match.group(0) if match else "?"
