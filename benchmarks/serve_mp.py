"""Model-parallel serving: pipelined pp=2 inference vs a naive layer split, and tp=2, on the same
requests.

One GPT (8 layers × 256 wide × 4 heads, 256-token context, byte vocabulary), saved as a plait run.
64 requests, prompts of 16-48 tokens, 48 greedy tokens each, all present at the start (64 slots:
all decode together), through `plait.serve.model_parallel.open_engine`:

- pp=2 pipelined across steps: the running sequences in 2 cohorts, one step of each in flight,
  so stage 0 runs cohort A's step t + 1 while stage 1 runs cohort B's step t (`cohorts=2`);
- pp=2 naive: the same 2 processes and engine, one step at a time, the whole batch through stage
  0, then through stage 1 (`cohorts=1, micro_batches=1`: one stage always idles);
- tp=2: Megatron column/row split of every block over 2 processes;
- one process: the plain engine, for reference.

Every process has one intra-op thread (2 processes on 2 cores). Pipelined and naive run on the
same engine, alternated round by round (A B, B A, ...); "ratio" is the median over rounds of
pipelined / naive wall time (ideal 1 / cohorts = 0.5). "cpu_bound_ratio" is the pipelined side's
busiest rank's CPU seconds over the naive side's two ranks' sum: about the ratio with a core per
process and free hand-offs, which a machine shared with other jobs does not give. tp=2 and one process are
timed in rounds of their own after that, with their outputs checked against pp's.

    python benchmarks/serve_mp.py [--quick] [--json benchmarks/results/serve_mp.json]
"""

from __future__ import annotations

import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import benchmark_parser, median, paired_ratio, print_table, round_order, write_json  # noqa: E402
from plait.config import Config, ModelConfig  # noqa: E402
from plait.models import GPT  # noqa: E402
from plait.serve import Engine, EngineConfig, SamplingParams  # noqa: E402
from plait.serve.model_parallel import open_engine  # noqa: E402
from plait.train.checkpoint import save_checkpoint  # noqa: E402

MODEL = dict(n_layer=8, n_head=4, n_embd=256, block_size=256, vocab_size=256, dropout=0.0)
QUICK_MODEL = dict(MODEL, n_layer=4)


def write_run(root: Path, model_cfg: ModelConfig) -> Path:
    torch.manual_seed(0)
    model = GPT(model_cfg).eval()
    cfg = Config(model=model_cfg)
    cfg.train.out_dir = str(root)
    state = {"step": 1, "sampler": {}, "rng": [torch.get_rng_state()], "config": cfg.to_dict(),
             "mesh": {"dp": 1, "pp": 1, "tp": 1}}
    save_checkpoint(root / "checkpoints", 1, {"model": model.state_dict(), "state": state})
    return root


def make_requests(n: int, new_tokens: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(rng.randint(16, 48))] for _ in range(n)]


