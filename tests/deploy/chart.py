"""The chart under test, rendered offline by Helm's own engine (helm-python-sdk, Helm v4)."""

from __future__ import annotations

from typing import Any

import helm_python as helm
import yaml

from tests.deploy.conftest import REPO

CHART = REPO / "deploy" / "helm" / "pdserve"


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    """Every object the chart renders with ``values``."""
    manifests = helm.Chart.load(CHART).render(values, name="pd", namespace="llm", is_install=True)
    docs = [
        doc
        for name, text in manifests.items()
        if not name.endswith("NOTES.txt")
        for doc in yaml.safe_load_all(text)
        if doc
    ]
    assert docs, "nothing rendered"
    return docs
