"""Command line: ``python -m funcloss check | demo | bench``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m funcloss", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    check = sub.add_parser("check", help="compare every loss with torch.nn.functional on a device")
    check.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    check.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    check.add_argument("--compile", action="store_true", help="also try torch.compile (slow: seconds per loss)")
    check.add_argument("--loss", action="append", help="only this loss (repeatable)")
    check.add_argument(
        "--autocast",
        action="store_true",
        help="run inside torch.autocast with --dtype float16 or bfloat16 (mixed-precision parity)",
    )

    demo = sub.add_parser("demo", help="train a small classifier functionally, then inspect its gradient signs")
    demo.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    demo.add_argument("--plot", default="funcloss-demo.png", help="where to write the PNG (needs matplotlib)")
    demo.add_argument("--no-plot", action="store_true", help="do not write a plot")

    bench = sub.add_parser("bench", help="time funcloss against torch.nn.functional, Opacus and loops")
    bench.add_argument("what", nargs="?", default="losses", choices=["losses", "persample", "memory"])
    bench.add_argument("--device", default="cpu")
    bench.add_argument(
        "--rounds", type=int, default=None, help="interleaved timing rounds (default 15; memory: 5, each is slow)"
    )
    bench.add_argument("--loss", action="append", help="losses only: only this loss (repeatable)")
    bench.add_argument(
        "--compile",
        action="store_true",
        help="losses: add a column with both sides under torch.compile (slow: seconds per loss)",
    )

    args = parser.parse_args(argv)
    if args.command in ("check", "bench"):
        try:
            device = torch.device(args.device)
        except RuntimeError as e:
            parser.error(f"--device {args.device}: expected a device such as cpu or cuda ({e})")
        if device.type == "meta":
            parser.error("--device meta: the meta device holds no values to compare or time; use cpu or cuda")
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is available here")
    if args.command == "bench" and args.compile and args.what != "losses":
        parser.error(f"--compile: only for 'bench losses' (got 'bench {args.what}')")
    if args.command == "bench" and args.loss and args.what != "losses":
        parser.error(f"--loss: only for 'bench losses' (got 'bench {args.what}')")
    if args.command in ("check", "bench") and args.loss:
        from ._bench.cases import CASES

        unknown = sorted(set(args.loss) - set(CASES))
        if unknown:
            parser.error(f"--loss: unknown loss {unknown}; choose from {sorted(CASES)}")
    if args.command == "check":
        from ._bench.check import run

        if args.autocast and args.dtype not in ("float16", "bfloat16"):
            parser.error(f"--autocast: expected --dtype float16 or bfloat16, got {args.dtype}")
        return run(args.device, DTYPES[args.dtype], names=args.loss, compile=args.compile, autocast=args.autocast)
    if args.command == "demo":
        from ._demo import run as run_demo

        if args.steps < 1:
            parser.error(f"--steps: expected a positive number of steps, got {args.steps}")
        folder = Path(args.plot).expanduser().resolve().parent
        if not args.no_plot and not folder.is_dir():
            parser.error(f"--plot {args.plot}: expected a path in an existing folder; {folder} does not exist")
        args.plot = str(Path(args.plot).expanduser())
        return run_demo(args.steps, None if args.no_plot else args.plot)
    if args.command == "bench":
        if args.rounds is not None and args.rounds < 1:
            parser.error(f"--rounds: expected a positive number of rounds, got {args.rounds}")
        if args.what == "memory":
            from ._bench.memory import run as run_memory

            return run_memory(device=args.device, rounds=5 if args.rounds is None else args.rounds)
        args.rounds = 15 if args.rounds is None else args.rounds
        if args.what == "persample":
            from ._bench.persample import run as run_persample

            return run_persample(rounds=args.rounds, device=args.device)
        from ._bench.timing import run_losses

        return run_losses(args.device, rounds=args.rounds, names=args.loss, compile=args.compile)
    return 2


if __name__ == "__main__":
    sys.exit(main())
