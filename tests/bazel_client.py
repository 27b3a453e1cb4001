"""The real Bazel client against a kura-py cache: one workspace and one build-clean-rebuild
run, shared by the gRPC (``tests/reapi/test_bazel_e2e.py``) and HTTP
(``tests/e2e/test_bazel_http.py``) end-to-end tests.

Debian's bazel-bootstrap (Bazel 4.2.3) is what CI installs (``.ci/apt-packages-reapi.txt``);
without a ``bazel`` on ``PATH`` the tests that use this module are skipped.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

BAZEL = shutil.which("bazel")
# bazel-bootstrap ships an unpacked install base (its binary carries no embedded one); Debian's
# /etc/bazel/bazelrc passes these two startup flags, which --nosystem_rc turns off, so pass them.
INSTALL_BASE_FLAGS = ["--install_base=/usr/share/bazel", "--trust_install_base"]
GENRULES = 10
BIG_OUTPUT = "g4_a.out"
BIG_OUTPUT_BYTES = 3_000_000

requires_bazel = pytest.mark.skipif(BAZEL is None, reason="bazel not installed (apt-get install bazel-bootstrap)")


def make_workspace(root: Path) -> list[str]:
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
            cmd = (f"head -c {BIG_OUTPUT_BYTES} /dev/urandom > $(location {a}); "
                   f"cat $(SRCS) | sha256sum > $(location {b})")
        else:
            cmd = (f"cat $(SRCS) | sha256sum > $(location {a}); "
                   f"for n in $$(seq 1 {200 * (i + 1)}); do echo line-{i}-$$n; done > $(location {b})")
        rules.append(f'genrule(\n    name = "g{i}",\n    srcs = {srcs},\n'
                     f'    outs = ["{a}", "{b}"],\n    cmd = "{cmd}",\n)\n')
    (root / "BUILD").write_text("\n".join(rules))
    return outputs


@dataclass(frozen=True)
class CachedRebuild:
    """What ``build_clean_rebuild`` saw: both builds' summaries and wall-clock times."""

    first_summary: str
    second_summary: str
    first_s: float
    second_s: float
    remote_hits: int
    outputs: dict[str, bytes]

    def __str__(self) -> str:
        return (f"first build {self.first_s:.1f}s: {self.first_summary}\n"
                f"after clean {self.second_s:.1f}s: {self.second_summary}")


def build_clean_rebuild(tmp_path: Path, remote_flags: list[str]) -> CachedRebuild:
    """Build the workspace against the cache, ``bazel clean``, build again; assert that the
    second build ran nothing locally (every action a remote cache hit) and produced the
    first build's bytes."""
    assert BAZEL is not None
    workspace = tmp_path / "ws"
    outputs = make_workspace(workspace)
    startup = [BAZEL, *INSTALL_BASE_FLAGS, f"--output_user_root={tmp_path / 'bazel-root'}",
               "--nohome_rc", "--nosystem_rc", "--max_idle_secs=120"]
    build_flags = [*remote_flags, "--spawn_strategy=local", "--color=no", "--curses=no",
                   "--noshow_progress", "--remote_timeout=60"]

    def bazel(*args: str) -> tuple[str, float]:
        started = time.monotonic()
        result = subprocess.run([*startup, *args], cwd=workspace, capture_output=True, text=True,
                                timeout=240)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stderr, time.monotonic() - started

    try:
        first, first_s = bazel("build", *build_flags, "//...")
        bin_dir = workspace / "bazel-bin"
        before = {name: (bin_dir / name).read_bytes() for name in outputs}
        bazel("clean")
        assert not (bin_dir / outputs[0]).exists()
        second, second_s = bazel("build", *build_flags, "//...")
        hits = re.search(r"(\d+) remote cache hit", second)
        assert hits is not None, second
        assert int(hits.group(1)) == GENRULES, second
        assert not re.search(r"\d+ (local|linux-sandbox|processwrapper-sandbox)", second), second
        after = {name: (bin_dir / name).read_bytes() for name in outputs}
        assert after == before
        assert len(before[BIG_OUTPUT]) == BIG_OUTPUT_BYTES
        return CachedRebuild(_summary(first), _summary(second), first_s, second_s, int(hits.group(1)),
                             after)
    finally:
        subprocess.run([*startup, "shutdown"], cwd=workspace, capture_output=True, timeout=60)


def _summary(stderr: str) -> str:
    match = re.search(r"INFO: \d+ processes?:.*", stderr)
    return match.group(0) if match else "?"
