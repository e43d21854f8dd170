"""Distributed launches: who started this process, and the DDP strategy that fits it.

Three ways a ``trainer=ddp`` run starts, and what each needs:

* ``python -m hymtl.train trainer=ddp`` (one Hydra run): Lightning's ``strategy="ddp"`` re-runs
  the command line for local ranks 1…N-1 and pins their ``hydra.run.dir`` to the parent's, so
  every rank shares one run folder. The subprocess launcher is the fast path (no pickling).
* a Hydra multirun (``-m``) or an in-process call (pytest, notebooks): re-running the command
  line would start a second sweep (a second sweep folder) or a second test session, and the
  launcher's environment variables would make the next job of the sweep hang. The strategy
  switches to ``start_method="spawn"`` there: the job starts fresh processes itself and gets
  back the weights, the best checkpoint's path and ``callback_metrics``.
* ``torchrun`` (one or many nodes): every rank is started by torchrun and Lightning spawns
  nothing. Each rank runs Hydra itself, so the run folder's time stamp (``${hymtl_now:…}`` in
  ``conf/hydra/default.yaml``) is agreed through torchrun's own key-value store: rank 0's launch
  time, for every rank on every node. Ranks other than 0 write no ``.hydra/`` copy and log to
  ``train_rank<R>.log`` (``${hymtl_rank_zero:…}``, ``${hymtl_rank_suffix:}``).

One run folder per run (:func:`hymtl.runs.claim_run_dir`, ``${hymtl_run_dir:…}``): under
torchrun rank 0 claims it and publishes the name through the same store (:func:`from_rank_zero`);
every other rank uses rank 0's name.

Lowest layer, beside ``runtime``: imports nothing of ours.
"""

from __future__ import annotations

import functools
import os
import time
from datetime import datetime, timedelta
from typing import Any, Callable


#: seconds a collective (or the launch-time handshake) may wait for a silent rank before the
#: job fails instead of hanging; override with ``trainer.strategy.timeout_s``
DEFAULT_TIMEOUT_S = 1800.0
_TORCHRUN_VARS = ("RANK", "GROUP_RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")  # as Lightning's TorchElasticEnvironment
_launch_time: float | None = None
_store: Any = None  # rank 0's store server (fallback path) must outlive the handshake


# --------------------------------------------------------------------------- launch context
def launched_by_torchrun() -> bool:
    """True in a worker started by ``torchrun`` / ``torch.distributed.run`` (any node)."""
    return all(v in os.environ for v in _TORCHRUN_VARS)


def relaunched_by_lightning() -> bool:
    """True in a local rank > 0 that Lightning's subprocess launcher started (``strategy=ddp``)."""
    return not launched_by_torchrun() and int(os.environ.get("LOCAL_RANK", "0")) > 0


