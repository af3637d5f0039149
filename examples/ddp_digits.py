"""Train the digits ResNet with DistributedDataParallel on several processes (CPU, gloo).

    torchrun --nproc_per_node=2 examples/ddp_digits.py

On several machines, start the same command on each with a shared rendezvous:

    torchrun --nnodes=2 --nproc_per_node=2 --rdzv-backend=c10d \\
        --rdzv-endpoint=HOST_OF_NODE_0:29500 --rdzv-id=digits examples/ddp_digits.py

Each rank takes its share of every global batch of 64 (the single-process example's batch),
so the optimisation is the single-process one; rank 0 shows the progress bar, evaluates, and
saves the one checkpoint (atomically).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm
from train_digits import SETTINGS, accuracy, load_data, save_atomically, shift

from residual.distributed import check_drop_agreement


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(SETTINGS), default="resnet")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("checkpoints") / "digits_ddp.pt")
    args = parser.parse_args()
    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    torch.manual_seed(0)  # the same initial weights and stochastic-depth seeds on every rank
    build, default_epochs, lr = SETTINGS[args.model]
    epochs = args.epochs or default_epochs
    x_train, y_train, x_test, y_test = load_data(0)
    model = DistributedDataParallel(build())
    check_drop_agreement(model)  # every rank will skip the same blocks (drop_mode="batch")
    batch = 64
    steps = epochs * ((len(y_train) + batch - 1) // batch)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    order = torch.Generator().manual_seed(0)  # the same batch order on every rank
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
        save_atomically(model.module.state_dict(), args.out)
        print(f"saved {args.out}")
        print(
            f"{args.model} on {world} processes: test accuracy {acc:.2%} "
            f"({seconds:.1f} s, {1e3 * seconds / steps:.1f} ms/step)"
        )
    # Every rank's collectives complete before any rank exits: a gloo thread still finishing the
    # last all-reduce while the interpreter shuts down aborts the process (see tests/_dist_workers).
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
