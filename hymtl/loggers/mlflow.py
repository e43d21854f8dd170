"""MLflow (``conf/logger/mlflow.yaml``): a tracking server (``MLFLOW_TRACKING_URI``), else a local
store under the outputs folder, that never costs the run.

:class:`MLflowLogger` is Lightning's ``MLFlowLogger`` plus what a run needs from a tracker it does
not own: the server is asked once, briefly, at the start (MLflow's client would retry for
minutes); a server that does not answer then, or stops answering mid-run, is one warning line,
and from then on what MLflow would have got is written to ``<run>/mlflow_unsent/`` (Lightning's
CSV format) and named at the end. Parameters already sent are not sent again (MLflow refuses a
second value for a parameter).

The local store is SQLite (``<outputs>/mlruns/mlflow.db``, artifacts beside it): MLflow 3 keeps
its file store in maintenance mode and refuses it unless ``MLFLOW_ALLOW_FILE_STORE`` is set.
"""

from __future__ import annotations

import logging
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Mapping, Sequence

from lightning.pytorch.loggers import CSVLogger, MLFlowLogger
from lightning.pytorch.loggers.logger import DummyExperiment

from hymtl.errors import first_line
from hymtl.fileio import shown_path
from hymtl.loggers import Adapter

log = logging.getLogger("hymtl.loggers.mlflow")

UNSENT_DIR = "mlflow_unsent"


def local_store(save_dir: str | os.PathLike) -> tuple[str, str]:
    """``(tracking URI, artifact location)`` of the local store in ``save_dir``."""
    root = Path(save_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}", (root / "artifacts").as_uri()


def answers(uri: str, timeout_s: float) -> str | None:
    """``None`` when the server at ``uri`` answers (any HTTP status), else why not."""
    if not uri.startswith(("http://", "https://")):
        return None  # a local store, or a scheme MLflow's client knows better
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s):
            return None
    except urllib.error.HTTPError:
        return None  # it answered
    except (OSError, ValueError) as exc:  # refused, timed out, no such host
        reason = getattr(exc, "reason", None) or exc
        return first_line(reason, 200) if isinstance(reason, BaseException) else str(reason)


