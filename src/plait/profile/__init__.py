"""Performance debugging: traces, per-rank breakdowns, stragglers, reports, uneven hardware.

- comm.py        time blocked in communication; collectives named with group and bytes in traces
- phases.py      forward, backward, pipeline actions, data and optimizer named in traces
- capture.py     torch.profiler over chosen steps on every rank (`plait train --profile N`)
- trace.py       a trace's steps split into compute (by phase), communication and idle
- intervals.py   the interval arithmetic behind that split
- stragglers.py  the slow rank among its peers, and the phase it loses time in
- analysis.py    a run folder read into per-rank summaries
- hints.py       plain-language advice from the analysis
- plots.py       the report's PNGs (matplotlib)
- hta.py         Holistic Trace Analysis for GPU traces
- report.py      `plait report RUN_DIR`: plots and a text summary
- balance.py     uneven hardware: speeds, the uneven dp split, stage speeds
- session.py     what the trainer calls around its steps
- slow.py        a testing knob that makes one rank slower

Nothing here is imported by the parallel strategies; the trainer and the CLI use it.
"""
