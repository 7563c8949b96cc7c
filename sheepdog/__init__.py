"""The faces for people and programs: the in-deployment client, the CLI, the HTTP front door,
the demo."""
