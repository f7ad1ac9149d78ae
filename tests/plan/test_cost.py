"""The cost model's parts against the formulas and figures of the papers they come from."""

from __future__ import annotations

import dataclasses

import pytest

from plait.config import validate
from plait.errors import PlanError
from plait.plan import Candidate, estimate, gpu_cluster, search
from plait.plan.hardware import cpu_cluster
from plait.plan.memory import block_activations, model_state
from plait.plan.ops import Dims, Op
from plait.plan.search import plait_accepts
from plait.plan.shapes import MODELS, ModelShape
from plait.plan.software import MEGATRON_2021, PLAIT
from plait.plan.timing import collective_time, op_time, wave_efficiency


def test_zero_model_state_is_the_papers_figure_1():
    """Rajbhandari et al. 2020, Figure 1: Ψ = 7.5B, N_d = 64, mixed-precision Adam (2 + 2 + 12
    bytes per parameter): 120 GB, 31.4 GB, 16.6 GB and 1.88 GB per device for stages 0-3."""
    sw = dataclasses.replace(PLAIT, param_bytes=2, grad_bytes=2, optim_bytes=12, weight_copy_bytes=0)
    for zero, gb in ((0, 120), (1, 31.4), (2, 16.6), (3, 1.88)):
        assert sum(model_state(7.5e9, 64, zero, sw)) / 1e9 == pytest.approx(gb, rel=0.01)


def _dims(shape, t=1, sp=False, b=1):
    return Dims(shape, b, t, sp, 2, 2)


def test_activations_follow_korthikanti_table_2():
    m = MODELS["gpt-175b"]
    s, h, a = m.seq, m.n_embd, m.n_head
    sbh = s * h
    kept, _ = block_activations(_dims(m), "none", flash=False)
    assert kept == pytest.approx(sbh * (34 + 5 * a * s / h))
    kept, _ = block_activations(_dims(m, t=8), "none", flash=False)
    assert kept == pytest.approx(sbh * (10 + 24 / 8 + 5 * a * s / (h * 8)))
    kept, _ = block_activations(_dims(m, t=8, sp=True), "none", flash=False)
    assert kept == pytest.approx(sbh / 8 * (34 + 5 * a * s / h))
    kept, _ = block_activations(_dims(m, t=8, sp=True), "selective", flash=False)
    assert kept == pytest.approx(sbh / 8 * 34)
    kept, _ = block_activations(_dims(m, t=8), "full", flash=False)
    assert kept == pytest.approx(2 * sbh)
    # A fused attention kernel never stores the scores: as if they were recomputed.
    assert block_activations(_dims(m, t=8), "none", flash=True)[0] == pytest.approx(
        block_activations(_dims(m, t=8), "selective", flash=False)[0])


@pytest.mark.parametrize("name,saving", [("gpt-175b", 0.70), ("gpt-530b", 0.65)])
def test_selective_recomputation_saves_what_korthikanti_reports(name, saving):
    """Korthikanti et al. 2022 §5: selective recomputation cuts activation memory by 70% for
    GPT-3 (175B) and 65% for MT-NLG (530B)."""
    d = _dims(MODELS[name])
    none = block_activations(d, "none", flash=False)[0]
    selective = block_activations(d, "selective", flash=False)[0]
    assert 1 - selective / none == pytest.approx(saving, abs=0.01)


def test_pipeline_bubble_is_p_minus_1_over_m():
    """GPipe / 1F1B with equal stages: (m + p − 1)·t, a bubble of (p − 1)/m of the ideal;
    interleaving v chunks divides it by v (Narayanan et al. 2021 §2.2)."""
    shape = ModelShape("deep", 32, 16, 2048, 2048, 256)  # a tiny vocabulary: stages all but equal
    cluster = gpu_cluster("a100", 4)
    for m in (4, 8, 16):
        for schedule, v in (("1f1b", 1), ("interleaved", 2), ("interleaved", 4)):
            e = estimate(shape, cluster, Candidate(1, 4, 1, 0, 1, schedule, v, "full"), m, MEGATRON_2021)
            ideal = e.step_s - sum(t for k, t in e.breakdown.items() if k in ("pipeline bubble", "p2p",
                                                                                "tied grads", "optimizer"))
            assert e.breakdown["pipeline bubble"] / ideal == pytest.approx(3 / (m * v), rel=0.02)
    gpipe = estimate(shape, cluster, Candidate(1, 4, 1, 0, 1, "gpipe", 1, "full"), 8)
    one_f_one_b = estimate(shape, cluster, Candidate(1, 4, 1, 0, 1, "1f1b", 1, "full"), 8)
    assert gpipe.step_s == pytest.approx(one_f_one_b.step_s)  # same time, more memory
    assert gpipe.memory.activations > one_f_one_b.memory.activations


