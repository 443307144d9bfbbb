"""Where a result came from: the lumbar_ray version, the git commit it ran from, the versions of its libraries.

Recorded on every MLflow run and in every registered model's contract.
"""

from __future__ import annotations

import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

LIBRARIES = ("torch", "timm", "mlflow", "ray", "ultralytics", "numpy", "pydicom")
"""The libraries whose versions change what a run learns or how it reads data."""


def package_version(name: str = "lumbar_ray") -> str:
    """The installed version of ``name``, or ``unknown`` (e.g. a source tree that is not installed)."""
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def library_versions(names: tuple[str, ...] = LIBRARIES) -> dict[str, str]:
    """``{name: version}`` of lumbar_ray and the given libraries (read from package metadata, nothing imported)."""
    return {"lumbar_ray": package_version()} | {name: package_version(name) for name in names}


def git_commit() -> str | None:
    """The commit of the checkout lumbar_ray runs from, or None (not a checkout, no git, a slow filesystem)."""
    try:
        completed = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = completed.stdout.strip()
    return commit if completed.returncode == 0 and commit else None
