"""`retrieve serve --workers 2`: two processes on one port sharing the loaded model; a reload
reaches both or neither; /metrics labels each worker; SIGTERM stops the whole set."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import httpx
import pytest

from test_server import USER, fingerprint, running_server


def worker_pids(supervisor: int) -> set[int]:
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children")
    return {int(p) for p in children.read_text().split()} if children.exists() else set()


def model_info(text: str) -> dict[str, str]:
    """worker -> bundle fingerprint it serves, from retrieve_model_info."""
    out = {}
    for line in text.splitlines():
        if line.startswith("retrieve_model_info{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            out[labels["worker"]] = labels["bundle_fingerprint"]
    return out


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads worker processes from /proc")
def test_two_workers_answer_reload_together_and_stop_together(bundle_k4, index_k4, bundle_k1, index_k1, tmp_path):
    k4, k1 = fingerprint(bundle_k4), fingerprint(bundle_k1)
    with running_server(tmp_path, "--bundle", bundle_k4, "--index", index_k4, "--workers", "2") as s:
        pids = worker_pids(s.proc.pid)
        assert len(pids) == 2
        seen = set()
        for _ in range(40):  # a fresh connection each: the kernel hands them to either worker
            with httpx.Client(base_url=s.url, timeout=30) as c:
                assert c.post("/recommend", json={"user": USER, "n": 5}).status_code == 200
                seen.add(c.get("/readyz").json()["worker"])
        assert seen <= {0, 1}
        with httpx.Client(base_url=s.url, timeout=60) as c:
            text = c.get("/metrics").text
            assert model_info(text) == {"0": k4, "1": k4}
            served = sum(float(v) for v in re.findall(
                r'retrieve_http_requests_total\{path="/recommend",status="200",worker="[01]"\} (\S+)', text))
            assert served == 40  # both workers' counters, gathered by whichever answered

            # a bad bundle: every worker keeps the old model (all or nothing)
            bad = c.post("/admin/reload", json={"bundle": str(bundle_k1)})  # k1 beside k4's index
            assert bad.status_code == 422 and "built from another model bundle" in bad.json()["error"]
            assert bad.json()["error"].startswith(f"reload failed, still serving {bundle_k4}: worker ")
            assert model_info(c.get("/metrics").text) == {"0": k4, "1": k4}

            swapped = c.post("/admin/reload", json={"bundle": str(bundle_k1), "index": str(index_k1)})
            assert swapped.status_code == 200, swapped.text
            assert swapped.json()["workers"] == 2 and swapped.json()["fingerprints"]["bundle"] == k1
            assert model_info(c.get("/metrics").text) == {"0": k1, "1": k1}

            os.kill(s.proc.pid, signal.SIGHUP)  # the supervisor reloads the same paths on every worker
            deadline = time.monotonic() + 60
            while len(re.findall(r'retrieve_reloads_total\{outcome="ok",worker="[01]"\} 2.0', c.get("/metrics").text)) < 2:
                assert time.monotonic() < deadline, "SIGHUP did not reload both workers"
                time.sleep(0.2)
        for _ in range(10):
            with httpx.Client(base_url=s.url, timeout=30) as c:
                answer = c.post("/recommend", json={"user": USER, "n": 5}).json()
                assert {it["interest"] for it in answer["items"]} == {0}  # K=1 on whichever worker

        s.proc.terminate()
        assert s.proc.wait(60) == 0
        assert all(not Path(f"/proc/{p}").exists() or "zombie" in Path(f"/proc/{p}/status").read_text()
                   for p in pids)
    assert "Traceback" not in s.log.read_text()


def test_a_bad_bundle_starts_no_worker(bundle_k1, index_k4, tmp_path):
    with running_server(tmp_path, "--bundle", bundle_k1, "--index", index_k4, "--workers", "2",
                        wait_ready=False) as s:
        assert s.proc.wait(120) == 2
        text = s.log.read_text()
    assert "Traceback" not in text and "worker" not in text
    assert text.strip().splitlines()[-1].startswith(f"error: {index_k4}: the index was built from another model bundle")
