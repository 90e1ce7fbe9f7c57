"""Durable gateway state shared between the gateway process and the `apishield` CLI.

`keys.py` defines what an API-key store must do (`KeyStore`, `KeyRecord`), backend-neutral
so a Redis store for multi-instance deployments can implement the same protocol later;
`sqlite.py` is the embedded default (`SqliteKeyStore`), one file at `config.state`.
"""

from apishield.state.keys import DuplicateKeyId, KeyRecord, KeyStore, KeyStoreError

__all__ = ["DuplicateKeyId", "KeyRecord", "KeyStore", "KeyStoreError"]
