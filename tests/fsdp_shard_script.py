"""Run by tests/test_accelerate.py under `torch.distributed.run --standalone --nproc_per_node 2` (gloo, CPU).

FSDP2 (`fully_shard`) the tiny model the way accelerate's TRANSFORMER_BASED_WRAP does with fsdp.yaml (each class the
model lists in `_no_split_modules` is its own shard unit, then the root), take two SGD steps with each rank on its half
of every global batch, and write the sharded model state as accelerate's SHARDED_STATE_DICT checkpoints do
(`torch.distributed.checkpoint` of {"model": state dict} into OUT/checkpoint/pytorch_model_fsdp_0). Rank 0 also writes
the initial model (OUT/initial, save_pretrained) for the test's single-process reference.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fsdp_shard_script.py OUT
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.fsdp import fully_shard

from linear_decay import LinearDecayConfig, LinearDecayForCausalLM

TINY = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_heads=2, intermediate_size=64, decay_rank=8,
            decay_type="gla")
STEPS, GLOBAL_BATCH, LENGTH, LR = 2, 4, 16, 1.0


def batches():
    """The global batches every process (and the single-process reference) sees."""
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, TINY["vocab_size"], (GLOBAL_BATCH, LENGTH), generator=generator) for _ in range(STEPS)]


def main(out):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = LinearDecayForCausalLM(LinearDecayConfig(**TINY))
    if rank == 0:
        model.save_pretrained(out / "initial")
    wrapped = [name for name, module in model.named_modules() if type(module).__name__ in model._no_split_modules]
    assert wrapped, model._no_split_modules
    for name in wrapped:
        fully_shard(model.get_submodule(name))
    fully_shard(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    per_rank = GLOBAL_BATCH // world
    for ids in batches():
        local = ids[rank * per_rank: (rank + 1) * per_rank]
        loss = model(input_ids=local, labels=local).loss
        loss.backward()  # FSDP2 reduce-scatters the gradients averaged over the ranks
        optimizer.step()
        optimizer.zero_grad()
    state = get_model_state_dict(model)
    print(f"rank {rank}: wrapped {wrapped}; {type(next(iter(state.values()))).__name__} shards", flush=True)
    dcp.save({"model": state}, storage_writer=dcp.FileSystemWriter(str(out / "checkpoint" / "pytorch_model_fsdp_0")))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
