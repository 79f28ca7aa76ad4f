"""`retrieve serve` as a real uvicorn process on a free loopback port: the API, bad requests,
the explorer page's contract, hot reload (also under load and by SIGHUP) and SIGTERM's drain.

Every server is started by a context manager that stops it, whatever the test did."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from retrieval.serving import MAX_HISTORY, MAX_N, Recommender, Request

REPO = Path(__file__).resolve().parents[1]
USER = "u00003"


@dataclass
class Running:
    url: str
    proc: subprocess.Popen
    log: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(log_dir: Path, *args: str | Path, wait_ready: bool = True, timeout: float = 120) -> Iterator[Running]:
    """`retrieve serve ARGS` on a free port; yields once /readyz answers 200; always stopped."""
    port = free_port()
    log = log_dir / f"serve-{port}.log"
    cmd = [sys.executable, "-m", "cli", "serve", *map(str, args), "--port", str(port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    running = Running(f"http://127.0.0.1:{port}", proc, log)
    try:
        deadline = time.monotonic() + timeout
        while wait_ready:
            if proc.poll() is not None:
                raise AssertionError(f"server exited with {proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{running.url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"server not ready after {timeout}s:\n{log.read_text()}")
            time.sleep(0.1)
        yield running
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def server(bundle_k4, index_k4, din_k4, tmp_path_factory) -> Iterator[Running]:
    with running_server(tmp_path_factory.mktemp("serve"), "--bundle", bundle_k4, "--index", index_k4,
                        "--ranker", din_k4) as s:
        yield s


@pytest.fixture(scope="module")
def client(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def local(bundle_k4, index_k4, din_k4) -> Recommender:
    return Recommender.load(bundle_k4, index_k4, din_k4)


def fingerprint(path: Path) -> str:
    return json.loads((path / "manifest.json").read_text())["bundle_fingerprint"]


def items(resp: httpx.Response) -> list[str]:
    assert resp.status_code == 200, resp.text
    return [it["item"] for it in resp.json()["items"]]


# ----------------------------------------------------------------------------- the API


def test_health_readiness_and_metrics(client, bundle_k4, index_k4, din_k4):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready"
    assert ready["fingerprints"] == {
        "bundle": fingerprint(bundle_k4), "ranker": fingerprint(din_k4),
        "index": json.loads((index_k4 / "manifest.json").read_text())["index_sha256"]}
    assert client.post("/recommend", json={"user": USER}).status_code == 200
    text = client.get("/metrics").text
    assert 'retrieve_http_requests_total{path="/recommend",status="200"}' in text
    assert re.search(r'retrieve_http_request_seconds_bucket\{le="0.005",path="/recommend"\} \d', text)
    assert re.search(r"retrieve_batch_requests_count [1-9]", text)
    assert f'bundle_fingerprint="{fingerprint(bundle_k4)}"' in text and "retrieve_ready 1.0" in text
    assert 'retrieve_stage_seconds_count{stage="retrieve"}' in text


def test_answers_are_the_librarys(client, local):
    fresh = ["i00001", "i00002", "unknown-id"]
    body = {"user": USER, "history": fresh, "times": [1, 2, 3], "n": 8, "rank": True, "candidates": 30, "explain": True}
    got = client.post("/recommend", json=body).json()
    [want] = local.recommend([Request(user=USER, history=fresh, times=[1, 2, 3], n=8, rank=True, candidates=30,
                                      explain=True)])
    assert [it["item"] for it in got["items"]] == [it.item for it in want.items]
    assert got["dropped"] == ["unknown-id"] and got["known_user"] and got["ranked"]
    first = got["items"][0]
    assert set(first) == {"rank", "item", "title", "score", "interest", "rank_score", "channel", "because"}
    assert first["rank_score"] == pytest.approx(want.items[0].rank_score, abs=1e-5)
    assert [b["item"] for b in first["because"]] == [b.item for b in want.items[0].because]
    assert [g["interest"] for g in got["interests"]] == [g.interest for g in want.interests]


def test_fresh_behaviours_change_the_next_request(client, local):
    before = items(client.post("/recommend", json={"user": USER, "n": 20}))
    log = local.dataset.item_ids[local.dataset.sequence(local.dataset.user_index(USER))].tolist()
    fresh = [i for i in local.dataset.item_ids[1:].tolist() if i not in set(log)][:3]
    resp = client.post("/recommend", json={"user": USER, "history": fresh, "n": 20})
    after = items(resp)
    assert after != before and not set(fresh) & set(after)
    assert resp.json()["history"] == len(log) + 3


def test_a_new_user_with_three_behaviours(client):
    resp = client.post("/recommend", json={"history": ["i00010", "i00020", "i00030"], "n": 5})
    got = resp.json()
    assert resp.status_code == 200 and not got["known_user"] and not got["fallback"]
    assert got["history"] == 3 and len(got["items"]) == 5
    assert not {"i00010", "i00020", "i00030"} & set(items(resp))
    fallback = client.post("/recommend", json={"user": 12345, "history": ["nope"], "n": 3}).json()
    assert fallback["fallback"] and fallback["user"] == "12345" and fallback["dropped"] == ["nope"]


def test_batch_answers_in_order(client):
    bodies = [{"user": USER, "n": 4}, {"history": ["i00042"], "n": 2}, {"history": [], "n": 3}]
    got = client.post("/recommend/batch", json={"requests": bodies}).json()["responses"]
    assert [r["items"] for r in got] == [client.post("/recommend", json=b).json()["items"] for b in bodies]
    bad = client.post("/recommend/batch", json={"requests": [bodies[0], {"n": 2}]})
    assert bad.status_code == 422 and bad.json() == {"error": "requests.1: give user, history or both"}


BIG = b'{"history": [' + b",".join([b'"i00001"'] * 200_000) + b"]}"  # over 1 MiB


@pytest.mark.parametrize("method, path, content, status, message", [
    ("POST", "/recommend", b'{"user": "u00003", "n": 3', 400, "malformed JSON: EOF while parsing an object at line 1 column 25"),
    ("POST", "/recommend", b'{"user": "u00003", "n": "3"}', 422, "n: Input should be a valid integer"),
    ("POST", "/recommend", b'{"user": "u00003", "rank": "yes"}', 422, "rank: Input should be a valid boolean"),
    ("POST", "/recommend", b'{"user": ["u00003"]}', 422, "user: Input should be a string or an integer id"),
    ("POST", "/recommend", b'{"history": ["i00001", 2.5]}', 422, "history.1: Input should be a string or an integer id"),
    ("POST", "/recommend", b'{"user": "u00003", "n": 0}', 422, "n: Input should be greater than or equal to 1"),
    ("POST", "/recommend", b'{"user": "u00003", "n": %d}' % (MAX_N + 1), 422,
     f"n: Input should be less than or equal to {MAX_N}"),
    ("POST", "/recommend", b'{"user": "u00003", "n": 10, "rank": true, "candidates": 5}', 422,
     "candidates must be between n (10) and 1000, got 5"),
    ("POST", "/recommend", b'{"user": "u00003", "colour": "red"}', 422, "colour: Extra inputs are not permitted"),
    ("POST", "/recommend", b"[]", 422, "Input should be an object"),
    ("POST", "/recommend", b"{}", 422, "give user, history or both"),
    ("POST", "/recommend", json.dumps({"history": ["i00001"] * (MAX_HISTORY + 1)}).encode(), 422,
     f"history: List should have at most {MAX_HISTORY} items after validation, not {MAX_HISTORY + 1}"),
    ("POST", "/recommend", BIG, 413, "request body over 1048576 bytes"),
    ("POST", "/recommend", iter([BIG[i : i + 65536] for i in range(0, len(BIG), 65536)]), 413,
     "request body over 1048576 bytes"),  # chunked: no Content-Length to refuse it by
    ("GET", "/nowhere", None, 404, "Not Found"),
    ("GET", "/recommend", None, 405, "Method Not Allowed"),
    ("GET", "/users?limit=0", None, 422, "limit: Input should be greater than or equal to 1"),
    ("POST", "/admin/reload", b'{"bundle": 3}', 422, "bundle: Input should be a valid string"),
])
def test_bad_requests_get_one_line_json_errors(client, method, path, content, status, message):
    resp = client.request(method, path, content=content)
    assert resp.status_code == status
    assert resp.headers["content-type"] == "application/json"
    assert "\n" not in resp.text and "Traceback" not in resp.text
    assert resp.json() == {"error": message}
    assert client.post("/recommend", json={"user": USER, "n": 2}).status_code == 200  # still serving


def test_the_explorer_page_contract(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    for element in ("user", "random-user", "item-search", "n", "rank", "go", "chips", "status", "interests"):
        assert f'id="{element}"' in html, element
    api = dict(re.findall(r'(\w+): "(/[^"]*)"', re.search(r"const API = \{([^}]*)\}", html).group(1)))
    assert set(api) == {"recommend", "info", "users", "items"}
    info = client.get(api["info"]).json()
    assert info["interests"] == 4 and info["ranker"] == "din" and info["limits"]["n"] == MAX_N
    users = client.get(f"{api['users']}?limit=50").json()["users"]
    assert len(users) == 50 and set(users[0]) == {"user", "history"}
    found = client.get(f"{api['items']}?q=topic&limit=12").json()["items"]
    assert len(found) == 12 and all("topic" in f["title"] for f in found)
    # the body the page sends
    body = {"n": 10, "explain": True, "rank": False, "user": users[0]["user"], "history": [found[0]["item"]]}
    answer = client.post(api["recommend"], json=body).json()
    assert answer["interests"] and all("because" in it for it in answer["items"])
    schema = client.get("/openapi.json").json()
    assert {"/recommend", "/recommend/batch", "/healthz", "/readyz", "/metrics", "/admin/reload"} <= set(schema["paths"])
    assert "history" in str(schema["paths"]["/recommend"]["post"]["requestBody"])


def test_the_page_ships_as_package_data():
    import tomllib

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "*.html" in pyproject["tool"]["setuptools"]["package-data"]["retrieval.server"]
    assert (REPO / "retrieval" / "server" / "explorer.html").is_file()


# ----------------------------------------------------------------------------- reload


def test_reload_swaps_models_and_a_failed_one_keeps_the_old(client, bundle_k4, index_k4, din_k4, bundle_k1, index_k1):
    k4 = fingerprint(bundle_k4)
    bad = client.post("/admin/reload", json={"index": "/no/such/index"})
    assert bad.status_code == 422
    assert bad.json()["error"].startswith(f"reload failed, still serving {bundle_k4}: /no/such/index: ")
    assert "manifest.json" in bad.json()["error"]  # the loader's own reason follows
    mismatch = client.post("/admin/reload", json={"bundle": str(bundle_k1)})  # k1 beside k4's index
    assert mismatch.status_code == 422 and "built from another model bundle" in mismatch.json()["error"]
    assert client.get("/readyz").json()["fingerprints"]["bundle"] == k4
    assert client.get("/admin/reload").json()["last"]["ok"] is False

    swapped = client.post("/admin/reload", json={"bundle": str(bundle_k1), "index": str(index_k1), "ranker": None})
    assert swapped.status_code == 200, swapped.text
    assert client.get("/readyz").json()["fingerprints"] == swapped.json()["fingerprints"]
    assert swapped.json()["fingerprints"]["bundle"] == fingerprint(bundle_k1) and swapped.json()["info"]["interests"] == 1
    answer = client.post("/recommend", json={"user": USER, "n": 5}).json()
    assert {it["interest"] for it in answer["items"]} == {0}
    assert client.post("/recommend", json={"user": USER, "rank": True}).json() == {
        "error": "rank: no ranker is loaded (start the server with --ranker)"}
    back = client.post("/admin/reload", json={"bundle": str(bundle_k4), "index": str(index_k4), "ranker": str(din_k4)})
    assert back.status_code == 200 and client.get("/readyz").json()["fingerprints"]["bundle"] == k4
    assert f'bundle_fingerprint="{k4}"' in client.get("/metrics").text


def test_zero_failed_requests_across_hot_reloads_under_load(server, client, bundle_k4, index_k4, din_k4,
                                                            bundle_k1, index_k1, tmp_path):
    bodies = tmp_path / "bodies.jsonl"
    bodies.write_text("\n".join(json.dumps(b) for b in (
        {"user": USER, "n": 10}, {"user": "u00020", "history": ["i00005"], "n": 10}, {"history": ["i00007"], "n": 5},
        {"user": "u00031", "n": 20, "explain": True})) + "\n")
    out = tmp_path / "load.json"
    load = subprocess.Popen([sys.executable, "-m", "bench.loadgen", "--url", f"{server.url}/recommend",
                             "--bodies", str(bodies), "--rate", "150", "--max-seconds", "3", "--out", str(out)],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        time.sleep(1.0)
        first = client.post("/admin/reload", json={"bundle": str(bundle_k1), "index": str(index_k1), "ranker": None})
        second = client.post("/admin/reload", json={"bundle": str(bundle_k4), "index": str(index_k4), "ranker": str(din_k4)})
        assert load.wait(60) == 0
    finally:
        if load.poll() is None:
            load.kill()
    assert first.status_code == 200 and second.status_code == 200
    result = json.loads(out.read_text())
    assert result["sent"] == 450 and result["completed"] == 450
    assert result["errors"] == 0, result["errors_by_kind"]


def test_sighup_reloads_the_same_paths(server, client, bundle_k4):
    before = (client.get("/admin/reload").json()["last"] or {}).get("at", 0)
    os.kill(server.proc.pid, signal.SIGHUP)
    deadline = time.monotonic() + 60
    while (last := client.get("/admin/reload").json()["last"]) is None or last["at"] == before:
        assert time.monotonic() < deadline, "no reload after SIGHUP"
        time.sleep(0.1)
    assert last["ok"] and last["fingerprints"]["bundle"] == fingerprint(bundle_k4)
    assert client.post("/recommend", json={"user": USER}).status_code == 200


# ----------------------------------------------------------------------------- lifecycle


def test_sigterm_drains_the_requests_in_flight(bundle_k4, index_k4, tmp_path):
    # a long batching wait holds the requests inside the server when SIGTERM comes
    with running_server(tmp_path, "--bundle", bundle_k4, "--index", index_k4, "--max-wait-ms", "3000") as s:
        results: list[int] = []

        def ask(user: str) -> None:
            results.append(httpx.post(f"{s.url}/recommend", json={"user": user, "n": 5}, timeout=30).status_code)

        threads = [threading.Thread(target=ask, args=(f"u000{10 + i}",)) for i in range(6)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while 'retrieve_http_requests_in_flight{path="/recommend"} 6.0' not in httpx.get(f"{s.url}/metrics").text:
            assert time.monotonic() < deadline, "the requests never reached the server"
            time.sleep(0.02)
        s.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(30)
        assert s.proc.wait(30) == 0
        assert results == [200] * 6
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{s.url}/healthz", timeout=2)
        assert "Waiting for connections to close" in s.log.read_text() or "Shutting down" in s.log.read_text()


def test_artifacts_that_do_not_belong_together_end_the_server_with_a_clean_error(bundle_k1, index_k4, tmp_path):
    with running_server(tmp_path, "--bundle", bundle_k1, "--index", index_k4, wait_ready=False) as s:
        assert s.proc.wait(120) == 2
        text = s.log.read_text()
    assert "Traceback" not in text
    assert text.strip().splitlines()[-1].startswith(f"error: {index_k4}: the index was built from another model bundle")


def test_serve_checks_its_paths_before_starting(invoke, index_k4, tmp_path):
    from conftest import assert_clean_error

    result = invoke("serve", "--bundle", tmp_path / "nowhere", "--index", index_k4)
    assert_clean_error(result, f"{tmp_path / 'nowhere'}: not a directory")


@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_the_fast_path_answers_as_the_framework_routes(bundle_k4, index_k4):
    """/recommend, /recommend/batch and /healthz are served beside FastAPI; with fast_path off the
    FastAPI routes serve them: the same statuses and bodies either way (in process)."""
    from fastapi.testclient import TestClient

    from retrieval.server.app import ServeConfig, create_app

    cases = [("POST", "/recommend", {"user": USER, "n": 5, "explain": True}),
             ("POST", "/recommend", {"history": ["i00001", "zz"], "n": 3}),
             ("POST", "/recommend/batch", {"requests": [{"user": USER, "n": 2}, {"history": [], "n": 1}]}),
             ("POST", "/recommend", {"user": USER, "n": 0}),
             ("POST", "/recommend", {"user": USER, "rank": True}),
             ("POST", "/recommend", b'{"user": '),
             ("GET", "/healthz", None)]
    answers = []
    for fast in (True, False):
        app = create_app(ServeConfig(bundle=bundle_k4, index=index_k4, fast_path=fast))
        with TestClient(app) as c:
            deadline = time.monotonic() + 60
            while c.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            got = []
            for method, path, body in cases:
                r = c.request(method, path, **({"content": body} if isinstance(body, bytes) else {"json": body}))
                got.append((r.status_code, r.headers["content-type"], r.json()))
            answers.append(got)
    assert answers[0] == answers[1]
    assert [a[0] for a in answers[0]] == [200, 200, 200, 422, 422, 400, 200]
