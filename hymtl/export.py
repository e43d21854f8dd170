"""Export a trained model to run without hymtl, and prove it gives the same answers.

``python -m hymtl.export ckpt_path=RUN/checkpoints/best.ckpt format=onnx|torchscript [out=PATH]``

* ``onnx``: one self-contained ``.onnx`` file with a dynamic batch axis (PyTorch's
  ``torch.export``-based exporter at opset 18; ``onnx.exporter=torchscript onnx.opset=17`` for
  runtimes that stop at opset 17);
* ``torchscript``: ``torch.jit.trace`` of backbone + head, loadable with ``torch.jit.load``.

Beside the model, a JSON sidecar ``<model file>.json`` holds the class names, the
preprocessing, the model file's SHA-256 and the parity figures.

**Parity is part of the export**: the exported model runs next to the checkpoint on real images
(by default the validation split of the run's data; ``parity.inputs=[...]`` sets others); the
figures are printed. When parity breaks, nothing is written to ``out`` and the command exits
with code 3. The service is :mod:`hymtl.exporting`.
"""

from __future__ import annotations

import json

from omegaconf import DictConfig

from hymtl.cli import hymtl_main, run_entry
from hymtl.errors import printable


def export(cfg: DictConfig) -> dict:
    """Export ``cfg.ckpt_path`` as ``cfg.format``, check parity, write model + sidecar; return the sidecar."""
    from hymtl.exporting import ExportSettings, ParityError, export_checkpoint, write_export

    settings = ExportSettings.from_config(cfg)
    exported = export_checkpoint(settings)
    print(exported.report.line())
    if not exported.report.ok:
        raise ParityError(f"parity check failed, nothing written to {printable(settings.out)}: "
                          f"{exported.report.line()}")
    sidecar = write_export(exported, settings)
    print(f"wrote {printable(settings.out)} ({len(exported.data) / 1e6:.1f} MB) and {sidecar.name}")
    return json.loads(sidecar.read_text())


@hymtl_main("export")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: ``error: ...`` and exit 2 on bad input, exit 3 when parity breaks."""
    run_entry(export, cfg, phase="the export", stopped="no model file or sidecar was written (each is written "
              "whole, after the parity check, or not at all) and the scratch folder is removed: run it again")


if __name__ == "__main__":
    main()
