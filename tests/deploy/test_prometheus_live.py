"""A real Prometheus scraping a real qlorad on loopback, with deploy/'s scrape config and alert rules.

The daemon (SmolLM2, CPU) has served chat through the base and an adapter and run a tiny fine-tuning
job, so every series exists. Then: every metric the dashboard and the alerts query is exported (and
used as its type allows), Prometheus scrapes it (`up{job="qlorad"} == 1`), the Kubernetes job's
relabeling turns pod metadata into the right target, every dashboard query runs, every alert rule
evaluates cleanly and none fires on a healthy daemon. Everything stops by itself (bounded waits).
"""
import json
import re
import shutil
import subprocess
import tempfile
import urllib.parse

import pytest
import yaml

from conftest import (DEPLOY, EXTERNAL, alert_rules, dashboard_exprs, exposition, free_port,
                      grafana_to_promql, http, load_yaml, metric_names, stop, tool, wait_for)

POD = "qlorad-7d9f-abcde"


def scrape_config(qlorad_port, tmp):
    """deploy/prometheus/prometheus.yml pointed at the loopback daemon (1 s intervals), plus the
    Kubernetes job of deploy/k8s/prometheus-scrape.yml fed the metadata labels that service
    discovery would give a pod of deploy/k8s/deployment.yaml (its address with a wrong port)."""
    cfg = load_yaml(DEPLOY / "prometheus/prometheus.yml")[0]
    cfg["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    cfg["rule_files"] = [str(DEPLOY / "prometheus" / f) for f in cfg["rule_files"]]
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    jobs["qlorad"]["static_configs"] = [{"targets": [f"127.0.0.1:{qlorad_port}"]}]
    k8s = load_yaml(DEPLOY / "k8s/prometheus-scrape.yml")[0]["scrape_configs"][0]
    assert k8s["job_name"] == "qlorad"
    pod = load_yaml(DEPLOY / "k8s/deployment.yaml")[0]["spec"]["template"]
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "8000"
    meta = {
        "__meta_kubernetes_pod_label_app_kubernetes_io_name": pod["metadata"]["labels"]["app.kubernetes.io/name"],
        "__meta_kubernetes_pod_annotation_prometheus_io_scrape": annotations["prometheus.io/scrape"],
        "__meta_kubernetes_pod_annotation_prometheus_io_path": annotations["prometheus.io/path"],
        # The loopback daemon's port stands in for the container port 8000.
        "__meta_kubernetes_pod_annotation_prometheus_io_port": str(qlorad_port),
        "__meta_kubernetes_pod_name": POD,
        "__meta_kubernetes_namespace": "qlorad",
    }
    del k8s["kubernetes_sd_configs"]
    k8s["job_name"] = "qlorad-k8s"
    k8s["static_configs"] = [{"targets": ["127.0.0.1:1"], "labels": meta}]
    # A decoy pod without the scrape annotation must be dropped by the relabeling.
    decoy = dict(meta, __meta_kubernetes_pod_annotation_prometheus_io_scrape="false",
                 __meta_kubernetes_pod_name="decoy")
    k8s["static_configs"].append({"targets": ["127.0.0.1:2"], "labels": decoy})
    cfg["scrape_configs"] = [jobs["qlorad"], k8s]
    path = f"{tmp}/prometheus.yml"
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


@pytest.fixture(scope="module")
def prom(qlorad):
    tmp = tempfile.mkdtemp(prefix="qlorad-deploy-prom-")
    config = scrape_config(qlorad["port"], tmp)
    check = subprocess.run([tool("promtool"), "check", "config", config], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    port = free_port()
    log = open(f"{tmp}/prometheus.log", "wb")
    proc = subprocess.Popen(
        [tool("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={tmp}/data",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        def api_up():
            assert proc.poll() is None, "prometheus exited: " + open(log.name).read()
            return http("GET", base + "/-/ready", timeout=2)[0] == 200
        wait_for("Prometheus ready", api_up, 60)
        yield base
    finally:
        stop(proc)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def query(prom, expr):
    status, body = http("GET", prom + "/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    out = json.loads(body)
    assert status == 200 and out["status"] == "success", (expr, out)
    return out["data"]["result"]


def test_every_queried_metric_is_exported(qlorad):
    """Names in the dashboard and the alerts are sample names of /metrics: a histogram is queried
    through _bucket/_sum/_count, never by its bare family name; rate() and increase() take counters
    or histogram parts; histogram_quantile() takes _bucket series."""
    names, types = exposition(qlorad["base"])
    kind = {}
    for n in names:
        fam = n if n in types else re.sub(r"_(bucket|sum|count)$", "", n)
        kind[n] = types.get(fam)
    exprs = dashboard_exprs() + [r["expr"] for r in alert_rules()]
    used = set().union(*(metric_names(e) for e in exprs))
    assert len(used) >= 25, used
    missing = sorted(used - names - EXTERNAL)
    assert not missing, f"queried but not exported by qlorad: {missing}"
    for e in exprs:
        for fn, m in re.findall(r"\b(rate|irate|increase)\(\s*([A-Za-z_:][A-Za-z0-9_:]*)", e):
            if m in EXTERNAL:
                continue
            ok = kind.get(m) == "counter" or (kind.get(m) == "histogram" and m != re.sub(
                r"_(bucket|sum|count)$", "", m))
            # qlorad_fine_tuning_jobs{status="failed"} only grows (alerts.yml says why).
            ok = ok or (m == "qlorad_fine_tuning_jobs" and 'status="failed"' in e)
            assert ok, f"{fn}() of {m} ({kind.get(m)}) in: {e}"
        for m in re.findall(r"histogram_quantile\([^,]+,.*?\b(qlorad_[a-z0-9_]+)", e):
            assert m.endswith("_bucket") and kind[m] == "histogram", e


def test_dashboard_shows_every_exported_metric(qlorad):
    """A metric added to qlorad without a panel fails here: add it to make_dashboard.py."""
    names, types = exposition(qlorad["base"])
    shown = set().union(*(metric_names(e) for e in dashboard_exprs()))
    shown_families = {re.sub(r"_(bucket|sum|count)$", "", n) if n not in types else n for n in shown}
    exported = {f for f in types if f.startswith("qlorad_")}
    assert exported - shown_families == set()


def test_prometheus_scrapes_qlorad(prom):
    wait_for('up{job="qlorad"} == 1', lambda: query(prom, 'up{job="qlorad"} == 1'), 60)
    series = wait_for("qlorad_* series", lambda: query(prom, 'count({__name__=~"qlorad_.+"})'), 30)
    assert int(series[0]["value"][1]) > 50
    weights = query(prom, 'qlorad_model_weight_bytes{job="qlorad"}')
    assert float(weights[0]["value"][1]) > 0


def test_kubernetes_relabeling_finds_the_annotated_pod(prom):
    up = wait_for("the k8s job's target", lambda: query(prom, 'up{job="qlorad-k8s"} == 1'), 60)
    assert [r["metric"]["instance"] for r in up] == [POD]
    assert up[0]["metric"]["namespace"] == "qlorad"
    status, body = http("GET", prom + "/api/v1/targets")
    targets = json.loads(body)["data"]["activeTargets"]
    assert all(t["labels"].get("instance") != "decoy" for t in targets)


def test_every_queried_series_is_in_prometheus(prom):
    wait_for('up{job="qlorad"} == 1', lambda: query(prom, 'up{job="qlorad"} == 1'), 60)
    exprs = dashboard_exprs() + [r["expr"] for r in alert_rules()]
    for name in sorted(set().union(*(metric_names(e) for e in exprs)) - EXTERNAL):
        assert query(prom, f'count({{__name__="{name}", job="qlorad"}})'), name


def test_every_dashboard_query_runs(prom):
    wait_for('up{job="qlorad"} == 1', lambda: query(prom, 'up{job="qlorad"} == 1'), 60)
    for expr in dashboard_exprs():
        if expr.startswith("label_values("):
            # Grafana's own function: the series it reads must exist.
            metric, label = re.match(r"label_values\((\w+),\s*(\w+)\)", expr).groups()
            assert {r["metric"].get(label) for r in query(prom, metric)} - {None}, expr
        else:
            query(prom, grafana_to_promql(expr))
    # Values, not just syntax: the traffic shows up in the serving panels' base series.
    assert float(query(prom, "qlorad_tokens_generated_total")[0]["value"][1]) > 0
    assert float(query(prom, "qlorad_fine_tuning_steps_total")[0]["value"][1]) >= 2


def test_alert_rules_evaluate_and_stay_quiet(prom):
    wait_for('up{job="qlorad"} == 1', lambda: query(prom, 'up{job="qlorad"} == 1'), 60)

    seen = []

    def settled():
        # Before the first scrape absent(up) is briefly pending: wait for a later evaluation.
        groups = json.loads(http("GET", prom + "/api/v1/rules")[1])["data"]["groups"]
        seen[:] = [r for g in groups for r in g["rules"]]
        return seen and all(not r["lastEvaluation"].startswith("0001") and r["state"] == "inactive"
                            for r in seen)

    wait_for("every rule evaluated and inactive", settled, 30, required=False)
    assert {r["name"] for r in seen} == {r["alert"] for r in alert_rules()}
    for r in seen:
        assert r["health"] == "ok", r
        assert not r["lastEvaluation"].startswith("0001"), r
        assert r["state"] == "inactive", (r["name"], r["state"], r.get("alerts"))
