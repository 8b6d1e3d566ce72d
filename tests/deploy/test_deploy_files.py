"""Static checks of deploy/: what can be checked without Docker, Kubernetes or systemd running.

promtool (config, rules, rule unit tests), hadolint, systemd-analyze, the manifests' structure, the
dashboard, and every QLORAD_* setting the files make being one `qlorad serve` reads with a value it
accepts.
"""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import DEPLOY, ROOT, dashboard, load_yaml, qlorad_bin, tool

MANIFESTS = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml"))


def run(*cmd, cwd=None):
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))}\n{r.stdout}\n{r.stderr}"
    return r.stdout + r.stderr


def test_every_yaml_file_parses():
    assert len(MANIFESTS) >= 14, MANIFESTS
    for p in MANIFESTS:
        assert load_yaml(p), p


# --- Prometheus ---

def test_promtool_check_config():
    out = run(tool("promtool"), "check", "config", "prometheus/prometheus.yml", cwd=DEPLOY)
    assert "SUCCESS" in out and "1 rule files found" in out


def test_promtool_check_kubernetes_scrape_config(tmp_path):
    """Debian's Prometheus is built without Kubernetes discovery, so promtool checks the job with its
    discovery block swapped for a static target (relabeling, regexes, rule file path);
    test_prometheus_live runs the same relabeling on pod metadata."""
    cfg = load_yaml(DEPLOY / "k8s/prometheus-scrape.yml")[0]
    for job in cfg["scrape_configs"]:
        assert job.pop("kubernetes_sd_configs")[0]["role"] == "pod"
        job["static_configs"] = [{"targets": ["127.0.0.1:8000"]}]
    cfg["rule_files"] = [str((DEPLOY / "k8s" / f).resolve()) for f in cfg["rule_files"]]
    (tmp_path / "p.yml").write_text(yaml.safe_dump(cfg))
    assert "SUCCESS" in run(tool("promtool"), "check", "config", str(tmp_path / "p.yml"))


def test_promtool_check_rules():
    out = run(tool("promtool"), "check", "rules", "prometheus/alerts.yml", cwd=DEPLOY)
    assert "SUCCESS: 10 rules found" in out


def test_promtool_alert_unit_tests():
    """deploy/prometheus/alerts_test.yml: each alert fires on its failure, none on a healthy daemon."""
    out = run(tool("promtool"), "test", "rules", "prometheus/alerts_test.yml", cwd=DEPLOY)
    assert "SUCCESS" in out
    tested = set(re.findall(r"alertname: (\w+)", (DEPLOY / "prometheus/alerts_test.yml").read_text()))
    rules = load_yaml(DEPLOY / "prometheus/alerts.yml")[0]["groups"]
    assert tested == {r["alert"] for g in rules for r in g["rules"]}
    for g in rules:
        for r in g["rules"]:
            assert r["labels"]["severity"] in ("critical", "warning"), r["alert"]
            assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]


# --- Grafana ---

def test_dashboard_is_the_generator_output():
    sys.path.insert(0, str(DEPLOY / "grafana"))
    try:
        import make_dashboard
    finally:
        sys.path.pop(0)
    assert (DEPLOY / "grafana/dashboards/qlorad.json").read_text() == make_dashboard.render(), \
        "run python3 deploy/grafana/make_dashboard.py and commit its output"


