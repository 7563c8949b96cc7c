"""The HTTP front door (`sheepdog api`): tenant keys, an OpenAI-compatible chat.completions
endpoint and Sheepdog's own request API with resumable event streams. Built on the
in-deployment client (sheepdog.client); see app.py."""
