"""One SGLang TP rank of the stand-in server, in a process of its own, running SGLang's own code from the pinned
package (``.sglang-contract/site``):

- the weight-update group is joined with ``sglang.srt.utils.common.init_custom_process_group``, called as
  sglang 0.5.23 ``model_runner_components/weight_updater.py:133`` calls it (``init_method=tcp://addr:port``,
  ``rank = rank_offset + tp_rank``, the request's ``group_name``); ``/destroy_weights_update_group`` is
  ``torch.distributed.destroy_process_group`` of that group (``weight_updater.py:150``);
- a distributed update receives each tensor with ``torch.distributed.broadcast(src=0, group=...)`` into an empty
  tensor of the announced dtype and shape (``weight_updater.py:288``);
- a tensor update deserializes only this rank's payload, ``serialized_named_tensors[tp_rank]``, with
  ``MultiprocessingSerializer.deserialize`` after ``monkey_patch_torch_reductions()`` (``managers/tp_worker.py:194``,
  SGLang's ``SafeUnpickler`` included).

Each rank keeps its own full copy of the weights (HF names, the checkpoint's dtypes; received tensors are cast to
them as SGLang's ``load_weights`` copies into its parameters) and reports a SHA-256 digest of it, so tests can see
that every TP rank of every engine holds bit-identical weights. It must be a process, not a thread: torch allows
one live group per name in a process, and the trainer's side already holds that name in the test process.

The parent talks to it over a ``multiprocessing`` pipe (:class:`TPRank`); tensors come back as plain pickles.
"""
from __future__ import annotations

import hashlib
import multiprocessing as mp
import pickle
import sys
from typing import Any

import torch

from tests.support.sglang_contract import contract_site, stub_unused_packages

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
START_TIMEOUT_S = 120.0
"""Spawned interpreter + torch + SGLang's ``utils.common`` import: 3-8 s here, more on a loaded CPU."""


def weights_digest(weights: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and raw bytes, in name order (equal digests = bit-identical weights)."""
    h = hashlib.sha256()
    for name in sorted(weights):
        t = weights[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class _Rank:
    """The rank's state inside its process."""

    def __init__(self, tp_rank: int, model_path: str | None) -> None:
        from sglang.srt.utils.common import MultiprocessingSerializer, init_custom_process_group
        from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions

        self.tp_rank = tp_rank
        self.init_custom_process_group = init_custom_process_group
        self.serializer = MultiprocessingSerializer
        self.patch_reductions = monkey_patch_torch_reductions
        self.groups: dict[str, Any] = {}
        self.weights: dict[str, torch.Tensor] = {}
        self.strict = bool(model_path)
        """Only names and shapes of the model are accepted (a rank built without a model takes anything)."""
        if model_path:
            from megatron_lpreg.models import hf_dir

            self.weights = {name: t.clone() for name, t in hf_dir.iter_tensors(model_path)}

    def init_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int, group_name: str,
                   backend: str) -> str:
        if not group_name:
            raise ValueError("Group name cannot be empty")  # weight_updater.py:121 asserts this
        self.groups[group_name] = self.init_custom_process_group(
            backend=backend, init_method=f"tcp://{master_address}:{master_port}", world_size=world_size,
            rank=rank_offset + self.tp_rank, group_name=group_name)
        return "Succeeded to initialize custom process group."

    def destroy_group(self, group_name: str) -> str:
        if group_name not in self.groups:
            raise KeyError("The group to be destroyed does not exist.")
        torch.distributed.destroy_process_group(self.groups.pop(group_name))
        return "Succeeded to destroy custom process group."

    def receive(self, names: list[str], dtypes: list[str], shapes: list[list[int]], group_name: str) -> bytes:
        if group_name not in self.groups:
            raise KeyError(f"Group {group_name} not in {list(self.groups)}. Please call `init_weights_update_group` "
                           f"first.")
        received = []
        for name, dtype, shape in zip(names, dtypes, shapes):
            tensor = torch.empty(shape, dtype=DTYPES[dtype.removeprefix("torch.")])
            torch.distributed.broadcast(tensor, src=0, group=self.groups[group_name])
            received.append((name, tensor))
        return self._install(received)

    def from_tensor(self, serialized_named_tensors: list[str]) -> bytes:
        self.patch_reductions()
        return self._install(self.serializer.deserialize(serialized_named_tensors[self.tp_rank]))

    def load_disk(self, model_path: str) -> None:
        from megatron_lpreg.models import hf_dir

        self._install(list(hf_dir.iter_tensors(model_path)))

    def _install(self, named: list[tuple[str, torch.Tensor]]) -> bytes:
        for name, tensor in named:
            if self.strict and name not in self.weights:
                raise KeyError(f"no parameter named {name}")
            if self.strict and tuple(tensor.shape) != tuple(self.weights[name].shape):
                raise ValueError(f"{name}: shape {tuple(tensor.shape)} != {tuple(self.weights[name].shape)}")
            dtype = self.weights[name].dtype if self.strict else tensor.dtype
            self.weights[name] = tensor.detach().to("cpu", dtype).clone()
        return pickle.dumps([(name, self.weights[name]) for name, _ in named])

    def digest(self) -> str:
        return weights_digest(self.weights)


