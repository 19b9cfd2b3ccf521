"""Layer-parallel sweeps across processes (accelerate launch / torchrun): each rank sweeps a share
of the candidate layers over the whole probe set, the ranks merge their per-doc scores, and every
rank therefore selects the same layer and answers its own requests under it.

lmms-eval gives each rank only its shard of the docs (doc i on rank i % N), so TaLo first makes the
whole sub-task visible everywhere: `SharedRequests` gathers every rank's Instances once per request
type (one all_gather_object). An Instance's arguments hold the task's bound methods
(doc_to_visual, doc_to_target, doc_to_messages), which would drag the whole Task through pickle;
construct_requests puts the same callables in every Instance of a task, so a rank sends its
arguments with each callable replaced by a placeholder, and the receiver puts back the callable at
that position from one of its own Instances of the task (lmms-eval gives every rank at least a
padding Instance of every task).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


class RankMismatchError(RuntimeError):
    """The ranks computed different results for the same thing."""


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes of the run."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def share(self, items: Sequence) -> list:
        """This rank's items, dealt in snake order (0..N-1, N-1..0, ...): with the items sorted by
        falling cost (prefix replay makes low layers the dearest) every rank gets a similar load."""
        mine = []
        for index, item in enumerate(items):
            block, slot = divmod(index, self.size)
            owner = slot if block % 2 == 0 else self.size - 1 - slot
            if owner == self.rank:
                mine.append(item)
        return mine

    def all_gather(self, value: Any) -> list:
        """Every rank's `value`, in rank order (a collective: all ranks must call it)."""
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        gathered: list = [None] * self.size
        dist.all_gather_object(gathered, value)
        return gathered

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def merged(self, mapping: Mapping) -> dict:
        """The union of every rank's dict; a key two ranks computed must carry the same value."""
        merged: dict = {}
        for rank, part in enumerate(self.all_gather(dict(mapping))):
            for key, value in part.items():
                if key in merged and merged[key] != value:
                    raise RankMismatchError(
                        f"ranks disagree on {key!r}: {merged[key]!r} vs {value!r} (rank {rank}); the model "
                        f"must give the same answers in every process for a layer-parallel sweep"
                    )
                merged[key] = value
        return merged


def current_ranks() -> Ranks:
    """The torch.distributed world, once a launcher (accelerate, torchrun) has set it up."""
    try:
        import torch.distributed as dist
    except ImportError:
        return Ranks()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return Ranks(dist.get_rank(), dist.get_world_size())
    return Ranks()


def is_padding(instance: Any) -> bool:
    """lmms-eval's filler requests that keep the ranks' request counts equal."""
    return bool((getattr(instance, "metadata", None) or {}).get("__padding_only__"))


@dataclass(frozen=True)
class _LocalCallable:
    """Stands for the callable at this argument position: the receiving rank supplies its own."""

    position: int


def _portable(instance: Any) -> tuple:
    arguments = tuple(_LocalCallable(i) if callable(a) else a for i, a in enumerate(instance.args))
    return instance.request_type, arguments, instance.idx, dict(instance.metadata)


def _rebuilt(portable: tuple, task: Any, task_name: str, rebuild: Callable) -> Any:
    """Another rank's request as this harness's Instance, with this rank's own callables."""
    request_type, arguments, idx, metadata = portable
    local = task.instances
    if any(isinstance(a, _LocalCallable) for a in arguments):
        twins = [i for i in local if i.request_type == request_type]
        if not twins:
            raise RankMismatchError(
                f"task {task_name!r}: this rank holds no {request_type} request to borrow the task's "
                f"callables from, so it cannot rebuild the other ranks' requests"
            )
        arguments = tuple(twins[0].args[a.position] if isinstance(a, _LocalCallable) else a for a in arguments)
    return rebuild(task, request_type, arguments, idx, metadata)


class SharedRequests:
    """Every rank's requests of one request type, as seen from this rank."""

    def __init__(
        self, reqtype: str, requests: Sequence[Any], tasks: Mapping[str, Any], ranks: Ranks, rebuild: Callable
    ):
        """`rebuild(task, request_type, arguments, idx, metadata)`: the harness's Instance (lmms_talo.harness.base)."""
        self.reqtype = reqtype
        self.ranks = ranks
        self.task_order = {name: index for index, name in enumerate(tasks)}
        self.remote_keys: list[tuple[str, Hashable]] = []  # (task, doc) of other ranks' requests
        self._instances: dict[str, list] = {}
        if not ranks.distributed:
            return
        payload = {
            "requests": [(r.task_name, r.doc_id) for r in requests if not is_padding(r)],
            "instances": {
                name: [_portable(i) for i in task.instances if i.request_type == reqtype and not is_padding(i)]
                for name, task in tasks.items()
            },
        }
        gathered = ranks.all_gather(payload)
        for rank, part in enumerate(gathered):
            if rank != ranks.rank:
                self.remote_keys.extend(part["requests"])
        for name, task in tasks.items():
            local = [i for i in task.instances if i.request_type == reqtype and not is_padding(i)]
            everyone = list(local)
            for rank, part in enumerate(gathered):
                if rank != ranks.rank:
                    everyone.extend(_rebuilt(p, task, name, rebuild) for p in part["instances"].get(name, []))
            everyone.sort(key=lambda i: (i.doc_id, i.idx))
            self._instances[name] = everyone

    def instances(self, task_name: str, task: Any) -> list:
        """The task's requests of this type on every rank (in one process: the task's own)."""
        if not self.ranks.distributed:
            return [i for i in task.instances if i.request_type == self.reqtype]
        return self._instances.get(task_name, [])

    def group_order(self, task_name: str, first_doc: Hashable) -> tuple:
        """The order one process would meet the group in: task by task, then by first doc."""
        return self.task_order.get(task_name, len(self.task_order)), first_doc
