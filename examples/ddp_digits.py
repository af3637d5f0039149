"""Train the digits ResNet with DistributedDataParallel on several processes (CPU, gloo).

    torchrun --nproc_per_node=2 examples/ddp_digits.py

On several machines, start the same command on each with a shared rendezvous:

    torchrun --nnodes=2 --nproc_per_node=2 --rdzv-backend=c10d \\
        --rdzv-endpoint=HOST_OF_NODE_0:29500 --rdzv-id=digits examples/ddp_digits.py

Each rank takes its share of every global batch of 64 (the single-process example's batch),
so the optimisation is the single-process one; rank 0 shows the progress bar, evaluates, saves
the one checkpoint folder (--out, default checkpoints/digits_ddp/: model.safetensors +
config.json, reloaded by residual.load_pretrained) and writes the results file (--json, default
examples/results/ddp_digits_<model>.json): {"example", "command", "threads" (per process),
"seed", "torch", "metrics": {"test_accuracy", "processes", "train_seconds", "ms_per_step"}}.
Each process uses --threads threads (default 1); with the same processes, threads and seed the
accuracy is the same on every run.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist
from reproducible import (
    add_reproducibility_arguments,
    make_reproducible,
    parser,
    results_path,
    write_results,
)
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm
from train_digits import SETTINGS, accuracy, build, load_data, shift

import residual
from residual.distributed import check_drop_agreement


def main() -> None:
    args_parser = parser(__doc__)
    args_parser.add_argument("--model", choices=sorted(SETTINGS), default="resnet")
    args_parser.add_argument("--epochs", type=int, default=None, help="default: the model's own")
    args_parser.add_argument(
        "--out", type=Path, default=Path("checkpoints") / "digits_ddp", help="checkpoint folder"
    )
    add_reproducibility_arguments(args_parser, "ddp_digits_<model>.json")
    args = args_parser.parse_args()
    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    # The same initial weights and stochastic-depth seeds on every rank.
    make_reproducible(args.seed, args.threads)
    setting = SETTINGS[args.model]
    epochs = args.epochs or setting.epochs
    lr = setting.lr
    x_train, y_train, x_test, y_test = load_data(args.seed)
    model = DistributedDataParallel(build(setting))
    check_drop_agreement(model)  # every rank will skip the same blocks (drop_mode="batch")
    batch = 64
    steps = epochs * ((len(y_train) + batch - 1) // batch)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    order = torch.Generator().manual_seed(args.seed)  # the same batch order on every rank
    bar = tqdm(total=steps, disable=rank != 0, desc=f"{args.model} x{world}", unit="step")
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(y_train), generator=order).split(batch):
            mine = idx[rank::world]  # this rank's share of the global batch
            loss = loss_fn(model(shift(x_train[mine])), y_train[mine])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    seconds = time.perf_counter() - start
    if rank == 0:
        acc = accuracy(model.module, x_test, y_test)
        residual.save_pretrained(
            model.module, args.out, builder=setting.builder, kwargs=setting.kwargs
        )
        print(f"saved {args.out}")
        print(
            f"{args.model} on {world} processes: test accuracy {acc:.2%} "
            f"({seconds:.1f} s, {1e3 * seconds / steps:.1f} ms/step)"
        )
        metrics = {
            "test_accuracy": round(acc, 6),
            "processes": world,
            "train_seconds": round(seconds, 1),
            "ms_per_step": round(1e3 * seconds / steps, 1),
        }
        path = results_path(args.json, f"ddp_digits_{args.model}")
        write_results(path, "ddp_digits", args.seed, metrics, f"torchrun --nproc_per_node={world}")
    # Every rank's collectives complete before any rank exits: a gloo thread still finishing the
    # last all-reduce while the interpreter shuts down aborts the process (see tests/_dist_workers).
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
