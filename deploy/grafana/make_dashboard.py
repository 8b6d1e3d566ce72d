#!/usr/bin/env python3
"""Writes deploy/grafana/dashboards/qlorad.json, the Grafana dashboard of qlorad's metrics.

The JSON is generated so that the panels stay uniform (one data source variable, one instance
filter, the same legend and tooltip everywhere) and stay reviewable as a list of queries. Edit this
file, run it, commit both; tests/deploy checks that the JSON is this script's output and that every
metric it queries is exported by a running qlorad.

    python3 deploy/grafana/make_dashboard.py
"""
import json
import pathlib

OUT = pathlib.Path(__file__).resolve().parent / "dashboards" / "qlorad.json"
DS = {"type": "prometheus", "uid": "${datasource}"}
# The instance filter every query carries (a label matcher, merged into the metric's own).
I = 'instance=~"$instance"'
# Grafana widens this to at least four scrape intervals, so rate() always has two samples.
W = "$__rate_interval"
S5XX = 'status=~"5.."'
S429 = 'status="429"'


def sel(metric, extra=""):
    """`metric{instance=~"$instance",extra}`."""
    return f"{metric}{{{I}{',' + extra if extra else ''}}}"


def quantiles(metric, by="", qs=(0.5, 0.9, 0.99)):
    """histogram_quantile targets for a qlorad histogram (its _bucket series)."""
    group = f"le{', ' + by if by else ''}"
    legend = f"p{{q}}{' {{' + by + '}}' if by else ''}"
    return [
        (f"histogram_quantile({q}, sum by ({group}) (rate({sel(metric + '_bucket')}[{W}])))",
         legend.replace("{q}", str(round(q * 100))))
        for q in qs
    ]