def launch_rank() -> int:
    """This process's global rank as the launcher set it (0 when not distributed)."""
    if launched_by_torchrun():
        return int(os.environ["RANK"])
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def in_hydra_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
    except ImportError:  # pragma: no cover - hydra is a dependency
        return False
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def in_hydra_cli_run() -> bool:
    """True inside ``@hydra.main`` in single-run mode: re-running ``sys.argv`` re-runs this job."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
    except ImportError:  # pragma: no cover
        return False
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.RUN


def choose_start_method() -> str:
    """``"popen"`` where Lightning may re-run the command line, else ``"spawn"`` (see the module docstring)."""
    if launched_by_torchrun() or relaunched_by_lightning():
        return "popen"  # processes exist already: Lightning launches nothing either way
    return "popen" if in_hydra_cli_run() else "spawn"


# --------------------------------------------------------------------------- one launch time
def launch_time(timeout_s: float = 300.0) -> float:
    """Seconds since the epoch at which this launch started; the same on every torchrun rank.

    Outside torchrun: the clock now. Under torchrun with more than one rank: global
    rank 0 publishes its clock in torchrun's key-value store (``compare_set``: an elastic restart
    keeps the first value, so restarted workers land in the same run folder) and the other ranks
    read it, waiting at most ``timeout_s``.
    """
    global _launch_time
    if not (launched_by_torchrun() and world_size() > 1):
        return time.time()  # like Hydra's ${now:}; the resolver's cache keeps it fixed per config
    if _launch_time is None:
        _launch_time = _agree_on_launch_time(time.time(), timeout_s)
    return _launch_time


def _launch_store(timeout_s: float) -> Any:
    """The key-value store every torchrun rank of this launch reaches (created once per process)."""
    global _store
    if _store is None:
        from torch.distributed import TCPStore

        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        timeout = timedelta(seconds=timeout_s)
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun's agent on node 0 serves a store at MASTER_ADDR:MASTER_PORT: every rank is a client
            _store = TCPStore(host, port, is_master=False, timeout=timeout, wait_for_workers=False)
        else:
            # rank 0 serves; multi_tenant lets torch.distributed's own store reuse this server later
            _store = TCPStore(host, port, is_master=launch_rank() == 0, timeout=timeout,
                              wait_for_workers=False, multi_tenant=True)
    return _store


def from_rank_zero(what: str, key: str, produce: Callable[[], str], timeout_s: float) -> str:
    """Rank 0's value for ``key``, the same on every rank of the launch.

    Rank 0 publishes ``produce()``, the other ranks wait for it at most ``timeout_s``. A value
    already in the store stays (``compare_set``; and rank 0 does not even produce a new one): an
    elastic restart of the workers gets the original launch time and run folder.
    """
    store = _launch_store(timeout_s)
    key = f"hymtl/{key}/{os.environ.get('TORCHELASTIC_RUN_ID', '')}"
    try:
        if launch_rank() == 0:
            if store.check([key]):
                return store.get(key).decode()
            return store.compare_set(key, "", produce()).decode()
        return store.get(key).decode()
    except RuntimeError as exc:  # DistStoreError: rank 0 never published (it died or is unreachable)
        raise RuntimeError(
            f"rank {launch_rank()}: no {what} from rank 0 at {os.environ['MASTER_ADDR']}:"
            f"{os.environ['MASTER_PORT']} within {timeout_s:.0f}s ({exc})"
        ) from None


def _agree_on_launch_time(mine: float, timeout_s: float) -> float:
    return float(from_rank_zero("launch time", "launch_time", lambda: repr(mine), timeout_s))


def launch_time_string(pattern: str) -> str:
    """:func:`launch_time` formatted with ``pattern`` (``${hymtl_now:%Y-%m-%d}``)."""
    return datetime.fromtimestamp(launch_time()).strftime(pattern)


# --------------------------------------------------------------------------- ranks
def on_rank_zero(value: Any) -> Any:
    """``value`` on global rank 0 (or outside torchrun), else ``None``."""
    return value if not launched_by_torchrun() or launch_rank() == 0 else None


def rank_suffix() -> str:
    """``""`` on global rank 0 (or outside torchrun), else ``"_rank<R>"``."""
    return "" if not launched_by_torchrun() or launch_rank() == 0 else f"_rank{launch_rank()}"


def devices_per_node(default: Any = "auto") -> Any:
    """Processes per node: torchrun's ``--nproc_per_node`` under torchrun, else ``default``."""
    return int(os.environ["LOCAL_WORLD_SIZE"]) if launched_by_torchrun() else default


