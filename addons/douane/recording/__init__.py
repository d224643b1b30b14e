"""Recordings: every flow written as a replayable `.mitm` file per user, indexed in SQLite."""
