"""The nightly documents job: scan files, send each new or changed one for a summary (batch path),
and read the results back (status, export)."""
