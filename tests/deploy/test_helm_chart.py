"""The Helm chart in deploy/helm/pdserve, rendered by the real Helm engine (helm-python-sdk).

For each values file in the chart's ci/ folder: Helm lints it clean (strict), renders it,
every built-in kind validates strictly with kubernetes-validate for a current Kubernetes,
custom kinds validate strictly against their CRDs' schemas (deploy/helm/crd-schemas, each
file says where it comes from), and the router's command line parses with pdserve's own
parser and agrees with the worker groups. The values schema rejects bad values; every metric the
dashboard and alert rules name exists in a live registry of the router's metrics; the preStop
drain hook, taken from the rendered manifest, runs against a live metrics endpoint.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import promql_parser
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from router.cluster import parse_resources
from router.metrics import RouterMetrics
from tests.deploy.chart import CHART, render
from tests.deploy.commands import parse_pdserve, pdserve_argvs
from tests.deploy.conftest import REPO

CRD_SCHEMAS = REPO / "deploy" / "helm" / "crd-schemas"
VALUES_FILES = sorted((CHART / "ci").glob("*-values.yaml"))
KUBERNETES_VERSION = kubernetes_validate.latest_version()
CUSTOM_KINDS = {"RayCluster", "ServiceMonitor", "PrometheusRule"}


def _values(path: Path | None) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) if path else {}


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


@pytest.fixture(scope="module", params=VALUES_FILES, ids=lambda p: p.stem)
def rendered(request: pytest.FixtureRequest) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    values = _values(request.param)
    return values, render(values)


def test_the_three_deployments_are_covered() -> None:
    assert [p.name for p in VALUES_FILES] == [
        "cpu-smoke-values.yaml", "gpu-2p4d-monitoring-values.yaml", "pvc-model-values.yaml",
    ]  # fmt: skip


@pytest.mark.parametrize("path", [None, *VALUES_FILES], ids=lambda p: p.stem if p else "defaults")
def test_helm_lints_clean(path: Path | None) -> None:
    report = helm.lint(CHART, _values(path), strict=True, kube_version=f"v{KUBERNETES_VERSION}")
    assert report["errors"] == []
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # 2 warning, 3 error
    assert problems == []


def test_built_in_kinds_validate_strictly(rendered: tuple[dict, list[dict]]) -> None:
    _, docs = rendered
    built_in = [d for d in docs if d["kind"] not in CUSTOM_KINDS]
    assert {d["kind"] for d in built_in} >= {"Service", "PodDisruptionBudget"}
    for doc in built_in:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def _strict(schema: Any) -> Any:
    """A CRD schema as the API server's strict field validation reads it: no unknown keys."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    return [_strict(s) for s in schema] if isinstance(schema, list) else schema


# Custom kinds: their CRD's schema (deploy/helm/crd-schemas, each file says its source).
CRD_VALIDATORS = {
    kind: jsonschema.Draft7Validator(
        _strict(json.loads((CRD_SCHEMAS / f"{kind.lower()}-v1.schema.json").read_text()))
    )
    for kind in CUSTOM_KINDS
}
KUBERAY_VALIDATOR = CRD_VALIDATORS["RayCluster"]


def test_custom_kinds_validate_against_their_crds(rendered: tuple[dict, list[dict]]) -> None:
    """RayCluster: KubeRay v1.7.0's v1 API; ServiceMonitor, PrometheusRule: prometheus-operator
    v0.93.0's monitoring.coreos.com/v1."""
    values, docs = rendered
    custom = [d for d in docs if d["kind"] in CUSTOM_KINDS]
    monitoring = values.get("monitoring", {})
    expected = {"RayCluster"} | {
        kind
        for kind, key in (
            ("ServiceMonitor", "serviceMonitor"),
            ("PrometheusRule", "prometheusRule"),
        )
        if monitoring.get(key, {}).get("enabled")
    }
    assert {d["kind"] for d in custom} == expected
    for doc in custom:
        validator = CRD_VALIDATORS[doc["kind"]]
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]
        assert errors == [], doc["kind"]


