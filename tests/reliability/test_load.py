"""The load test (tests/reliability/load.py), CI-sized: 32 concurrent streaming clients for 15 s
against an admission limit of 8, so most attempts are refused with 429 + Retry-After and retried.
Every stream must end with [DONE] (or be refused at admission), no 5xx, memory bounded, and the
daemon still ready afterwards with its gauges back at zero. The full run (256 clients, 120 s) is
`tests/reliability/run.sh`; its figures are in RELIABILITY.md."""
import json

import load

RSS_LIMIT_MB = 1024


def test_streaming_load_with_admission_control():
    a = load.parser().parse_args(["--clients", "32", "--duration", "15", "--max-inflight", "8",
                                  "--max-tokens", "16", "--drain", "120"])
    out = load.run(a)
    print(json.dumps(out, indent=1))
    assert out["http_5xx"] == 0 and out["lost_streams"] == 0 and out["stream_errors"] == 0, out
    assert not out["other_status"], out
    assert out["completed"] > 0 and out["refused_429"] > 0, out
    assert out["retry_after_missing"] == 0
    assert out["requests"] == out["completed"] + out["refused_429"], out
    assert out["ready_after"] == 200 and out["daemon_alive_after"] and not out["daemon_panicked"]
    assert out["daemon_metrics"]["qlorad_batch_running_requests"] == 0, out["daemon_metrics"]
    assert out["daemon_metrics"]["http_chat_by_status"].get("429") == out["refused_429"]
    assert out["rss"]["peak_mb"] < RSS_LIMIT_MB, out["rss"]
