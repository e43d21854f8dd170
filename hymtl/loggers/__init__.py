"""Every experiment tracker a run writes to, behind one seam: what the callbacks publish
(hyperparameter columns, the test figures, the run's final numbers and best checkpoint) and
where each tracker put the run (the end lines, ``metrics.json["loggers"]``, a sweep's lines).

The callbacks never ask which logger is there: they call :func:`publish_hparams`,
:func:`publish_figures`, :func:`publish_summary` and :func:`where`, and an :class:`Adapter` per
logger kind does the rest. Lightning itself sends the scalars (``log_metrics``) to every logger.
A new tracker is one module here with its adapter, one entry in :data:`KINDS` and one
``conf/logger/<name>.yaml``.

A tracker that fails (a server that stops answering) is reported once, its adapter records
what it did not get, and the run goes on: everything stays in the run folder.

Nothing heavy is imported here (``hymtl.summarize`` reads the kinds to print a sweep's lines).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import weakref
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from hymtl.errors import HymtlError, first_line

log = logging.getLogger("hymtl.loggers")

#: ``extra=`` of a record for the log file only (``hymtl.cli.QuietConsole``)
FILE_ONLY = {"console": False}


@dataclass(frozen=True)
class Kind:
    """One logger preset: its ``conf/logger/<name>.yaml``, the module holding its adapter, the
    Lightning class it serves and the package (and ``hymtl[extra]``) it needs."""

    name: str
    module: str
    logger_class: str
    package: str | None = None
    extra: str | None = None


#: the presets of ``conf/logger/``, by name (the order of the end lines)
KINDS: dict[str, Kind] = {kind.name: kind for kind in (
    Kind("tensorboard", "hymtl.loggers.tensorboard", "lightning.pytorch.loggers.TensorBoardLogger", "tensorboard"),
    Kind("mlflow", "hymtl.loggers.mlflow", "lightning.pytorch.loggers.MLFlowLogger", "mlflow", "mlflow"),
    Kind("wandb", "hymtl.loggers.wandb", "lightning.pytorch.loggers.WandbLogger", "wandb", "wandb"),
    Kind("csv", "hymtl.loggers.csv", "lightning.pytorch.loggers.CSVLogger"),
)}


class Adapter:
    """How one kind of logger receives what the callbacks publish. The defaults fit any
    Lightning logger (``log_hyperparams``/``log_metrics``); a kind overrides what it does
    better (images, summaries, where it put the run)."""

    kind = "logger"

    def hparams(self, logger: Any, columns: Mapping[str, Any], metrics: Mapping[str, float], step: int) -> None:
        """The HParams dashboard's columns and ``hp_metric``."""
        logger.log_hyperparams(dict(columns))
        logger.log_metrics(dict(metrics), step=step)

    def figures(self, logger: Any, pixels: Mapping[str, Any], step: int) -> bool:
        """The test figures (``tag -> (H, W, 3) uint8``); ``False`` when this kind keeps no images."""
        return False

    def summary(self, logger: Any, facts: Mapping[str, float], info: Mapping[str, str], step: int) -> None:
        """``metrics.json``'s numbers that no step logged (``epochs``, ``wall_time_s``, …) and
        the run's strings (``best_checkpoint``, ``run_dir``)."""
        logger.log_metrics(dict(facts), step=step)
        logger.log_hyperparams(dict(info))

    def where(self, logger: Any) -> dict[str, Any]:
        """Where the logger put the run, as plain JSON (``metrics.json["loggers"][kind]``)."""
        return {}

    def end_lines(self, where: Mapping[str, Any], run_dir: str) -> list[str]:
        """The run's end lines for this logger, from :meth:`where`'s record."""
        return []

    def sweep_lines(self, wheres: Sequence[Mapping[str, Any]], sweep_dir: str) -> list[str]:
        """A sweep's end lines for this logger, from its runs' records."""
        return []

    def finish(self, logger: Any) -> None:
        """The run has published everything: flush or close what the logger holds open."""


def _load(kind: Kind) -> Adapter:
    return importlib.import_module(kind.module).ADAPTER


def adapter_named(name: str) -> Adapter:
    """The adapter of a preset (``"mlflow"``); the generic :class:`Adapter` for other names."""
    return _load(KINDS[name]) if name in KINDS else Adapter()


def adapter_for(logger: Any) -> Adapter:
    """The adapter of a logger object: the kind whose Lightning class it is an instance of."""
    for kind in KINDS.values():
        module_name, _, class_name = kind.logger_class.rpartition(".")
        if isinstance(logger, getattr(importlib.import_module(module_name), class_name)):
            return _load(kind)
    return Adapter()


# --------------------------------------------------------------------------- building them
def check_packages(cfg: Mapping[str, Any] | None) -> None:
    """One line naming the ``pip install`` for each configured preset whose package is missing
    (before anything else of the run happens)."""
    for name in (cfg or {}):
        kind = KINDS.get(str(name))
        if kind is not None and kind.package and not _importable(kind.package):
            raise HymtlError(f"logger={kind.name} needs the {kind.package} package: "
                             f"pip install 'hymtl[{kind.extra}]' (or pip install {kind.package})")


