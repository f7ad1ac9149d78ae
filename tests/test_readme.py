"""The README's Python example runs as written, on the processes its config asks for."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_example() -> str:
    text = README.read_text()
    start = text.index("From Python")
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


def _run_example(code: str) -> dict:
    import torch

    torch.manual_seed(0)
    data = torch.randint(0, 256, (2, 129), generator=torch.Generator().manual_seed(1))
    scope = {"x": data[:, :-1], "y": data[:, 1:]}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - our own README
    model, mesh = scope["model"], scope["mesh"]
    return {"loss": float(scope["loss"]), "tp": mesh.tp_size, "dp": mesh.dp_size,
            "split": model.tensor is not None}


def test_readme_python_example_runs(pools):
    for out in pools(4).run(_run_example, python_example()):
        assert out["tp"] == 2 and out["dp"] == 2 and out["split"]
        assert 4.0 < out["loss"] < 7.0  # a fresh byte-level model: about ln(256) = 5.5
