"""`plait serve` autoscaling: waking from zero replicas, a step in load, and back down to zero.

The router (127.0.0.1, replicas of one intra-op thread) runs with min_replicas 0, max_replicas 3,
target_ongoing_requests 2, upscale_delay_s 1 and downscale_delay_s 2. A round:
1. waits until the router has scaled to zero, then sends one streamed request:
   first_token_from_zero_s = its time to first token (a replica process starts for it);
2. keeps one client busy until one replica is ready, then steps to 8 clients at once (wanting
   4 replicas, clamped to 3): scale_up_s = the step to the router's scale-up event (target
   upscale_delay_s + up to 2 s), scale_up_ready_s = the step to all 3 replicas ready;
3. stops the load: scale_to_zero_s = the end of the load to the target back at zero (at least
   2 × downscale_delay_s: 3 → 1 → 0, as Ray Serve scales to zero only from one).
The JSON has the medians over rounds.

    python benchmarks/serve_autoscale.py [--quick] [--json benchmarks/results/serve_autoscale.json]
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import benchmark_parser, median, print_table, write_json
from serve_failover import AUTH, NAME, start_router, stop, write_model

SCALING = {"min_replicas": 0, "max_replicas": 3, "target_ongoing_requests": 2.0, "upscale_delay_s": 1.0,
           "downscale_delay_s": 2.0}
CLIENTS = 8
LIMIT_S = 180.0  # any phase that takes longer ends the benchmark


async def health(client, url: str) -> dict:
    return (await client.get(f"{url}/health", headers=AUTH)).json()


async def until(client, url: str, check, what: str) -> tuple[dict, float]:
    t0 = time.monotonic()
    while time.monotonic() - t0 < LIMIT_S:
        h = await health(client, url)
        if check(h):
            return h, time.time()
        await asyncio.sleep(0.02)
    raise RuntimeError(f"{what}: not within {LIMIT_S:g} s")


async def first_token(client, url: str) -> float:
    body = {"model": NAME, "prompt": "wake up", "max_tokens": 16, "temperature": 0, "stream": True}
    t0 = time.monotonic()
    ttft = None
    async with client.stream("POST", f"{url}/v1/completions", json=body, headers=AUTH) as r:
        assert r.status_code == 200, r.status_code
        async for line in r.aiter_lines():
            if line.startswith("data: {") and ttft is None:
                ttft = time.monotonic() - t0
    return ttft


async def load_client(client, url: str, stop_at: asyncio.Event, statuses: list[int]) -> None:
    body = {"model": NAME, "prompt": "some load", "max_tokens": 60, "temperature": 0}
    t0 = time.monotonic()
    while not stop_at.is_set() and time.monotonic() - t0 < 3 * LIMIT_S:
        statuses.append((await client.post(f"{url}/v1/completions", json=body, headers=AUTH)).status_code)


async def one_round(url: str) -> dict:
    import httpx

    out: dict = {}
    async with httpx.AsyncClient(timeout=LIMIT_S, limits=httpx.Limits(max_connections=64)) as client:
        await until(client, url, lambda h: h["target_replicas"] == 0 and not h["replicas"], "scale to zero")
        out["first_token_from_zero_s"] = await first_token(client, url)
        stop_load, statuses = asyncio.Event(), []
        tasks = [asyncio.create_task(load_client(client, url, stop_load, statuses))]
        await until(client, url, lambda h: h["ready_replicas"] == 1, "one replica")
        await asyncio.sleep(2 * SCALING["upscale_delay_s"])  # steady at one client, one replica
        step = time.time()
        tasks += [asyncio.create_task(load_client(client, url, stop_load, statuses)) for _ in range(CLIENTS - 1)]
        h, _ = await until(client, url, lambda h: h["target_replicas"] > 1, "scale-up")
        up = min(e["time"] for e in h["scale_events"] if e["time"] >= step and e["to"] > e["from"])
        out["scale_up_s"] = up - step
        _, ready = await until(client, url, lambda h: h["ready_replicas"] == SCALING["max_replicas"], "replicas ready")
        out["scale_up_ready_s"] = ready - step
        stop_load.set()
        await asyncio.gather(*tasks)
        idle = time.time()
        h, _ = await until(client, url, lambda h: h["target_replicas"] == 0, "scale down to zero")
        out["scale_to_zero_s"] = max(e["time"] for e in h["scale_events"] if e["to"] == 0) - idle
        out["requests"], out["failed"] = len(statuses), sum(s != 200 for s in statuses)
    return out


def main() -> None:
    ap = benchmark_parser(__doc__, "1 round instead of 3")
    args = ap.parse_args()
    rounds = 1 if args.quick else 3
    run = write_model(Path(tempfile.mkdtemp(prefix="serve_autoscale-")) / "run")
    flags = [f"--{k.replace('_', '-')}={v:g}" for k, v in SCALING.items()]
    proc, url = start_router(run, *flags, "--max-seqs", "8", "--prefill-chunk", "16")
    try:
        loop = asyncio.new_event_loop()
        results = []
        for k in range(rounds):
            r = loop.run_until_complete(one_round(url))
            results.append(r)
            print(f"round {k}: " + ", ".join(f"{key} {v:.2f}" if isinstance(v, float) else f"{key} {v}"
                                             for key, v in r.items()), flush=True)
        loop.close()
    finally:
        stop(proc)
    keys = ("first_token_from_zero_s", "scale_up_s", "scale_up_ready_s", "scale_to_zero_s")
    payload = {"benchmark": "serve_autoscale", **{k: median([r[k] for r in results]) for k in keys},
               "failed": sum(r["failed"] for r in results), "rounds": results, "autoscaling": SCALING,
               "clients": CLIENTS, "targets": {"scale_up_s": SCALING["upscale_delay_s"] + 2.0}}
    write_json(args.json, payload)
    print_table("plait serve autoscaling (medians over rounds, seconds)", ["rounds", *keys, "failed"],
                [[rounds, *(f"{payload[k]:.2f}" for k in keys), payload["failed"]]])


if __name__ == "__main__":
    main()
