"""`kd-mlflow` ends its process with os._exit once a command is done (kd_mlflow.cli.program):
what a normal exit does must still happen, in a real subprocess."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO

SCRIPT = """
import atexit, sys, threading, time
from pathlib import Path
from kd_mlflow.cli import program
out = Path(sys.argv.pop(1))
atexit.register(lambda: (out / "atexit").write_text("ran"))
def late():
    time.sleep(0.5)
    (out / "thread").write_text("finished")
threading.Thread(target=late).start()  # non-daemon: exit waits for it, as Python's does
from concurrent.futures import ThreadPoolExecutor
pool = ThreadPoolExecutor(1)  # never shut down: its idle worker thread is stopped by threading's exit hook
pool.submit(lambda: (out / "pool").write_text("ran")).result()
sys.stdout.write("x" * 200_000)  # unflushed when the command returns
sys.argv[0] = "kd-mlflow"
program()
"""


def _program(tmp_path, *args):
    # a hang here (an idle pool thread joined before threading's exit hook stops it) fails at the timeout
    return subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_exit_code_output_threads_and_atexit_handlers_survive_the_fast_exit(tmp_path):
    proc = _program(tmp_path, "modes")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("x" * 200_000)
    assert "teacher" in proc.stdout.splitlines()[-1]  # the command's last line, flushed
    assert (tmp_path / "atexit").read_text() == "ran"
    assert (tmp_path / "thread").read_text() == "finished"
    assert (tmp_path / "pool").read_text() == "ran"


def test_a_refused_command_keeps_its_exit_code_and_its_one_line(tmp_path):
    proc = _program(tmp_path, "train", "kd", "--epochs", "0")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: epochs must be >= 1")
    assert (tmp_path / "atexit").read_text() == "ran"
    proc = _program(tmp_path, "no-such-command")
    assert proc.returncode == 2 and "No such command" in proc.stderr
