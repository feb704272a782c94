"""Several ranks (``accelerate launch --multi_gpu``): fail naming the stalled rank, die with the launcher.

    make_accelerator ─▶ every collective (DDP all-reduce, barriers, gathers) fails after run.dist_timeout_s
    Heartbeat.beat   ─▶ <output_dir>/.ranks/rank<N>.json: step, phase, time, at every phase change
    explain_failure  ─▶ the rank whose collective failed names the rank(s) that stopped making progress

The backend's timeout message (gloo: ``Timed out waiting 600000ms for recv operation``) does not say which
rank it waited for, so every rank leaves a heartbeat and a failed rank reads the others'. A rank counts as
stalled when it is behind this one (fewer phase changes: every rank runs the same sequence of phases), has
exited or is stopped (same host), or has not failed too within :data:`GRACE_S` (peers waiting in the same
collective time out within seconds of each other). ``die_with_parent`` covers the other half: torch elastic
starts each rank in a session of its own, so a launcher killed with SIGKILL used to orphan ranks that kept
training and writing to the run dir.

On GPUs, NCCL's watchdog thread ends a rank whose collective timed out (after the same timeout) before
Python sees an exception, so no rank prints the line there; the heartbeat files still say where each was.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from rltk import lifetime

if TYPE_CHECKING:  # torch and accelerate load only once the config is valid (rltk.train)
    from accelerate import Accelerator

    from rltk.config import Config

T = TypeVar("T")

HEARTBEAT_DIR = ".ranks"
GRACE_S = 5.0
"""How long a rank whose collective failed waits for its peers to fail too before naming them stalled."""


def make_accelerator(cfg: Config) -> Accelerator:
    """The run's Accelerator: CPU when no GPU is visible, ``model.mixed_precision``, ``run.dist_timeout_s``.

    The timeout goes to ``init_process_group``; gloo applies it to every collective (checked on torch 2.13:
    barrier, all_reduce, broadcast, gather_object and DDP's gradient all-reduce all raise after it). An FSDP
    config (``ACCELERATE_USE_FSDP``) shards on CPU ranks too (:func:`_fsdp_on_cpu`).

    Raises:
        ConfigError: Under a DeepSpeed or FSDP1 config, which rltk does not run under.

    """
    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    _refuse_unsupported_engines()
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.run.dist_timeout_s))
    cpu = not torch.cuda.is_available()
    accelerator = Accelerator(cpu=cpu, mixed_precision=cfg.model.mixed_precision, kwargs_handlers=[timeout])
    if cpu and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        _fsdp_on_cpu(accelerator)
    return accelerator


def _refuse_unsupported_engines() -> None:
    """Stop a launch with a DeepSpeed or FSDP1 config (``accelerate launch`` sets ``ACCELERATE_USE_*``).

    Raises:
        ConfigError: Naming the engine, why rltk does not run under it, and the config to use instead.

    """
    from rltk.config import ConfigError
    from rltk.typedyaml import problem

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        why = (
            "under DeepSpeed accelerate's backward steps the optimizer at every micro-batch, while rltk "
            "accumulates a minibatch's micro-batches, clips, checks for a non-finite loss and then steps"
        )
        fix = "launch with recipes/accelerate/fsdp.yaml (sharded) or ddp.yaml"
        raise ConfigError([problem("accelerate config", "DEEPSPEED", why, fix)])
    version = os.environ.get("FSDP_VERSION", "1")  # accelerate's default
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and version != "2":
        why = "rltk shards with FSDP2 (torch's fully_shard) only: rltk/fsdp.py"
        raise ConfigError([problem("accelerate config: fsdp_version", version, why, "set fsdp_version: 2")])


def _fsdp_on_cpu(accelerator: Accelerator) -> None:
    """Turn a CPU run launched with an FSDP config into FSDP (accelerate makes it plain multi-CPU DDP).

    accelerate enables FSDP only for GPU-like devices, so an FSDP config on a machine without GPUs would run
    as DDP without a word. torch's FSDP2 shards on CPU gloo ranks (checked on torch 2.13: ``fully_shard``,
    its all-gathers and reduce-scatters), so the run gets the plugin the launcher described (``FSDP_*``
    environment variables): the code paths a GPU run takes, testable on a CPU.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables (FSDP2: checked above)
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    AcceleratorState._shared_state["fsdp_plugin"] = plugin
    AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def die_with_parent() -> None:
    """Under a launcher (torchrun, ``accelerate launch``), have the kernel end this rank when it exits.

    Only under a launcher: a plain ``rltk train`` under ``nohup`` must outlive its shell. The signal is
    SIGTERM, sent when the thread that started this process exits; torch elastic starts the ranks from its
    main thread, so that is when the launcher exits. Linux only (``prctl``); a no-op elsewhere.
    """
    launched = "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ
    if launched and not lifetime.die_with_parent(os.getppid(), signal.SIGTERM):
        os.kill(os.getpid(), signal.SIGTERM)  # the launcher died first: nobody will send the signal


