#!/usr/bin/env python3
"""Fault scenarios against the real `qlorad serve` binary (SmolLM2, CPU, loopback). Each scenario
starts its own daemon(s) on its own temporary state dir, asserts what it observes and returns the
figures it measured (a dict). `test_faults.py` runs each as a pytest test; run directly, this file
runs them all and prints one JSON object.

  serving_kill9      kill -9 with 8 streams in flight → restart on the same state dir: time to
                     /ready; uploaded files, the finished job and its adapter still listed and
                     servable, and so is an adapter loaded at run time (`POST /v1/adapters`)
  training_kill9     kill -9 during a job → restart: the job resumes by itself from its last
                     checkpoint and succeeds; steps lost, time to resume
  export_kill9       kill -9 during `POST /v1/adapters/{name}/promote` → restart: nothing under the
                     target name while it was killed; the export is queued again and finishes
  corrupt_adapter    garbage or truncated adapter_model.safetensors → 422 `invalid_adapter`, nothing
                     loaded, serving goes on (a corrupt checkpoint: daemon/tests/jobs.rs)
  disk_full          a small tmpfs as the state dir (needs root; skipped otherwise): uploads, job
                     creation and checkpoints on a full volume fail clearly, serving goes on,
                     nothing half-written is visible; after freeing space all works again
  client_disconnect  a client that leaves mid-stream: its sequence is cancelled

Usage: tests/reliability/faults.py [--quick] [--only NAME,…] [--json-out FILE]
"""
import argparse
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import harness  # noqa: E402
from harness import Daemon, ended, error_of, httpx, tiny_job, training_data  # noqa: E402

SCENARIOS = {}


class Skip(Exception):
    """The scenario cannot run here (the reason is reported)."""


def scenario(fn):
    SCENARIOS[fn.__name__] = fn
    return fn


def poll(what, check, timeout=120, every=0.05):
    """Polls `check()` until it returns a truthy value; returns (value, seconds)."""
    t0 = time.monotonic()
    while True:
        v = check()
        if v:
            return v, time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what}: not within {timeout}s")
        time.sleep(every)


def sha(b):
    return hashlib.sha256(b).hexdigest()


