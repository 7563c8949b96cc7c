"""The stream path: high and normal priority, streamed from the provider to Redis pub/sub."""
