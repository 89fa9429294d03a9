"""The collective wrappers on real gloo ranks: values, group-rank order, object collectives, and the refusal of
tensors no backend can move."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megatron_lpreg.parallel import collectives as coll
from megatron_lpreg.parallel.spawn import RankFailure, run_ranks

CTX = SimpleNamespace(device=torch.device("cpu"))


def _exercise(rank: int, world: int) -> dict:
    out: dict = {}
    out["sum"] = coll.all_reduce(coll.tensor([rank + 1.0], CTX), op="sum").item()
    out["max"] = coll.all_reduce(coll.tensor([float(rank)], CTX), op="max").item()
    out["bcast"] = coll.broadcast(coll.tensor([rank * 10.0], CTX), src=1).item()
    out["gather_all"] = [t.item() for t in coll.all_gather(coll.tensor([rank], CTX, torch.long))]
    buf = coll.empty((world, 2), CTX)
    out["into"] = coll.all_gather_into_tensor(buf, coll.tensor([[rank, rank + 0.5]], CTX)).tolist()
    gathered = coll.gather(coll.tensor([rank + 100], CTX, torch.long), dst=0)
    out["gather"] = None if gathered is None else [t.item() for t in gathered]
    if rank == 0:
        coll.send(coll.arange(3, CTX), dst=1)
        coll.send_object({"hello": 1}, dst=1)
    else:
        out["recv"] = coll.recv(coll.zeros(3, CTX, torch.long), src=0).tolist()
        out["recv_obj"] = coll.recv_object(src=0)
    out["obj"] = coll.broadcast_object({"from": rank} if rank == 0 else None, src=0)
    out["objs"] = coll.all_gather_object(("r", rank))
    coll.barrier()
    out["world"], out["rank"] = coll.world_size(), coll.rank()
    return out


def test_wrappers_on_two_gloo_ranks():
    r0, r1 = run_ranks(_exercise, 2, timeout_s=120)
    for r in (r0, r1):
        assert r["sum"] == 3.0 and r["max"] == 1.0 and r["bcast"] == 10.0
        assert r["gather_all"] == [0, 1]
        assert r["into"] == [[0.0, 0.5], [1.0, 1.5]]
        assert r["obj"] == {"from": 0} and r["objs"] == [("r", 0), ("r", 1)]
    assert r0["gather"] == [100, 101] and r1["gather"] is None
    assert r1["recv"] == [0, 1, 2] and r1["recv_obj"] == {"hello": 1}
    assert (r0["world"], r0["rank"], r1["rank"]) == (2, 0, 1)


def _standalone(rank: int, world: int, port: int) -> tuple[str, list[float]]:
    from datetime import timedelta

    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0, timeout=timedelta(seconds=60))
    group = dist.ProcessGroupGloo(dist.PrefixStore("side", store), rank, world, timedelta(seconds=60))
    t = coll.tensor([1.0, 2.0] if rank == 0 else [0.0, 0.0], CTX)
    return coll._backend(group), coll.broadcast_in_group(group, t, root=0).tolist()


def test_broadcast_in_a_group_outside_the_registry():
    from megatron_lpreg.parallel.spawn import free_port

    assert run_ranks(_standalone, 2, free_port(), timeout_s=120) == [("gloo", [1.0, 2.0])] * 2


def _meta_all_reduce(rank: int, world: int) -> None:
    coll.all_reduce(torch.zeros(2, device="meta"))


def test_meta_tensor_is_refused_with_the_fix():
    with pytest.raises(RankFailure, match="meta device .*collectives.tensor/on_device"):
        run_ranks(_meta_all_reduce, 2, timeout_s=120)


def test_single_process_is_a_no_op():
    t = coll.tensor([2.0], CTX)
    assert coll.all_reduce(t).item() == 2.0
    assert coll.broadcast_object("x") == "x" and coll.all_gather_object(3) == [3]
    assert coll.world_size() == 1 and coll.rank() == 0
    assert coll.on_device(torch.ones(2, dtype=torch.float16), CTX, dtype=torch.float32).dtype == torch.float32
