"""Bad `GATEWAY_*` values end `gateway serve` / `gateway pull` with exit status 2 and one
line per bad variable that names it and says what is allowed (no traceback); the help
texts are for users and name every sub-command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


def _gateway(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        cwd=REPO,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("var", "value", "allowed"),
    [
        ("GATEWAY_PORT", "abc", "an integer from 0 to 65535"),
        ("GATEWAY_MAX_N", "0", "an integer >= 1"),
        ("GATEWAY_LOG_LEVEL", "verbose", "one of critical, error, warning, info, debug, trace"),
        ("GATEWAY_ACCESS_LOG", "maybe", "true or false"),
        ("GATEWAY_ACCESS_LOG_SAMPLE", "1.5", "a number from 0.0 to 1.0"),
        ("GATEWAY_CORS_ALLOW_CREDENTIALS", "perhaps", "true or false"),
    ],
)
def test_bad_value_exits_2_with_one_line(var: str, value: str, allowed: str) -> None:
    done = _gateway("serve", **{var: value})
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines == [f"gateway: {var}={value!r} is not allowed: {var} must be {allowed}."]
    assert "Traceback" not in done.stderr


def test_every_bad_variable_gets_its_line_and_pull_checks_too() -> None:
    done = _gateway("pull", GATEWAY_PORT="-1", GATEWAY_MAX_STOP_LENGTH="x")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("gateway: GATEWAY_PORT='-1'")
    assert lines[1].startswith("gateway: GATEWAY_MAX_STOP_LENGTH='x'")


@pytest.mark.parametrize("workers", ["1", "3"])
def test_invalid_catalog_exits_2_also_with_several_front_doors(
    tmp_path: Path, workers: str
) -> None:
    """With `--workers N` the catalog is checked before any front door starts (a front door
    that cannot load it would otherwise be restarted forever)."""
    bad = tmp_path / "models.yaml"
    bad.write_text("models:\n  - name: m\n    engine: sim\n    endpoints: [http://127.0.0.1:9]\n")
    done = _gateway("serve", "--config", str(bad), "--port", "0", "--workers", workers)
    assert done.returncode == 2
    assert done.stderr.startswith(f"{bad} is invalid:")
    assert "models[0].endpoints" in done.stderr
    assert "Traceback" not in done.stderr


def test_help_is_for_users() -> None:
    done = _gateway("--help")
    assert done.returncode == 0
    for command in ("serve", "check", "pull", "sim", "bench"):
        assert f"    {command} " in done.stdout
    assert "GATEWAY_" in done.stdout and "Owns" not in done.stdout
    serve = _gateway("serve", "--help").stdout
    assert "--port" in serve and "/ui" in serve
