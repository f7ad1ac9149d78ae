"""`plait serve --replicas 2` under bounded concurrent load, one replica killed (SIGKILL) mid-load.

The router and its two replicas run on 127.0.0.1 (one intra-op thread each). A round sends 12
requests at once (8 streamed, 4 whole; greedy and seeded sampling, 100 new tokens each) and, once
at least three streams are under way, SIGKILLs the replica with the most requests in flight.
A request is lost if it fails or its text differs from the same request's text in an undisturbed
round run first. recovery_s: from the kill to the last of the dead replica's requests running
again on the survivor (the router's record in /health: a whole completion sent again, a stream's
next event delivered); the JSON has the median over rounds (recovery_s_max: the worst).
stream_gap_s: measured by the client, the longest wait from the kill to the next chunk of any
stream in flight then. restart_s: kill to a replacement replica ready (a new Python process
imports torch and loads the model).

    python benchmarks/serve_failover.py [--quick] [--json benchmarks/results/serve_failover.json]
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
from common import benchmark_parser, median, print_table, write_json

from plait.config import Config, ModelConfig
from plait.models import GPT
from plait.train.checkpoint import save_checkpoint

MODEL = dict(n_layer=2, n_head=4, n_embd=64, block_size=128, vocab_size=256, dropout=0.0)
NAME = "failover"
KEY = "bench-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
JOBS = [(f"request {i}: ", {"max_tokens": 100, "temperature": 0.0 if i % 3 == 0 else 0.8, "seed": i,
                            "top_k": 60}, i % 3 != 2) for i in range(12)]


def write_model(root: Path) -> Path:
    torch.manual_seed(0)
    model = GPT(ModelConfig(**MODEL)).eval()
    cfg = Config(model=ModelConfig(**MODEL))
    save_checkpoint(root / "checkpoints", 1, {"model": model.state_dict(), "state": {"step": 1, "config": cfg.to_dict()}})
    return root


def start_router(run: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "plait.cli", "serve", str(run), "--host", "127.0.0.1", "--port", "0",
                             "--model-name", NAME, "--api-key", KEY, *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        m = re.search(r"serving .* on (http://127\.0\.0\.1:\d+)", line)
        if m:
            # Keep draining its output, so the router never blocks on a full pipe.
            import threading
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc, m.group(1)
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError("the router did not start")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


async def health(client, url: str) -> dict:
    return (await client.get(f"{url}/health", headers=AUTH)).json()


async def one(client, url: str, i: int, seen: list[list[float]]) -> str | None:
    """Request i's text (None if it failed); stream chunk arrival times go to seen[i]."""
    import httpx

    prompt, kw, stream = JOBS[i]
    body = {"model": NAME, "prompt": prompt, "stream": stream, **kw}
    try:
        if not stream:
            r = await client.post(f"{url}/v1/completions", json=body, headers=AUTH)
            return r.json()["choices"][0]["text"] if r.status_code == 200 else None
        text, done = [], False
        async with client.stream("POST", f"{url}/v1/completions", json=body, headers=AUTH) as r:
            if r.status_code != 200:
                return None
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    event = json.loads(line[6:])
                    if "error" in event:
                        return None
                    seen[i].append(time.monotonic())
                    text.append(event["choices"][0]["text"])
        return "".join(text) if done else None
    except (httpx.HTTPError, OSError, ValueError, KeyError):
        return None