def test_collectives_follow_the_ring_alpha_beta_model():
    b, n, alpha, beta = 1e9, 8, 5e-6, 100e9
    ar = collective_time("all_reduce", b, n, alpha, beta)
    assert ar == pytest.approx(2 * 7 * alpha + 2 * 7 / 8 * b / beta)
    assert ar == pytest.approx(collective_time("reduce_scatter", b, n, alpha, beta)
                               + collective_time("all_gather", b, n, alpha, beta))
    assert collective_time("all_reduce", b, 1, alpha, beta) == 0.0
    assert collective_time("p2p", b, 2, alpha, beta) == pytest.approx(alpha + b / beta)


def test_group_bandwidth_by_placement():
    c = gpu_cluster("a100", 64)  # 8 nodes of 8
    nvlink, hdr = c.intra.beta, c.inter.beta
    assert c.group_beta(8, 1) == (c.intra.latency_s, nvlink)          # tp = 8: one node
    assert c.group_beta(8, 8)[1] == pytest.approx(hdr)                # dp across nodes, 1 GPU per node
    assert c.group_beta(32, 1)[1] == pytest.approx(min(nvlink, 8 * hdr))  # 8 GPUs per node share 8 NICs
    eth = gpu_cluster("h100", 16, nodes=2, inter="eth-100g")
    assert eth.group_beta(2, 8)[1] == pytest.approx(eth.inter.beta / 8)  # one NIC for 8 GPUs


def test_roofline_and_wave_quantization():
    dev = gpu_cluster("a100", 1).device
    big = Op("gemm", 2.0 * 8192 ** 3, 2 * 3 * 8192 ** 2, mnk=(8192, 8192, 8192))
    assert op_time(dev, big) == pytest.approx(big.flops / dev.matmul_flops, rel=0.01)
    assert wave_efficiency(128, 128, 108) == pytest.approx(1 / 108)  # one tile on 108 SMs
    assert wave_efficiency(256 * 108, 128, 108) == 1.0
    stream = Op("memory", bytes=1e9)
    assert op_time(dev, stream) == pytest.approx(1e9 / (dev.mem_bw * dev.mem_efficiency) + dev.launch_s)


def _calibration(**rates):
    base = {"gemm": 50e9, "attn_fwd": 20e9, "attn_bwd": 15e9, "gelu": 3e8, "gelu_bwd": 2.5e8, "norm": 1e9,
            "norm_bwd": 5e8, "xent": 9e8, "xent_bwd": 6e8, "adamw_param": 1e8, "adamw_tensor": 2e4}
    base.update(rates)
    return {"cpu": "test", "cores": 2, "threads": 1, "matmul_flops": base["gemm"], "mem_bw": 30e9,
            "mem_bytes": 16e9, "op_overhead_s": 5e-6, "rates": base,
            "gloo": {"all_reduce": (5e-5, 2e9), "reduce_scatter": (5e-5, 1e9), "all_gather": (5e-5, 1e9),
                     "p2p": (5e-5, 2e9)}}


def test_processes_beyond_the_cores_share_them():
    shape = ModelShape("tiny", 4, 4, 128, 128, 256)
    one = estimate(shape, cpu_cluster(_calibration(), 1), Candidate(1, micro_batch=8), 32)
    four = estimate(shape, cpu_cluster(_calibration(), 4), Candidate(4, micro_batch=8), 32)
    assert "core sharing" in four.breakdown
    # four processes on two cores: at least the whole job's compute over two cores
    assert four.step_s >= one.step_s / 2


def test_search_proposes_only_layouts_plait_accepts():
    shape = ModelShape("small", 8, 8, 512, 256, 1024)
    result = search(shape, gpu_cluster("a100-40gb", 8), 32)
    assert result.ranked and result.considered >= len(result.ranked)
    steps = [e.step_s for e in result.ranked]
    assert steps == sorted(steps)
    for e in result.ranked:
        c = e.candidate
        assert e.fits and c.dp * c.pp * c.tp == 8
        assert not (c.pp > 1 and c.zero > 0)  # plait's rule: no ZeRO inside pipeline stages
        assert plait_accepts(shape, c, e.microbatches) is None
    pinned = search(shape, gpu_cluster("a100-40gb", 8), 32, fixed={"tp": 2, "pp": 2, "recompute": "full"})
    assert pinned.ranked and all((e.candidate.tp, e.candidate.pp, e.candidate.dp, e.candidate.recompute)
                                 == (2, 2, 2, "full") for e in pinned.ranked)


def test_what_plait_refuses_the_search_never_proposes():
    shape = ModelShape("small", 8, 8, 512, 256, 1024)
    refused = plait_accepts(shape, Candidate(2, 2, 1, zero=1, micro_batch=1), 4)
    assert refused is not None and "parallel.zero" in refused
    from plait.config import Config

    validate(Config())  # the defaults stay valid (the layout field is empty)


def test_estimate_refuses_a_layout_that_does_not_fit_the_cluster():
    with pytest.raises(PlanError, match="does not use the 8 devices"):
        estimate(MODELS["gpt-125m"], gpu_cluster("h100", 8), Candidate(2, 2, 1), 16)
    with pytest.raises(PlanError, match="not a multiple of dp × micro-batch"):
        estimate(MODELS["gpt-125m"], gpu_cluster("h100", 8), Candidate(8, micro_batch=3), 16)
