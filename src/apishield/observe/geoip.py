"""Which country an address is in, from a MaxMind-format database the user provides (F3).

Read with `maxminddb`, MaxMind's maintained reader (its C extension when built, memory
mapped): a lookup costs microseconds, and the last `CACHE_SIZE` answers are kept, since a
client sends many requests from one address. An address in no country (private,
loopback, documentation ranges, or simply absent from the file) is `None`. The database
is opened when the pipeline is built: a missing or unreadable file is a ConfigError that
`apishield check` reports, not a failure at the first request.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from pathlib import Path
from typing import Any

import maxminddb

from apishield.config.errors import ConfigError

CACHE_SIZE = 4096


class CountryLookup:
    def __init__(self, path: Path, where: str = "alerts.geoip.database") -> None:
        try:
            self._reader: Any = maxminddb.open_database(str(path))
        except FileNotFoundError:
            raise ConfigError([f"{where}: {path} does not exist; give the path of a "
                               "MaxMind-format country database (e.g. GeoLite2-Country."
                               "mmdb), relative to the config file"]) from None
        except (OSError, ValueError, maxminddb.InvalidDatabaseError) as exc:
            raise ConfigError([f"{where}: cannot read {path} as a MaxMind database: "
                               f"{exc}"]) from None
        self.path = path
        self.country = lru_cache(maxsize=CACHE_SIZE)(self._country)

    def _country(self, address: str) -> str | None:
        """The ISO 3166-1 alpha-2 code of `address`'s country, or None."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:  # not an IP address
            return None
        if ip.version == 6 and ip.ipv4_mapped is not None:  # ::ffff:203.0.113.7
            ip = ip.ipv4_mapped
        record = self._reader.get(ip)
        if not isinstance(record, dict):
            return None
        country = record.get("country") or record.get("registered_country")
        if isinstance(country, dict):
            code = country.get("iso_code")
            if isinstance(code, str):
                return code
        return None

    def close(self) -> None:
        self.country.cache_clear()
        self._reader.close()
