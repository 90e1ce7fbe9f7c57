"""Gateway state shared between gateway processes and the `apishield` CLI.

Protocols, backend-neutral: `keys.py` (API keys), `bans.py` (bans), `counters.py` (rate
limits and quotas, with the in-memory backend). Backends: the embedded default is one
SQLite file at `config.state` (`sqlite.py`, `sqlite_bans.py`; counters in memory), and
`state: redis://...` shares everything between instances (`redis_store.py`,
`redis_counters.py`). `open.py` picks the backends from the config.
"""

from apishield.state.keys import DuplicateKeyId, KeyRecord, KeyStore, KeyStoreError

__all__ = ["DuplicateKeyId", "KeyRecord", "KeyStore", "KeyStoreError"]
