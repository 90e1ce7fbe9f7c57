"""Instructions per request under valgrind's callgrind, for bench/hotpath.py and
bench/middleware_hotpath.py (stdlib only).

A tool runs itself again under callgrind with instrumentation off at start; inside, it
loads a tiny C helper (`counting_lib`) and wraps each measured run in `hp_start()` /
`hp_stop(name)`, which zero the counters, count, and dump them under `name`. `run_counting`
reads back each dump's total: a figure a shared machine does not move."""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# callgrind client requests: start counting; stop and dump under a name
HELPER_SOURCE = r"""
#include <valgrind/callgrind.h>
void hp_start(void) { CALLGRIND_ZERO_STATS; CALLGRIND_START_INSTRUMENTATION; }
void hp_stop(const char *name) { CALLGRIND_STOP_INSTRUMENTATION; CALLGRIND_DUMP_STATS_AT(name); }
"""


def counting_lib(env_var: str) -> ctypes.CDLL:
    """Inside callgrind: the helper `run_counting` built (its path is in `env_var`)."""
    return ctypes.CDLL(os.environ[env_var])


def run_counting(script: str, argv: list[str], env_var: str,
                 keep: Path | None = None) -> dict[str, int]:
    """Run `script argv` under callgrind with the helper's path in `env_var`; the total
    instructions of each named dump. `keep`: copy each dump there as `callgrind.<name>`
    (for `callgrind_annotate --inclusive=yes`)."""
    with tempfile.TemporaryDirectory(prefix="callgrind-") as tmp:
        helper = Path(tmp) / "cghelper.so"
        source = Path(tmp) / "cghelper.c"
        source.write_text(HELPER_SOURCE)
        subprocess.run(["gcc", "-O1", "-shared", "-fPIC", "-o", str(helper), str(source)],
                       check=True)
        out = Path(tmp) / "callgrind.out"
        subprocess.run(["valgrind", "--tool=callgrind", "--instr-atstart=no",
                        f"--callgrind-out-file={out}", sys.executable, script, *argv],
                       check=True, env={**os.environ, env_var: str(helper)},
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=3600)
        totals: dict[str, int] = {}
        for part in sorted(Path(tmp).glob("callgrind.out*")):
            text = part.read_text(errors="replace")
            trigger = re.search(r"^desc: Trigger: Client Request: (\S+)", text, re.M)
            total = re.search(r"^totals: (\d+)", text, re.M)
            if trigger and total:
                totals[trigger.group(1)] = int(total.group(1))
                if keep is not None:
                    keep.mkdir(parents=True, exist_ok=True)
                    shutil.copy(part, keep / f"callgrind.{trigger.group(1)}")
    return totals