def unshard(shards: list[list[T]]) -> list[T]:
    """Undo sharding: ``shards[r]`` is ``items[r::len(shards)]``; returns ``items`` in its original order.

    >>> unshard([[0, 3, 6], [1, 4], [2, 5]])
    [0, 1, 2, 3, 4, 5, 6]
    """
    return [s[i] for i in range(max(map(len, shards), default=0)) for s in shards if i < len(s)]


def gather_shards(shard: list[T], accelerator: Accelerator) -> list[T] | None:
    """Every rank's ``items[rank::world]`` (picklable), whole and in order, on the main process; else None."""
    if accelerator.num_processes == 1:
        return shard
    import torch.distributed as dist

    shards: list[Any] | None = [None] * accelerator.num_processes if accelerator.is_main_process else None
    dist.gather_object(shard, shards, dst=0)
    return None if shards is None else unshard(shards)


@dataclass
class Beat:
    """One rank's last heartbeat: where it was and when.

    Attributes:
        rank: Global rank.
        pid: Its process id (on ``host``).
        host: Its host name.
        seq: Phase changes so far; every rank runs the same sequence, so a lower ``seq`` is behind.
        step: The optimizer step the phase belongs to.
        phase: ``setup``, ``warmstart``, ``eval``, ``save``, ``rollout``, ``reward`` or ``update``.
        time: Unix time of the phase change.
        failed: Set by the rank itself once a collective failed there (it is not the one stalled).

    """

    rank: int
    pid: int
    host: str
    seq: int
    step: int
    phase: str
    time: float
    failed: bool = False

    @property
    def where(self) -> str:
        """``"rollout of step 3"``."""
        return f"{self.phase} of step {self.step}"


def beat_path(run_dir: Path, rank: int) -> Path:
    """Where ``rank`` keeps its heartbeat in ``run_dir``."""
    return run_dir / HEARTBEAT_DIR / f"rank{rank}.json"


def read_beat(path: Path) -> Beat | None:
    """The heartbeat at ``path``, or ``None`` if there is none (or it is not one)."""
    try:
        return Beat(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _write_beat(path: Path, beat: Beat) -> None:
    # Atomic (write aside, rename), so a reader never sees half a file; no fsync: a crash loses nothing
    # that matters, and the next phase change rewrites it.
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(dataclasses.asdict(beat)))
    os.replace(tmp, path)


class Heartbeat:
    """This rank's heartbeat file, rewritten at every phase change (a few small writes per step)."""

    def __init__(self, run_dir: Path, rank: int) -> None:
        """Prepare ``<run_dir>/.ranks/rank<rank>.json``; nothing is written before the first :meth:`beat`."""
        self.path = beat_path(run_dir, rank)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self.seq = 0

    def beat(self, step: int, phase: str) -> None:
        """Record that this rank entered ``phase`` of ``step`` now."""
        self.seq += 1
        beat = Beat(self.rank, os.getpid(), socket.gethostname(), self.seq, step, phase, time.time())
        _write_beat(self.path, beat)


