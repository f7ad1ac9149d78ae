"""Edge export: ONNX Runtime fp32 and int8 against eager PyTorch, one thread, one sample at a time.

Two models, each trained here, saved as a plait checkpoint and exported with `plait export
--format onnx` (and `--int8`: ONNX Runtime's dynamic quantization, int8 weights; for the MLPs
then fused by ONNX Runtime's graph optimizer into one DynamicQuantizeMatMul per layer):
- the digits MLP at the size of examples/ps_digits_sync.toml (64 → 64 → 10), trained with Adam on
  scikit-learn's digits; held-out accuracy on the fixed split (359 images); and a wider one
  (64 → 256 → 256 → 10), where the graph's fixed bytes (nodes, biases, scales) no longer weigh
  on the int8 file ratio;
- a GPT at the size of examples/tiny_gpt.toml (4 layers × 128 wide, 128-token context), trained
  briefly on the built-in corpus; perplexity on held-out sequences.
Per-sample latency: one image, or one full 128-token sequence, per call (batch 1), one intra-op
thread on every side (torch.set_num_threads(1); ONNX Runtime intra_op_num_threads=1). The three
sides run in alternating order round by round; each round's per-sample mean, medians over rounds;
ratios are paired per round.

JSON: "int8_file_ratio" (MLP int8 file / fp32 file; target ≤ 0.30), "accuracy_drop" (MLP, eager
fp32 − ONNX Runtime int8, percentage points; target ≤ 0.5), "latency_ratio" (MLP, ONNX Runtime
int8 / eager fp32 per sample; target ≤ 1.0); the same for the wider MLP as "wide_mlp_*" and
for the GPT as "gpt_int8_file_ratio",
"gpt_perplexity_ratio" (int8 / eager) and "gpt_latency_ratio"; every row's raw figures in "rows".

    python benchmarks/edge.py [--quick] [--json benchmarks/results/edge.json]
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import (benchmark_parser, median, paired_ratio, print_table, round_order,  # noqa: E402
                    write_json)
from plait.config import Config, ModelConfig  # noqa: E402
from plait.export.onnx import export_onnx, run_session, session  # noqa: E402
from plait.models.build import build_model  # noqa: E402
from plait.train.checkpoint import save_checkpoint  # noqa: E402

SIDES = ("eager-fp32", "ort-fp32", "ort-int8")
MLP = dict(arch="mlp", n_layer=1, n_embd=64)
WIDE_MLP = dict(arch="mlp", n_layer=2, n_embd=256)  # where the graph's fixed bytes stop mattering
GPT = dict(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=256, dropout=0.0)


def train_mlp(steps: int, shape: dict = MLP):
    from plait.data.digits import load_digits_splits

    cfg = Config(model=ModelConfig(**shape))
    cfg.data.dataset = "digits"
    cfg.data.val_fraction = 0.2
    train, val = load_digits_splits(cfg.data.val_fraction)
    model = build_model(cfg.model, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        for group in opt.param_groups:  # cosine decay to a tenth: a steadier end point
            group["lr"] = 1e-3 + 0.5 * (1e-2 - 1e-3) * (1 + math.cos(math.pi * step / steps))
        x, y = train.batch(torch.randint(0, len(train), (32,), generator=g).tolist())
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return cfg, model.eval(), val


def train_gpt(steps: int):
    from plait.data.dataset import load_token_splits

    cfg = Config(model=ModelConfig(**GPT))
    train, val = load_token_splits("", cfg.model.block_size, 0.05)
    model = build_model(cfg.model, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = 3e-4 + 0.5 * (3e-3 - 3e-4) * (1 + math.cos(math.pi * step / steps))
        x, y = train.batch(torch.randint(0, len(train), (16,), generator=g).tolist())
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return cfg, model.eval(), val


def save_run(root: Path, cfg: Config, model: torch.nn.Module) -> Path:
    save_checkpoint(root / "checkpoints", 1, {"model": model.state_dict(),
                                              "state": {"step": 1, "config": cfg.to_dict()}})
    return root


def exports(run: Path, out: Path, name: str) -> dict[str, Path]:
    fp32 = export_onnx(run, out / f"{name}.onnx").path
    int8 = export_onnx(run, out / f"{name}.int8.onnx", int8=True).path
    return {"ort-fp32": fp32, "ort-int8": int8}


def quality(sides, inputs, targets, arch: str) -> dict[str, float]:
    """Accuracy (%) of the MLP on the held-out images, or the GPT's held-out perplexity."""
    out = {}
    for name, fn in sides.items():
        if arch == "mlp":
            logits = torch.as_tensor(fn(inputs))
            out[name] = 100.0 * (logits.argmax(-1) == targets).float().mean().item()
        else:
            losses = []
            for x, y in zip(inputs, targets):
                logits = torch.as_tensor(fn(x))
                losses.append(torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)),
                                                                y.view(-1)).item())
            out[name] = math.exp(sum(losses) / len(losses))
    return out


def latency(sides, samples, rounds: int) -> dict[str, list[float]]:
    """Per-sample seconds of each side, one list entry per round."""
    times: dict[str, list[float]] = {s: [] for s in sides}
    for r in range(rounds):
        for name in round_order(list(sides), r):
            fn = sides[name]
            fn(samples[0])  # warm
            t = time.perf_counter()
            for x in samples:
                fn(x)
            times[name].append((time.perf_counter() - t) / len(samples))
    return times


