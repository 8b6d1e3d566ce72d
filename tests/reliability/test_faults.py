"""Fault scenarios (tests/reliability/faults.py) under pytest, CI-sized (`quick`) unless
QLORAD_RELIABILITY_FULL=1: kill -9 while serving, during a job and during an export; corrupt
adapter files; a full state volume (needs root for a tmpfs, skipped otherwise); a client that
disconnects mid-stream. Each scenario starts its own daemon on its own temporary state dir."""
import os

import pytest

import faults

QUICK = os.environ.get("QLORAD_RELIABILITY_FULL") != "1"


def run(name):
    try:
        out = faults.run(name, quick=QUICK)
    except faults.Skip as e:
        pytest.skip(str(e))
    print(name, out)
    return out


@pytest.fixture(scope="module")
def serving_kill9():
    return run("serving_kill9")


def test_kill9_while_serving_loses_nothing(serving_kill9):
    assert serving_kill9["streams_in_flight_at_kill"] == 8
    assert serving_kill9["streams_with_done"] == 0
    assert serving_kill9["restart_to_ready_s"] < 60


def test_kill9_while_serving_keeps_runtime_loaded_adapters(serving_kill9):
    assert serving_kill9["runtime_adapter_restored"], "rt-qv was not listed or servable after restart"


def test_kill9_during_training_resumes_from_checkpoint():
    out = run("training_kill9")
    assert out["status"] == "succeeded" and out["steps_lost"] <= out["checkpoint_interval"]


def test_kill9_during_export_leaves_nothing_half_written():
    out = run("export_kill9")
    assert out["final_status"] == "succeeded" and out["target_absent_after_kill"]


def test_corrupt_adapter_files_are_refused():
    out = run("corrupt_adapter")
    assert {v["status"] for v in out["refused"].values()} == {422}


def test_disk_full_on_the_state_dir():
    out = run("disk_full")
    assert out["upload_small_full"][0] == 507


def test_client_disconnect_cancels_its_sequence():
    out = run("client_disconnect")
    assert out["cancelled_total_delta"] >= 1
