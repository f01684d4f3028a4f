"""Load test of ``zipmoe-rt serve``: requests/s, time to first token (p50/p99) and the server's
peak RSS over N streamed chat requests from C concurrent clients.

Starts ``zipmoe-rt serve MODEL`` on a free 127.0.0.1 port (or uses ``--url``, which must be on
127.0.0.1/localhost), waits for ``/health``, sends ``--requests`` requests (prompts from
tools/prompts.txt in turn, greedy, ``--max-tokens`` each) and stops at ``--time-limit`` seconds
whatever the count. Standard library only (http.client); the server needs the server extra.

    python tools/load_server.py [MODEL] --requests 200 --concurrency 8 --max-tokens 16

TTFT is measured at the client: from sending the request to the first content chunk, so it
includes the time spent queued behind other requests. Peak RSS is the server process's VmHWM
(Linux), known only when this script started the server.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

PROMPTS = Path(__file__).with_name("prompts.txt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(host, port, path, timeout=10):
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def one_request(host, port, messages, max_tokens, timeout):
    """One streamed chat request; returns (ttft_s or None, total_s, completion_tokens, ok)."""
    body = json.dumps({"messages": messages, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True}})
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    ttft, tokens = None, 0
    try:
        conn.request("POST", "/v1/chat/completions", body=body,
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            r.read()
            return None, time.perf_counter() - t0, 0, False
        buf = b""
        while True:
            chunk = r.read1(65536) if hasattr(r, "read1") else r.read(1)
            if not chunk:
                break
            buf += chunk
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                data = event.removeprefix(b"data: ")
                if data == b"[DONE]":
                    continue
                obj = json.loads(data)
                if ttft is None and obj.get("choices") and obj["choices"][0]["delta"].get("content"):
                    ttft = time.perf_counter() - t0
                if obj.get("usage"):
                    tokens = obj["usage"]["completion_tokens"]
        return ttft, time.perf_counter() - t0, tokens, True
    finally:
        conn.close()


def _peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", help=".zmoe file (default: the bundled model)")
    ap.add_argument("--url", help="use a running server on 127.0.0.1 instead of starting one")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--time-limit", type=float, default=600.0, help="seconds, in all")
    ap.add_argument("--json", help="write the figures here as JSON")
    a = ap.parse_args(argv)
    if not 1 <= a.requests <= 100_000 or not 1 <= a.concurrency <= 256:
        ap.error("--requests must be in [1, 100000] and --concurrency in [1, 256]")
    deadline = time.monotonic() + a.time_limit
    proc = None
    if a.url:
        u = urlparse(a.url)
        if u.hostname not in ("127.0.0.1", "localhost"):
            ap.error("--url must be on 127.0.0.1 (this script only loads a local server)")
        host, port = "127.0.0.1", u.port or 80
    else:
        host, port = "127.0.0.1", _free_port()
        cmd = [sys.executable, "-m", "zipmoe_rt.cli", "serve", "--port", str(port),
               "--queue", str(a.concurrency)] + ([a.model] if a.model else [])
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        t_start = time.monotonic()
        while True:
            if proc is not None and proc.poll() is not None:
                sys.exit(f"server exited: {proc.stderr.read().decode()[-2000:]}")
            try:
                if _get(host, port, "/health")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                sys.exit("the server did not become ready within --time-limit")
            time.sleep(0.2)
        load_s = time.monotonic() - t_start
        prompts = [l.strip() for l in PROMPTS.read_text().splitlines() if l.strip()]
        # warm-up (kernel compilation on a fresh process), not counted
        one_request(host, port, [{"role": "user", "content": prompts[0]}], 2, 300)
        results, lock, counter = [], threading.Lock(), iter(range(a.requests))

        def client():
            while time.monotonic() < deadline:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                msgs = [{"role": "user", "content": prompts[i % len(prompts)]}]
                left = max(1.0, deadline - time.monotonic())
                try:
                    r = one_request(host, port, msgs, a.max_tokens, left)
                except OSError:
                    r = (None, 0.0, 0, False)
                with lock:
                    results.append(r)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, daemon=True) for _ in range(a.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()) + 5)
        wall = time.perf_counter() - t0
        ok = [r for r in results if r[3]]
        ttfts = [r[0] for r in ok if r[0] is not None]
        out = {"requests": len(results), "ok": len(ok), "concurrency": a.concurrency,
               "max_tokens": a.max_tokens, "wall_s": round(wall, 2),
               "requests_per_s": round(len(ok) / wall, 3) if wall else None,
               "output_tokens_per_s": round(sum(r[2] for r in ok) / wall, 2) if wall else None,
               "ttft_p50_s": round(pct(ttfts, 50), 3), "ttft_p99_s": round(pct(ttfts, 99), 3),
               "latency_p50_s": round(statistics.median(r[1] for r in ok), 3) if ok else None,
               "server_load_s": round(load_s, 1),
               "server_peak_rss_mb": round(_peak_rss_mb(proc.pid), 1) if proc else None,
               "cpus": os.cpu_count()}
        print(json.dumps(out, indent=2))
        if a.json:
            Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
        return 0 if len(ok) == len(results) == a.requests else 1
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    sys.exit(main())