def is_collective_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a failed collective: a timeout or a peer gone (gloo raises a bare RuntimeError)."""
    import torch.distributed as dist

    return isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError) and "/gloo/" in str(exc))


def _process_state(beat: Beat) -> str:
    """``"exited"``, ``"stopped"`` or ``""`` (running, or unknown: another host, no /proc)."""
    if beat.host != socket.gethostname() or not Path("/proc").is_dir():
        return ""
    try:
        # the state letter follows the parenthesised command name, which may itself hold spaces
        state = Path(f"/proc/{beat.pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return "exited"
    return {"Z": "exited", "X": "exited", "T": "stopped", "t": "stopped"}.get(state, "")


def _peers(run_dir: Path, rank: int, world: int, started: float) -> dict[int, Beat | None]:
    """The other ranks' heartbeats from this launch (one older than this process is from an earlier one)."""
    beats = {q: read_beat(beat_path(run_dir, q)) for q in range(world) if q != rank}
    return {q: b if b is not None and b.time >= started else None for q, b in beats.items()}


def _wait_for_peers(
    run_dir: Path, rank: int, world: int, me: Beat | None, started: float
) -> dict[int, Beat | None]:
    """Read the peers' heartbeats, for up to :data:`GRACE_S` while some may still fail in this collective."""
    deadline = time.monotonic() + GRACE_S
    while True:
        peers = _peers(run_dir, rank, world, started)
        undecided = [
            b
            for b in peers.values()
            if b is not None and not b.failed and (me is None or b.seq >= me.seq) and not _process_state(b)
        ]
        if not undecided or time.monotonic() >= deadline:
            return peers
        time.sleep(0.2)


def _describe(rank: int, beat: Beat | None, now: float) -> str:
    if beat is None:
        return f"rank {rank} left no heartbeat in this launch (did it start?)"
    state = _process_state(beat) or "looks stalled"
    if state == "stopped":
        state = "is stopped (SIGSTOP or a debugger)"
    elif state == "exited":
        state = "has exited"
    seen = f"last seen in {beat.where}, {now - beat.time:.0f} s ago"
    return f"rank {rank} (pid {beat.pid} on {beat.host}) {state}: {seen}"


def explain_failure(
    run_dir: Path, rank: int, world: int, timeout_s: float, started: float, exc: BaseException
) -> str:
    """One line for a failed collective on ``rank``: which rank(s) stalled or died, where, and the fix.

    Marks this rank's heartbeat failed first, so that its peers do not name it.

    Args:
        run_dir: The run's ``output_dir``.
        rank: This rank.
        world: Number of ranks.
        timeout_s: ``run.dist_timeout_s``.
        started: Unix time this process started: older heartbeats are from an earlier launch.
        exc: The error the collective raised.

    Returns:
        The message, without the ``error:`` prefix.

    """
    me = read_beat(beat_path(run_dir, rank))
    me = me if me is not None and me.time >= started else None  # one from an earlier launch says nothing
    if me is not None:
        _write_beat(beat_path(run_dir, rank), dataclasses.replace(me, failed=True))
    peers = _wait_for_peers(run_dir, rank, world, me, started)
    now = time.time()
    message = str(exc).strip()
    message = message.partition("] ")[2] or message  # drop gloo's "[.../pair.cc:553] " source location
    cause = message.splitlines()[0].split(". ")[0] if message else type(exc).__name__
    head = f"a collective failed on rank {rank} in {me.where if me else 'setup'} ({cause})"
    suspects = [_describe(q, b, now) for q, b in sorted(peers.items()) if b is None or not b.failed]
    if not suspects:
        return f"{head}; every other rank failed too: the first rank's error names the cause"
    return (
        f"{head}: {'; '.join(suspects)}. Check that process (hung, stopped, out of memory?); if that phase "
        f"legitimately takes longer than run.dist_timeout_s={timeout_s:g} s, raise it"
    )
