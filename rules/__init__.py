"""Rules that need no service: routing, the deadline horizon, prices, caps, token estimates."""
