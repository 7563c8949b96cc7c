"""The producer's side of intake: validate, route, reserve, record, send."""
