"""The explorer page in a real headless browser: Chromium loads / from `retrieve serve`, runs its
JavaScript against the live API, and we read back the rendered page and a screenshot.

    python bench/explorer_check.py --bundle B --index I [--ranker R] --out DIR [--user ID] [--history ID,ID]

Needs Chromium from the distribution (`apt-get install -y chromium`); it is not a test
dependency. The page is opened twice with URL parameters (which fill the form and run it):
a known user with three fresh behaviours appended, and a new user with only those
behaviours. For each, the DOM after the scripts ran (--dump-dom) is checked: the model line
was filled from /info, no error is shown, there is one card per interest holding
"built from" behaviours and recommended items with titles, and the fresh behaviours are
shown as chips. Writes DIR/explorer-*.png, DIR/explorer-*.html and DIR/explorer_check.json;
exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


class Page(HTMLParser):
    """The few things the checks read from the rendered DOM."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[tuple[str, dict[str, str]]] = []
        self.text: dict[str, str] = {}  # element id -> its text
        self.cards: list[dict[str, Any]] = []
        self.chips = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag in ("meta", "input", "br", "img", "link"):
            return
        self.stack.append((tag, a))
        if "interest" in a.get("class", "").split():
            self.cards.append({"interest": a.get("data-interest"), "headings": [], "items": 0, "behaviours": 0})
        if "chip" in a.get("class", "").split():
            self.chips += 1
        if tag == "li" and self.cards and any("interest" in x.get("class", "").split() for _, x in self.stack):
            inside = [t for t, _ in self.stack]
            if "ol" in inside:
                self.cards[-1]["items"] += 1
            elif "ul" in inside:
                self.cards[-1]["behaviours"] += 1

    def handle_endtag(self, tag: str) -> None:
        while self.stack:
            t, _ = self.stack.pop()
            if t == tag:
                break

    def handle_data(self, data: str) -> None:
        for _, a in self.stack:
            if "id" in a:
                self.text[a["id"]] = self.text.get(a["id"], "") + data
        if self.stack and self.stack[-1][0] == "h3" and self.cards:
            self.cards[-1]["headings"].append(data.strip())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    raise SystemExit("error: no chromium on the PATH (apt-get install -y chromium)")


def browse(url: str, out: Path, name: str) -> tuple[Path, str]:
    """Screenshot and DOM of `url` after its scripts ran (virtual time lets the fetches finish)."""
    common = [chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
              "--window-size=1400,1100", "--virtual-time-budget=15000", "--run-all-compositor-stages-before-draw"]
    shot = out / f"explorer-{name}.png"
    subprocess.run([*common, f"--screenshot={shot}", url], check=True, capture_output=True, timeout=120)
    dom = subprocess.run([*common, "--dump-dom", url], check=True, capture_output=True, text=True, timeout=120).stdout
    (out / f"explorer-{name}.html").write_text(dom)
    return shot, dom


def check(dom: str, fresh: int, new_user: bool) -> dict[str, Any]:
    page = Page()
    page.feed(dom)
    status = " ".join(page.text.get("status", "").split())
    model = page.text.get("model", "")
    cards = [c for c in page.cards if c["interest"] is not None]
    checks = {
        "model line filled from /info": "items" in model and "bundle" in model,
        "no error shown": "error" not in status.lower() and bool(status),
        "served as asked": ("new user" in status) if new_user else ("user " in status and "new user" not in status),
        "one card per interest with behaviours": bool(cards) and all(c["behaviours"] > 0 for c in cards[:1]),
        "recommendations under the interests": sum(c["items"] for c in page.cards) > 0,
        "fresh behaviours shown": page.chips == fresh,
        "answer time shown": bool(re.search(r"answered in [\d.]+ ms", status)),
    }
    return {"checks": checks, "status": status, "model": model, "cards": page.cards, "chips": page.chips}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--ranker", type=Path, default=None)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--user", default=None, help="a known user (default: the bundle's first)")
    parser.add_argument("--history", default=None, help="comma-separated fresh item ids (default: three of the log's)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "cli", "serve", "--bundle", str(args.bundle), "--index", str(args.index), "--port", str(port)]
    if args.ranker:
        cmd += ["--ranker", str(args.ranker)]
    log = open(args.out / "explorer-server.log", "wb")
    server = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    report: dict[str, Any] = {}
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None:
                raise SystemExit(f"error: the server exited with {server.returncode}; see {args.out / 'explorer-server.log'}")
            try:
                with urllib.request.urlopen(f"{base}/readyz", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("error: the server was not ready in 300 s") from None
                time.sleep(0.2)
        with urllib.request.urlopen(f"{base}/users?limit=1") as r:
            user = args.user or json.loads(r.read())["users"][0]["user"]
        if args.history:
            fresh = args.history.split(",")
        else:
            with urllib.request.urlopen(f"{base}/items?q=1&limit=3") as r:
                fresh = [x["item"] for x in json.loads(r.read())["items"]]
        runs = {"known-user": ({"user": user, "history": ",".join(fresh), "n": "12"}, False),
                "new-user": ({"history": ",".join(fresh), "n": "12"}, True)}
        for name, (params, new_user) in runs.items():
            url = f"{base}/?{urllib.parse.urlencode(params)}"
            shot, dom = browse(url, args.out, name)
            report[name] = {"url": url, "screenshot": str(shot), **check(dom, len(fresh), new_user)}
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    ok = all(all(r["checks"].values()) for r in report.values())
    report["ok"] = ok
    (args.out / "explorer_check.json").write_text(json.dumps(report, indent=2) + "\n")
    for name, r in report.items():
        if isinstance(r, dict):
            failed = [k for k, v in r["checks"].items() if not v]
            print(f"{name}: {'ok' if not failed else 'FAILED: ' + ', '.join(failed)}  ({len(r['cards'])} cards; "
                  f"status: {r['status'][:120]})  {r['screenshot']}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
