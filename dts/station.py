"""The station: one configuration, one spool, one journal, built once per command."""

from __future__ import annotations

import os
from dataclasses import dataclass

from . import config as config_mod
from .config import Config
from .journal import Journal
from .spool import Spool


@dataclass
class Station:
    config: Config
    spool: Spool
    journal: Journal

    @classmethod
    def open(cls, config_path: str | os.PathLike[str] | None = None,
             spool_path: str | os.PathLike[str] | None = None,
             *, create: bool = True) -> "Station":
        """Load the configuration (refused with file/key/reason when bad) and the spool."""
        config = config_mod.load(config_path, spool_path)
        spool = Spool(config.station.spool)
        if create:
            spool.ensure()
        return cls(config=config, spool=spool, journal=Journal(spool))
