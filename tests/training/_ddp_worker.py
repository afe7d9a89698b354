"""Worker of the DDP equality test: one gloo rank training TinyNet on its slice of each batch."""
import os

import torch
import torch.distributed as dist


def train_rank(rank: int, world_size: int, store_file: str, out_path: str, steps: int, accumulations) -> None:
    # the ranks meet through a file store, not a TCP port: no port can be taken by another process
    # between choosing it and binding it
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world_size)
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
    finally:
        dist.destroy_process_group()
