"""What every MLproject entry point runs: the kd-mlflow CLI, from this checkout.

The repository root goes first on sys.path so `mlflow run .` works in any environment
that has the dependencies (conda.yaml / python_env.yaml), installed package or not.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kd_mlflow.cli import program  # noqa: E402

if __name__ == "__main__":
    program()
