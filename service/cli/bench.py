"""`embedserve bench generate | run | kernels | soak | gpu`: the benchmark suite of `bench/` from the command line."""

from __future__ import annotations

import argparse
from typing import Any


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add `bench` and its subcommands to the `embedserve` subcommands."""
    from bench import generate, gpu_check, run, soak

    bench = sub.add_parser("bench", parents=[common], help="benchmarks and the synthetic OCT data set")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    generate_parser = bench_sub.add_parser(
        "generate", parents=[common], help="write a synthetic twin of the Kermany OCT set"
    )
    generate.add_arguments(generate_parser)
    run_parser = bench_sub.add_parser("run", parents=[common], help="time every stage against the baseline")
    run.add_arguments(run_parser)
    kernels = bench_sub.add_parser("kernels", parents=[common], help="time each kernel against its torch reference")
    kernels.add_argument("--device", default="cuda", help="device to time on (default cuda)")
    kernels.add_argument("--quick", action="store_true", help="small inputs, a few seconds")
    kernels.add_argument("--json", help="also write the results to this JSON file")
    soak_parser = bench_sub.add_parser(
        "soak", parents=[common], help="a real server under mixed traffic; fails if its memory keeps growing"
    )
    soak.add_arguments(soak_parser)
    gpu = bench_sub.add_parser(
        "gpu", parents=[common], help="the GPU check: every GPU path in one process, <= 8 minutes (--dry-run on CPU)"
    )
    gpu_check.add_arguments(gpu)
    bench.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    if args.bench_command == "generate":
        from bench import generate

        return generate.run(args)
    if args.bench_command == "run":
        from bench import run

        return run.run(args)
    if args.bench_command == "soak":
        from bench import soak

        return soak.run(args)
    if args.bench_command == "gpu":
        from bench import gpu_check

        return gpu_check.run(args)
    from bench import kernels

    argv = (
        ["--device", args.device] + (["--quick"] if args.quick else []) + (["--json", args.json] if args.json else [])
    )
    return int(kernels.main(argv) or 0)
