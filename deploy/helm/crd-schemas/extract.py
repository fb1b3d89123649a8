"""Write one version's ``openAPIV3Schema`` of a CustomResourceDefinition as JSON.

    python deploy/helm/crd-schemas/extract.py CRD.yaml VERSION OUT.json "SOURCE"

Descriptions are dropped (nothing else changes); SOURCE (repository, tag, commit, path) is
kept in ``$comment``. The chart's tests validate rendered objects against these files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml


def strip_descriptions(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {k: strip_descriptions(v) for k, v in schema.items() if k != "description"}
    if isinstance(schema, list):
        return [strip_descriptions(v) for v in schema]
    return schema


def main(crd_path: str, version: str, out_path: str, source: str) -> None:
    crd = yaml.safe_load(Path(crd_path).read_text())
    (spec,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = strip_descriptions(spec["schema"]["openAPIV3Schema"])
    out = {"$comment": f"{crd['spec']['names']['kind']} {version}: {source}", **schema}
    Path(out_path).write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
