"""Owns the classification rule file (the predecessor's classifyRules.json format).

Placeholder until `dts classify` lands: only checks that the file is JSON.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import Config


def load_rules_for_config(config: "Config") -> None:
    path = config.station.classify_rules
    try:
        json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(str(config.path), "station.classify_rules", f"no such file: {path}") from None
    except ValueError as exc:
        raise ConfigError(str(path), "", f"not valid JSON: {exc}") from None