class Board:
    def __init__(self):
        self.panels = []
        self.next_id = 1
        self.y = 0
        self.x = 0

    def row(self, title):
        if self.x:
            self.y += 8
            self.x = 0
        self.panels.append({"type": "row", "title": title, "id": self.next_id, "collapsed": False,
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": []})
        self.next_id += 1
        self.y += 1

    def panel(self, title, targets, unit, description, w=8, stack=False, kind="timeseries"):
        if self.x + w > 24:
            self.y += 8
            self.x = 0
        custom = {"lineWidth": 1, "fillOpacity": 10, "showPoints": "never"}
        if stack:
            custom["stacking"] = {"mode": "normal", "group": "A"}
        p = {
            "type": kind,
            "title": title,
            "description": description,
            "id": self.next_id,
            "gridPos": {"h": 8, "w": w, "x": self.x, "y": self.y},
            "datasource": DS,
            "targets": [
                {"refId": chr(ord("A") + i), "datasource": DS, "expr": expr, "legendFormat": legend,
                 "range": True}
                for i, (expr, legend) in enumerate(targets)
            ],
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                        "tooltip": {"mode": "multi", "sort": "desc"}},
        }
        if kind == "timeseries":
            p["fieldConfig"]["defaults"]["custom"] = custom
        self.panels.append(p)
        self.next_id += 1
        self.x += w


def serving(b):
    b.row("Serving")
    b.panel("Requests by route and status",
            [(f"sum by (route, status) (rate({sel('qlorad_http_requests_total')}[{W}]))",
              "{{route}} {{status}}")],
            "reqps", "API requests per second (inference and adapter routes), by HTTP status.",
            stack=True)
    b.panel("Errors and rejections",
            [(f"sum(rate({sel('qlorad_http_requests_total', S5XX)}[{W}]))"
              f" / sum(rate({sel('qlorad_http_requests_total')}[{W}]))", "5xx"),
             (f"sum(rate({sel('qlorad_http_requests_total', S429)}[{W}]))"
              f" / sum(rate({sel('qlorad_http_requests_total')}[{W}]))", "429 (admission)"),
             (f"sum(rate({sel('qlorad_requests_cancelled_total')}[{W}]))"
              f" / sum(rate({sel('qlorad_http_requests_total')}[{W}]))", "cancelled by client")],
            "percentunit", "Share of requests answered 5xx, turned away at --max-inflight (429), "
            "or dropped because the client disconnected. Alerts: QloradHigh5xxRate, QloradRejectingRequests.")
    b.panel("Tokens per second",
            [(f"sum(rate({sel('qlorad_tokens_generated_total')}[{W}]))", "generated"),
             (f"sum(rate({sel('qlorad_tokens_prompt_total')}[{W}]))", "prompt (prefill)")],
            "short", "Generated and prompt tokens per second over all requests.")
    b.panel("Time to first token", quantiles("qlorad_time_to_first_token_seconds"), "s",
            "From admission to the first generated token: queueing plus prefill.")
    b.panel("Inter-token latency", quantiles("qlorad_inter_token_latency_seconds"), "s",
            "Time between consecutive tokens of one request (decode step of the whole batch).")
    b.panel("Request duration by route",
            quantiles("qlorad_http_request_duration_seconds", by="route", qs=(0.5, 0.99)), "s",
            "Whole-request latency; for streams, until the response headers.")
    b.panel("Queue and running batch",
            [(f"sum({sel('qlorad_queue_waiting_requests')})", "waiting"),
             (f"sum({sel('qlorad_batch_running_requests')})", "running")],
            "short", "Requests waiting for a batch slot and requests decoding. A queue that never "
            "drains is saturation (alert QloradQueueSaturated).")
    b.panel("Batch size (tokens per forward pass)",
            quantiles("qlorad_batch_tokens", qs=(0.5, 0.99))
            + [(f"sum(rate({sel('qlorad_batch_tokens_sum')}[{W}]))"
                f" / sum(rate({sel('qlorad_batch_tokens_count')}[{W}]))", "mean")],
            "short", "Prefill and decode tokens per engine step; bounded by --max-batch-tokens.")
    b.panel("Forward passes per second",
            [(f"sum(rate({sel('qlorad_batch_tokens_count')}[{W}]))", "steps/s")],
            "short", "Engine steps per second (one forward pass each).")
    b.panel("Requests per engine",
            [(f"sum by (instance, engine) (rate({sel('qlorad_engine_requests_total')}[{W}]))",
              "{{instance}} engine {{engine}}")],
            "reqps", "Generation requests routed to each engine of a daemon (one per --device "
            "entry, by index): the spread of least-loaded routing. Engine 0 gets less while a "
            "fine-tuning job trains on its device.", stack=True)
    b.panel("Decode steps from CUDA graphs",
            [(f"sum by (kind) (rate({sel('qlorad_decode_graph_steps_total')}[{W}]))", "{{kind}}")],
            "short", "Decode steps replayed from a captured graph and steps captured "
            "(on a GPU unless QLORAD_DECODE_GRAPH=0; zero otherwise). Replays cost the host one launch "
            "instead of ~290; a capture is one slow step per new batch shape.")


def adapters(b):
    b.row("Adapters")
    b.panel("Adapter cache",
            [(f"sum(rate({sel('qlorad_adapter_cache_hits_total')}[{W}]))", "hits"),
             (f"sum(rate({sel('qlorad_adapter_cache_misses_total')}[{W}]))", "misses (reloaded from disk)"),
             (f"sum(rate({sel('qlorad_adapter_evictions_total')}[{W}]))", "evictions")],
            "ops", "Requests whose adapter was resident (hit) or had to be reloaded (miss), and LRU "
            "evictions under --max-adapter-bytes.")
    b.panel("Adapter bytes by tier",
            [(f"sum({sel('qlorad_adapter_resident_bytes')})", "servable (device / host)"),
             (f"sum({sel('qlorad_adapter_host_bytes')})", "evicted, host copy"),
             (f"sum({sel('qlorad_adapter_disk_bytes')})", "evicted (disk)")],
            "bytes", "Adapter weights resident in memory and registered adapters evicted to disk.")
    b.panel("Requests per adapter",
            [(f"topk(10, sum by (adapter) (rate({sel('qlorad_adapter_requests_total')}[{W}])))",
              "{{adapter}}")],
            "reqps", "Generation requests by `model` (the base model's id or an adapter), top 10. "
            "The router's adapter affinity should keep each adapter on few daemons.", stack=True)


def jobs(b):
    b.row("Fine-tuning jobs and exports")
    b.panel("Jobs by status",
            [(f"sum by (status) ({sel('qlorad_fine_tuning_jobs')})", "{{status}}")],
            "short", "Jobs in the state database by status (failed: alert QloradFineTuningJobFailed).")
    b.panel("Job queue",
            [(f"sum({sel('qlorad_fine_tuning_queue_length')})", "waiting (validating or queued)")],
            "short", "Jobs waiting to run; one runs at a time on the resident base.")
    b.panel("Steps and trained tokens per second",
            [(f"sum(rate({sel('qlorad_fine_tuning_steps_total')}[{W}]))", "steps/s"),
             (f"sum(rate({sel('qlorad_fine_tuning_tokens_total')}[{W}]))", "tokens/s")],
            "short", "Optimizer steps and trained tokens per second (zero while a job runs: alert "
            "QloradTrainingStalled).")
    b.panel("Training loss", [(sel("qlorad_fine_tuning_loss"), "{{instance}}")], "none",
            "Training loss of the latest step of the running job.")
    b.panel("Learning rate", [(sel("qlorad_fine_tuning_learning_rate"), "{{instance}}")], "none",
            "Learning rate of the latest step (warmup and schedule).")
    b.panel("Step time", quantiles("qlorad_fine_tuning_step_seconds", qs=(0.5, 0.99)), "s",
            "Wall time of one optimizer step, including gradient accumulation.")
    b.panel("Time yielded to serving",
            [(f"sum(rate({sel('qlorad_fine_tuning_yield_milliseconds_total')}[{W}])) / 1000",
              "share of wall time")],
            "percentunit", "Fraction of time training paused to give serving priority (--train-share).")
    b.panel("Training between yields", quantiles("qlorad_fine_tuning_uninterrupted_seconds",
                                                  qs=(0.5, 0.99)), "s",
            "Wall time between two preemption points of training while requests are in flight "
            "(on a GPU including serving work queued in between): how long a token may wait.")
    b.panel("Training's wait for the GPU at a yield", quantiles("qlorad_fine_tuning_device_wait_seconds",
                                                                qs=(0.5, 0.99)), "s",
            "On a GPU, how long training waited at a preemption point for the device to finish "
            "what was queued (its layer and serving's steps) before yielding to serving.")
    b.panel("Exports (promotions) in the last hour",
            [(f"sum by (status) (increase({sel('qlorad_exports_total')}[1h]))", "{{status}}")],
            "short", "Promote jobs (merge an adapter, export an HF folder) by transition: queued, "
            "succeeded, failed, cancelled (failed: alert QloradExportFailed).")
    b.panel("Export write rate",
            [(f"sum(rate({sel('qlorad_export_bytes_written_total')}[{W}]))", "merged weights")],
            "Bps", "Bytes of merged weights written by running exports (to --export-root).")


def memory(b):
    b.row("Memory")
    b.panel("Process resident memory", [(sel("qlorad_process_resident_memory_bytes"), "{{instance}}")],
            "bytes", "RSS of the daemon: base weights, KV caches, adapters and the running job.")
    b.panel("Device memory", [(sel("qlorad_device_memory_bytes"), "{{instance}} {{device}} {{kind}}")],
            "bytes", "Used and total memory of each compute device: the GPU as the driver sees it "
            "(context and caching pool included; kind graphs: the captured decode steps' part of "
            "it), or the process RSS and the machine's memory on a CPU model.")
    b.panel("Model weights", [(sel("qlorad_model_weight_bytes"), "{{instance}}")], "bytes",
            "Bytes of the resident base weights (NF4 projections plus full-precision embeddings), "
            "summed over the devices of a multi-device daemon (one copy each).")
    b.panel("Fine-tuning job memory",
            [(f"sum by (kind) ({sel('qlorad_fine_tuning_memory_bytes')})", "{{kind}}")],
            "bytes", "Memory of the running job beyond the shared base: trainable LoRA weights and "
            "AdamW moments.", stack=True)
    b.panel("GPU memory (dcgm-exporter)",
            [("DCGM_FI_DEV_FB_USED * 1024 * 1024", "GPU {{gpu}} used"),
             ("(DCGM_FI_DEV_FB_USED + DCGM_FI_DEV_FB_FREE) * 1024 * 1024", "GPU {{gpu}} total")],
            "bytes", "Framebuffer memory from NVIDIA's dcgm-exporter (empty without it): qlorad "
            "exports no GPU metric yet. Alert QloradGpuMemoryHigh.", w=24)


def dashboard():
    b = Board()
    serving(b)
    adapters(b)
    jobs(b)
    memory(b)
    return {
        "uid": "qlorad",
        "title": "qlorad",
        "description": "Serving, adapters, fine-tuning jobs and memory of qlorad daemons.",
        "tags": ["qlorad", "llm"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "time": {"from": "now-3h", "to": "now"},
        "annotations": {"list": []},
        "links": [],
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": {"text": "Prometheus", "value": "prometheus"}, "hide": 0, "refresh": 1},
            {"name": "instance", "label": "Instance", "type": "query", "datasource": DS,
             "definition": "label_values(qlorad_model_weight_bytes, instance)",
             "query": {"query": "label_values(qlorad_model_weight_bytes, instance)",
                       "refId": "instance"},
             "multi": True, "includeAll": True, "allValue": ".*", "refresh": 2, "sort": 1,
             "current": {"text": "All", "value": "$__all"}, "hide": 0},
        ]},
        "panels": b.panels,
    }


def render():
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(render())
    print(f"wrote {OUT}")
