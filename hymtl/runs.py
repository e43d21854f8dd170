"""The run folder, all of it: which folder a run writes to, which run a checkpoint belongs to,
what that run saved, where its data was, and what a failed run leaves there.

One run of ``hymtl.train`` is one folder (``outputs/<date>/<time>/``, or a sweep's
``outputs/multirun/…/<n>/``)::

    <run>/.hydra/config.yaml   the composed config (interpolations kept, as Hydra saves it)
    <run>/.hydra/hydra.yaml    Hydra's own config: hydra.runtime.cwd is where the run was launched
    <run>/checkpoints/*.ckpt   best and last checkpoints
    <run>/eval/<stamp>/        the evaluations of its checkpoints (hymtl.eval)
    <run>/error.json           a run that failed: what went wrong (hymtl.summarize lists it failed)

* :func:`claim_run_dir` — ``${hymtl_run_dir:…}`` (``conf/hydra/default.yaml``): one run per
  folder (``<time>_2`` when ``<time>`` is taken), agreed by every rank of a launch;
  :func:`release_unused_run_dir` removes a claimed folder a failed run wrote nothing in.
* :func:`resolve_resume` — what ``ckpt_path`` names and which run folder a resumed run continues
  in; :func:`continue_run` makes that folder the run's (``paths.output_dir``).
* :func:`write_error_json` — ``error.json`` in the folder of the run under way
  (:func:`run_folder`: the one a resume continued in, not the new Hydra folder).
* :func:`run_dir_of`, :func:`saved_config`, :func:`trained_data_root`, :func:`eval_dir` — what
  resume, eval and export ask, so that "the run of a checkpoint" and "the data it was trained
  on" mean the same thing everywhere.
* :class:`RunDirCheck` — the Hydra callback that refuses an output folder that cannot be written.

A primitive: imports no service, no torch or Lightning (Hydra loads it before every run).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from hymtl import distributed
from hymtl.errors import HymtlError
from hymtl.fileio import atomic_write_json, read_regular_file, regular_file_problem

CHECKPOINTS_DIR = "checkpoints"
HYDRA_DIR = ".hydra"
EVAL_DIR = "eval"
LAST = "last.ckpt"  # <run>/checkpoints/last.ckpt: the end of the last saved epoch, what ckpt_path=last resumes
ERROR_FILE = "error.json"

log = logging.getLogger(__name__)


def run_dir_of(checkpoint: str | os.PathLike) -> Path | None:
    """The run folder a checkpoint belongs to: ``<run>`` for ``<run>/checkpoints/x.ckpt`` when
    ``<run>/.hydra`` exists (a folder Hydra made), else ``None`` (a checkpoint on its own)."""
    path = Path(checkpoint).expanduser().resolve()
    run = path.parent.parent
    return run if path.parent.name == CHECKPOINTS_DIR and (run / HYDRA_DIR).is_dir() else None


#: a resolver call, ``${name:…}`` (``${oc.env:HOME}``, ``${hymtl_run_dir:…}``); a plain
#: interpolation ``${a.b}`` has no colon after its key
_RESOLVER_CALL = re.compile(r"\$\{\s*[\w.\-]+\s*:")
_MAX_SAVED_BYTES = 4 << 20  # a saved config is a few KB


def _load_saved(run_dir: Path | None, name: str) -> DictConfig | None:
    """A file of ``<run>/.hydra/``, read as data: a regular file (the file rule of
    :mod:`hymtl.fileio`), and every value that calls a resolver replaced by ``???`` (missing).
    A saved config sits beside a checkpoint anyone may send: resolving ``${oc.env:…}`` would
    put an environment variable into an error line, ``${hymtl_run_dir:…}`` make folders where
    the file says. Plain interpolations between its own keys still resolve."""
    if run_dir is None:
        return None
    path = run_dir / HYDRA_DIR / name
    if regular_file_problem(path) is not None:
        return None
    try:
        loaded = OmegaConf.create(read_regular_file(path, max_bytes=_MAX_SAVED_BYTES).decode("utf-8"))
        if not isinstance(loaded, DictConfig):
            return None
        return OmegaConf.create(_without_resolvers(OmegaConf.to_container(loaded, resolve=False)))
    except Exception:  # noqa: BLE001 - an unreadable saved file is as good as none
        return None


def _without_resolvers(value):
    if isinstance(value, dict):
        return {k: _without_resolvers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_resolvers(v) for v in value]
    if isinstance(value, str) and _RESOLVER_CALL.search(value):
        return "???"
    return value


def saved_config(run_dir: Path | None) -> DictConfig | None:
    """The composed config a run saved (``<run>/.hydra/config.yaml``), or ``None``."""
    return _load_saved(run_dir, "config.yaml")


def launch_dir(run_dir: Path | None) -> Path | None:
    """The folder the run was launched from (``hydra.runtime.cwd`` of ``<run>/.hydra/hydra.yaml``)."""
    hydra_cfg = _load_saved(run_dir, "hydra.yaml")
    cwd = OmegaConf.select(hydra_cfg, "hydra.runtime.cwd", default=None) if hydra_cfg is not None else None
    return Path(str(cwd)) if cwd else None


def trained_data_root(checkpoint: str | os.PathLike) -> Path | None:
    """``data.root`` of the run that wrote ``checkpoint``, or ``None`` (no run, no saved config,
    no root, or a root that does not resolve any more).

    A relative root (the default ``${paths.data_dir}`` is ``data``) was relative to the folder
    the training was launched from, so it is resolved against that folder, not against the
    folder this command runs in.
    """
    run = run_dir_of(checkpoint)
    config = saved_config(run)
    if config is None:
        return None
    try:
        root = OmegaConf.select(config, "data.root", throw_on_resolution_failure=False)
    except Exception:  # noqa: BLE001 - e.g. a resolver of an older hymtl: ask for data.root
        return None
    if not root:
        return None
    root = Path(os.path.expanduser(str(root)))
    if not root.is_absolute():
        launched = launch_dir(run)
        if launched is not None:
            root = launched / root
    return root


def eval_dir(ckpt_path: str | None, fallback: str) -> str:
    """Where evaluations of ``ckpt_path`` go (``hydra.run.dir`` of ``hymtl.eval``, without the
    time stamp): ``<run>/eval`` for a checkpoint of a run, ``<its folder>/eval`` for one on its
    own, ``<fallback>/eval`` when there is no such file (the command then fails with one line)."""
    if ckpt_path and Path(str(ckpt_path)).expanduser().is_file():
        checkpoint = Path(str(ckpt_path)).expanduser()
        return str((run_dir_of(checkpoint) or checkpoint.resolve().parent) / EVAL_DIR)
    return str(Path(fallback) / EVAL_DIR)


def holds_no_work(run_dir: str | os.PathLike) -> bool:
    """True when ``run_dir`` holds only what Hydra writes before a run starts (``.hydra/``, the
    ``*.log`` files; a sweep folder's ``multirun.yaml``) and empty files (``skipped.txt`` of a
    scan that skipped nothing): a run that failed there leaves nothing worth a folder."""
    return all(entry.name == HYDRA_DIR or entry.is_file() and (
        entry.name.endswith(".log") or entry.name == "multirun.yaml" or entry.stat().st_size == 0)
        for entry in Path(run_dir).iterdir())


# --------------------------------------------------------------------------- one folder per run
#: run folders this process created (:func:`claim_run_dir`) -> the empty parents it created for them
_claimed: dict[str, tuple[str, ...]] = {}


def claim_run_dir(path: str, mode: Any = None, timeout_s: float = 300.0) -> str:
    """``path``, or ``path_2``, ``path_3``… : the first of these that this launch could create.

    ``${hymtl_run_dir:…}`` in ``conf/hydra/default.yaml`` (``hydra.run.dir``, ``hydra.sweep.dir``).
    The folder is claimed with ``os.mkdir`` (atomic: of two launches in the same second, exactly
    one gets ``path``; the other moves on to the next suffix), so a run folder never holds two runs.

    Claimed only when Hydra is about to run the config: ``mode`` is ``${hydra.mode}``, which
    Hydra's run and multirun paths set (``RUN`` / ``MULTIRUN``) and the compose API and ``--cfg``
    leave ``None``: those get ``path`` unchanged and create nothing.

    The resolver is cached (``use_cache``), so one config claims once: the run folder of a run,
    the sweep folder of a multirun (Hydra copies the master config's resolver cache to every job
    of the sweep, which therefore all land in that one folder). Under torchrun only global rank 0
    claims and publishes its suffix in the launch store (:func:`hymtl.distributed.from_rank_zero`);
    every other rank, on any node, appends rank 0's suffix to the same ``path`` (they agreed on
    the launch time already). Lightning's own DDP children get ``hydra.run.dir`` pinned to the
    parent's folder and never reach this resolver.
    """
    if mode is None:
        return path
    if distributed.launched_by_torchrun() and distributed.world_size() > 1:
        suffix = distributed.from_rank_zero("run folder", f"run_dir/{path}", lambda: _claim(path)[len(path):],
                                            timeout_s)
        return path + suffix
    return _claim(path)


def _claim(path: str) -> str:
    parents, parent = [], os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(parent) and parent != os.path.dirname(parent):
        parents.append(parent)  # <log_dir>/<date>/ of the first run of the day: ours to remove with it
        parent = os.path.dirname(parent)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    candidate, n = path, 1
    while True:
        try:
            os.mkdir(candidate)
            _claimed[os.path.abspath(candidate)] = tuple(parents)
            return candidate
        except FileExistsError:  # taken (by another run, or anything else): next suffix
            n += 1
            candidate = f"{path}_{n}"


def claimed_run_dirs() -> list[str]:
    """The run (or sweep) folders that this process created and has not released."""
    return list(_claimed)


def release_run_dir(path: str | os.PathLike, unused: Callable[[str], bool] = holds_no_work) -> bool:
    """Remove the run folder ``path`` if this process claimed it (:func:`claim_run_dir`) and
    ``unused(path)`` says that it holds no work, with the parents created for it that are empty
    now; ``True`` if it was removed. A folder this process did not create is never touched."""
    path = os.path.abspath(path)
    if path not in _claimed or not os.path.isdir(path) or not unused(path):
        return False
    shutil.rmtree(path)
    for parent in _claimed.pop(path):
        try:
            os.rmdir(parent)  # only when empty: another run of the same day keeps it
        except OSError:
            break
    return True


def release_unused_run_dirs() -> None:
    """Every folder this process claimed that holds no work, removed (a sweep folder claimed
    before a job's config failed); one that cannot be removed stays."""
    for path in claimed_run_dirs():
        try:
            release_run_dir(path)
        except OSError:  # noqa: BLE001 - then it stays
            log.debug("could not remove the unused folder %s", path, exc_info=True)


def release_unused_run_dir() -> bool:
    """Remove the run folder that Hydra claimed for this run if the run wrote nothing in it yet
    (:func:`holds_no_work`): a run that fails before it starts leaves no folder."""
    from hydra.core.hydra_config import HydraConfig

    try:
        if not HydraConfig.initialized():
            return False
        return release_run_dir(HydraConfig.get().runtime.output_dir)
    except OSError:  # noqa: BLE001 - then the folder stays, marked failed by error.json
        log.debug("could not remove the unused run folder", exc_info=True)
        return False


# --------------------------------------------------------------------------- resume's folder
@dataclass(frozen=True)
class Resume:
    """A resolved ``ckpt_path``: the checkpoint, and the run folder the resumed run writes to
    (``None``: the new Hydra run folder)."""

    checkpoint: Path
    run_dir: Path | None


def resolve_resume(ckpt_path: str | None, output_dir: Path, log_dir: Path) -> Resume | None:
    """``ckpt_path`` -> :class:`Resume`.

    * ``None``: a new run.
    * ``last``: ``<output_dir>/checkpoints/last.ckpt`` when this run folder has one (the command
      reused ``hydra.run.dir``), else the newest ``last.ckpt`` (by modification time) of the
      single runs under ``log_dir`` (``outputs/<date>/<time>/checkpoints/``). Sweeps are not
      searched: several of their runs are "the newest"; pass their path.
    * a path: that file.

    A checkpoint inside a run folder resumes *in* that folder, so its checkpoints (the best
    model so far), TensorBoard curves and metrics.json stay one run.
    """
    if ckpt_path is None or str(ckpt_path).strip() == "":
        return None
    if str(ckpt_path) == "last":
        own = output_dir / CHECKPOINTS_DIR / LAST
        if own.is_file():
            return Resume(own, output_dir)
        candidates = [p for p in log_dir.glob(f"*/*/{CHECKPOINTS_DIR}/{LAST}") if p.is_file()]
        candidates = [p for p in candidates if "multirun" not in p.relative_to(log_dir).parts]
        if not candidates:
            raise HymtlError(f"ckpt_path=last: no {LAST} under {log_dir}/<date>/<time>/checkpoints/ to resume from "
                             f"(pass ckpt_path=PATH, or hydra.run.dir=<the run folder>)")
        newest = max(candidates, key=lambda p: p.stat().st_mtime)
        return Resume(newest, run_dir_of(newest))
    path = Path(os.path.expanduser(str(ckpt_path)))
    if not path.is_file():
        raise HymtlError(f"ckpt_path: no checkpoint file at {path}")
    return Resume(path, run_dir_of(path))


# --------------------------------------------------------------------------- the run under way
#: Hydra's run folder -> the run folder a resume continues in instead (:func:`continue_run`)
_continued: dict[str, Path] = {}


def continue_run(cfg: DictConfig, resume: Resume | None) -> Path:
    """The folder this training run writes to, set as ``cfg.paths.output_dir``: the run folder of
    the checkpoint a resume continues (one run, one folder: the best checkpoint so far, the
    curves and metrics.json stay together), else Hydra's. Called once the resume was accepted;
    an ``error.json`` of an earlier attempt of the run goes (this attempt is the run's state now),
    and a failure of this one is written there (:func:`write_error_json`)."""
    hydra_dir = Path(cfg.paths.output_dir)
    folder = resume.run_dir if resume is not None and resume.run_dir is not None else hydra_dir
    if folder.resolve() != hydra_dir.resolve():
        log.info("resuming %s: writing to its run folder %s", resume.checkpoint, folder)
        _continued[str(hydra_dir.resolve())] = folder
        cfg.paths.output_dir = str(folder)
    if resume is not None:
        (folder / ERROR_FILE).unlink(missing_ok=True)
    return folder


def run_folder() -> Path | None:
    """The folder of the training run under way in this process: the one a resume continues in
    (:func:`continue_run`), else Hydra's run folder; ``None`` outside a Hydra job."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    hydra_dir = Path(HydraConfig.get().runtime.output_dir)
    return _continued.get(str(hydra_dir.resolve()), hydra_dir)


def write_error_json(record: dict[str, str]) -> Path | None:
    """``record`` (``error``, ``type``, ``traceback``) as ``error.json`` in the folder of the
    training run that failed (:func:`run_folder`): ``hymtl.summarize`` lists it as failed, not
    incomplete. Only for a training run whose folder exists (eval/predict/export write none of
    their own; a folder released as unused stays gone). Returns the file written, if any."""
    from hydra.core.hydra_config import HydraConfig

    folder = run_folder()
    if folder is None or HydraConfig.get().job.name != "train" or not folder.is_dir():
        return None
    atomic_write_json(folder / ERROR_FILE, record)
    return folder / ERROR_FILE


# --------------------------------------------------------------------------- Hydra
try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover - hydra-core < 1.1
    _HydraCallback = object  # type: ignore[assignment,misc]


class RunDirCheck(_HydraCallback):
    """Hydra callback: the run (or sweep) folder must be creatable and writable; otherwise one
    line on stderr and exit 2, before Hydra's own mkdir would end in a traceback.

    ``before_run``: a check of the composed config and the run folder that must pass before Hydra
    writes the new config into it (``conf/hydra/default.yaml`` gives resume's
    :func:`hymtl.resume.check_resume_in_place`: a run that resumes *in* its run folder keeps the
    run's own record of its settings when the resume is refused). Given, not imported: this
    room imports no service."""

    def __init__(self, before_run: Callable[[DictConfig, Path], None] | None = None) -> None:
        self.before_run = before_run

    def on_run_start(self, config, **kwargs) -> None:
        run_dir = Path(config.hydra.run.dir)
        _check_writable(run_dir)
        if self.before_run is not None:
            self.before_run(config, run_dir)

    def on_multirun_start(self, config, **kwargs) -> None:
        _check_writable(Path(config.hydra.sweep.dir))


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".hymtl-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        print(f"error: cannot write the output folder {folder}: {exc.strerror or exc}", file=sys.stderr)
        sys.exit(2)