def test_the_kuberay_check_catches_a_misspelt_field(rendered: tuple[dict, list[dict]]) -> None:
    cluster = copy.deepcopy(_one(rendered[1], "RayCluster"))
    cluster["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    with pytest.raises(jsonschema.ValidationError, match="maxReplica"):
        KUBERAY_VALIDATOR.validate(cluster)


def _router_args(docs: list[dict[str, Any]]) -> Any:
    head = _one(docs, "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]
    (container,) = head["containers"]
    (argv,) = [a for arg in container["args"] for a in pdserve_argvs(arg)]
    return parse_pdserve(argv)


def test_router_command_parses_and_matches_the_worker_groups(
    rendered: tuple[dict, list[dict]],
) -> None:
    values, docs = rendered
    args = _router_args(docs)
    assert args.command == "serve" and args.address == "auto" and args.host == "0.0.0.0"
    groups = {g["groupName"]: g for g in _one(docs, "RayCluster")["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"prefill", "decode"}
    for role, count, selected in (
        ("prefill", args.num_prefill, parse_resources(args.prefill_resources)),
        ("decode", args.num_decode, parse_resources(args.decode_resources)),
    ):
        group = groups[role]
        offered = {k: float(v) for k, v in group["resources"].items()}
        # The group offers what the router's actors ask for, exactly enough for all of them.
        assert set(selected) == set(offered), (role, selected, offered)
        for name, amount in selected.items():
            assert count * amount == group["replicas"] * offered[name], (role, count)
        (container,) = group["template"]["spec"]["containers"]
        gpus = int(container["resources"]["limits"].get("nvidia.com/gpu", 0))
        assert gpus == values["roles"][role]["gpu"]["count"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        if gpus:
            assert args.device == "cuda"
            accelerator = getattr(args, f"{role}_accelerator_type")
            assert accelerator == values["roles"][role]["gpu"]["acceleratorType"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    if all(values["roles"][r]["gpu"]["count"] == 0 for r in groups):
        assert args.device == "cpu" and args.num_gpus_per_worker == 0


def test_model_sources(rendered: tuple[dict, list[dict]]) -> None:
    values, docs = rendered
    args = _router_args(docs)
    cluster = _one(docs, "RayCluster")["spec"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in cluster["workerGroupSpecs"]
    ]
    source = values["model"]["source"]
    for pod in pods:
        volumes = {v["name"]: v for v in pod["volumes"]}
        if source == "builtin":
            assert args.model == "pdserve-tiny" and "models" not in volumes
        elif source == "pvc":
            pvc = values["model"]["pvc"]
            assert args.model == f"/models/{pvc['path']}"
            claim = volumes["models"]["persistentVolumeClaim"]
            assert claim == {"claimName": pvc["claimName"], "readOnly": True}
        else:
            hf = values["model"]["huggingface"]
            assert args.model == f"/models/{hf['repo']}"
            (init,) = pod["initContainers"]
            assert init["command"][:3] == ["hf", "download", hf["repo"]]
            assert init["command"][init["command"].index("--local-dir") + 1] == args.model
            offline, token = init["env"]
            assert offline == {"name": "HF_HUB_OFFLINE", "value": "0"}
            assert token["valueFrom"]["secretKeyRef"] == hf["tokenSecret"]


def test_router_service_probes_and_disruption_budget(rendered: tuple[dict, list[dict]]) -> None:
    _, docs = rendered
    head = _one(docs, "RayCluster")["spec"]["headGroupSpec"]["template"]
    (container,) = head["spec"]["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}
    service, budget = _one(docs, "Service"), _one(docs, "PodDisruptionBudget")
    selector = {
        "ray.io/cluster": _one(docs, "RayCluster")["metadata"]["name"],
        "ray.io/node-type": "head",
    }
    assert service["spec"]["selector"] == selector
    assert budget["spec"]["selector"]["matchLabels"] == selector
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert "preStop" in container["lifecycle"]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"roles": {"prefill": {"replicas": -1}}}, "minimum"),
        ({"roles": {"prefil": {"replicas": 1}}}, "additional properties 'prefil'"),
        ({"roles": {"decode": {"gpu": {"count": -2}}}}, "minimum"),
        ({"engine": {"device": "tpu"}}, "device"),
        ({"model": {"source": "s3"}}, "source"),
    ],
)
def test_values_schema_rejects_bad_values(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmValuesError, match=re.escape(message)):
        render(values)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"roles": {"prefill": {"replicas": 5}}}, "minReplicas <= replicas <= maxReplicas"),
        ({"model": {"source": "pvc"}}, "model.pvc.path is required"),
        ({"model": {"source": "huggingface"}}, "model.huggingface.repo is required"),
    ],
)
def test_templates_reject_inconsistent_values(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        render(values)


# -- metrics ---------------------------------------------------------------------------------


def _live_metric_samples() -> dict[str, set[str]]:
    """Sample name -> its ``le`` labels, from a RouterMetrics registry the way /metrics renders
    it, after one observation through each of its writers (so labelled series exist)."""
    metrics = RouterMetrics()
    metrics.observe_sequence_finished("stop", 10, 4, 5, 0.3)
    metrics.observe_request("chat", 200)
    for role in ("prefill", "decode"):
        metrics.observe_worker(role, f"{role}-0", 1, 2, 3, 4)
    metrics.observe_kv_transfer(1 << 20, 0.01)
    metrics.observe_prefill_decision("remote", "long_prompt")
    metrics.time_to_first_token.observe(0.1)
    metrics.inter_token_latency.observe(0.01)
    body, _ = metrics.render()
    samples: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, set()).update(
                [sample.labels["le"]] if "le" in sample.labels else []
            )
    return samples