def num_nodes(default: int = 1) -> int:
    """Nodes: torchrun's world size / processes per node under torchrun, else ``default``."""
    if launched_by_torchrun():
        return max(1, world_size() // int(os.environ["LOCAL_WORLD_SIZE"]))
    return int(default)


# --------------------------------------------------------------------------- the strategy
def ddp_strategy(
    timeout_s: float = DEFAULT_TIMEOUT_S,
    find_unused_parameters: bool | str = "auto",
    start_method: str = "auto",
    process_group_backend: str | None = None,
    **ddp_kwargs: Any,
):
    """Lightning's ``DDPStrategy`` for this launch (``conf/trainer/ddp.yaml`` instantiates it).

    Args:
        timeout_s: bound on every collective: a rank that stops answering ends the job after
            this many seconds instead of hanging it.
        find_unused_parameters: ``"auto"``: asked of the module when DDP wraps it — on when its
            phase switches mid-fit (``has_phase_switch``: two-phase, the depth search). Such a
            backbone is wrapped while trainable (so DDP syncs it after the switch) and frozen in
            ``on_fit_start``; while frozen it gets no gradients, which DDP must be told to expect.
        start_method: ``"auto"`` (:func:`choose_start_method`), ``"popen"``, ``"spawn"``…
        process_group_backend: ``None`` (nccl on GPUs, gloo on CPUs) or explicit.
        ddp_kwargs: passed to ``torch.nn.parallel.DistributedDataParallel``.
    """
    ask_module = find_unused_parameters == "auto"
    if start_method == "auto":
        start_method = choose_start_method()
    strategy = _strategy_class()(
        timeout=timedelta(seconds=float(timeout_s)),
        find_unused_parameters=False if ask_module else bool(find_unused_parameters),
        start_method=start_method,
        process_group_backend=process_group_backend,
        **ddp_kwargs,
    )
    strategy.ask_module_for_unused_parameters = ask_module
    return strategy


@functools.lru_cache(maxsize=None)
def _strategy_class() -> type:
    """The strategy class, built on first use: importing this module stays free of Lightning."""
    from lightning.pytorch.strategies import DDPStrategy

    class _DDPStrategy(DDPStrategy):
        """Lightning's DDP, plus: when a collective fails in the process that launched the other
        local ranks (``start_method="popen"``), those are ended too. Lightning only ends them on
        Ctrl-C; after any other error a rank still waiting in a collective would outlive the job."""

        ask_module_for_unused_parameters = False

        def configure_ddp(self) -> None:
            if self.ask_module_for_unused_parameters:  # the module knows whether its phase switches
                switches = bool(getattr(self.lightning_module, "has_phase_switch", False))
                self._ddp_kwargs["find_unused_parameters"] = switches
            super().configure_ddp()

        def on_exception(self, exception: BaseException) -> None:
            super().on_exception(exception)
            procs = getattr(self.launcher, "procs", None)
            if procs and rank_failure_message(exception) is not None:
                for proc in procs:
                    if proc.poll() is None:
                        proc.kill()

    # a module-level name for pickle (spawned ranks unpickle the strategy): hymtl.distributed._DDPStrategy
    _DDPStrategy.__qualname__ = "_DDPStrategy"
    _DDPStrategy.__module__ = __name__
    return _DDPStrategy


def __getattr__(name: str) -> Any:
    # PEP 562: ``hymtl.distributed._DDPStrategy`` resolves (for pickle) without importing
    # Lightning when this module is imported
    if name == "_DDPStrategy":
        return _strategy_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def rank_failure_message(exc: BaseException) -> str | None:
    """One line for an error that means "the other DDP ranks are gone or silent" (a rank died,
    or a collective ran past ``timeout_s``), else ``None``. For entry points to print instead of
    the communication library's traceback."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    text = str(exc).strip()
    # the communication libraries' words (a gloo/NCCL timeout names its library), not any "timeout"
    markers = ("gloo", "nccl", "c10d", "connection reset", "connection closed", "broken pipe")
    if not (isinstance(exc, dist.DistError) or any(m in text.lower() for m in markers)):
        return None
    detail = text.splitlines()[0] if text else type(exc).__name__
    return (f"rank {dist.get_rank()} of {dist.get_world_size()} lost the other DDP ranks ({detail[:300]}): "
            "another rank probably died or stopped answering - see its log (train_ddp_process_<R>.log, "
            "train_rank<R>.log or torchrun's report)")
