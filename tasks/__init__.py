"""Celery tasks, thin: each loads ids, calls a path, records the outcome."""
