"""The ground floor: settings, Redis keys, connections, errors, provider config."""
