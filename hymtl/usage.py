"""``--help`` of every entry point: Hydra's help (``hydra/help``), rendered from ``conf/``.

Each entry point's config selects its help file (``- override hydra/help: <entry>``); that file,
``conf/hydra/help/<entry>.yaml``, lists ``hymtl`` (the shared template and one line per config
group) first and says what the command does (``about``), five ``examples``, where results go
(``outputs``) and, optionally, its most used ``settings``. Hydra resolves
``hydra.help.template``; the ``${hymtl_help_…:}`` resolvers below render its parts:

* the config groups this entry point composes (``hydra.runtime.choices``; Hydra's own
  ``hydra/…`` groups are ``--hydra-help``'s), one line each: what it sets and its options, the
  one chosen now starred. Options are the files of ``conf/<group>/`` that Hydra offers, so the
  shared parts in ``conf/_base/`` are never among them;
* the settings, ``key=<value now>`` and one line each.

Hydra passes the resolved template through ``string.Template``: every ``$`` rendered here is
doubled. Imports neither torch nor Lightning.
"""

from __future__ import annotations

import re
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

#: the column where the one-line descriptions start
_WIDTH = 26


def _escaped(text: str) -> str:
    return text.replace("$", "$$")


def _options(group: str) -> list[str]:
    """The options of ``group`` that Hydra offers (``group=option``), sorted."""
    from hydra.core.global_hydra import GlobalHydra

    loader = GlobalHydra.instance().config_loader()
    return sorted(o for o in loader.get_group_options(group) if not o.startswith("_"))


def render_groups(descriptions: DictConfig, choices: DictConfig) -> str:
    """One line per config group of this entry point: ``group  what it sets: a, b*, c``."""
    lines = []
    for group, chosen in reversed(list(choices.items())):  # Hydra lists them last first
        if group == "hydra" or str(group).startswith(("hydra/", "_")):
            continue
        options = ", ".join(o + ("*" if o == chosen else "") for o in _options(str(group)))
        about = descriptions.get(group)
        lines.append(f"  {group:<{_WIDTH - 4}}  {about + ': ' if about else ''}{options}")
    return _escaped("\n".join(lines) if lines else "  (none: settings only)")


def render_settings(settings: DictConfig, _root_: DictConfig) -> str:
    """One line per setting: ``key=<its value now, as composed>  what it does``."""
    lines = []
    for key, about in settings.items():
        lines.append(f"  {f'{key}={_shown(_root_, str(key))}':<{_WIDTH - 2}}  {about}")
    return _escaped("\n".join(lines))


#: an interpolation that calls a resolver (``${hymtl_precision:…}``): computed when the run starts
_COMPUTED = re.compile(r"\$\{[\w.]+:")


def _shown(root: DictConfig, key: str) -> str:
    """The value of ``key`` as it would be typed: references to other keys followed
    (``${paths.data_dir}/x`` -> ``data/x``), a value that a resolver computes when the run
    starts (the precision the hardware supports) shown as ``auto``."""
    node: Any = root
    for part in key.split("."):
        node = node._get_node(part) if isinstance(node, DictConfig) and part in node.keys() else None
    if node is None:
        return "(none)"
    if node._is_missing():
        return "(required)"
    if isinstance(node, (DictConfig, ListConfig)):
        return "null" if node._is_none() else "…"
    raw = node._value()
    if isinstance(raw, str) and "${" in raw:
        if _COMPUTED.search(raw):
            return "auto"
        try:
            raw = OmegaConf.select(root, key)
        except Exception:  # noqa: BLE001 - shown as written
            pass
    return "null" if raw is None else str(raw).lower() if isinstance(raw, bool) else str(raw)


def render_lines(items: Any) -> str:
    """A list of lines (the examples), indented."""
    return _escaped("\n".join(f"  {item}" for item in items))


#: resolver name -> function (registered by :func:`hymtl.cli.register_resolvers`)
RESOLVERS = {
    "hymtl_help_groups": render_groups,
    "hymtl_help_settings": render_settings,
    "hymtl_help_lines": render_lines,
}
