"""What the report and CLI tests share: the sample's Parquet table as `embed` writes it, and the analysis CLI."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa

from service.cli import analysis as cli_analysis


def oct_table(embeddings: np.ndarray, files: list[Path]) -> pa.Table:
    """The table `embedserve embed tests/data/oct-sample --out oct.parquet` writes (without its metadata)."""
    return pa.table(
        {
            "key": [f"{f.parent.name}/{f.name}" for f in files],
            "path": [str(f.resolve()) for f in files],
            "label": [f.parent.name for f in files],
            "embedding": pa.FixedSizeListArray.from_arrays(
                pa.array(embeddings.astype(np.float32).ravel()), embeddings.shape[1]
            ),
        }
    )


def run(argv: list[str]) -> int:
    """The analysis subcommands of `embedserve` on `argv`; their exit code."""
    parser = argparse.ArgumentParser(prog="embedserve")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default=argparse.SUPPRESS)
    cli_analysis.register(parser.add_subparsers(dest="command", required=True), common)
    args = parser.parse_args(argv)
    return int(args.func(args))