def stream_reader(d, n_tokens, box):
    """Streams one chat completion, recording first token, [DONE] and how it ended, in `box`."""
    body = {"model": d.model_id, "stream": True, "max_tokens": n_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": "Tell me a long story about a lighthouse."}]}
    box.update(tokens=0, done=False, error=None)
    try:
        with httpx.Client(timeout=httpx.Timeout(120.0)) as c:
            with c.stream("POST", d.url + "/v1/chat/completions", json=body) as r:
                box["status"] = r.status_code
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        box["done"] = True
                    elif line.startswith("data: ") and '"content":"' in line:
                        box["tokens"] += 1
    except httpx.HTTPError as e:
        box["error"] = type(e).__name__


# ---------------------------------------------------------------- a. kill -9 while serving

@scenario
def serving_kill9(work, quick=False):
    """kill -9 with 8 streams in flight; restart on the same state dir (quick: the finished job
    trains on two examples instead of six)."""
    state, root = work / "state", work / "adapters"
    root.mkdir()
    shutil.copytree(harness.LORA_FIXTURE, root / "qv")
    d = Daemon(work, ["--adapter-root", str(root), "--checkpoint-interval", "2"], state=state)
    try:
        d.start()
        data = training_data()
        if quick:
            data = b"\n".join(data.split(b"\n")[:2])
        f = d.upload("caps.jsonl", data).json()["id"]
        notes = os.urandom(50_000)
        other = d.upload("notes.bin", notes, "batch").json()["id"]
        job = tiny_job(d, f)
        done = d.wait_job(job, ended, "the job before the kill")
        assert done["status"] == "succeeded", done
        ft = done["fine_tuned_model"]
        r = d.post("/v1/adapters", {"name": "rt-qv", "path": "qv"})
        assert r.status_code == 201, r.text
        assert d.chat("rt-qv").status_code == 200

        boxes = [{} for _ in range(8)]
        threads = [threading.Thread(target=stream_reader, args=(d, 400, b), daemon=True) for b in boxes]
        for t in threads:
            t.start()
        poll("8 streams generating", lambda: all(b.get("tokens", 0) >= 1 for b in boxes), timeout=180)
        inflight = d.get("/ready").json()["inflight"]
        d.kill9()
        for t in threads:
            t.join(timeout=30)
        # A killed stream must never look finished: no [DONE], the client sees the cut.
        assert not any(b["done"] for b in boxes), boxes
        cut = sum(1 for b in boxes if b["error"] or not b["done"])

        ready_s = d.start()
        files = {x["id"]: x for x in d.get("/v1/files").json()["data"]}
        assert set(files) == {f, other}, files
        assert d.get(f"/v1/files/{other}/content").content == notes
        j = d.job(job)
        assert j["status"] == "succeeded" and j["fine_tuned_model"] == ft, j
        models = {m["id"] for m in d.get("/v1/models").json()["data"]}
        assert ft in models, models
        assert d.chat(ft).status_code == 200
        assert d.chat().status_code == 200
        assert d.get("/ready").json()["inflight"] == 0
        # Nothing half-written visible: no upload temp files in the state dir.
        leftovers = [p.name for p in (state / "files").iterdir() if p.name.startswith(".")]
        assert not leftovers, leftovers
        adapters = {a["name"] for a in d.get("/v1/adapters").json()["data"]}
        runtime_ok = "rt-qv" in adapters and d.chat("rt-qv").status_code == 200
        return {"streams_in_flight_at_kill": inflight, "streams_cut": cut,
                "streams_with_done": sum(b["done"] for b in boxes),
                "restart_to_ready_s": round(ready_s, 2), "files_kept": len(files),
                "finished_job_kept": True, "fine_tuned_adapter_servable": True,
                "runtime_adapter_restored": runtime_ok}
    finally:
        d.close()


# ---------------------------------------------------------------- b. kill -9 during training

@scenario
def training_kill9(work, quick=False, interval=2):
    """kill -9 during a job (checkpoint every `interval` steps); it resumes and succeeds."""
    d = Daemon(work, ["--checkpoint-interval", str(interval)], state=work / "state")
    try:
        d.start()
        f = d.upload("caps.jsonl", training_data()).json()["id"]
        job = tiny_job(d, f)
        j = d.wait_job(job, lambda j: j["step"] >= interval + 1, "steps past the first checkpoint")
        step_at_kill = j["step"]
        ck = d.get(f"/v1/fine_tuning/jobs/{job}/checkpoints").json()["data"]
        last_ckpt = max(c["step_number"] for c in ck)
        d.kill9()
        t_kill = time.monotonic()
        ready_s = d.start()

        def resumed():
            ev = d.get(f"/v1/fine_tuning/jobs/{job}/events?limit=100").json()["data"]
            return [e["message"] for e in ev if "resumed from checkpoint step" in e["message"]]
        msgs, _ = poll("the job resuming", resumed, timeout=120)
        resume_s = time.monotonic() - t_kill
        resumed_from = int(msgs[0].rsplit(" ", 1)[1])
        done = d.wait_job(job, ended, "the resumed job")
        assert done["status"] == "succeeded", done
        assert done["step"] == done["total_steps"] == 6, done
        assert resumed_from == last_ckpt, (msgs, last_ckpt)
        lost = step_at_kill - resumed_from
        assert 0 <= lost <= interval, (step_at_kill, resumed_from)
        assert d.chat(done["fine_tuned_model"]).status_code == 200
        return {"checkpoint_interval": interval, "step_at_kill": step_at_kill,
                "resumed_from_step": resumed_from, "steps_lost": lost,
                "restart_to_ready_s": round(ready_s, 2), "kill_to_resumed_s": round(resume_s, 2),
                "total_steps": done["total_steps"], "status": done["status"]}
    finally:
        d.close()


# ---------------------------------------------------------------- c. kill -9 during an export

@scenario
def export_kill9(work, quick=False):
    """kill -9 mid-export; restart: the export is queued again and finishes; never half-written."""
    state = work / "state"
    d = Daemon(work, ["--lora", f"qv={harness.LORA_FIXTURE}"], state=state)
    exports = state / "exports"
    try:
        d.start()
        r = d.post("/v1/adapters/qv/promote", {"out": "smollm2-qv"})
        assert r.status_code == 202, r.text
        eid = r.json()["id"]

        def midway():
            e = d.get(f"/v1/exports/{eid}").json()
            p = e["progress"]
            total = p["tensors_total"]
            return e if e["status"] == "running" and total // 3 <= p["tensors_done"] < total and total else None
        e, _ = poll("the export midway", midway, timeout=120, every=0.02)
        done_at_kill, total = e["progress"]["tensors_done"], e["progress"]["tensors_total"]
        d.kill9()
        staged = sorted(p.name for p in exports.iterdir())
        assert not (exports / "smollm2-qv").exists(), "half-written export under the target name"
        assert staged and all(n.startswith(".smollm2-qv.tmp-") for n in staged), staged

        ready_s = d.start()
        t0 = time.monotonic()
        e = d.get(f"/v1/exports/{eid}").json()
        status_after_restart = e["status"]
        assert status_after_restart in ("queued", "running", "succeeded"), e

        def finished():
            e = d.get(f"/v1/exports/{eid}").json()
            return e if e["status"] in ("succeeded", "failed", "cancelled") else None
        e, _ = poll("the requeued export", finished, timeout=300, every=0.2)
        assert e["status"] == "succeeded", e
        out = exports / "smollm2-qv"
        for name in ("config.json", "model.safetensors.index.json", "tokenizer.json", "qlorad-manifest.json"):
            assert (out / name).exists(), name
        left = sorted(p.name for p in exports.iterdir() if p.name != "smollm2-qv")
        assert not left, f"staging folders left after the rerun: {left}"
        msgs = [x["message"] for x in d.get(f"/v1/exports/{eid}/events").json()["data"]]
        return {"tensors_done_at_kill": done_at_kill, "tensors_total": total,
                "target_absent_after_kill": True, "status_after_restart": status_after_restart,
                "restart_to_ready_s": round(ready_s, 2),
                "restart_to_export_done_s": round(time.monotonic() - t0, 2),
                "final_status": e["status"], "staging_swept": True, "events": len(msgs)}
    finally:
        d.close()


# ---------------------------------------------------------------- d. corrupt adapter files

@scenario
def corrupt_adapter(work, quick=False):
    """A garbage and a truncated adapter_model.safetensors are refused with 422; serving goes on."""
    root = work / "adapters"
    root.mkdir()
    good = harness.LORA_FIXTURE
    for name, damage in (("garbage", lambda b: b"this is not a safetensors file" * 10),
                         ("truncated", lambda b: b[: len(b) // 2]),
                         ("bad-header", lambda b: b[:8] + b"{not json" + b[17:])):
        shutil.copytree(good, root / name)
        p = root / name / "adapter_model.safetensors"
        p.write_bytes(damage(p.read_bytes()))
    d = Daemon(work, ["--adapter-root", str(root)], state=work / "state")
    seen = {}
    try:
        d.start()
        for name in ("garbage", "truncated", "bad-header"):
            r = d.post("/v1/adapters", {"name": name, "path": name})
            status, code, msg = error_of(r)
            seen[name] = {"status": status, "code": code, "message": msg}
            assert (status, code) == (422, "invalid_adapter"), r.text
            assert msg and "safetensors" in msg, msg
            assert name not in {a["name"] for a in d.get("/v1/adapters").json()["data"]}
            assert d.chat(name).status_code == 404
        assert d.chat().status_code == 200
        assert d.get("/ready").status_code == 200
        assert "panicked" not in d.logs()
        return {"refused": seen, "serving_after": 200}
    finally:
        d.close()


# ---------------------------------------------------------------- e. disk full

def fill(path, mount, leave=0):
    """Appends zeros to `path` until at most `leave` bytes are free on `mount` (or ENOSPC)."""
    with open(path, "ab", buffering=0) as fh:
        for chunk in (1 << 20, 65536, 4096, 512):
            try:
                while True:
                    st = os.statvfs(mount)
                    if st.f_bavail * st.f_frsize - chunk < leave:
                        break
                    fh.write(b"\0" * chunk)
            except OSError:
                pass
    st = os.statvfs(mount)
    return st.f_bavail * st.f_frsize


def mount_tmpfs(mnt, size="8m"):
    mnt.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        raise Skip("disk_full needs root to mount a tmpfs (not root here)")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise Skip(f"mount -t tmpfs not permitted here: {r.stderr.strip()}")


def nearly_full_job(d, f, seen):
    """A job on a nearly full volume: its first checkpoint cannot be written, the job fails with
    `checkpoint_write_failed`, no checkpoint is listed and serving goes on."""
    job = tiny_job(d, f, suffix="full")
    j = d.wait_job(job, ended, "the job whose checkpoint cannot be written", timeout=300)
    seen["job_checkpoint_on_nearly_full_disk"] = {"status": j["status"], "error": j["error"]}
    assert j["status"] == "failed" and j["error"]["code"] == "checkpoint_write_failed", j
    assert "No space left on device" in j["error"]["message"], j
    assert d.get(f"/v1/fine_tuning/jobs/{job}/checkpoints").json()["data"] == []
    assert d.chat().status_code == 200


@scenario
def disk_full(work, quick=False):
    """A full state volume: clear errors (507), failed checkpoint, serving continues, recovery.
    (quick: without the job on a nearly full volume and the job after freeing space.)"""
    mnt = work / "vol"
    mount_tmpfs(mnt)
    state = mnt / "state"
    d = Daemon(work, ["--checkpoint-interval", "2", "--lora", f"qv={harness.LORA_FIXTURE}"], state=state)
    seen = {}
    try:
        d.start()
        f = d.upload("caps.jsonl", training_data()).json()["id"]

        # Nearly full (300 KB left): the state database still has room, larger writes do not.
        free = fill(mnt / "filler-1", mnt, leave=300 << 10)
        seen["free_bytes_nearly_full"] = free
        r = d.upload("big.bin", os.urandom(1 << 20), "batch")
        seen["upload_1mb_nearly_full"] = error_of(r)
        assert error_of(r)[:2] == (507, "insufficient_storage"), r.text
        if not quick:
            nearly_full_job(d, f, seen)

        # Completely full while a job runs: even its failure cannot be written to the database.
        # The API must still show it failed (not `running` forever), and the failure is written
        # once there is space again.
        job_r = tiny_job(d, f, suffix="full2")
        d.wait_job(job_r, lambda j: j["status"] == "running", "the second job running", timeout=300)
        seen["free_bytes_full"] = fill(mnt / "filler-2", mnt, leave=0)
        j = d.wait_job(job_r, ended, "a job on a completely full volume", timeout=300)
        seen["job_on_completely_full_disk"] = {"status": j["status"], "error": j["error"]}
        assert j["status"] == "failed" and j["error"]["code"] == "checkpoint_write_failed", j
        m = d.metrics()
        assert m['qlorad_fine_tuning_jobs{status="running"}'] == 0, m
        for what, r in (("upload_small_full", d.upload("small.jsonl", training_data())),
                        ("create_job_full", d.post("/v1/fine_tuning/jobs", {
                            "model": d.model_id, "training_file": f, "suffix": "x"})),
                        ("promote_full", d.post("/v1/adapters/qv/promote", {"out": "x"})),
                        ("delete_file_full", d.delete(f"/v1/files/{f}"))):
            seen[what] = error_of(r)
        assert seen["upload_small_full"][:2] == (507, "insufficient_storage"), seen
        assert seen["create_job_full"][:2] == (507, "insufficient_storage"), seen
        assert seen["promote_full"][:2] == (507, "insufficient_storage"), seen
        # Deleting is a database write too: refused the same way (the file stays listed).
        assert seen["delete_file_full"][:2] in ((507, "insufficient_storage"), (200, None)), seen
        chat = d.chat()
        seen["chat_full"] = chat.status_code
        assert chat.status_code == 200 and d.get("/ready").status_code == 200
        # Nothing half-written is visible: the API lists only the file stored before; no temp
        # upload or staging folders were left behind.
        listed = [x["id"] for x in d.get("/v1/files").json()["data"]]
        assert listed == ([] if seen["delete_file_full"][0] == 200 else [f]), listed
        hidden = [str(p.relative_to(state)) for p in state.rglob(".*")]
        seen["hidden_leftovers"] = hidden
        assert not hidden, hidden

        # Space freed: everything works again.
        for p in mnt.glob("filler-*"):
            p.unlink()
        r = d.upload("again.jsonl", training_data())
        assert r.status_code == 200, r.text
        # The failure held in memory reaches the database (its event is written after the row),
        # and it survives a restart as `failed`.
        def recorded():
            ev = d.get(f"/v1/fine_tuning/jobs/{job_r}/events?limit=100").json()["data"]
            return any(e["message"].startswith("Job failed:") for e in ev)
        _, seen["failure_written_after_freeing_s"] = poll("the held failure written", recorded, timeout=60)
        d.stop()
        d.start()
        j = d.job(job_r)
        assert j["status"] == "failed" and j["error"]["code"] == "checkpoint_write_failed", j
        if not quick:
            job2 = tiny_job(d, r.json()["id"], suffix="after")
            d.wait_job(job2, lambda j: j["step"] >= 3 or ended(j), "a job after freeing space", timeout=300)
            ck = d.get(f"/v1/fine_tuning/jobs/{job2}/checkpoints").json()["data"]
            assert [c["step_number"] for c in ck] == [2], ck
            assert d.post(f"/v1/fine_tuning/jobs/{job2}/cancel").status_code == 200
            seen["after_freeing_job"] = "checkpointed at step 2"
        assert d.chat().status_code == 200
        assert d.alive() and "panicked" not in d.logs()
        seen["after_freeing_upload"] = 200
        return seen
    finally:
        d.close()
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


# ---------------------------------------------------------------- f. client disconnect

@scenario
def client_disconnect(work, quick=False):
    """A client that leaves mid-stream: its sequence is cancelled, the batch empties."""
    d = Daemon(work, [], state=None)
    try:
        d.start()
        before = d.metrics().get("qlorad_requests_cancelled_total", 0)
        body = {"model": d.model_id, "stream": True, "max_tokens": 400, "temperature": 0,
                "messages": [{"role": "user", "content": "Tell me a long story about a lighthouse."}]}
        tokens = 0
        with httpx.Client(timeout=httpx.Timeout(60.0)) as c:
            with c.stream("POST", d.url + "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if '"content":"' in line:
                        tokens += 1
                    if tokens >= 3:
                        break
                running = d.metrics().get("qlorad_batch_running_requests")
                t_close = time.monotonic()
        # Leaving the `with` blocks closed the connection mid-stream.

        def cancelled():
            m = d.metrics()
            return m if (m.get("qlorad_requests_cancelled_total", 0) >= before + 1
                         and m.get("qlorad_batch_running_requests") == 0) else None
        m, _ = poll("the sequence cancelled", cancelled, timeout=60, every=0.02)
        cancel_s = time.monotonic() - t_close
        generated = m.get("qlorad_tokens_generated_total")
        assert d.get("/ready").json()["inflight"] == 0
        time.sleep(1.0)
        assert d.metrics().get("qlorad_tokens_generated_total") == generated, "still generating"
        assert d.chat().status_code == 200
        return {"tokens_read_before_leaving": tokens, "running_while_streaming": running,
                "cancelled_total_delta": m["qlorad_requests_cancelled_total"] - before,
                "disconnect_to_cancelled_s": round(cancel_s, 3),
                "tokens_generated_total": generated}
    finally:
        d.close()


def run(name, quick=False):
    """Runs one scenario in a fresh temp dir; returns its figures (plus its wall time)."""
    work = pathlib.Path(tempfile.mkdtemp(prefix=f"qlorad-{name}-"))
    t0 = time.monotonic()
    try:
        out = SCENARIOS[name](work, quick=quick)
        out["wall_s"] = round(time.monotonic() - t0, 1)
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma-separated scenario names: " + ", ".join(SCENARIOS))
    ap.add_argument("--quick", action="store_true", help="the CI-sized variants")
    ap.add_argument("--json-out")
    a = ap.parse_args()
    names = a.only.split(",") if a.only else list(SCENARIOS)
    report, ok = {}, True
    for name in names:
        print(f"--- {name}", file=sys.stderr, flush=True)
        try:
            report[name] = {"result": "passed", **run(name, quick=a.quick)}
        except Skip as e:
            report[name] = {"result": "skipped", "reason": str(e)}
        except AssertionError as e:
            ok = False
            report[name] = {"result": "failed", "error": str(e)[-2000:]}
    text = json.dumps(report, indent=1)
    print(text)
    if a.json_out:
        pathlib.Path(a.json_out).write_text(text + "\n")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
