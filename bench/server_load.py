"""llama-server with a CARVQ model under load (issue 12, item 15), on loopback.

8 client threads x 50 requests each against `llama-server --parallel 4`: chat completions,
half of them streaming, every fifth streaming one cancelled after its first chunks (the client
closes the connection). All greedy, over a handful of prompts whose single-client answers are
taken first. Records: crashes (the server must stay up), malformed responses, greedy answers
that differ from the single-client ones, request latencies, and the server's RSS before and
after. Every loop and every request is bounded.

    python bench/server_load.py [--model gemma3|smollm2] [--clients 8] [--requests 50]

Writes bench/results/server_load.{json,md} (server_load_stock.* with --stock, the same load on
the stock GGUF: llama.cpp's own greedy answers also depend on how requests share a batch).
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert import machine  # noqa: E402
from screen import MODELS, _converted  # noqa: E402

from carvq.runtime import tool_path  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = ["What is the capital of France?", "Name three colours.", "Write one sentence about the sea.",
           "What is 2 + 3?", "Say hello in Spanish.", "Give a synonym of happy."]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Server:
    def __init__(self, model: Path, parallel: int, ctx: int):
        self.port = _free_port()
        self.log = tempfile.NamedTemporaryFile("w", prefix="carvq-server-", suffix=".log", delete=False)
        self.proc = subprocess.Popen([str(tool_path("llama-server")), "-m", str(model), "--host", "127.0.0.1",
                                      "--port", str(self.port), "--parallel", str(parallel), "-c", str(ctx),
                                      "-t", str(os.cpu_count() or 1), "--no-webui"],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 180
        while True:
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                raise SystemExit(f"llama-server did not come up (see {self.log.name})")
            time.sleep(0.5)

    def get(self, path: str):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", path)
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def chat(self, prompt: str, max_tokens: int, stream: bool, cancel_after: int | None = None) -> dict:
        """One chat completion; the answer's text, or why the response was malformed."""
        body = json.dumps({"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                           "temperature": 0, "seed": 1, "stream": stream})
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        t0 = time.time()
        try:
            conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
            r = conn.getresponse()
            if r.status != 200:
                return {"error": f"HTTP {r.status}: {r.read()[:200]!r}"}
            if not stream:
                msg = json.loads(r.read())
                return {"text": msg["choices"][0]["message"]["content"], "seconds": time.time() - t0}
            text, chunks, done = [], 0, False
            while True:
                line = r.readline()
                if not line:
                    break
                line = line.strip()
                if not line:
                    continue
                if not line.startswith(b"data: "):
                    return {"error": f"not an SSE data line: {line[:100]!r}"}
                payload = line[6:]
                if payload == b"[DONE]":
                    done = True
                    break
                delta = json.loads(payload)["choices"][0].get("delta", {})
                text.append(delta.get("content") or "")
                chunks += 1
                if cancel_after is not None and chunks >= cancel_after:
                    return {"cancelled": True, "seconds": time.time() - t0}
            if not done:
                return {"error": "stream ended without [DONE]"}
            return {"text": "".join(text), "seconds": time.time() - t0}
        except (OSError, ValueError, KeyError, IndexError) as exc:
            return {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            conn.close()

    def stop(self) -> int | None:
        crashed = self.proc.poll()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
        return crashed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma3", choices=sorted(MODELS))
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--stock", action="store_true", help="the stock GGUF instead (the control)")
    args = ap.parse_args()
    label, fetch, _ = MODELS[args.model]
    model = fetch() if args.stock else _converted(args.model, fetch())
    RESULTS.mkdir(exist_ok=True)
    server = Server(model, args.parallel, ctx=args.parallel * 512)
    pid = server.proc.pid
    reference = {p: server.chat(p, args.max_tokens, stream=False) for p in PROMPTS}
    bad_ref = {p: r for p, r in reference.items() if "text" not in r}
    if bad_ref:
        raise SystemExit(f"single-client answers failed: {bad_ref}")
    rss_before = _rss_mib(pid)
    outcomes: list[dict] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        rng = random.Random(i)
        for j in range(args.requests):
            prompt = rng.choice(PROMPTS)
            stream = j % 2 == 1
            cancel = 2 if stream and j % 5 == 3 else None
            r = server.chat(prompt, args.max_tokens, stream, cancel)
            r.update(prompt=prompt, stream=stream)
            with lock:
                outcomes.append(r)

    t0 = time.time()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=3600)
    seconds = time.time() - t0
    alive = server.proc.poll() is None
    health = server.get("/health")[0] if alive else None
    rss_after = _rss_mib(pid) if alive else float("nan")
    crashed = server.stop()
    done = [o for o in outcomes if "text" in o]
    res = {
        "date": str(date.today()), "machine": machine(), "model": f"{label} {'stock' if args.stock else 'CARVQ'} ({model.name})",
        "clients": args.clients, "requests_per_client": args.requests, "parallel": args.parallel,
        "max_tokens": args.max_tokens, "seconds": round(seconds, 1),
        "requests": len(outcomes), "completed": len(done), "cancelled": sum(1 for o in outcomes if o.get("cancelled")),
        "malformed": [o for o in outcomes if "error" in o][:10],
        "n_malformed": sum(1 for o in outcomes if "error" in o),
        "greedy_identical": sum(1 for o in done if o["text"] == reference[o["prompt"]]["text"]),
        "greedy_differs": [{"prompt": o["prompt"], "got": o["text"], "single": reference[o["prompt"]]["text"]}
                           for o in done if o["text"] != reference[o["prompt"]]["text"]][:5],
        "latency_s": {"median": round(statistics.median(o["seconds"] for o in done), 3) if done else None,
                      "max": round(max((o["seconds"] for o in done), default=0), 3)},
        "server_alive_after": alive and health == 200 and crashed is None,
        "rss_mib": {"before": round(rss_before, 1), "after": round(rss_after, 1)},
    }
    tag = "server_load" + ("_stock" if args.stock else "")
    (RESULTS / f"{tag}.json").write_text(json.dumps(res, indent=1) + "\n")
    md = (f"| model | requests (clients x each) | completed / cancelled | malformed | greedy = single client | "
          f"median / max latency | server up after | RSS before → after |\n|---|---|---|---|---|---|---|---|\n"
          f"| {res['model']} | {res['requests']} ({args.clients} x {args.requests}), --parallel {args.parallel} | "
          f"{res['completed']} / {res['cancelled']} | {res['n_malformed']} | "
          f"{res['greedy_identical']} / {res['completed']} | {res['latency_s']['median']} / {res['latency_s']['max']} s | "
          f"{'yes' if res['server_alive_after'] else 'NO'} | {res['rss_mib']['before']} → {res['rss_mib']['after']} MiB |")
    (RESULTS / f"{tag}.md").write_text(md + "\n")
    print(md)
    print(json.dumps({k: res[k] for k in ("malformed", "greedy_differs")}, indent=1))


if __name__ == "__main__":
    main()
