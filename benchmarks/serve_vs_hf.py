"""plait's serving engine vs Hugging Face `generate` on the same 32 requests.

One GPT (4 layers × 128 wide × 4 heads, 256-token context, byte vocabulary), exported to a
Hugging Face GPT-2 folder that both sides load. 32 requests with prompts of 8-64 tokens and
outputs of 16-128 tokens, greedy, all present at the start. plait: `Engine.generate` on all 32
(continuous batching, KV cache, chunked prefill). Hugging Face: `GPT2LMHeadModel.generate` one
request at a time, and in padded static batches of 8 and of 32 (left-padded prompts, each batch
running until its longest request is done; only each request's own tokens are counted). Same
model, same threads, variants alternated round by round; medians of the rounds' wall times.

    python benchmarks/serve_vs_hf.py [--quick] [--device cuda] [--json benchmarks/results/serve_vs_hf.json]
"""

from __future__ import annotations

import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import benchmark_parser, machine, median, print_table, round_order, write_json  # noqa: E402
from plait.config import ModelConfig  # noqa: E402
from plait.models import GPT  # noqa: E402
from plait.models.hf_gpt2 import save_hf_gpt2  # noqa: E402
from plait.serve import Engine, EngineConfig, SamplingParams  # noqa: E402

MODEL = dict(n_layer=4, n_head=4, n_embd=128, block_size=256, vocab_size=256, dropout=0.0)
VARIANTS = ("plait-engine", "hf-one-at-a-time", "hf-static-8", "hf-static-32")


def make_requests(n: int, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(256) for _ in range(rng.randint(8, 64))], rng.randint(16, 128)) for _ in range(n)]


def hf_batches(hf, requests, batch: int) -> list[list[int]]:
    """Greedy outputs of `requests` through HF generate in padded static batches of `batch`."""
    outs = []
    device = next(hf.parameters()).device
    for s in range(0, len(requests), batch):
        group = requests[s:s + batch]
        width = max(len(p) for p, _ in group)
        longest = max(n for _, n in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        for r, (p, _) in enumerate(group):  # left padding: every prompt ends where generation starts
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        ids, mask = ids.to(device), mask.to(device)
        with torch.no_grad():
            gen = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest,
                              do_sample=False, pad_token_id=0, eos_token_id=None)
        outs += [gen[r, width:width + n].tolist() for r, (_, n) in enumerate(group)]
    return outs


def main() -> None:
    ap = benchmark_parser(__doc__, "two rounds on 16 requests (under a minute)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads for both sides (default 1)")
    ap.add_argument("--rounds", type=int, default=0, help="rounds (default 5, --quick 2)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                    help="where both sides run (default cpu; every output is read back, so each timing ends synchronised)")
    args = ap.parse_args()
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    n_requests = 16 if args.quick else 32
    rounds = args.rounds or (2 if args.quick else 5)
    requests = make_requests(n_requests)
    useful_tokens = sum(n for _, n in requests)

    torch.manual_seed(0)
    folder = tempfile.mkdtemp(prefix="serve_vs_hf-")
    save_hf_gpt2(GPT(ModelConfig(**MODEL)).eval(), folder)
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder).eval().to(args.device)
    engine = Engine.from_path(folder, EngineConfig(max_seqs=32, prefill_chunk=64), device=args.device)
    params = [SamplingParams(max_tokens=n, temperature=0) for _, n in requests]

    def run(name: str) -> list[list[int]]:
        if name == "plait-engine":
            return [c.token_ids for c in engine.generate([p for p, _ in requests], params)]
        batch = {"hf-one-at-a-time": 1, "hf-static-8": 8, "hf-static-32": 32}[name]
        return hf_batches(hf, requests, batch)

    outputs: dict[str, list[list[int]]] = {}
    for name in VARIANTS:  # warm-up, and the outputs compared below
        outputs[name] = run(name)
    times: dict[str, list[float]] = {n: [] for n in VARIANTS}
    cpu: dict[str, list[float]] = {n: [] for n in VARIANTS}
    for r in range(rounds):
        for name in round_order(VARIANTS, r):
            t0, c0 = time.perf_counter(), time.process_time()
            run(name)
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    med = {n: median(t) for n, t in times.items()}
    med_cpu = {n: median(t) for n, t in cpu.items()}
    best_static = min(("hf-static-8", "hf-static-32"), key=lambda n: med[n])
    ref = outputs["hf-one-at-a-time"]
    same = {n: sum(a == b for a, b in zip(outputs[n], ref)) for n in VARIANTS}
    payload = {
        "benchmark": "serve_vs_hf",
        "ratio": med["plait-engine"] / med["hf-one-at-a-time"],
        "ratio_static": med["plait-engine"] / med[best_static],
        "best_static": best_static,
        # The same on the process's CPU time (one process, both sides): less moved by other load.
        "ratio_cpu": med_cpu["plait-engine"] / med_cpu["hf-one-at-a-time"],
        "ratio_static_cpu": med_cpu["plait-engine"] / min(med_cpu["hf-static-8"], med_cpu["hf-static-32"]),
        "median_wall_s": med,
        "median_cpu_s": med_cpu,
        "wall_s": times,
        "tokens_per_s": {n: useful_tokens / med[n] for n in VARIANTS},
        "requests": n_requests,
        "generated_tokens": useful_tokens,
        "prompt_tokens": sum(len(p) for p, _ in requests),
        "outputs_identical_to_hf_one_at_a_time": same,
        "rounds": rounds,
        "threads": args.threads,
        "device": machine()["device"] if args.device == "cuda" else "cpu",
        "model": MODEL,
        "engine": {"max_seqs": 32, "prefill_chunk": 64, "row_quantum": engine.runner.quantum,
                   "span_quantum": engine.runner.span_quantum},
        "quick": args.quick,
        "target": "ratio <= 0.20, ratio_static <= 0.67",
    }
    write_json(args.json, payload)
    rows = [[n, f"{med[n]:.3f}", f"{useful_tokens / med[n]:,.0f}", f"{med['plait-engine'] / med[n]:.3f}",
             f"{med_cpu[n]:.3f}", f"{med_cpu['plait-engine'] / med_cpu[n]:.3f}", f"{same[n]}/{n_requests}"]
            for n in VARIANTS]
    header = ["variant", "wall s", "tokens/s", "plait / this", "CPU s", "plait / this (CPU)",
              "same tokens as HF 1-by-1"]
    print_table(f"{n_requests} requests, {useful_tokens} generated tokens, {args.device}, {args.threads} thread(s), "
                f"median of {rounds} rounds", header, rows)


if __name__ == "__main__":
    main()