class MLflowLogger(MLFlowLogger):
    """Lightning's ``MLFlowLogger`` that never fails the run (see the module docstring).

    ``tracking_uri``: a server or store URI; ``None`` (``MLFLOW_TRACKING_URI`` unset): the local
    SQLite store in ``save_dir``. ``run_dir``: the run folder (the MLflow run's name, a tag, and
    where ``mlflow_unsent/`` goes). ``probe_timeout_s``: how long the server gets to answer at the
    start; ``request_retries``/``request_timeout_s``: MLflow's HTTP retries and timeout for every
    later request (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``/``…_TIMEOUT`` when set win).
    """

    def __init__(self, experiment_name: str = "hymtl", tracking_uri: str | None = None,
                 save_dir: str = "outputs/mlruns", run_dir: str | None = None, run_name: str | None = None,
                 probe_timeout_s: float = 5.0, request_retries: int = 2, request_timeout_s: float = 15.0,
                 tags: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        artifact_location = kwargs.pop("artifact_location", None)
        if not tracking_uri:
            tracking_uri, artifact_location = local_store(save_dir)
        # MLflow's client retries a dead server with exponential backoff for minutes by default
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(int(request_retries)))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(request_timeout_s)))
        # its own console handler would print the store's table migrations: warnings and up only;
        # and its "View run … at" lines after the run's end lines, which say it already
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        self.run_dir = Path(run_dir) if run_dir else None
        tags = dict(tags or {})
        if self.run_dir is not None:
            tags.setdefault("hymtl.run_dir", str(self.run_dir.resolve()))
        super().__init__(experiment_name=experiment_name, tracking_uri=tracking_uri, tags=tags,
                         run_name=run_name or (shown_path(self.run_dir) if self.run_dir else None),
                         artifact_location=artifact_location, **kwargs)
        self.probe_timeout_s = float(probe_timeout_s)
        self._probed = False
        self._lost: str | None = None  # why the server is given up: "did not answer at the start (…)"
        self._unsent: list[str] = []
        self._first_unsent_step: int | None = None
        self._spool: CSVLogger | None = None
        self._sent_params: dict[str, str] = {}
        self.sent_metric_keys: set[str] = set()

    @property
    def tracking_uri(self) -> str:
        return self._tracking_uri

    # ------------------------------------------------------------------ the server, guarded
    @property
    def experiment(self):  # noqa: D401 - Lightning's property, probed first
        """MLflow's client; a no-op stand-in once the server is given up (Lightning reads this
        property in its setup with ``hasattr``: it must not raise). Calls of this class and of
        :class:`MLflowAdapter` check :attr:`lost` first and record what was not sent."""
        if self._lost is None and not self._probed:
            self._probed = True
            reason = answers(self._tracking_uri, self.probe_timeout_s)
            if reason is not None:
                self._lose(f"did not answer at the start ({reason})")
        if self._lost is None:
            try:
                if not self._initialized and self._experiment_id is None and self._run_id is None:
                    self._experiment_id = self._experiment_of(self._experiment_name)
                return MLFlowLogger.experiment.fget(self)
            except Exception as exc:  # noqa: BLE001 - MlflowException, requests' errors: the server is gone
                self._lose(f"stopped answering ({first_line(exc, 200)})")
        return DummyExperiment()

    def _experiment_of(self, name: str) -> str:
        """The id of experiment ``name``, created if needed (quietly: Lightning warns that it creates it)."""
        found = self._mlflow_client.get_experiment_by_name(name)
        if found is not None and found.lifecycle_stage != "deleted":
            return found.experiment_id
        # MLflow 3's UI opens an experiment of unknown kind as a GenAI one (traces, prompts): this
        # one holds training runs
        return self._mlflow_client.create_experiment(name=name, artifact_location=self._artifact_location,
                                                     tags={"mlflow.experimentKind": "custom_model_development"})

    def _lose(self, why: str) -> None:
        if self._lost is None:
            self._lost = why
            log.warning("mlflow: the tracking server %s %s; the run goes on without it, and what it would get "
                        "stays in the run folder (%s)", self._tracking_uri, why, shown_path(self._spool_dir()))

    def _spool_dir(self) -> Path:
        return (self.run_dir or Path(".")) / UNSENT_DIR

    def _send(self, item: str, call, *args: Any, **kwargs: Any) -> bool:
        """``call(*args)`` while the server answers; ``False`` (and ``item`` recorded) after it stopped."""
        if self._lost is None:
            try:
                call(*args, **kwargs)
                if self._lost is None:  # (the call may be what found the server gone)
                    return True
            except Exception as exc:  # noqa: BLE001 - MlflowException, requests' errors: the server is gone
                self._lose(f"stopped answering ({first_line(exc, 200)})")
        if item not in self._unsent:
            self._unsent.append(item)
        return False

    def spool(self) -> CSVLogger:
        """Where what MLflow did not get is kept: ``<run>/mlflow_unsent/`` (metrics.csv, hparams.yaml)."""
        if self._spool is None:
            folder = self._spool_dir()
            self._spool = CSVLogger(save_dir=str(folder.parent), name=folder.name, version="")
        return self._spool

    def not_sent(self) -> list[tuple[str, str]]:
        """``(item, reason)`` of what the server did not get."""
        items = [f"metrics from step {self._first_unsent_step} on" if item == "metrics" and self._first_unsent_step
                 is not None else item for item in self._unsent]
        return [(item, self._lost or "") for item in items]

    @property
    def lost(self) -> str | None:
        """Why the server was given up, or ``None``."""
        return self._lost

    # ------------------------------------------------------------------ Lightning's logger API
    def log_hyperparams(self, params: Any) -> None:
        from lightning.fabric.utilities.logger import _convert_params, _flatten_dict

        flat = _flatten_dict(_convert_params(params))
        fresh = {k: v for k, v in flat.items() if k not in self._sent_params}
        if not fresh:
            return
        if self._send("hyperparameters", MLFlowLogger.log_hyperparams, self, fresh):
            self._sent_params.update({k: str(v) for k, v in fresh.items()})
        else:
            self.spool().log_hyperparams(fresh)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self._send("metrics", MLFlowLogger.log_metrics, self, metrics, step):
            self.sent_metric_keys.update(metrics)
        else:
            if self._first_unsent_step is None:
                self._first_unsent_step = int(step or 0)
            self.spool().log_metrics(dict(metrics), step)

    def save(self) -> None:
        if self._spool is not None:
            self._spool.save()

    def finalize(self, status: str) -> None:
        if self._spool is not None:
            self._spool.finalize(status)
        if self._lost is None and self._initialized:
            self._send("the run's end status", MLFlowLogger.finalize, self, status)

    @property
    def run_id(self) -> str | None:
        _ = self.experiment  # creates the run while the server answers; never raises
        return self._run_id

    @property
    def experiment_id(self) -> str | None:
        _ = self.experiment
        return self._experiment_id

    @property
    def name(self) -> str | None:
        return self.experiment_id

    @property
    def version(self) -> str | None:
        return self.run_id

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        if self._log_model:  # log_model: false (the preset's): the checkpoints stay in the run folder
            self._send("checkpoints", MLFlowLogger.after_save_checkpoint, self, checkpoint_callback)


