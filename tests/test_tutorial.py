"""docs/TUTORIAL.md runs as written: its files are written, its Python blocks run in one
namespace, its shell lines run as commands (a line ending in ``&`` starts a server that the
test waits for and stops at the end), all in a fresh directory."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from splitexit.serve.runner import wait_until_healthy

DOC = Path(__file__).resolve().parents[1] / "docs" / "TUTORIAL.md"
BIN = Path(sys.executable).parent
BLOCK = re.compile(r"```(\w+)([^\n]*)\n(.*?)```", re.S)


def _blocks():
    for lang, info, body in BLOCK.findall(DOC.read_text()):
        yield lang, info.strip(), body


@pytest.mark.slow
def test_tutorial_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    namespace: dict = {"__name__": "tutorial"}
    servers: list[subprocess.Popen] = []
    try:
        for lang, info, body in _blocks():
            if lang == "python" and info.startswith("file="):
                (tmp_path / info.split("=", 1)[1]).write_text(body)
            elif lang == "python":
                exec(compile(body, str(DOC), "exec"), namespace)  # noqa: S102 - our own doc
            elif lang == "bash":
                for line in body.splitlines():
                    line = line.split(" #")[0].strip()
                    if not line or line.startswith("#"):
                        continue
                    if line.startswith("export "):
                        key, _, value = line[len("export "):].partition("=")
                        env[key] = value
                        continue
                    background = line.endswith("&")
                    argv = shlex.split(line.rstrip("&").strip())
                    if background:
                        proc = subprocess.Popen(argv, cwd=tmp_path, env=env,
                                                stdout=subprocess.DEVNULL,
                                                stderr=subprocess.PIPE)
                        servers.append(proc)
                        port = argv[argv.index("--port") + 1]
                        wait_until_healthy(f"http://127.0.0.1:{port}", 60, process=proc)
                        continue
                    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True,
                                          text=True, timeout=300)
                    assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"
    finally:
        for proc in servers:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
    assert (tmp_path / "bundle-cli" / "manifest.json").is_file()
