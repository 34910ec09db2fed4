"""Settings for the gateway's SQLite file, shared by everything that may create it (keys, traces).

The page size is fixed when the file is created (and cannot change once it is in WAL mode), so
whichever store opens a new file first must set it before switching to WAL. 16 KiB pages fit
the 2-3 KB trace rows far better than SQLite's default 4 KiB: measured on the trace writer,
~13 us of CPU per trace against ~24 us (fewer pages written per row, fewer B-tree splits).
Files created by an older version keep their page size; nothing else depends on it.

Every store in the file records its migrations in one table, `schema_version`, one row per
component (`provider_traces`, `gateway_auth`): the version of that component's schema, i.e. how
many of its migrations were applied.
"""

from __future__ import annotations

NEW_FILE_PRAGMAS: tuple[str, ...] = ("PRAGMA page_size=16384", "PRAGMA journal_mode=WAL")

SCHEMA_VERSION_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_version (component TEXT PRIMARY KEY, version INTEGER NOT NULL)"
)
READ_SCHEMA_VERSION = "SELECT version FROM schema_version WHERE component = ?"
WRITE_SCHEMA_VERSION = (
    "INSERT INTO schema_version (component, version) VALUES (?, ?)"
    " ON CONFLICT (component) DO UPDATE SET version = excluded.version"
)