# --------------------------------------------------------------------------- the adapter
class MLflowAdapter(Adapter):
    kind = "mlflow"

    def _client_run(self, logger: MLflowLogger):
        return logger.experiment, logger.run_id

    def hparams(self, logger: Any, columns: Mapping[str, Any], metrics: Mapping[str, float], step: int) -> None:
        logger.log_hyperparams(dict(columns))
        logger.log_metrics(dict(metrics), step=step)

    def figures(self, logger: Any, pixels: Mapping[str, Any], step: int) -> bool:
        def send() -> None:
            client, run_id = self._client_run(logger)
            for tag, image in pixels.items():
                client.log_image(run_id, image, artifact_file=f"figures/{tag.split('/')[-1]}.png")
        return self._guarded(logger, "figures", send)

    def summary(self, logger: Any, facts: Mapping[str, float], info: Mapping[str, str], step: int) -> None:
        fresh = {k: v for k, v in facts.items() if k not in getattr(logger, "sent_metric_keys", set())}
        logger.log_metrics(fresh, step=step)

        def send() -> None:
            client, run_id = self._client_run(logger)
            for key, value in info.items():
                if value:
                    client.set_tag(run_id, f"hymtl.{key}", value)
        self._guarded(logger, "final numbers", send)

    @staticmethod
    def _guarded(logger: Any, item: str, send) -> bool:
        if isinstance(logger, MLflowLogger):
            return logger._send(item, send)
        send()
        return True

    def where(self, logger: Any) -> dict[str, Any]:
        lost = getattr(logger, "lost", None)
        place = {"tracking_uri": logger._tracking_uri, "experiment_name": logger._experiment_name,
                 "experiment_id": logger._experiment_id, "run_id": logger._run_id}
        if lost:
            place["lost"] = lost
            place["kept_in"] = str(logger.spool().log_dir)
        return place

    def end_lines(self, where: Mapping[str, Any], run_dir: str) -> list[str]:
        uri, run_id = str(where.get("tracking_uri", "")), where.get("run_id")
        lines = []
        if run_id:
            lines.append(f"mlflow: experiment {where.get('experiment_name')} (id {where.get('experiment_id')}), "
                         f"run {run_id}: {ui_command(uri, where.get('experiment_id'), run_id)}")
        if where.get("not_sent"):
            kept = ", ".join(p for p in (shown_path(where["kept_in"]) if where.get("kept_in") else "",
                                         shown_path(Path(run_dir) / "figures"),
                                         shown_path(Path(run_dir) / "metrics.json")) if p)
            lines += [f"mlflow: not sent to {uri}, which {where.get('lost') or 'failed'}: "
                      f"{', '.join(where['not_sent'])}; kept in {kept}"]
        return lines

    def sweep_lines(self, wheres: Sequence[Mapping[str, Any]], sweep_dir: str) -> list[str]:
        stores = {}
        for place in wheres:
            if place.get("run_id"):
                stores.setdefault((place.get("tracking_uri"), place.get("experiment_id"),
                                   place.get("experiment_name")), []).append(place["run_id"])
        return [f"mlflow: experiment {name} (id {eid}), {len(runs)} runs: {ui_command(uri, eid, None)}"
                for (uri, eid, name), runs in stores.items()]


def ui_command(uri: str, experiment_id: Any, run_id: Any) -> str:
    """How to see the run: its page on a server, or the ``mlflow ui`` command of a local store."""
    if uri.startswith(("http://", "https://")):
        page = f"#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
        return f"{uri.rstrip('/')}/{page}"
    if uri.startswith("sqlite:///"):
        return f"mlflow ui --backend-store-uri sqlite:///{shown_path(uri[len('sqlite:///'):])}"
    return f"mlflow ui --backend-store-uri {uri}"


ADAPTER = MLflowAdapter()
