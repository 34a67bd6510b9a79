"""DistributedDataParallel (gloo, 2 processes on this machine) with the segregated layers gives
the same parameters as one process training on the whole batches."""
import pytest
import torch
import torch.distributed as dist

from perf import ddp_example


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_ddp_two_processes_match_one():
    ddp = ddp_example.run_ddp(world=2, steps=4, batch=8)
    one = ddp_example.run_single(steps=4, batch=8)
    torch.manual_seed(0)
    init = ddp_example.Decoder().state_dict()
    assert set(ddp) == set(one) == set(init)
    moved = max((one[k] - init[k]).abs().max().item() for k in one)
    assert moved > 1e-3, "training did not change the parameters: the comparison would be empty"
    for k in one:
        assert (ddp[k] - one[k]).abs().max().item() < 1e-5, k
