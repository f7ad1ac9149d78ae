"""Lean models: a half-depth student distilled from the demo model, and cached frozen layers.

Distillation. The teacher is the demo model (examples/tiny_gpt.toml: 4 blocks × 128 wide, byte
tokens, the built-in corpus): runs/tiny_gpt when it holds a valid checkpoint, else trained here
from that config. The student is the same config with half the blocks (2), trained by plait's
Trainer for the same steps on the same data twice: distilled from the teacher (`[distill]`,
alpha and T below) and from scratch (no teacher), from the same seed.

- "speedup": the student's generation tokens/s / the teacher's (greedy `GPT.generate`, as
  `plait generate` samples; the two take turns round by round, median of the rounds' ratios);
  target ≥ 1.7.
- "ppl_ratio": the distilled student's held-out perplexity / the teacher's, on the same held-out
  batches; target ≤ 1.30.
- "gain_vs_scratch": the scratch student's perplexity / the distilled student's; must be > 1.

Frozen layers with cached activations. The teacher-sized model with half its blocks frozen
(train.freeze_blocks = 2) on a data set small enough that the cache is warm after one epoch:
step time with train.freeze_cache vs plain freezing (what turning the cache on changes for a
user), and vs the same frozen model recomputing its prefix every step (the cache's own effect;
its losses must equal the cached run's exactly, which is checked). The runs take turns step by
step, in an order reversed every other step; "frozen_cache_step_ratio" = cached step time /
plain frozen step time (median of the paired ratios; below 1 is faster).

    python benchmarks/distill.py [--quick] [--json benchmarks/results/distill.json]
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import benchmark_parser, median, paired_ratio, print_table, round_order, write_json  # noqa: E402
from plait.config import Config, load_config  # noqa: E402
from plait.data.corpus import load_text  # noqa: E402
from plait.data.dataset import TokenDataset, load_token_splits  # noqa: E402
from plait.errors import CheckpointError  # noqa: E402
from plait.generate import find_checkpoint, load_model  # noqa: E402
from plait.mesh import ParallelMesh  # noqa: E402
from plait.train.trainer import Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "examples" / "tiny_gpt.toml"
DEMO_RUN = ROOT / "runs" / "tiny_gpt"
ALPHA, TEMPERATURE = 0.5, 1.0  # the best of T = 1, 1.5, 2 for this teacher (BENCHMARKS.md)


def demo_config(out_dir: Path, steps: int, *overrides: str) -> Config:
    return load_config(DEMO, [f"train.steps={steps}", f'train.out_dir="{out_dir}"', "train.eval_interval=0",
                              "checkpoint.interval=0", 'checkpoint.resume="none"', "train.log_interval=1000",
                              *overrides])


def train(cfg: Config, data: tuple[TokenDataset, TokenDataset]) -> float:
    """Train in this process; returns the seconds it took."""
    t0 = time.perf_counter()
    Trainer(cfg, ParallelMesh.single(), *data).fit()
    return time.perf_counter() - t0


def teacher_run(tmp: Path, steps: int, data) -> tuple[Path, str]:
    """runs/tiny_gpt when it holds a valid checkpoint, else the demo config trained here."""
    try:
        find_checkpoint(DEMO_RUN)
        return DEMO_RUN, f"{DEMO_RUN.relative_to(ROOT)} (existing)"
    except CheckpointError:
        pass
    seconds = train(demo_config(tmp / "teacher", steps), data)
    return tmp / "teacher", f"examples/tiny_gpt.toml trained here, {steps} steps in {seconds:.0f} s"


@torch.no_grad()
def perplexity(model, val: TokenDataset, batches: int, batch: int = 8) -> float:
    """exp(mean cross-entropy) over the first `batches` × `batch` held-out sequences."""
    model.eval()
    n = len(val)
    losses = [model(*val.batch([(b * batch + i) % n for i in range(batch)]))[1].item()
              for b in range(batches)]
    return math.exp(sum(losses) / len(losses))


@torch.no_grad()
def generation_tps(model, prompt: torch.Tensor, new_tokens: int) -> float:
    t0 = time.perf_counter()
    model.generate(prompt, new_tokens, temperature=0.0)
    return prompt.size(0) * new_tokens / (time.perf_counter() - t0)


def frozen_cache_steps(tmp: Path, text: str, warm_steps: int, timed_steps: int) -> dict:
    """Step times of plain freezing, the cached prefix, and the recomputed prefix (alternating)."""
    corpus = tmp / "small.txt"
    corpus.write_text(text)
    variants = {}
    for name, cache in (("plain", False), ("cached", True), ("recomputed", True)):
        cfg = demo_config(tmp / f"frozen_{name}", warm_steps + timed_steps, f'data.path="{corpus}"',
                          "train.freeze_blocks=2", f"train.freeze_cache={'true' if cache else 'false'}")
        data = load_token_splits(str(corpus), cfg.model.block_size, cfg.data.val_fraction)
        trainer = Trainer(cfg, ParallelMesh.single(), *data)
        if name == "recomputed":
            trainer.frozen_prefix.cache = None  # the same frozen model, its prefix run every step
        variants[name] = trainer
    times: dict[str, list[float]] = {name: [] for name in variants}
    losses: dict[str, list[float]] = {name: [] for name in variants}
    for step in range(warm_steps + timed_steps):
        for name in round_order(list(variants), step):
            t0 = time.perf_counter()
            out = variants[name].train_step()
            if step >= warm_steps:
                times[name].append(time.perf_counter() - t0)
            losses[name].append(out["loss"])
    stats = variants["cached"].frozen_prefix.cache.stats()
    epochs = variants["cached"].sampler.epoch
    return {"sequences": len(variants["cached"].train_data), "epochs_started": epochs + 1,
            "step_s": {name: median(ts) for name, ts in times.items()},
            "ratio_vs_plain": paired_ratio(times["cached"], times["plain"]),
            "ratio_vs_recomputed": paired_ratio(times["cached"], times["recomputed"]),
            "cached_losses_equal_recomputed": losses["cached"] == losses["recomputed"],
            "cache": stats}


def main() -> None:
    ap = benchmark_parser(__doc__, "fewer training steps and rounds (under a minute on a quiet 2-core CPU)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # steadier timings on a shared machine; both sides alike
    teacher_steps, student_steps = (60, 60) if args.quick else (500, 500)
    rounds, new_tokens = (3, 48) if args.quick else (7, 96)
    eval_batches = 8 if args.quick else 32
    cache_warm, cache_timed = (8, 6) if args.quick else (8, 24)
    base = demo_config(Path("unused"), 1)
    data = load_token_splits(base.data.path, base.model.block_size, base.data.val_fraction,
                             base.data.cache_dir or None)
    with tempfile.TemporaryDirectory(prefix="plait-distill-") as tmp_name:
        tmp = Path(tmp_name)
        teacher_dir, teacher_source = teacher_run(tmp, teacher_steps, data)
        half = f"model.n_layer={base.model.n_layer // 2}"
        distilled_s = train(demo_config(tmp / "distilled", student_steps, half,
                                        f'distill.teacher="{teacher_dir}"', f"distill.alpha={ALPHA}",
                                        f"distill.temperature={TEMPERATURE}"), data)
        scratch_s = train(demo_config(tmp / "scratch", student_steps, half), data)
        models = {"teacher": load_model(teacher_dir)[0], "distilled": load_model(tmp / "distilled")[0],
                  "scratch": load_model(tmp / "scratch")[0]}
        val = data[1]
        ppl = {name: perplexity(m, val, eval_batches) for name, m in models.items()}
        prompt = val.batch(range(4))[0][:, :16]
        tps: dict[str, list[float]] = {"teacher": [], "distilled": []}
        generation_tps(models["teacher"], prompt, 4)  # warm-up
        generation_tps(models["distilled"], prompt, 4)
        for r in range(rounds):
            for name in round_order(list(tps), r):
                tps[name].append(generation_tps(models[name], prompt, new_tokens))
        # Paired per round: student time per token / teacher's = teacher tok/s / student tok/s.
        speedup = 1.0 / paired_ratio([1 / x for x in tps["distilled"]], [1 / x for x in tps["teacher"]])
        frozen = frozen_cache_steps(tmp, load_text(base.data.path, base.data.cache_dir or None)[:4300],
                                    cache_warm, cache_timed)
    results = {
        "speedup": speedup,
        "ppl_ratio": ppl["distilled"] / ppl["teacher"],
        "gain_vs_scratch": ppl["scratch"] / ppl["distilled"],
        "frozen_cache_step_ratio": frozen["ratio_vs_plain"],
        "frozen_cache_vs_recomputed_ratio": frozen["ratio_vs_recomputed"],
        "targets": {"speedup": ">= 1.7", "ppl_ratio": "<= 1.30", "gain_vs_scratch": "> 1"},
        "perplexity": ppl,
        "generation_tokens_per_s": {name: median(v) for name, v in tps.items()},
        "teacher": {"source": teacher_source, "n_layer": base.model.n_layer, "n_embd": base.model.n_embd},
        "student": {"n_layer": base.model.n_layer // 2, "steps": student_steps, "alpha": ALPHA,
                    "temperature": TEMPERATURE, "distilled_train_s": distilled_s, "scratch_train_s": scratch_s},
        "generation": {"batch": prompt.size(0), "prompt_tokens": prompt.size(1), "new_tokens": new_tokens,
                       "rounds": rounds, "decoding": "greedy, GPT.generate (no KV cache)"},
        "frozen_cache": frozen,
        "threads": torch.get_num_threads(),
        "quick": args.quick,
    }
    write_json(args.json, results)
    fs = frozen["step_s"]
    print_table(
        f"distillation: {base.model.n_layer}-block teacher ({teacher_source}) → "
        f"{base.model.n_layer // 2}-block student, {student_steps} steps, alpha {ALPHA}, T {TEMPERATURE}",
        ["measure", "value", "target", "detail"],
        [["speedup (student/teacher generation tok/s)", f"{speedup:.2f}", "≥ 1.7",
          f"{median(tps['distilled']):.0f} vs {median(tps['teacher']):.0f} tok/s"],
         ["ppl_ratio (distilled / teacher)", f"{results['ppl_ratio']:.3f}", "≤ 1.30",
          f"{ppl['distilled']:.2f} vs {ppl['teacher']:.2f}"],
         ["gain_vs_scratch (scratch / distilled ppl)", f"{results['gain_vs_scratch']:.3f}", "> 1",
          f"{ppl['scratch']:.2f} vs {ppl['distilled']:.2f}"],
         ["frozen_cache_step_ratio (cached / plain freeze)", f"{frozen['ratio_vs_plain']:.3f}", "< 1",
          f"{fs['cached'] * 1e3:.0f} vs {fs['plain'] * 1e3:.0f} ms/step, 2 of 4 blocks frozen"],
         ["cached / recomputed prefix", f"{frozen['ratio_vs_recomputed']:.3f}", "< 1",
          f"{fs['recomputed'] * 1e3:.0f} ms/step; losses equal: {frozen['cached_losses_equal_recomputed']}"]])


if __name__ == "__main__":
    main()
