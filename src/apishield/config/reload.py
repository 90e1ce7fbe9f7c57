"""Live reload of the config and the contract (`reload:`): whether the gateway also
watches the files, besides SIGHUP and the admin API's `POST /reload`.

Its own module because it is read by the gateway's lifecycle, not by a pipeline step.
"""

from __future__ import annotations

from apishield.config.units import Model, Seconds


class Reload(Model):
    """`watch: true` polls the config file and every contract file (size, mtime, inode)
    every `interval` and reloads once a change has stayed put for one interval (a deploy
    that writes several files is not caught half-way). Polling, like the TLS certificate
    watcher: no watcher dependency, and it works on every filesystem."""

    watch: bool = False
    interval: Seconds = 1.0
