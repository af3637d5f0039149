"""Hyper-connections on real data: the digits Transformer with n = 1 (exactly the plain
residual) vs n = 4 residual streams, same seed, same schedule.

    python examples/hyper_digits.py
    python examples/hyper_digits.py --streams 1 2 4 --epochs 20

The model is residual.models.HyperPatchTransformer(n): every attention and feed-forward
residual of the digits Transformer hyper-connected over n streams. Prints a progress bar per
run and a Markdown table at the end. Writes the results file (--json, default
examples/results/hyper_digits.json): {"example", "command", "threads", "seed", "torch",
"metrics": {"streams_<n>_test_accuracy", "streams_<n>_parameters", "streams_<n>_train_seconds"
for each n}}. With the same --seed and --threads the accuracies are the same on every run.
"""

from __future__ import annotations

import train_digits
from reproducible import (
    add_reproducibility_arguments,
    make_reproducible,
    parser,
    results_path,
    write_results,
)


def main() -> None:
    args_parser = parser(__doc__)
    args_parser.add_argument(
        "--streams", type=int, nargs="+", default=[1, 4], help="stream counts to train, in order"
    )
    args_parser.add_argument("--epochs", type=int, default=50, help="epochs for each run")
    args_parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_reproducibility_arguments(args_parser, "hyper_digits.json")
    args = args_parser.parse_args()
    make_reproducible(args.seed, args.threads)
    rows = []
    metrics: dict[str, float | int] = {}
    for n in args.streams:
        setting = train_digits.Setting("HyperPatchTransformer", {"streams": n}, args.epochs, 2e-3)
        params = sum(p.numel() for p in train_digits.build(setting).parameters())
        acc, seconds = train_digits.train(
            f"streams={n}",
            setting=setting,
            seed=args.seed,
            progress=not args.no_progress,
            summary=False,
        )
        rows.append((n, params, acc, seconds))
        print(f"n={n}: {params:,} parameters, test accuracy {acc:.2%}, {seconds:.1f} s", flush=True)
        metrics[f"streams_{n}_test_accuracy"] = round(acc, 6)
        metrics[f"streams_{n}_parameters"] = params
        metrics[f"streams_{n}_train_seconds"] = round(seconds, 1)
    print("\n| streams n | parameters | test accuracy | training time |")
    print("| --- | --- | --- | --- |")
    for n, params, acc, seconds in rows:
        print(f"| {n} | {params:,} | {acc:.2%} | {seconds:.1f} s |")
    write_results(results_path(args.json, "hyper_digits"), "hyper_digits", args.seed, metrics)


if __name__ == "__main__":
    main()
