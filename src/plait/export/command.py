"""`plait export PATH OUT --format hf|onnx|executorch [--int8]`.

`add_arguments` is argparse only (importing this module imports no torch); `run` loads what the
chosen format needs.
"""

from __future__ import annotations

import argparse

from plait.errors import ConfigError

FORMATS = {
    "hf": "a Hugging Face GPT2LMHeadModel folder (config.json + safetensors); GPT only",
    "onnx": "one .onnx file for ONNX Runtime (GPT or digits MLP); needs plait[edge]",
    "executorch": "one .pte ExecuTorch program lowered to XNNPACK (GPT or digits MLP); needs plait[executorch]",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `plait export` arguments."""
    parser.add_argument("path", help="a run folder (its newest valid checkpoint; a parameter-server "
                                     "run too) or a step_* folder")
    parser.add_argument("out", help="what to write: a new folder for hf, a new .onnx or .pte file")
    parser.add_argument("--format", choices=list(FORMATS), default="hf",
                        help="; ".join(f"{k}: {v}" for k, v in FORMATS.items()) + " (default hf)")
    parser.add_argument("--int8", action="store_true",
                        help="onnx only: int8 weights by ONNX Runtime's dynamic quantization "
                             "(activations quantized at run time)")


def run(args: argparse.Namespace) -> int:
    """Export `args.path` in `args.format` to `args.out`; says what was written on stderr."""
    from rich.console import Console

    console = Console(stderr=True)

    def say(text: str) -> None:
        console.print(text, markup=False, highlight=False, soft_wrap=True)

    fmt = args.format
    if fmt not in FORMATS:  # argparse refuses these too; a direct caller may not use argparse
        raise ConfigError(f"--format {fmt!r} is unknown; valid: {', '.join(FORMATS)}")
    if args.int8 and fmt != "onnx":
        raise ConfigError(f"--int8 applies to --format onnx only, not --format {fmt}")
    if fmt == "hf":
        from plait.export.hf import export_hf

        say(f"wrote Hugging Face GPT-2 folder {export_hf(args.path, args.out)}")
        return 0
    if fmt == "onnx":
        from plait.export.onnx import export_onnx

        done = export_onnx(args.path, args.out, int8=args.int8)
        kind = "int8 (dynamic quantization)" if done.int8 else "fp32"
    else:
        from plait.export.executorch import export_executorch

        done = export_executorch(args.path, args.out)
        kind = "fp32, XNNPACK"
    for reason in done.skipped:
        say(f"skipped: {reason}")
    say(f"wrote {done.path} ({done.bytes / 1e3:,.1f} kB, {done.arch}, {kind}) from {done.checkpoint}; "
        f"the fp32 graph matches PyTorch within {done.max_abs_diff:.1e} (relative)")
    return 0
