from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from app.settings import Settings


@pytest.fixture
def hooked_app(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """``hooked_app(script, tenant="default", **env)``: an app with Lua hooks from ``script``
    (a path, or the script's text). Each app gets its own data directory."""
    from app.http import create_app

    apps: list[Any] = []

    def build(script: Path | str, tenant: str = "default", **env: str) -> Any:
        if not isinstance(script, Path):
            path = tmp_path / f"hooks{len(apps)}.lua"
            path.write_text(script)
            script = path
        kura_env = {"KURA_EXTENSION_SCRIPT_PATH": str(script), **env}
        app = create_app(Settings(data_dir=str(tmp_path / f"data{len(apps)}"), tenant_id=tenant,
                                  extension_script_path=str(script), kura_env=kura_env))
        apps.append(app)
        return app

    yield build
    for app in apps:
        app.extensions["kura"].store.close()
