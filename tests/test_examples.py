"""examples/plain_loop.py, the block-wise loop written with the ops alone, runs and learns."""

import os
import re
import subprocess
import sys
from pathlib import Path

from test_cli import PACKAGE_PATHS

PLAIN_LOOP = Path(__file__).resolve().parents[1] / "examples" / "plain_loop.py"
RESULT = re.compile(r"^test accuracy \(block-wise, B=(\d+)\): (\S+)$", re.MULTILINE)


def run_plain_loop(*args) -> tuple[int, float]:
    """(B, accuracy) from a fresh process that imports the same packages as this one, run
    outside the checkout so that the source tree cannot shadow an install."""
    env = dict(os.environ)
    extra = [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []
    env["PYTHONPATH"] = os.pathsep.join(PACKAGE_PATHS + extra)
    done = subprocess.run([sys.executable, str(PLAIN_LOOP), *args], env=env, cwd=Path(os.sep),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    found = RESULT.findall(done.stdout)
    assert len(found) == 1, done.stdout
    return int(found[0][0]), float(found[0][1])


def test_plain_loop_runs_and_reports_an_accuracy():
    blocks, accuracy = run_plain_loop("--steps", "60", "--blocks", "2", "--seed", "1")
    assert blocks == 2
    assert 0.0 <= accuracy <= 1.0
    # 60 steps already give about 0.65 (0.61-0.67 over seeds 0-4; chance is 0.1). The default
    # 1500 steps (about 0.97) take 17 s on 2 idle cores, up to 35 s on busy ones: not run here.
    assert accuracy > 0.3
