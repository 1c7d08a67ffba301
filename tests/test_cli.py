"""The `copyless` command."""

from __future__ import annotations

import subprocess
import sys


def test_demo_runs_two_processes_and_verifies_every_frame():
    r = subprocess.run(
        [sys.executable, "-m", "copyless.cli", "demo", "--frames", "200", "--size", "100000"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "200 frames" in r.stdout and "0 corrupt" in r.stdout and "demo passed" in r.stdout


def test_unknown_arguments_are_refused():
    r = subprocess.run([sys.executable, "-m", "copyless.cli", "demo", "--bogus"], capture_output=True, text=True)
    assert r.returncode == 2 and "unrecognized" in r.stderr
