"""The run folder: which run a checkpoint belongs to, what that run saved, where its data was.

One run of ``hymtl.train`` is one folder (``outputs/<date>/<time>/``, or a sweep's
``outputs/multirun/…/<n>/``)::

    <run>/.hydra/config.yaml   the composed config (interpolations kept, as Hydra saves it)
    <run>/.hydra/hydra.yaml    Hydra's own config: hydra.runtime.cwd is where the run was launched
    <run>/checkpoints/*.ckpt   best and last checkpoints
    <run>/eval/<stamp>/        the evaluations of its checkpoints (hymtl.eval)

Resume, eval and export all ask this module, so that "the run of a checkpoint" and "the data
it was trained on" mean the same thing everywhere. Also :class:`RunDirCheck`, the Hydra
callback that refuses an output folder that cannot be written.

Imports no torch or Lightning: Hydra loads this module before every run.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Callable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from hymtl.fileio import read_regular_file, regular_file_problem

CHECKPOINTS_DIR = "checkpoints"
HYDRA_DIR = ".hydra"
EVAL_DIR = "eval"


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
