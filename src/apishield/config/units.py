"""The vocabulary every feature model is written in: the `Model` base and the unit types.

`Model` forbids unknown keys (a typo must not silently turn a control off) and freezes
the result (the pipeline shares one config across connections). The units (durations
such as `500ms` or `2m`, sizes such as `64KiB`, rates such as `100/s`, CIDR lists) are
parsed here once so that every key that takes a duration accepts the same spellings and
refuses a bad one with the same message, wherever in the file it appears.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_SIZE = re.compile(r"^\s*(\d+)\s*(b|kb|kib|mb|mib|gb|gib)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    None: 1, "b": 1, "kb": 1000, "kib": 1024, "mb": 1000**2, "mib": 1024**2,
    "gb": 1000**3, "gib": 1024**3,
}
_DURATION_UNITS = {None: 1.0, "s": 1.0, "ms": 0.001, "m": 60.0, "h": 3600.0, "d": 86400.0}
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d*)\s*(ms|s|m|h|d)?\s*$")
_RATE_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: Any) -> Any:
    """Seconds as a number, or a string such as `500ms`, `10s`, `2m`."""
    if isinstance(value, bool):  # YAML `yes`/`true` is not one second
        raise ValueError(f"{value!r} is not a duration; write e.g. 10, 10s, 500ms, 2m or 90d")
    if isinstance(value, str):
        match = _DURATION.match(value)
        if not match:
            raise ValueError(f"{value!r} is not a duration; write e.g. 10, 10s, 500ms, 2m or 90d")
        return float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    return value


def parse_size(value: Any) -> Any:
    """Bytes as an integer, or a string such as `64KiB`, `1MB`."""
    if isinstance(value, bool):  # YAML `true` is not one byte
        raise ValueError(f"{value!r} is not a size; write e.g. 1048576, 64KiB or 1MB")
    if isinstance(value, str):
        match = _SIZE.match(value)
        if not match:
            raise ValueError(f"{value!r} is not a size; write e.g. 1048576, 64KiB or 1MB")
        unit = match.group(2).lower() if match.group(2) else None
        return int(match.group(1)) * _SIZE_UNITS[unit]
    return value


def parse_rate(value: Any) -> tuple[int, float]:
    """`100/s`, `1000/m`, `10/10s` -> (count, period in seconds)."""
    if isinstance(value, str):
        match = _RATE.match(value)
        if not match or int(match.group(1)) < 1 or match.group(2) == "0":
            raise ValueError(f"{value!r} is not a rate; write COUNT/PERIOD, e.g. 100/s, "
                             "1000/m or 10/10s")
        period = float(match.group(2) or 1) * _RATE_UNITS[match.group(3)]
        if match.group(3) is None and not match.group(2):
            raise ValueError(f"{value!r} is not a rate; give the period's unit, e.g. 100/s")
        return (int(match.group(1)), period)
    raise ValueError(f"{value!r} is not a rate; write COUNT/PERIOD, e.g. 100/s or 1000/m")


def _check_cidrs(value: tuple[str, ...]) -> tuple[str, ...]:
    for cidr in value:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError as exc:
            raise ValueError(f"{cidr!r} is not an IP address or CIDR network") from exc
    return value


Seconds = Annotated[float, BeforeValidator(parse_duration), Field(gt=0)]
Leeway = Annotated[float, BeforeValidator(parse_duration), Field(ge=0, le=600)]
Bytes = Annotated[int, BeforeValidator(parse_size), Field(ge=0)]
Cidrs = Annotated[tuple[str, ...], AfterValidator(_check_cidrs)]  # IPv4/IPv6 addresses, CIDRs
Rate = Annotated[tuple[int, float], BeforeValidator(parse_rate)]
