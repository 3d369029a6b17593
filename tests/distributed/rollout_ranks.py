"""One RL rollout batch split across ranks (run by tests/test_rl_distributed.py under torchrun).

Each rank samples its rows with one generator per row (seeded by the row's global index), then
rank 0 gathers every rank's rollouts and log-probs over gloo and checks them bitwise against the
whole batch sampled in one process. Prints one line: "ranks=<n> rows=<B> bitwise-equal" on
success; exits non-zero otherwise.
"""

import sys

import torch
import torch.distributed as dist

from flowmatch_fast.alpamayo1_x_rl import FlowMatching

BATCH, STEPS, X_DIMS = 12, 5, (16, 2)


def field(*, x, t):
    return (torch.tanh(1.3 * x) - 0.7 * x * t + t).to(torch.bfloat16)


def rollout(rows):
    fm = FlowMatching("sde", num_inference_steps=STEPS, x_dims=X_DIMS)
    gens = [torch.Generator().manual_seed(1000 + r) for r in rows]
    info = fm.sample(len(rows), field, generator=gens, return_info=True, noise_level=0.8)
    return {k: info[k] for k in ("x", "log_prob", "all_steps")}


def main() -> int:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = rollout(range(rank * BATCH // world, (rank + 1) * BATCH // world))
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    status = 0
    if rank == 0:
        whole = rollout(range(BATCH))
        for key, want in whole.items():
            got = torch.cat([g[key] for g in gathered])
            if not torch.equal(got, want):
                print(f"rank split differs from one process in {key}", flush=True)
                status = 1
        if status == 0:
            print(f"ranks={world} rows={BATCH} bitwise-equal", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return status


if __name__ == "__main__":
    sys.exit(main())
