"""No raw ``torch.distributed`` collective outside ``parallel/collectives.py`` and ``ops/``.

NCCL accepts only tensors on the rank's GPU; the wrappers in :mod:`megatron_lpreg.parallel.collectives` are where
tensors are placed on ``ctx.device`` and checked, so every other module must go through them. The package is parsed
with ``ast`` (every import form of ``torch.distributed`` is resolved, so an alias cannot hide a call), and the
checker itself is tested on snippets so that it can fail. megatron-core's own internals are not in our tree.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

import megatron_lpreg

PACKAGE = Path(megatron_lpreg.__file__).parent
ALLOWED = ("parallel/collectives.py", "ops/")
"""Package-relative paths that may call torch.distributed collectives directly."""

COLLECTIVES = frozenset({
    "all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_into_tensor", "all_gather_coalesced",
    "all_gather_object", "_all_gather_base", "all_to_all", "all_to_all_single", "broadcast", "broadcast_object_list",
    "gather", "gather_object", "scatter", "scatter_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor",
    "_reduce_scatter_base", "send", "recv", "isend", "irecv", "send_object_list", "recv_object_list",
    "batch_isend_irecv", "P2POp", "barrier", "monitored_barrier",
})
"""Module-level torch.distributed functions that move tensors between ranks (and the barriers)."""

COLLECTIVE_OPTIONS = frozenset({
    "AllreduceOptions", "AllreduceCoalescedOptions", "AllgatherOptions", "AllToAllOptions", "BarrierOptions",
    "BroadcastOptions", "GatherOptions", "ReduceOptions", "ReduceScatterOptions", "ScatterOptions",
})
"""c10d option objects that only a raw ProcessGroup collective call takes."""

PROCESS_GROUP_METHODS = frozenset({
    "allreduce", "allreduce_coalesced", "allgather", "allgather_coalesced", "allgather_into_tensor_coalesced",
    "_allgather_base", "alltoall", "alltoall_base", "reduce_scatter", "_reduce_scatter_base",
    "reduce_scatter_tensor_coalesced",
})
"""c10d ProcessGroup method names (spelled without underscores, so they are unambiguous in our code)."""


@dataclass(frozen=True)
class Site:
    path: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what}"


def _dotted(node: ast.AST) -> list[str] | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return [node.id, *reversed(parts)]
    return None


def raw_collective_sites(source: str, path: str = "<snippet>") -> list[Site]:
    """Every raw torch.distributed collective in ``source``: calls through any alias of torch / torch.distributed,
    collectives imported by name, c10d collective option objects and ProcessGroup collective methods."""
    tree = ast.parse(source)
    aliases: dict[str, str] = {}  # local name -> dotted module/object path it stands for
    sites: list[Site] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    aliases[a.asname] = a.name
                else:
                    top = a.name.split(".")[0]
                    aliases[top] = top
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                aliases[a.asname or a.name] = full
                if full.startswith("torch.distributed") and a.name in COLLECTIVES:
                    sites.append(Site(path, node.lineno, f"imports {full}"))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Attribute, ast.Name)) and not isinstance(getattr(node, "ctx", None), ast.Store):
            chain = _dotted(node)
            if not chain or chain[0] not in aliases:
                continue
            resolved = ".".join([aliases[chain[0]], *chain[1:]])
            last = resolved.rsplit(".", 1)[-1]
            if resolved.startswith("torch.distributed.") and (last in COLLECTIVES or last in COLLECTIVE_OPTIONS):
                if isinstance(node, ast.Name) and node.id == last:  # the bare name imported above: counted there
                    continue
                sites.append(Site(path, node.lineno, resolved))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in PROCESS_GROUP_METHODS:
                sites.append(Site(path, node.lineno, f"ProcessGroup.{node.func.attr}()"))
    return sorted(set(sites), key=lambda s: (s.path, s.line, s.what))


def _package_sites() -> list[Site]:
    sites = []
    for file in sorted(PACKAGE.rglob("*.py")):
        rel = file.relative_to(PACKAGE).as_posix()
        if rel.startswith(ALLOWED):
            continue
        sites.extend(raw_collective_sites(file.read_text(), rel))
    return sites


def test_no_raw_collectives_outside_the_helper_module_and_ops():
    sites = _package_sites()
    assert not sites, ("raw torch.distributed collectives outside parallel/collectives.py and ops/ (use the "
                       "wrappers in megatron_lpreg.parallel.collectives):\n" + "\n".join(map(str, sites)))


@pytest.mark.parametrize("snippet", [
    "import torch.distributed as dist\ndist.all_reduce(t)",
    "import torch.distributed\ntorch.distributed.broadcast(t, 0)",
    "import torch\ntorch.distributed.all_gather_object(out, x)",
    "from torch import distributed as d\nd.send(t, 1)",
    "from torch.distributed import all_reduce\nall_reduce(t)",
    "from torch.distributed import broadcast_object_list as bol\nbol(box, src=0)",
    "import torch.distributed.distributed_c10d as c10d\nc10d.recv(t, 0)",
    "def f():\n    import torch.distributed as dist\n    dist.barrier()",
    "import torch.distributed as dist\nopts = dist.BroadcastOptions()",
    "group.allreduce([t]).wait()",
    "import torch.distributed as dist\nop = dist.all_reduce\nop(t)",
])
def test_checker_finds_every_form(snippet):
    assert raw_collective_sites(snippet), snippet


@pytest.mark.parametrize("snippet", [
    "import torch.distributed as dist\nif dist.is_initialized(): r = dist.get_rank(); w = dist.get_world_size()",
    "from megatron_lpreg.parallel import collectives as coll\ncoll.all_reduce(t, group=g)",
    "import torch\nx = torch.broadcast_tensors(a, b)",
    "conn.send(b'x'); sock.recv(4)",
    "import torch.distributed as dist\ng: dist.ProcessGroup | None = None",
    "import torch.distributed as dist\nopts = dist.ProcessGroupNCCL.Options()",
])
def test_checker_leaves_allowed_code_alone(snippet):
    assert raw_collective_sites(snippet) == []