async def round_(url: str, kill: bool, limit_s: float) -> dict:
    import httpx

    seen: list[list[float]] = [[] for _ in JOBS]
    out: dict = {}
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as client:
        before = await health(client, url)
        tasks = [asyncio.create_task(one(client, url, i, seen)) for i in range(len(JOBS))]
        if kill:
            deadline = time.monotonic() + limit_s
            while sum(3 <= len(s) < 80 for s in seen) < 3 and time.monotonic() < deadline:
                await asyncio.sleep(0.002)
            victim = max((await health(client, url))["replicas"], key=lambda r: r["ongoing"])
            t_kill, t_kill_wall = time.monotonic(), time.time()
            os.kill(victim["pid"], signal.SIGKILL)
            started = [i for i, s in enumerate(seen) if s]  # streams that had sent something
            out.update(victim_ongoing=victim["ongoing"])
        done, pending = await asyncio.wait(tasks, timeout=limit_s)
        for t in pending:
            t.cancel()
        out["texts"] = [t.result() if t in done else None for t in tasks]
        if kill:
            gaps = []
            for i in started:
                after = [t for t in seen[i] if t > t_kill]
                if after and len(seen[i]) > len(after):  # under way at the kill, and it went on
                    gaps.append(after[0] - t_kill)
            out["stream_gap_s"] = max(gaps) if gaps else float("nan")
            out["streams_in_flight"] = len(gaps)
            old = {r["pid"] for r in before["replicas"]}
            while time.monotonic() - t_kill < limit_s:
                h = await health(client, url)
                ready = {r["pid"] for r in h["replicas"] if r["state"] == "ready"}
                if len(ready) == 2 and ready - old:
                    out["restart_s"] = time.monotonic() - t_kill
                    moved = [f for f in h["failovers"] if f["failed"] >= t_kill_wall - 0.01]
                    out["moved_requests"] = len(moved)
                    out["recovery_s"] = max(f["resumed"] for f in moved) - t_kill_wall if moved else float("nan")
                    break
                await asyncio.sleep(0.05)
            else:
                out["restart_s"] = out["recovery_s"] = float("nan")
    return out


def main() -> None:
    ap = benchmark_parser(__doc__, "2 kill rounds instead of 5 (about a minute on a quiet 2-core machine)")
    args = ap.parse_args()
    rounds = 2 if args.quick else 5
    limit_s = 120.0
    run = write_model(Path(tempfile.mkdtemp(prefix="serve_failover-")) / "run")
    proc, url = start_router(run, "--replicas", "2", "--max-seqs", "8", "--prefill-chunk", "16")
    try:
        loop = asyncio.new_event_loop()
        reference = loop.run_until_complete(round_(url, False, limit_s))["texts"]
        if None in reference:
            raise RuntimeError("the undisturbed round failed")
        results = []
        for k in range(rounds):
            r = loop.run_until_complete(round_(url, True, limit_s))
            r["lost"] = sum(t != ref for t, ref in zip(r.pop("texts"), reference))
            results.append(r)
            print(f"round {k}: lost {r['lost']}, {r['moved_requests']} requests moved, recovery "
                  f"{r['recovery_s']:.3f} s (longest stream gap {r['stream_gap_s']:.3f} s), restart "
                  f"{r['restart_s']:.2f} s", flush=True)
        metrics = loop.run_until_complete(_router_metrics(url))
        loop.close()
    finally:
        stop(proc)
    lost = sum(r["lost"] for r in results)
    payload = {
        "benchmark": "serve_failover", "lost": lost, "recovery_s": median([r["recovery_s"] for r in results]),
        "recovery_s_max": max(r["recovery_s"] for r in results),
        "restart_s": median([r["restart_s"] for r in results]),
        "stream_gap_s": median([r["stream_gap_s"] for r in results]), "rounds": results,
        "requests_per_round": len(JOBS), "streams_per_round": sum(j[2] for j in JOBS),
        "router_failover_s_mean": metrics.get("plait_router_failover_seconds_sum", 0.0)
        / max(1.0, metrics.get("plait_router_failover_seconds_count", 0.0)),
        "router_retries": metrics.get("plait_router_retries_total"),
        "model": MODEL, "targets": {"lost": 0, "recovery_s": 2.0},
    }
    write_json(args.json, payload)
    print_table("plait serve --replicas 2, one replica SIGKILLed per round",
                ["rounds", "requests", "lost", "recovery_s median", "recovery_s max", "restart_s median"],
                [[rounds, rounds * len(JOBS), lost, f"{payload['recovery_s']:.3f}",
                  f"{payload['recovery_s_max']:.3f}", f"{payload['restart_s']:.2f}"]])


async def _router_metrics(url: str) -> dict[str, float]:
    import httpx

    async with httpx.AsyncClient(timeout=30) as client:
        text = (await client.get(f"{url}/metrics", headers=AUTH)).text
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
            if line.startswith("plait_router_") and "{" not in line}


if __name__ == "__main__":
    main()
