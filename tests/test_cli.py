"""The command line: the demo works exactly as printed; the fake upstream runs on its own."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

from gateway_processes import free_port

GATEKEEPER = [sys.executable, "-m", "gatekeeper"]


def wait_for_output(process: subprocess.Popen, pattern: str, timeout: float = 20.0) -> str:
    """Read the process's stdout until `pattern` appears; return everything read."""
    seen = ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            if process.poll() is not None:
                break
            continue
        seen += line
        if re.search(pattern, seen):
            return seen
    raise AssertionError(f"{pattern!r} never appeared; output so far:\n{seen}")


@pytest.fixture
def demo(tmp_path):
    port = free_port()
    env = {**os.environ, "GATEKEEPER_DEMO_DIR": str(tmp_path / "demo"), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([*GATEKEEPER, "serve", "--demo", "--port", str(port)], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True, env=env, cwd=tmp_path)
    try:
        banner = wait_for_output(process, r"Press Ctrl\+C")
        yield port, banner
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()


def test_demo_curl_line_works_as_printed(demo):
    port, banner = demo
    curl_line = next(line.strip() for line in banner.splitlines() if line.strip().startswith("curl "))
    assert f"127.0.0.1:{port}" in curl_line
    output = subprocess.run(["bash", "-c", curl_line], capture_output=True, text=True, timeout=30).stdout
    assert '"b64_json"' in output and '"created"' in output


def test_demo_sdk_snippet_works_as_printed(demo):
    _, banner = demo
    snippet = next(line.strip() for line in banner.splitlines() if line.strip().startswith("python -c"))
    argv = shlex.split(snippet)
    argv[0] = sys.executable  # "python" on the newcomer's PATH is the venv's; here it is this interpreter
    output = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert output.returncode == 0, output.stderr
    assert "output_tokens" in output.stdout


def test_fake_upstream_command_serves_the_contract(tmp_path):
    import urllib.request

    port = free_port()
    process = subprocess.Popen([*GATEKEEPER, "fake-upstream", "--port", str(port)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        wait_for_output(process, "fake upstream on")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10) as response:
            assert b"gpt-image-1.5" in response.read()
            assert response.headers["x-request-id"].startswith("req_")
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_version_and_help_list_the_core_commands(capsys):
    from gatekeeper.cli import build_parser

    help_text = build_parser().format_help()
    for command in ("serve", "check-config", "plugins", "fake-upstream"):
        assert command in help_text


def test_python_dash_m_gatekeeper_works():
    result = subprocess.run([*GATEKEEPER, "--version"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and result.stdout.startswith("gatekeeper ")