def bench(name: str, cfg: Config, model, val, out: Path, rounds: int, n_samples: int) -> dict:
    run = save_run(out / f"{name}-run", cfg, model)
    files = exports(run, out, name)
    sessions = {k: session(v, threads=1) for k, v in files.items()}
    arch = cfg.model.arch

    def eager(x):
        with torch.inference_mode():
            return model(torch.as_tensor(x))

    def ort(sess):
        return lambda x: run_session(sess, x if isinstance(x, np.ndarray) else x.numpy())

    sides = {"eager-fp32": eager, **{k: ort(s) for k, s in sessions.items()}}
    if arch == "mlp":
        inputs, targets = val.x, val.y
        samples = [val.x[i:i + 1].numpy() for i in range(min(n_samples, len(val)))]
    else:
        n_eval = min(len(val), 64 if n_samples >= 200 else 16)
        pairs = [val.batch([i]) for i in range(n_eval)]
        inputs, targets = [p[0] for p in pairs], [p[1] for p in pairs]
        samples = [x.numpy() for x in inputs[: max(4, n_samples // 20)]]
    q = quality(sides, inputs, targets, arch)
    t = latency(sides, samples, rounds)
    fp32_bytes = files["ort-fp32"].stat().st_size
    sizes = {"eager-fp32": sum(p.numel() * p.element_size() for p in model.parameters()),  # tied once
             "ort-fp32": fp32_bytes, "ort-int8": files["ort-int8"].stat().st_size}
    rows = {side: {"bytes": sizes[side], "per_sample_ms": 1e3 * median(t[side]),
                   ("accuracy_pct" if arch == "mlp" else "perplexity"): q[side]} for side in SIDES}
    return {"rows": rows, "times": t, "file_ratio": sizes["ort-int8"] / fp32_bytes,
            "latency_ratio": paired_ratio(t["ort-int8"], t["eager-fp32"]),
            "fp32_latency_ratio": paired_ratio(t["ort-fp32"], t["eager-fp32"]), "quality": q}


def main() -> None:
    ap = benchmark_parser(__doc__, "fewer training steps and timing rounds (under a minute)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rounds = 5 if args.quick else 15
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        mlp_cfg, mlp, digits_val = train_mlp(150 if args.quick else 600)
        m = bench("mlp", mlp_cfg, mlp, digits_val, out, rounds, 200 if args.quick else 359)
        wide_cfg, wide, _ = train_mlp(150 if args.quick else 600, WIDE_MLP)
        w = bench("wide-mlp", wide_cfg, wide, digits_val, out, rounds, 200 if args.quick else 359)
        gpt_cfg, gpt, text_val = train_gpt(30 if args.quick else 300)
        g = bench("gpt", gpt_cfg, gpt, text_val, out, rounds, 40 if args.quick else 200)
    q, wq, gq = m["quality"], w["quality"], g["quality"]
    payload = {
        "int8_file_ratio": m["file_ratio"],
        "accuracy_drop": q["eager-fp32"] - q["ort-int8"],
        "latency_ratio": m["latency_ratio"],
        "fp32_latency_ratio": m["fp32_latency_ratio"],
        "wide_mlp_int8_file_ratio": w["file_ratio"],
        "wide_mlp_accuracy_drop": wq["eager-fp32"] - wq["ort-int8"],
        "wide_mlp_latency_ratio": w["latency_ratio"],
        "gpt_int8_file_ratio": g["file_ratio"],
        "gpt_perplexity_ratio": gq["ort-int8"] / gq["eager-fp32"],
        "gpt_latency_ratio": g["latency_ratio"],
        "gpt_fp32_latency_ratio": g["fp32_latency_ratio"],
        "targets": {"int8_file_ratio": 0.30, "accuracy_drop": 0.5, "latency_ratio": 1.0},
        "models": {"mlp": MLP, "wide_mlp": WIDE_MLP, "gpt": GPT},
        "rounds": rounds, "quick": args.quick,
        "rows": {"mlp": m["rows"], "wide_mlp": w["rows"], "gpt": g["rows"]},
    }
    write_json(args.json, payload)
    table = []
    for model_name, res, metric in (("digits MLP 64", m, "accuracy_pct"), ("digits MLP 2×256", w, "accuracy_pct"),
                                    ("GPT 4×128", g, "perplexity")):
        for side in SIDES:
            row = res["rows"][side]
            table.append([model_name, side, f"{row['bytes'] / 1e3:,.1f}", f"{row['per_sample_ms']:.4f}",
                          f"{row[metric]:.2f}" + ("%" if metric == "accuracy_pct" else " ppl")])
    print_table("edge export, one thread, batch 1 (medians over rounds)",
                ["model", "side", "file kB", "ms/sample", "quality"], table)
    print(f"\nMLP: int8_file_ratio {payload['int8_file_ratio']:.3f} (target ≤ 0.30), accuracy_drop "
          f"{payload['accuracy_drop']:.2f} pts (≤ 0.5), latency_ratio {payload['latency_ratio']:.3f} (≤ 1.0)")
    print(f"MLP 2×256: int8_file_ratio {payload['wide_mlp_int8_file_ratio']:.3f}, accuracy_drop "
          f"{payload['wide_mlp_accuracy_drop']:.2f} pts, latency_ratio {payload['wide_mlp_latency_ratio']:.3f}")
    print(f"GPT: int8_file_ratio {payload['gpt_int8_file_ratio']:.3f}, perplexity int8/fp32 "
          f"{payload['gpt_perplexity_ratio']:.3f}, latency_ratio {payload['gpt_latency_ratio']:.3f}")


if __name__ == "__main__":
    main()
