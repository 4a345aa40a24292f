"""The SQLite schema as forward migrations, indexed by `PRAGMA user_version`.

Migration N takes a database at version N-1 to version N. Never edit a released
migration: add a new one. `tests/test_store.py` builds every old version and
migrates it forward.
"""

from __future__ import annotations

MIGRATIONS: tuple[str, ...] = (
    # 1: journal, derived order rows, outbox, timers, processor cursor, feed acks, pending intents.
    """
    CREATE TABLE journal (
        "offset"     INTEGER PRIMARY KEY AUTOINCREMENT,
        kind         TEXT NOT NULL,
        source       TEXT NOT NULL,
        order_id     TEXT,
        dedup_key    TEXT UNIQUE,
        event_id     TEXT UNIQUE,
        payload      TEXT NOT NULL,
        reason       TEXT,
        received_at  TEXT NOT NULL
    );
    CREATE INDEX journal_order ON journal(order_id);
    CREATE TABLE orders (
        order_id             TEXT PRIMARY KEY,
        marketplace_order_id TEXT,
        phase                TEXT NOT NULL,
        status               TEXT,
        data                 TEXT NOT NULL,
        updated_at           TEXT NOT NULL
    );
    CREATE INDEX orders_marketplace ON orders(marketplace_order_id);
    CREATE INDEX orders_phase ON orders(phase);
    CREATE TABLE outbox (
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        order_id     TEXT NOT NULL,
        seq          INTEGER NOT NULL,
        kind         TEXT NOT NULL,
        payload      TEXT NOT NULL,
        state        TEXT NOT NULL DEFAULT 'pending',
        created_at   TEXT NOT NULL,
        started_at   TEXT,
        done_at      TEXT,
        UNIQUE (order_id, seq)
    );
    CREATE INDEX outbox_state ON outbox(state, id);
    CREATE TABLE timers (
        order_id TEXT PRIMARY KEY,
        token    INTEGER NOT NULL,
        reason   TEXT NOT NULL,
        due_at   TEXT NOT NULL
    );
    CREATE INDEX timers_due ON timers(due_at);
    CREATE TABLE cursor (
        name     TEXT PRIMARY KEY,
        "offset" INTEGER NOT NULL
    );
    INSERT INTO cursor (name, "offset") VALUES ('processor', 0);
    CREATE TABLE feed_acks (
        handle         TEXT PRIMARY KEY,
        journal_offset INTEGER,
        received_at    TEXT NOT NULL,
        attempts       INTEGER NOT NULL DEFAULT 0,
        last_error     TEXT
    );
    CREATE TABLE pending_intents (
        marketplace_order_id TEXT PRIMARY KEY,
        source               TEXT NOT NULL,
        journal_offset       INTEGER NOT NULL,
        created_at           TEXT NOT NULL
    );
    """,
    # 2: one row per transition, for `omsd show` and the operator's questions.
    """
    CREATE TABLE history (
        id             INTEGER PRIMARY KEY AUTOINCREMENT,
        order_id       TEXT NOT NULL,
        journal_offset INTEGER NOT NULL,
        from_phase     TEXT,
        to_phase       TEXT NOT NULL,
        status         TEXT,
        cause          TEXT NOT NULL,
        at             TEXT NOT NULL
    );
    CREATE INDEX history_order ON history(order_id, id);
    """,
    # 3: the schema version each journal row was written with (rows before it are version 1),
    #    and the rows the processor could not read, for the operator and the alarm.
    """
    ALTER TABLE journal ADD COLUMN version INTEGER NOT NULL DEFAULT 1;
    CREATE TABLE unreadable (
        journal_offset INTEGER PRIMARY KEY,
        kind           TEXT NOT NULL,
        order_id       TEXT,
        error          TEXT NOT NULL,
        received_at    TEXT NOT NULL,
        found_at       TEXT NOT NULL
    );
    """,
    # 4: the entries routed by marketplace id, indexed (the pruning and `journal --order` find an
    #    order's notifications and intents by it). Before this migration runs, the store switches
    #    the file to incremental auto-vacuum (see VACUUM_AT) so pruned pages go back to the disk.
    """
    CREATE INDEX journal_routed ON journal(json_extract(payload, '$.marketplace_order_id'))
        WHERE order_id IS NULL AND kind IN ('notification_received', 'intent_received');
    """,
    # 5: orders not linked to a marketplace id and without intent, by status: the lazy link
    #    lookup reads only those in a status that may still need an approval.
    """
    CREATE INDEX orders_unlinked ON orders(status) WHERE marketplace_order_id IS NULL AND phase = 'tracking';
    """,
    # 6: the outcome stream (facts for the connector, derived from the journal in the processor's
    #    transaction; `seq` gap-free as readers see it, `id` stable) and its relay: one cursor per
    #    endpoint, and the deliveries taken from the stream and not yet acknowledged.
    """
    CREATE TABLE outcomes (
        seq                  INTEGER PRIMARY KEY AUTOINCREMENT,
        id                   TEXT NOT NULL UNIQUE,
        type                 TEXT NOT NULL,
        occurred_at          TEXT NOT NULL,
        order_id             TEXT,
        marketplace_order_id TEXT,
        journal_offset       INTEGER NOT NULL,
        data                 TEXT NOT NULL
    );
    CREATE INDEX outcomes_order ON outcomes(order_id, seq);
    CREATE INDEX outcomes_marketplace ON outcomes(marketplace_order_id, seq);
    CREATE INDEX outcomes_time ON outcomes(occurred_at);
    CREATE TABLE relay_endpoints (
        name            TEXT PRIMARY KEY,
        seq             INTEGER NOT NULL,
        disabled_at     TEXT,
        disabled_reason TEXT
    );
    CREATE TABLE relay_deliveries (
        endpoint   TEXT NOT NULL,
        seq        INTEGER NOT NULL,
        order_key  TEXT NOT NULL,
        attempts   INTEGER NOT NULL DEFAULT 0,
        next_at    TEXT NOT NULL,
        last_error TEXT,
        state      TEXT NOT NULL DEFAULT 'pending',
        PRIMARY KEY (endpoint, seq)
    );
    CREATE INDEX relay_due ON relay_deliveries(endpoint, state, next_at);
    CREATE INDEX relay_order ON relay_deliveries(endpoint, order_key, state, seq);
    """,
    # 7: per order, the marketplace id its VTEX id derives from (`{affiliate}-{id}-{n}`), indexed
    #    while the order is linked to none: an intent parked on that id looks the order up at once
    #    (orders written before this migration have none until they are written again or replayed).
    #    And what the VTEX client learned (the adapted rate, open Retry-After windows, when the
    #    configurations were last read), so that a restart starts from it.
    """
    ALTER TABLE orders ADD COLUMN derived_marketplace_id TEXT;
    CREATE INDEX orders_derived ON orders(derived_marketplace_id) WHERE marketplace_order_id IS NULL;
    CREATE TABLE vtex_learned (
        name       TEXT PRIMARY KEY,
        data       TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    """,
)

ROUTED_KINDS = "('notification_received', 'intent_received')"
"""The kinds the `journal_routed` index covers: a query must name them to use it."""

VACUUM_AT = 4
"""From this version on the file is `auto_vacuum=INCREMENTAL`. The setting takes effect on
an empty file at once, on an older one only through a VACUUM (which rewrites the file and
cannot run inside a transaction): `Store.migrate` does it once, before migration 4."""

SCHEMA_VERSION = len(MIGRATIONS)
