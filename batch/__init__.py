"""The batch path: claim, JSONL, submit, poll, ingest, and the emulated executor."""
