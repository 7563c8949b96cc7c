"""Webhooks: signed (Standard Webhooks), durable (an outbox written with each end), at least
once. See README "Webhooks"."""
