"""Vendor the KubeRay CRD schemas that tests/test_k8s.py validates deploy/k8s against.

    python tests/k8s_schemas/vendor.py --git-dir /path/to/kuberay/.git --ref v1.7.0

Reads ``helm-chart/kuberay-operator/crds/ray.io_<plural>.yaml`` at REF and writes, for each kind, the
``openAPIV3Schema`` of its storage version (``ray.io/v1``) as ``<kind>.v1.json`` beside this file. Record REF and its
commit in README.md here.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
CRDS = {"RayJob": "rayjobs", "RayService": "rayservices"}


def storage_schema(crd: dict) -> tuple[str, dict]:
    """The storage version of a CustomResourceDefinition and its OpenAPI v3 schema."""
    (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
    assert version["served"], version["name"]
    return version["name"], version["schema"]["openAPIV3Schema"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--git-dir", required=True, help="a KubeRay clone's git directory")
    parser.add_argument("--ref", required=True, help="a KubeRay release tag, e.g. v1.7.0")
    args = parser.parse_args()
    for kind, plural in CRDS.items():
        path = f"{args.ref}:helm-chart/kuberay-operator/crds/ray.io_{plural}.yaml"
        text = subprocess.run(["git", f"--git-dir={args.git_dir}", "show", path], check=True, capture_output=True)
        name, schema = storage_schema(yaml.safe_load(text.stdout))
        (HERE / f"{kind}.{name}.json").write_text(json.dumps(schema, sort_keys=True, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main()
