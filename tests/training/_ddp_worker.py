"""Worker of the DDP equality test: one gloo rank training TinyNet on its slice of each batch."""
import os
import sys

import torch
import torch.distributed as dist


def train_rank(rank: int, world_size: int, port: int, out_path: str, steps: int, accumulations) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        from harmonizer_fast.training.trainer import Trainer
        from tests.training._tiny import make_stream, train_config, tiny_net

        results = {}
        for grad_accum_steps in accumulations:
            trainer = Trainer(tiny_net(), train_config(steps=steps, grad_accum_steps=grad_accum_steps),
                              train_data=make_stream(batch_size=8, rank=rank, world_size=world_size))
            rows = trainer.fit()
            results[str(grad_accum_steps)] = {"params": trainer.model.state_dict(), "loss": [r["loss"] for r in rows]}
        if rank == 0:
            torch.save(results, out_path)
        dist.barrier()  # every rank done before any tears its connections down
    finally:
        dist.destroy_process_group()
    # Leave without interpreter finalization once the work is done and written: in ~1 run in 10 a
    # rank then aborted in the teardown of torch's distributed threads (SIGABRT, "terminate called
    # without an active exception"), after training and saving had finished; with the original
    # code too (12 pytest runs: 2 failures). Errors above still propagate (no exit on that path).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