def rank_cpu(engine: Engine) -> list[float] | None:
    """CPU seconds used so far by each rank's process (this one, then the workers), from /proc;
    None where that is not readable."""
    out = [time.process_time()]
    for p in engine.runner.workers.procs:
        try:
            fields = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        out.append((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
    return out


def timed(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> tuple[float, list[list[int]]]:
    t0 = time.perf_counter()
    out = engine.generate(prompts, params)
    return time.perf_counter() - t0, [c.token_ids for c in out]


def main() -> None:
    ap = benchmark_parser(__doc__, "4 layers, 32 requests × 24 tokens, two rounds (under a minute)")
    ap.add_argument("--rounds", type=int, default=0, help="rounds (default 5, --quick 2)")
    ap.add_argument("--requests", type=int, default=0, help="concurrent requests (default 64, --quick 32)")
    ap.add_argument("--cohorts", type=int, default=2, help="cohorts in flight when pipelined")
    ap.add_argument("--micro-batches", type=int, default=1, help="micro-batches per cohort step when pipelined")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = QUICK_MODEL if args.quick else MODEL
    n_requests, new_tokens = (32, 24) if args.quick else (64, 48)
    n_requests = args.requests or n_requests
    rounds = args.rounds or (2 if args.quick else 5)
    prompts = make_requests(n_requests, new_tokens)
    params = SamplingParams(max_tokens=new_tokens, temperature=0)
    path = write_run(Path(tempfile.mkdtemp(prefix="serve_mp-")) / "run", ModelConfig(**model))
    config = lambda: EngineConfig(max_seqs=n_requests, prefill_chunk=64)  # noqa: E731
    generated = n_requests * new_tokens

    engine = open_engine(path, config(), tp=1, pp=2, cohorts=args.cohorts, micro_batches=args.micro_batches,
                         threads=1)
    runner = engine.runner

    def use(name: str) -> None:
        pipelined = name == "pp2-pipelined"
        engine.cohorts = args.cohorts if pipelined else 1
        runner.micro_batches = args.micro_batches if pipelined else 1

    times: dict[str, list[float]] = {"pp2-pipelined": [], "pp2-naive": []}
    cpu: dict[str, list[list[float]]] = {"pp2-pipelined": [], "pp2-naive": []}  # per round, per rank
    outputs: dict[str, list[list[int]]] = {}
    try:
        for name in ("pp2-pipelined", "pp2-naive"):  # warm-up
            use(name)
            outputs[name] = timed(engine, prompts, params)[1]
        for r in range(rounds):
            for name in round_order(list(times), r):
                use(name)
                before = rank_cpu(engine)
                times[name].append(timed(engine, prompts, params)[0])
                after = rank_cpu(engine)
                if before and after:
                    cpu[name].append([b - a for a, b in zip(before, after)])
        bounds = list(runner.layout.bounds)
    finally:
        engine.close()

    engine = open_engine(path, config(), tp=2, pp=1, threads=1)
    times["tp2"] = []
    try:
        outputs["tp2"] = timed(engine, prompts, params)[1]
        for _ in range(rounds):
            times["tp2"].append(timed(engine, prompts, params)[0])
    finally:
        engine.close()

    engine = Engine.from_path(path, config())
    times["one-process"] = []
    outputs["one-process"] = timed(engine, prompts, params)[1]
    for _ in range(rounds):
        times["one-process"].append(timed(engine, prompts, params)[0])

    med = {n: median(t) for n, t in times.items()}
    # Per rank, the median over rounds of its CPU seconds; a pipeline on idle cores takes about its
    # busiest rank's CPU time, the naive split the sum of both ranks' (one at a time).
    cpu_s = {n: [median([r[k] for r in rows]) for k in range(len(rows[0]))] for n, rows in cpu.items() if rows}
    ref = outputs["one-process"]
    same = {n: sum(a == b for a, b in zip(o, ref)) for n, o in outputs.items()}
    payload = {
        "benchmark": "serve_mp",
        "ratio": paired_ratio(times["pp2-pipelined"], times["pp2-naive"]),
        "ratio_of_medians": med["pp2-pipelined"] / med["pp2-naive"],
        "ideal_ratio": 1 / args.cohorts,
        "cohorts": args.cohorts,
        "micro_batches": args.micro_batches,
        "cpu_s_per_rank": cpu_s,
        "cpu_bound_ratio": (max(cpu_s["pp2-pipelined"]) / sum(cpu_s["pp2-naive"])
                            if len(cpu_s) == 2 else None),
        "tp2_vs_one_process": med["tp2"] / med["one-process"],
        "pp2_pipelined_vs_one_process": med["pp2-pipelined"] / med["one-process"],
        "median_wall_s": med,
        "wall_s": times,
        "tokens_per_s": {n: generated / t for n, t in med.items()},
        "outputs_identical_to_one_process": same,
        "requests": n_requests,
        "generated_tokens": generated,
        "stage_blocks": bounds,
        "rounds": rounds,
        "threads_per_process": 1,
        "model": model,
        "quick": args.quick,
        "target": "ratio <= 0.77 (pipelined >= 1.3x naive); outputs identical",
    }
    write_json(args.json, payload)
    rows = [[n, f"{med[n]:.3f}", f"{generated / med[n]:,.0f}", f"{med[n] / med['pp2-naive']:.3f}",
             f"{same[n]}/{n_requests}"] for n in times]
    print_table(f"{n_requests} requests × {new_tokens} tokens, {model['n_layer']} layers × {model['n_embd']}, "
                f"median of {rounds} rounds; ratio (paired) pipelined / naive = {payload['ratio']:.3f} "
                f"(ideal {payload['ideal_ratio']:.3f})",
                ["variant", "wall s", "tokens/s", "this / pp2-naive", "same tokens as one process"], rows)


if __name__ == "__main__":
    main()