def test_dashboard_structure():
    d = dashboard()
    assert d["uid"] == "qlorad" and d["schemaVersion"] >= 36
    panels = d["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    rows = [p["title"] for p in panels if p["type"] == "row"]
    assert rows == ["Serving", "Adapters", "Fine-tuning jobs and exports", "Memory"]
    cells = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24 and g["w"] > 0 and g["h"] > 0, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps another panel"
                cells.add((x, y))
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"] and p["description"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)) and all(t["expr"] for t in p["targets"])
        assert p["fieldConfig"]["defaults"]["unit"], p["title"]
    titles = " ".join(p["title"].lower() for p in panels)
    for needed in ["requests by route", "tokens per second", "time to first token",
                   "inter-token", "queue", "batch size", "adapter cache", "adapter bytes",
                   "requests per adapter", "jobs by status", "job queue", "steps", "loss",
                   "learning rate", "step time", "resident memory", "model weights", "job memory"]:
        assert needed in titles, needed


def test_grafana_provisioning_matches_the_dashboard_and_compose():
    ds = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")[0]["datasources"][0]
    var = next(v for v in dashboard()["templating"]["list"] if v["name"] == "datasource")
    assert ds["type"] == "prometheus" and ds["uid"] == var["current"]["value"]
    assert ds["url"] == "http://prometheus:9090"
    scrape = load_yaml(DEPLOY / "prometheus/prometheus.yml")[0]["global"]["scrape_interval"]
    assert ds["jsonData"]["timeInterval"] == scrape
    provider = load_yaml(DEPLOY / "grafana/provisioning/dashboards/qlorad.yml")[0]["providers"][0]
    grafana = load_yaml(DEPLOY / "compose.yaml")[0]["services"]["grafana"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in grafana["volumes"]
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]


# --- compose ---

def test_compose_file():
    c = load_yaml(DEPLOY / "compose.yaml")[0]
    s = c["services"]
    assert set(s) == {"qlorad", "prometheus", "grafana"}
    q = s["qlorad"]
    assert (ROOT / q["build"]["dockerfile"]).is_file() and q["build"]["context"] == ".."
    assert q["environment"]["QLORAD_API_KEYS_FILE"] == "/run/secrets/qlorad_api_keys"
    assert set(q["secrets"]) <= set(c["secrets"])
    named = {v.split(":")[0] for svc in s.values() for v in svc.get("volumes", [])
             if not v.startswith((".", "$"))}
    assert named == set(c["volumes"])
    # Bind mounts of the repository's files point at files that exist.
    for svc in s.values():
        for v in svc.get("volumes", []):
            if v.startswith("./"):
                assert (DEPLOY / v.split(":")[0]).exists(), v
    mounted = [v.split(":")[1] for v in s["prometheus"]["volumes"] if v.startswith("./")]
    rules = load_yaml(DEPLOY / "prometheus/prometheus.yml")[0]["rule_files"]
    assert all(f"/etc/prometheus/{r}" in mounted for r in rules)
    # Published ports stay on loopback.
    for svc in s.values():
        assert all(p.startswith("127.0.0.1:") for p in svc.get("ports", [])), svc
    gpu = load_yaml(DEPLOY / "compose.gpu.yaml")[0]["services"]
    assert (ROOT / gpu["qlorad"]["build"]["dockerfile"]).is_file()
    assert gpu["qlorad"]["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"


# --- Dockerfiles ---

def test_hadolint():
    run(tool("hadolint"), "--config", str(DEPLOY / ".hadolint.yaml"),
        str(DEPLOY / "Dockerfile.cpu"), str(DEPLOY / "Dockerfile.cuda"))


def test_dockerfiles_build_what_exists():
    cargo = (ROOT / "daemon/Cargo.toml").read_text()
    for name in ["Dockerfile.cpu", "Dockerfile.cuda"]:
        text = (DEPLOY / name).read_text()
        for pkg in re.findall(r"-p (\S+)", text):
            assert (ROOT / {"qlorad": "daemon", "qctl": "client"}[pkg] / "Cargo.toml").is_file()
        assert "cargo build --release --locked" in text
        assert re.search(r"^USER 10001:10001$", text, re.M), name
        assert "HEALTHCHECK" in text and "/health" in text
        assert 'VOLUME ["/var/lib/qlorad"]' in text
        # The README's online backup runs `sqlite3 … .backup` inside the container.
        assert re.search(r"apt-get install .*\bsqlite3\b", text), name
    assert "--features qlorad/cuda" in (DEPLOY / "Dockerfile.cuda").read_text()
    assert re.search(r"^cuda = \[", cargo, re.M)
    assert "13.0" in (DEPLOY / "Dockerfile.cuda").read_text()


# --- router ---

def test_haproxy_check():
    """The committed router config as is (its daemons' names do not resolve here: warnings only)."""
    out = run(tool("haproxy"), "-c", "-f", str(DEPLOY / "router/haproxy.cfg"))
    assert "Configuration file is valid" in out
    assert "balance hash req.body,json_query('$.model')" in (DEPLOY / "router/haproxy.cfg").read_text()


# --- systemd ---

def test_systemd_unit(tmp_path):
    """systemd-analyze verifies the unit (ExecStart pointed at the built binary, which it checks) and
    scores its sandbox offline: it must stay "OK" (exposure at most 2.0 of 10)."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed (Debian's systemd package)")
    unit = (DEPLOY / "systemd/qlorad.service").read_text()
    assert "ExecStart=/usr/local/bin/qlorad serve" in unit
    bin_path = os.path.abspath(qlorad_bin())
    (tmp_path / "qlorad.service").write_text(unit.replace("/usr/local/bin/qlorad", bin_path))
    run("systemd-analyze", "verify", str(tmp_path / "qlorad.service"))
    out = run("systemd-analyze", "security", "--offline=true", str(tmp_path / "qlorad.service"))
    level = float(re.search(r"Overall exposure level for qlorad.service: ([0-9.]+)", out).group(1))
    assert level <= 2.0, out[-2000:]
    for key in ["DynamicUser=yes", "StateDirectory=qlorad", "ProtectSystem=strict", "NoNewPrivileges=yes",
                "PrivateTmp=yes", "RestrictAddressFamilies=", "MemoryDenyWriteExecute=yes"]:
        assert key in unit, key


# --- Kubernetes ---

def k8s():
    docs = {}
    for p in sorted((DEPLOY / "k8s").glob("*.yaml")):
        if p.name == "kustomization.yaml":
            continue
        for d in load_yaml(p):
            docs[(d["kind"], d["metadata"]["name"])] = (p.name, d)
    return docs


def test_kubernetes_manifests():
    docs = k8s()
    _, dep = docs[("Deployment", "qlorad")]
    spec = dep["spec"]["template"]["spec"]
    assert dep["spec"]["strategy"]["type"] == "Recreate" and dep["spec"]["replicas"] == 1
    (c,) = spec["containers"]
    assert c["startupProbe"]["httpGet"]["path"] == "/health"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8000}
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    ann = dep["spec"]["template"]["metadata"]["annotations"]
    assert ann == {"prometheus.io/scrape": "true", "prometheus.io/port": "8000",
                   "prometheus.io/path": "/metrics"}
    vols = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert set(mounts) == set(vols)
    for v in vols.values():
        if "persistentVolumeClaim" in v:
            assert ("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]) in docs
    assert vols["state"]["persistentVolumeClaim"]["claimName"] == "qlorad-state"
    assert vols["api-keys"]["secret"]["secretName"] == "qlorad-api-keys"
    _, cm = docs[("ConfigMap", c["envFrom"][0]["configMapRef"]["name"])]
    env = dict(cm["data"], **{e["name"]: e["value"] for e in c["env"]})
    # The state dir, the adapter root and the key file are on the mounted volumes.
    assert env["QLORAD_STATE_DIR"].startswith(mounts["state"] + "/")
    assert env["QLORAD_ADAPTER_ROOT"].startswith(mounts["state"] + "/")
    assert env["QLORAD_API_KEYS_FILE"] == mounts["api-keys"] + "/api-keys"
    assert env["QLORAD_MODEL"].startswith(mounts["models"] + "/")
    sc = spec["securityContext"]
    assert sc["runAsNonRoot"] and sc["runAsUser"] == 10001
    grace = int(cm["data"]["QLORAD_SHUTDOWN_GRACE_S"])
    assert spec["terminationGracePeriodSeconds"] > grace
    _, svc = docs[("Service", "qlorad")]
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert svc["spec"]["ports"][0]["targetPort"] == "http"
    kust = load_yaml(DEPLOY / "k8s/kustomization.yaml")[0]
    listed = {f for f in kust["resources"]}
    assert listed == {p for p, _ in docs.values()}


def test_kustomize_build():
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl not installed")
    out = run("kubectl", "kustomize", str(DEPLOY / "k8s"))
    kinds = [d["kind"] for d in yaml.safe_load_all(out)]
    assert sorted(kinds) == sorted(["Namespace", "ConfigMap", "PersistentVolumeClaim",
                                    "PersistentVolumeClaim", "Deployment", "Service"])


# --- the settings themselves ---

def settings():
    """(file, {QLORAD_*: value}) for every place deploy/ sets the daemon's environment."""
    out = []
    for name in ["Dockerfile.cpu", "Dockerfile.cuda"]:
        blocks = re.findall(r"^ENV (.*?)(?=^\S)", (DEPLOY / name).read_text(), re.M | re.S)
        out.append((name, dict(re.findall(r"(QLORAD_\w+)=(\S+)", "".join(blocks)))))
    env_file = (DEPLOY / "systemd/qlorad.env").read_text()
    out.append(("qlorad.env", dict(re.findall(r"^(QLORAD_\w+)=(.*)$", env_file, re.M))))
    for unit in ["qlorad.service", "qlorad-gpu.conf"]:
        text = (DEPLOY / "systemd" / unit).read_text()
        out.append((unit, dict(re.findall(r"^Environment=(QLORAD_\w+)=(.*)$", text, re.M))))
    compose = load_yaml(DEPLOY / "compose.yaml")[0]["services"]["qlorad"]["environment"]
    # Compose interpolation: take each ${VAR:-default}'s default.
    out.append(("compose.yaml", {k: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(v))
                                 for k, v in compose.items()}))
    out.append(("configmap.yaml", load_yaml(DEPLOY / "k8s/configmap.yaml")[0]["data"]))
    return out


def test_every_setting_is_one_qlorad_reads(tmp_path):
    """Each QLORAD_* name is a `qlorad serve` option (or QLORAD_LOG), and each file's values parse:
    with them qlorad gets past argument parsing and stops only at the (missing) model or device."""
    help_text = run(qlorad_bin(), "serve", "--help")
    known = set(re.findall(r"env: (QLORAD_\w+)", help_text)) | {"QLORAD_LOG"}
    keys = tmp_path / "keys"
    keys.write_text("sk-deploy-test-key:inference+admin\n")
    for name, env in settings():
        assert env, name
        unknown = sorted(k for k in env if k.startswith("QLORAD_") and k not in known)
        assert not unknown, f"{name}: qlorad does not read {unknown}"
        run_env = {k: v for k, v in os.environ.items() if not k.startswith("QLORAD_")}
        run_env.update({k: v for k, v in env.items() if k.startswith("QLORAD_")})
        # Only what must differ here: the model (absent, so serve stops right after parsing and
        # reading the keys) and the key file. The listen address is checked but never bound.
        run_env.update(QLORAD_MODEL=str(tmp_path / "no-model"), QLORAD_API_KEYS_FILE=str(keys))
        r = subprocess.run([qlorad_bin(), "serve"], env=run_env, capture_output=True, text=True,
                           timeout=60)
        # Past parsing, serve stops at the missing model, or for a cuda:N device first at this
        # CPU-only build (the value itself parsed).
        stopped = "loading model from" in r.stderr or (
            env.get("QLORAD_DEVICE", "").startswith("cuda:") and "built with cuda support" in r.stderr)
        assert r.returncode == 1 and stopped, (name, r.stderr)


def test_state_adapters_and_exports_share_one_volume():
    """Backups and the k8s/compose volumes assume the state dir, the adapter root and the export
    root sit side by side under /var/lib/qlorad (systemd: its StateDirectory)."""
    for name, env in settings():
        if "QLORAD_STATE_DIR" in env:
            roots = {os.path.dirname(env[k]) for k in
                     ["QLORAD_STATE_DIR", "QLORAD_ADAPTER_ROOT", "QLORAD_EXPORT_ROOT"]}
            assert len(roots) == 1, (name, env)


def test_dashboard_json_is_valid_json():
    json.loads((DEPLOY / "grafana/dashboards/qlorad.json").read_text())
