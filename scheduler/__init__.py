"""The beat schedule: what runs when (flush, poll, janitor, the nightly documents)."""
