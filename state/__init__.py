"""omsd's domain: statuses, events, the pure state machine and the SQLite store.

Nothing here imports `daemon`, aiohttp or APScheduler.
"""
