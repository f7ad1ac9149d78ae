"""Reduced-bit weights (plait.serve.quantize): size, quality and speed of fp32, bf16, int8, int4.

Two models. The demo GPT (examples/tiny_gpt.toml: 4 layers × 128 wide, byte vocabulary), read from
runs/tiny_gpt when it holds a checkpoint, else trained here first (`plait train
examples/tiny_gpt.toml --nproc 1`; --quick trains 150 steps into a temporary folder). The digits
MLP (models/mlp.py, as examples/ps_digits_sync.toml shapes it: 64 → 64 → 10), trained here with
Adam on scikit-learn's digits.

Per weight format: bytes of the quantized layers' weights (with their scales) and of the whole
model; held-out loss and perplexity (GPT) or accuracy (MLP); speed on one thread. GPT speed is the
serving engine generating the same greedy tokens: 16 requests batched continuously (8 at a time)
and 4 requests one at a time; MLP speed is one held-out image per call. Formats alternate round by
round (A B C D, D C B A, ...); times are medians, ratios paired per round (see common.py). A
kernel table times one linear layer of each GPT shape under each candidate implementation.

    python benchmarks/quantize.py [--quick] [--json benchmarks/results/quantize.json]
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import benchmark_parser, median, paired_ratio, print_table, round_order, write_json  # noqa: E402
from plait.serve import Engine, EngineConfig, SamplingParams  # noqa: E402
from plait.serve.quantize.linear import Int4Linear, Int8Linear  # noqa: E402
from plait.serve.quantize.model import linear_weight_bytes, model_bytes, quantize_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FORMATS = ("fp32", "bf16", "int8", "int4")


def _time(fn, budget_s: float) -> float:
    """CPU seconds per call of fn on this thread (median of 5 runs of about budget_s each)."""
    for _ in range(3):
        fn()
    t = time.thread_time()
    fn()
    n = max(3, min(300, int(budget_s / max(time.thread_time() - t, 1e-6))))
    runs = []
    for _ in range(5):
        t = time.thread_time()
        for _ in range(n):
            fn()
        runs.append((time.thread_time() - t) / n)
    return median(runs)


class Clock:
    """Wall and CPU time (this thread) of a block, appended to two lists."""

    def __init__(self, wall: list[float], cpu: list[float]):
        self.wall, self.cpu = wall, cpu

    def __enter__(self) -> "Clock":
        self.t0, self.c0 = time.perf_counter(), time.thread_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall.append(time.perf_counter() - self.t0)
        self.cpu.append(time.thread_time() - self.c0)


# --- the models ---------------------------------------------------------------------------------

def gpt_run(quick: bool, given: str | None) -> tuple[Path, str]:
    """A checkpoint of the demo GPT, and where it came from."""
    from plait.generate import find_checkpoint

    if given:
        return find_checkpoint(given).path, given
    default = ROOT / "runs" / "tiny_gpt"
    try:
        return find_checkpoint(default).path, "runs/tiny_gpt"
    except Exception:
        pass
    out = Path(tempfile.mkdtemp(prefix="quantize-bench-")) / "tiny_gpt" if quick else default
    steps = 150 if quick else 500
    print(f"training examples/tiny_gpt.toml for {steps} steps into {out} ...", flush=True)
    subprocess.run([sys.executable, "-m", "plait.cli", "train", str(ROOT / "examples" / "tiny_gpt.toml"),
                    "--nproc", "1", "--set", f'train.out_dir="{out}"', "--set", f"train.steps={steps}",
                    "--set", "train.eval_interval=0", "--fresh"], check=True, cwd=ROOT)
    return find_checkpoint(out).path, f"trained here ({steps} steps)"


@torch.no_grad()
def held_out_loss(model: nn.Module, val, n_seqs: int, batch: int = 16) -> float:
    total, count = 0.0, 0
    for s in range(0, n_seqs, batch):
        x, y = val.batch(range(s, min(s + batch, n_seqs)))
        _, loss = model(x, y)
        total += loss.item() * x.numel()
        count += x.numel()
    return total / count


def train_mlp(steps: int = 400, seed: int = 0):
    from plait.data.digits import load_digits_splits
    from plait.models.mlp import MLPClassifier

    train, val = load_digits_splits(0.2)
    torch.manual_seed(seed)
    model = MLPClassifier(64, 64, 1, 10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(train), (32,), generator=g)
        _, loss = model(*train.batch(idx.tolist()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), val


# --- per-layer kernel candidates ------------------------------------------------------------------

def kernel_table(quick: bool) -> list[dict]:
    """Microseconds per call of one linear layer of each GPT shape, per candidate implementation."""
    rows_list = (4, 32)
    budget = 0.01 if quick else 0.03
    out = []
    gen = torch.Generator().manual_seed(0)
    for o, i in ((384, 128), (512, 128), (128, 512)):
        lin = nn.Linear(i, o)
        nn.init.normal_(lin.weight, std=0.02, generator=gen)
        q8, q4 = Int8Linear.from_linear(lin), Int4Linear.from_linear(lin, 32)
        bf = quantize_model(nn.Sequential(copy.deepcopy(lin)), "bf16")[0]
        w8, s8, b = q8.weight, q8.scale, lin.bias.detach()
        cands = {
            "fp32 F.linear": lambda x: F.linear(x, lin.weight, lin.bias),
            "plait bf16 kernel (scratch matrix)": bf.kernel(torch.empty(o, i)),
            "plait int8 kernel (scratch matrix)": q8.kernel(torch.empty(o, i)),
            "int8 dequant, fresh tensor": lambda x: torch.addcmul(b, F.linear(x, w8.float()), s8),
            "aten._weight_int8pack_mm fp32 act": lambda x: torch.ops.aten._weight_int8pack_mm(x, w8, s8) + b,
            "aten._weight_int8pack_mm bf16 act":
                lambda x: torch.ops.aten._weight_int8pack_mm(x.bfloat16(), w8, s8.bfloat16()).float() + b,
            "plait int4 kernel (scratch matrix)": q4.kernel(torch.empty(o, i)),
        }
        try:  # torch's int4 CPU kernel: levels as int32 (n, k), scales and zeros (k/g, n, 2) at mid-level 8
            levels = torch.cat([q4.weight & 15, q4.weight >> 4], dim=1).to(torch.int32)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(levels, 1)
            sz = torch.cat([q4.scale, q4.zero + 8 * q4.scale], dim=2).transpose(0, 1).contiguous()
            sz16 = sz.bfloat16()
            cands["aten._weight_int4pack_mm_for_cpu fp32 act"] = \
                lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz) + b
            cands["aten._weight_int4pack_mm_for_cpu bf16 act"] = \
                lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), packed, 32, sz16).float() + b
        except Exception as exc:
            print(f"torch int4 kernel unavailable: {exc}")
        try:
            from torchao.quantization import Int8WeightOnlyConfig, quantize_

            ao = nn.Sequential(copy.deepcopy(lin))
            quantize_(ao, Int8WeightOnlyConfig())
            ao_w, ao_b = ao[0].weight, ao[0].bias  # a tensor subclass that takes over F.linear
            cands["torchao Int8WeightOnlyConfig (eager)"] = lambda x: F.linear(x, ao_w, ao_b)
        except Exception as exc:
            print(f"torchao int8 weight-only unavailable: {type(exc).__name__}: {exc}")
        for rows in rows_list:
            x = torch.randn(rows, i, generator=gen)
            ref = F.linear(x, lin.weight, lin.bias)
            with torch.no_grad():
                for name, fn in cands.items():
                    err = (fn(x).float() - ref).abs().max().item()
                    out.append({"shape": f"{o}x{i}", "rows": rows, "kernel": name,
                                "us": round(_time(lambda: fn(x), budget) * 1e6, 1), "max_abs_err": err})
    return out


# --- main -----------------------------------------------------------------------------------------

def main() -> None:
    ap = benchmark_parser(__doc__, "150-step GPT when runs/tiny_gpt is absent, 128 held-out sequences, 2 rounds")
    ap.add_argument("--rounds", type=int, default=0, help="timing rounds (default 5, --quick 2)")
    ap.add_argument("--run", default=None, help="a GPT run or checkpoint folder to use instead of runs/tiny_gpt")
    args = ap.parse_args()
    import logging

    logging.getLogger("torchao").setLevel(logging.ERROR)
    ckpt, origin = gpt_run(args.quick, args.run)
    torch.set_num_threads(1)
    rounds = args.rounds or (2 if args.quick else 5)

    from plait.generate import load_model
    from plait.train.run import load_splits

    base, cfg = load_model(ckpt)
    _, val = load_splits(cfg)
    n_val = min(len(val), 128 if args.quick else len(val))
    models = {"fp32": base}
    for w in FORMATS[1:]:
        models[w] = quantize_model(copy.deepcopy(base), w)

    # Quality.
    gpt: dict[str, dict] = {}
    for w, m in models.items():
        loss = held_out_loss(m, val, n_val)
        gpt[w] = {"linear_weight_bytes": linear_weight_bytes(m), "model_bytes": model_bytes(m),
                  "held_out_loss": round(loss, 5), "perplexity": round(math.exp(loss), 4)}

    # Speed through the serving engine: the same requests, prompts cut from held-out text.
    n_req, n_single, new = (8, 2, 32) if args.quick else (16, 4, 64)
    prompts = [val.batch([s])[0][0, :32].tolist() for s in range(n_req)]
    params = SamplingParams(max_tokens=new, temperature=0)  # byte vocabulary: no end token, all `new` made
    engines = {w: Engine(m, config=EngineConfig(max_seqs=8, prefill_chunk=64)) for w, m in models.items()}
    timings = {kind: {clock: {w: [] for w in FORMATS} for clock in ("wall", "cpu")}
               for kind in ("batched", "single")}
    for w in FORMATS:  # warm-up
        engines[w].generate(prompts[:2], params)
    for r in range(rounds):
        for w in round_order(FORMATS, r):
            with Clock(timings["batched"]["wall"][w], timings["batched"]["cpu"][w]):
                engines[w].generate(prompts, params)
            with Clock(timings["single"]["wall"][w], timings["single"]["cpu"][w]):
                for p in prompts[:n_single]:
                    engines[w].generate([p], params)
    for w in FORMATS:
        gpt[w]["row_quantum"] = engines[w].runner.quantum
        for kind, tokens in (("batched", n_req * new), ("one_at_a_time", n_single * new)):
            t = timings["batched" if kind == "batched" else "single"]
            gpt[w][f"tokens_per_s_{kind}"] = round(tokens / median(t["cpu"][w]), 1)
            gpt[w][f"tokens_per_s_{kind}_wall"] = round(tokens / median(t["wall"][w]), 1)
            gpt[w][f"speed_ratio_{kind}"] = round(paired_ratio(t["cpu"][w], t["cpu"]["fp32"]), 4)
            gpt[w][f"speed_ratio_{kind}_wall"] = round(paired_ratio(t["wall"][w], t["wall"]["fp32"]), 4)

    # Batched-vs-one-at-a-time greedy parity of the int8 engine (the engine's batch invariance).
    together = [c.token_ids for c in engines["int8"].generate(prompts[:4], params)]
    alone = [engines["int8"].generate([p], params)[0].token_ids for p in prompts[:4]]

    # The digits MLP.
    mlp_model, mlp_val = train_mlp()
    mlp: dict[str, dict] = {}
    mlp_times: dict[str, list[float]] = {w: [] for w in FORMATS}
    mlp_wall: dict[str, list[float]] = {w: [] for w in FORMATS}
    mlp_models = {"fp32": mlp_model, **{w: quantize_model(copy.deepcopy(mlp_model), w) for w in FORMATS[1:]}}
    n_img = 100 if args.quick else len(mlp_val)
    images = [mlp_val.x[i:i + 1] for i in range(n_img)]
    with torch.no_grad():
        for w, m in mlp_models.items():
            acc = (m(mlp_val.x).argmax(1) == mlp_val.y).float().mean().item()
            mlp[w] = {"linear_weight_bytes": linear_weight_bytes(m), "model_bytes": model_bytes(m),
                      "accuracy": round(acc, 4)}
        for r in range(rounds):
            for w in round_order(FORMATS, r):
                with Clock(mlp_wall[w], mlp_times[w]):
                    for x in images:
                        mlp_models[w](x)
    for w in FORMATS:
        mlp[w]["samples_per_s"] = round(n_img / median(mlp_times[w]), 1)
        mlp[w]["speed_ratio"] = round(paired_ratio(mlp_times[w], mlp_times["fp32"]), 4)

    kernels = kernel_table(args.quick)

    fp = gpt["fp32"]
    result = {
        "int8_size_ratio": round(gpt["int8"]["linear_weight_bytes"] / fp["linear_weight_bytes"], 4),
        "int8_ppl_delta": round(gpt["int8"]["perplexity"] / fp["perplexity"] - 1, 5),
        "int4_ppl_delta": round(gpt["int4"]["perplexity"] / fp["perplexity"] - 1, 5),
        "int8_speed_ratio": gpt["int8"]["speed_ratio_batched"],
        "int8_speed_ratio_one_at_a_time": gpt["int8"]["speed_ratio_one_at_a_time"],
        "int8_speed_ratio_wall": gpt["int8"]["speed_ratio_batched_wall"],
        "ratio": gpt["int8"]["speed_ratio_batched"],
        "targets": {"int8_size_ratio": "<= 0.30", "int8_ppl_delta": "<= 0.01", "int4_ppl_delta": "<= 0.06",
                    "int8_speed_ratio": "<= 1.10"},
        "gpt": gpt, "mlp": mlp, "kernels": kernels,
        "int8_batched_equals_one_at_a_time": together == alone,
        "setup": {"gpt_checkpoint": origin, "held_out_sequences": n_val, "requests_batched": n_req,
                  "requests_one_at_a_time": n_single, "new_tokens": new, "rounds": rounds, "threads": 1,
                  "quantized": "every block linear (qkv, attn proj, mlp fc, mlp proj); the tied embedding/head, "
                               "position embedding and LayerNorms stay fp32",
                  "int4_group_size": 32,
                  "timing": "speeds and ratios are CPU time of the one benchmark thread (time.thread_time), "
                            "which equals wall time on a quiet machine and is far less disturbed on a shared "
                            "one; *_wall keys give wall time"},
    }
    write_json(args.json, result)

    print_table("kernels: one linear layer, one thread (CPU µs per call)", ["shape", "rows", "kernel", "µs", "max err"],
                [[k["shape"], k["rows"], k["kernel"], k["us"], f"{k['max_abs_err']:.1e}"] for k in kernels])
    print_table("digits MLP", ["weights", "linear bytes", "model bytes", "accuracy", "samples/s", "time ratio"],
                [[w, m["linear_weight_bytes"], m["model_bytes"], m["accuracy"], m["samples_per_s"],
                  m["speed_ratio"]] for w, m in mlp.items()])
    print_table(f"demo GPT ({origin}), one thread", ["weights", "linear bytes", "model bytes", "loss", "ppl",
                                                      "tok/s batched", "ratio", "tok/s one-by-one", "ratio"],
                [[w, m["linear_weight_bytes"], m["model_bytes"], m["held_out_loss"], m["perplexity"],
                  m["tokens_per_s_batched"], m["speed_ratio_batched"], m["tokens_per_s_one_at_a_time"],
                  m["speed_ratio_one_at_a_time"]] for w, m in gpt.items()])
    print_table("summary (targets: size ≤ 0.30, int8 ppl ≤ 0.01, int4 ppl ≤ 0.06, int8 time ≤ 1.10)",
                ["key", "value"], [[k, result[k]] for k in ("int8_size_ratio", "int8_ppl_delta", "int4_ppl_delta",
                                                             "int8_speed_ratio", "int8_speed_ratio_one_at_a_time",
                                                             "int8_speed_ratio_wall",
                                                             "int8_batched_equals_one_at_a_time")])


if __name__ == "__main__":
    main()