def _serve(conn: Any, tp_rank: int, model_path: str | None) -> None:
    stub_unused_packages()
    sys.path.insert(0, str(contract_site()))
    torch.set_num_threads(1)
    try:
        rank = _Rank(tp_rank, model_path)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ok", None))
    while True:
        try:
            method, kwargs = conn.recv()
        except EOFError:  # the server process is gone
            return
        if method == "stop":
            return
        try:
            conn.send(("ok", getattr(rank, method)(**kwargs)))
        except Exception as exc:  # noqa: BLE001 - SGLang answers a failed call with success=false and the message
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class TPRank:
    """Parent-side handle of one TP-rank process (spawned, so no state of the parent leaks in)."""

    def __init__(self, tp_rank: int, model_path: str | None = None) -> None:
        """Spawn the process (use :meth:`start`, which also waits until SGLang's code is loaded)."""
        ctx = mp.get_context("spawn")
        self.tp_rank = tp_rank
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, tp_rank, model_path), daemon=True)
        self._proc.start()
        child.close()

    @classmethod
    def start(cls, count: int, model_path: str | None = None) -> list[TPRank]:
        """``count`` TP ranks (0 .. count-1), started together and ready."""
        ranks = [cls(r, model_path) for r in range(count)]
        try:
            for rank in ranks:
                rank._wait_ready()
        except BaseException:
            for rank in ranks:
                rank.stop()
            raise
        return ranks

    def _wait_ready(self) -> None:
        tp_rank = self.tp_rank
        if not self._conn.poll(START_TIMEOUT_S):
            self.stop()
            raise RuntimeError(f"stand-in TP rank {tp_rank} did not start within {START_TIMEOUT_S:.0f} s")
        status, detail = self._conn.recv()
        if status != "ok":
            self.stop()
            raise RuntimeError(f"stand-in TP rank {tp_rank} could not load SGLang's code: {detail}")

    def submit(self, method: str, **kwargs: Any) -> None:
        """Start ``method`` in the rank (collect it with :meth:`result`; one call in flight at a time)."""
        self._conn.send((method, kwargs))

    def result(self, timeout_s: float = 300.0) -> Any:
        """The value of the submitted call; raises RuntimeError with the rank's message when it failed."""
        if not self._conn.poll(timeout_s):
            raise RuntimeError(f"stand-in TP rank {self.tp_rank}: no answer within {timeout_s:.0f} s")
        status, value = self._conn.recv()
        if status != "ok":
            raise RuntimeError(value)
        return value

    def call(self, method: str, **kwargs: Any) -> Any:
        """Run ``method`` in the rank and return its value (see :meth:`result`)."""
        self.submit(method, **kwargs)
        return self.result()

    @staticmethod
    def stop_all(ranks: list[TPRank]) -> None:
        """Ask every rank to stop at once, then wait for (or kill) each."""
        for rank in ranks:
            rank._ask_stop()
        for rank in ranks:
            rank.stop()

    def _ask_stop(self) -> None:
        if self._proc.is_alive():
            try:
                self._conn.send(("stop", {}))
            except (BrokenPipeError, OSError):
                pass

    def stop(self) -> None:
        if self._proc.is_alive():
            self._ask_stop()
            self._proc.join(timeout=3)  # a rank stuck in a failed rendezvous does not exit by itself
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout=10)
