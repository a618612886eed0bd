"""Data-parallel optimize under ``torchrun``: one process per device, torch.distributed collectives.

Every rank holds the block being optimized and a share of the calibration windows (window j
belongs to rank j % world) with their two streams. What the single-process run sums over all
windows is summed per rank and all-reduced: the Wanda statistics, the SparseGPT Hessians, the
adapters' gradients, the low-group check errors and the loss metrics. Every rank then takes the
same optimizer step and computes the same masks; rank 0 writes the checkpoints and the artifact.

A run without torchrun (no ``WORLD_SIZE`` in the environment, or 1) gets ``LOCAL``: every
collective is a no-op, so the single-process path is the code it always was.

Errors: a user error is either the same on every rank (a bad flag) or shared through ``agree`` /
``on_main`` (a rank that cannot read its checkpoint), so every rank raises it. On the other ranks
it is a ``SharedError``: the CLI lets them exit quietly with status 0 and leaves the message and
the failure to rank 0 (torchrun stops every rank once one fails, which could cut rank 0 off before
it printed).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Iterator, TypeVar

import torch

from ..errors import UserError, one_line

T = TypeVar("T")


class SharedError(UserError):
    """On a rank other than 0: a UserError that rank 0 raises too, and reports."""

# A block's collectives are seconds apart, but rank 0 writing a 70B artifact (or loading the model
# while the others wait at a barrier) can take longer than torch's 30 min default.
TIMEOUT = timedelta(hours=3)
# ... but the ranks must find each other much sooner: a rank started without its peers says so
JOIN_TIMEOUT = timedelta(seconds=float(os.environ.get("EPTS_JOIN_TIMEOUT_S", 600)))


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1  # processes on this machine (they share its host memory)
    backend: str | None = None  # gloo | nccl; None for one process
    device: str = "cpu"  # where collective tensors live: cpu for gloo, this rank's GPU for nccl

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owned(self, total: int) -> list[int]:
        """Global ids of this rank's windows among ``total``: j % world == rank (deterministic)."""
        return list(range(self.rank, total, self.world))

    # --- collectives (no-ops for one process) -------------------------------------------------

    def all_reduce_(self, *tensors: torch.Tensor) -> None:
        """Sum each tensor over the ranks, in place (every rank gets the same values)."""
        if self.world == 1:
            return
        import torch.distributed as dist

        for t in tensors:
            dist.all_reduce(t)

    def sum_floats(self, values: list[float]) -> list[float]:
        """Python floats summed over the ranks, in float64."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        self.all_reduce_(t)
        return t.tolist()

    def broadcast_(self, *tensors: torch.Tensor) -> None:
        """Rank 0's values into every rank's tensors, in place."""
        if self.world == 1:
            return
        import torch.distributed as dist

        for t in tensors:
            dist.broadcast(t, src=0)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def _gather(self, obj) -> list:
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def on_main(self, fn: Callable[[], T]) -> T:
        """``fn()`` on rank 0 only; its result (or its UserError) on every rank."""
        if self.world == 1:
            return fn()
        import torch.distributed as dist

        box = [None]
        if self.is_main:
            try:
                box = [("ok", fn())]
            except UserError as e:
                box = [("error", (str(e), e.exit_code))]
        dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "error":
            raise (UserError if self.is_main else SharedError)(*value)
        return value

    def agree(self, fn: Callable[[], T]) -> T:
        """``fn()`` on every rank; if any rank raised a UserError, every rank raises the message of
        the lowest such rank, so rank 0 (the one that prints) knows it."""
        if self.world == 1:
            return fn()
        try:
            result, err = fn(), None
        except UserError as e:
            result, err = None, (str(e), e.exit_code)
        errors = self._gather(err)
        for r, e in enumerate(errors):
            if e is not None:
                msg = e[0] if r == 0 else f"rank {r}: {e[0]}"
                raise (UserError if self.is_main else SharedError)(msg, e[1])
        return result


LOCAL = Dist()


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer (torchrun sets it)") from None


def world_from_env() -> int:
    """The world size torchrun announced (its environment checked), or 1."""
    world = _env_int("WORLD_SIZE") or 1
    if world != 1:
        _check_env(world, _env_int("RANK") or 0, _env_int("LOCAL_RANK") or 0, _env_int("LOCAL_WORLD_SIZE") or world)
    return world


def rank_from_env() -> int:
    return _env_int("RANK") or 0


def _check_env(world: int, rank: int, local_rank: int, local_world: int) -> None:
    """UserError for a torchrun environment that cannot be a real one (set by hand, or half set)."""
    if world < 1:
        raise UserError(f"WORLD_SIZE={world}: it must be >= 1 (torchrun sets it)")
    if "RANK" not in os.environ:
        raise UserError(f"WORLD_SIZE={world} but RANK is not set: start the ranks with torchrun "
                        "(or unset WORLD_SIZE for one process)")
    if not 0 <= rank < world:
        raise UserError(f"RANK={rank} with WORLD_SIZE={world}: the rank must be 0 .. {world - 1}")
    if not 0 < local_world <= world or not 0 <= local_rank < local_world:
        raise UserError(f"LOCAL_RANK={local_rank} with LOCAL_WORLD_SIZE={local_world} and WORLD_SIZE={world} do not fit")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise UserError(f"WORLD_SIZE={world} but {name} is not set: start the ranks with torchrun")
    if not os.environ["MASTER_PORT"].isdigit() or not 0 < int(os.environ["MASTER_PORT"]) < 65536:
        raise UserError(f"MASTER_PORT={os.environ['MASTER_PORT']!r} is not a port number")


def _join(world: int, rank: int) -> dict:
    """init_process_group's store: torchrun's agent store when torchrun started this process (its
    own rendezvous has bounded waits); otherwise one made here that waits ``JOIN_TIMEOUT`` for
    the other ranks and then says they did not come."""
    import torch.distributed as dist

    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return {}
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    try:
        store = dist.TCPStore(host, port, world, rank == 0, timeout=JOIN_TIMEOUT, wait_for_workers=True)
    except RuntimeError as e:
        what = "the other ranks did not join" if rank == 0 else f"rank 0 did not answer at {host}:{port}"
        raise UserError(f"rank {rank} of {world} waited {JOIN_TIMEOUT.total_seconds():.0f} s: {what} "
                        f"({one_line(e)}); start every rank (torchrun does), or unset WORLD_SIZE") from None
    store.set_timeout(TIMEOUT)
    return {"store": store, "rank": rank, "world_size": world}


@contextlib.contextmanager
def init_distributed(device: str) -> Iterator[tuple[Dist, str]]:
    """(Dist, the device this rank computes on) from torchrun's environment, and the process
    group for the duration of the block. One process (no torchrun): (LOCAL, device).

    CPU runs use gloo; ``--device cuda`` runs use NCCL, one GPU per rank (``cuda:LOCAL_RANK``).
    """
    world = world_from_env()
    if world == 1:
        yield LOCAL, device
        return
    import torch.distributed as dist

    rank, local_rank = rank_from_env(), _env_int("LOCAL_RANK") or 0
    local_world = _env_int("LOCAL_WORLD_SIZE") or world
    _check_env(world, rank, local_rank, local_world)
    if device.startswith("cuda"):
        if device != "cuda":
            raise UserError(f"--device {device} under torchrun: pass --device cuda, each rank takes cuda:LOCAL_RANK")
        if torch.cuda.device_count() < local_world:
            raise UserError(f"torchrun starts {local_world} processes on this machine but it has "
                            f"{torch.cuda.device_count()} CUDA devices: use --nproc-per-node {torch.cuda.device_count()}")
        if not dist.is_nccl_available():
            raise UserError("--device cuda under torchrun needs NCCL, which this torch build lacks")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
        backend, coll_device = "nccl", device
    else:
        if not dist.is_gloo_available():
            raise UserError("--device cpu under torchrun needs the gloo backend, which this torch build lacks")
        backend, coll_device = "gloo", "cpu"
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group(backend, timeout=TIMEOUT, **_join(world, rank))
    elif dist.get_backend() != backend or dist.get_world_size() != world:
        raise UserError(f"a process group ({dist.get_backend()}, {dist.get_world_size()} ranks) is already "
                        f"initialized; optimize needs {backend} with {world} ranks")
    try:
        yield Dist(rank=rank, world=world, local_rank=local_rank, local_world=local_world, backend=backend,
                   device=coll_device), device
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()