def _expressions(docs: list[dict[str, Any]]) -> list[str]:
    """The PromQL of every alert rule and dashboard query (Grafana's variables filled in)."""
    rules = _one(docs, "PrometheusRule")
    exprs = [r["expr"] for g in rules["spec"]["groups"] for r in g["rules"]]
    dashboard = json.loads(_one(docs, "ConfigMap")["data"]["pdserve.json"])
    exprs += [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":  # label_values(SELECTOR, LABEL): Grafana's, not PromQL
            match = re.fullmatch(r"label_values\((.+), *[a-z_]+\)", variable["query"])
            assert match, variable["query"]
            exprs.append(match.group(1))
    return [e.replace("$__rate_interval", "5m") for e in exprs]


def _selectors(expr: str) -> list[tuple[str, dict[str, str]]]:
    """(metric name, equality matchers) of every vector selector, from Prometheus's grammar."""
    found = []

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            matchers = {m.name: m.value for m in node.matchers.matchers}
            found.append((node.name, matchers))
        return True

    promql_parser.walk(promql_parser.parse(expr), visit)  # ValueError if it does not parse
    return found


def test_every_metric_in_dashboard_and_alerts_exists_in_pdserve_metrics() -> None:
    values = _values(CHART / "ci" / "gpu-2p4d-monitoring-values.yaml")
    docs = render(values)
    samples = _live_metric_samples()
    exprs = _expressions(docs)
    assert len(exprs) > 10
    selectors = [s for e in exprs for s in _selectors(e)]
    used = {name for name, _ in selectors}
    assert used - set(samples) == set()
    # Every dashboard panel the issue names is there.
    for needed in (
        "pdserve_time_to_first_token_seconds_bucket", "pdserve_inter_token_latency_seconds_bucket",
        "pdserve_e2e_request_latency_seconds_bucket", "pdserve_worker_num_waiting_requests",
        "pdserve_worker_kv_blocks_used", "pdserve_kv_transfer_bytes_sum",
        "pdserve_kv_transfer_seconds_bucket", "pdserve_prefix_cache_hit_tokens_total",
        "pdserve_prefill_decisions_total",
    ):  # fmt: skip
        assert needed in used
    # SLO objectives are bucket bounds the histograms really have; roles are pdserve's.
    for name, matchers in selectors:
        if "le" in matchers:
            assert matchers["le"] in samples[name], (name, matchers["le"])
        assert matchers.get("role", "prefill") in ("prefill", "decode")
    # Alert thresholds are the values' (budget: 1 - the SLO target).
    rules = {r["alert"]: r["expr"] for g in _one(docs, "PrometheusRule")["spec"]["groups"]
             for r in g["rules"]}  # fmt: skip
    assert rules["PdservePrefillQueueHigh"].endswith("> 100")
    assert rules["PdserveDecodeQueueHigh"].endswith("> 500")
    assert rules["PdserveKVTransferSlow"].endswith("> 0.05")
    assert rules["PdserveTTFTSLOBurn1h"].count("> 14.4 * (1 - 0.99)") == 2


def test_the_metric_check_catches_an_unknown_name() -> None:
    samples = _live_metric_samples()
    assert "pdserve_requests_total" in samples
    assert "pdserve_requests_in_flight" in samples
    assert "pdserve_time_to_first_token_seconds" not in samples  # only _bucket/_sum/_count


# -- preStop drain -------------------------------------------------------------------------


class _Metrics(BaseHTTPRequestHandler):
    metrics = RouterMetrics()

    def do_GET(self) -> None:
        body, content_type = self.metrics.render()
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def metrics_server() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Metrics)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    thread.join(timeout=5)


def test_prestop_hook_waits_for_requests_in_flight(metrics_server: ThreadingHTTPServer) -> None:
    values = {"router": {"drain": {"endpointDelaySeconds": 0, "drainTimeoutSeconds": 20}}}
    head = _one(render(values), "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]
    command = head["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:2] == ["python", "-c"] and command[3:] == ["8000", "0", "20"]
    port = str(metrics_server.server_address[1])
    _Metrics.metrics.requests_in_flight.set(2)
    start = time.monotonic()
    hook = subprocess.Popen([sys.executable, "-c", command[2], port, "0", "20"])
    time.sleep(2.0)
    assert hook.poll() is None, "the hook returned while requests were in flight"
    _Metrics.metrics.requests_in_flight.set(0)
    assert hook.wait(timeout=10) == 0
    assert 2.0 <= time.monotonic() - start < 10