def _importable(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a broken install, or one blocked in sys.modules
        return False


def instantiate_loggers(cfg: Any) -> list[Any]:
    """The ``logger`` group's entries as Lightning loggers (each preset's package checked first)."""
    from hymtl.config import instantiate_group

    check_packages(cfg)
    return instantiate_group(cfg)


# --------------------------------------------------------------------------- publishing
#: what each logger did not get: logger -> [(item, reason)]
_NOT_SENT: "weakref.WeakKeyDictionary[Any, list[tuple[str, str]]]" = weakref.WeakKeyDictionary()


def not_sent(logger: Any) -> list[tuple[str, str]]:
    """``(item, reason)`` of what was not sent to ``logger`` (its own record included)."""
    own = getattr(logger, "not_sent", None)
    return list(_NOT_SENT.get(logger, [])) + (list(own() or []) if callable(own) else [])


def _real(loggers: Iterable[Any]) -> list[Any]:
    """The loggers that write somewhere: not Lightning's ``DummyLogger`` (``fast_dev_run``'s
    stand-in, which answers every call with ``None``)."""
    from lightning.pytorch.loggers.logger import DummyLogger

    return [logger for logger in loggers if not isinstance(logger, DummyLogger)]


def _each(loggers: Iterable[Any], item: str, send) -> None:
    """``send(adapter, logger)`` for every logger; a failure is one warning, recorded, and the
    run goes on (the run folder holds everything anyway)."""
    for logger in _real(loggers):
        adapter = adapter_for(logger)
        try:
            send(adapter, logger)
        except Exception as exc:  # noqa: BLE001 - a tracker never ends a run
            reason = first_line(exc, 200)
            log.warning("%s: the %s were not sent (%s); they are in the run folder", adapter.kind, item, reason)
            log.debug("%s: sending the %s failed", adapter.kind, item, exc_info=True, extra=FILE_ONLY)
            try:
                _NOT_SENT.setdefault(logger, []).append((item, reason))
            except TypeError:  # not weak-referenceable: the warning is the record
                pass


def publish_hparams(loggers: Iterable[Any], columns: Mapping[str, Any], metrics: Mapping[str, float],
                    step: int) -> None:
    """The HParams columns (name -> scalar) and ``hp_metric`` to every logger."""
    _each(loggers, "hyperparameters", lambda a, lg: a.hparams(lg, columns, metrics, step))


def publish_figures(loggers: Iterable[Any], pixels: Mapping[str, Any], step: int) -> None:
    """The test figures (``tag -> (H, W, 3) uint8``) to every logger that keeps images."""
    def send(adapter: Adapter, logger: Any) -> None:
        if not adapter.figures(logger, pixels, step):
            log.debug("%s keeps no images: the figures are in the run folder", adapter.kind, extra=FILE_ONLY)
    _each(loggers, "figures", send)


def publish_summary(loggers: Iterable[Any], metrics: Mapping[str, Any], run_dir: str, step: int) -> None:
    """``metrics.json``'s numbers that no step logged (the ``train/``, ``val/``, ``test/`` ones
    were), the best checkpoint and the run folder, to every logger."""
    facts = {k: float(v) for k, v in metrics.items()
             if not k.startswith(("train/", "val/", "test/")) and isinstance(v, (int, float)) and not isinstance(v, bool)}
    info = {"best_checkpoint": str(metrics.get("best_checkpoint") or ""), "run_dir": str(run_dir)}
    _each(loggers, "final numbers", lambda a, lg: a.summary(lg, facts, info, step))


def finish(loggers: Iterable[Any]) -> None:
    """Every logger's :meth:`Adapter.finish`: the run has published everything."""
    _each(loggers, "end of the run", lambda a, lg: a.finish(lg))


def where(loggers: Iterable[Any]) -> dict[str, Any]:
    """Where each logger put the run, by kind (``metrics.json["loggers"]``); what it did not
    get under ``"not_sent"``."""
    places: dict[str, Any] = {}
    for logger in _real(loggers):
        adapter = adapter_for(logger)
        try:
            place = dict(adapter.where(logger))
        except Exception as exc:  # noqa: BLE001
            place = {"error": first_line(exc, 200)}
        missing = not_sent(logger)
        if missing:
            place.setdefault("not_sent", [])
            place["not_sent"] += [item for item, _ in missing if item not in place["not_sent"]]
        places[adapter.kind] = place
    return places


def end_lines(places: Mapping[str, Any], run_dir: str) -> list[str]:
    """The end lines of every logger of a run, from ``metrics.json["loggers"]``."""
    lines: list[str] = []
    for name, place in places.items():
        lines += adapter_named(name).end_lines(place, run_dir)
    return lines


def sweep_lines(places: Sequence[Mapping[str, Any]], sweep_dir: str) -> list[str]:
    """A sweep's end lines per logger kind, from its runs' ``metrics.json["loggers"]``."""
    by_kind: dict[str, list[Mapping[str, Any]]] = {}
    for run in places:
        for name, place in run.items():
            by_kind.setdefault(name, []).append(place)
    lines: list[str] = []
    for name in sorted(by_kind, key=lambda n: list(KINDS).index(n) if n in KINDS else len(KINDS)):
        lines += adapter_named(name).sweep_lines(by_kind[name], sweep_dir)
    return lines


def not_sent_line(kind: str, place: Mapping[str, Any], kept_in: str) -> list[str]:
    """``<kind>: not sent: <items>; kept in <run folder>`` when a logger missed something."""
    missing = place.get("not_sent") or []
    if not missing:
        return []
    return [f"{kind}: not sent: {', '.join(missing)}; kept in {kept_in}"]
