"""The demo's front-door part: `sheepdog api --no-auth` started beside the workers, and one
answer streamed through it with the official openai SDK (only base_url and api_key changed)."""

from __future__ import annotations

import urllib.request
from pathlib import Path

from sheepdog.demo.console import console
from sheepdog.demo.processes import SHEEPDOG, Children, wait_until


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/healthz", timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def start_front_door(children: Children, env: dict[str, str], logs: Path, port: int) -> str:
    """Start `sheepdog api --no-auth` (loopback, no keys: tenant "default"); its URL. Not waited
    for here: it starts while the live streams run."""
    argv = [*SHEEPDOG, "api", "--port", str(port), "--no-auth"]
    children.spawn("api", argv, env, logs / "api.log")
    return f"http://127.0.0.1:{port}"


def stream_through_front_door(children: Children, url: str, logs: Path, model: str) -> str:
    """Stream one answer through the API with the openai SDK and print it; returns the request
    id (the response id)."""
    import openai

    wait_until(lambda: _healthy(url), children.get("api"), logs / "api.log", 60)
    prompt = "Write one sentence about a sheepdog, sent through the front door."
    console.print(f"[dim]openai.OpenAI(base_url='{url}/v1', api_key='unused')[/]")
    console.print(f"[cyan]> {prompt}[/]")
    sdk = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    rid, tokens = "", "no usage"
    try:
        stream = sdk.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={"X-Sheepdog-Priority": "high"},
        )
        for chunk in stream:
            rid = chunk.id
            if chunk.choices and chunk.choices[0].delta.content:
                console.out(chunk.choices[0].delta.content, end="", highlight=False)
            if chunk.usage:
                tokens = f"{chunk.usage.prompt_tokens} in / {chunk.usage.completion_tokens} out"
        console.out("")
        console.print(
            f"[dim]response id = request id {rid} ({tokens}): curl {url}/v1/requests/{rid}[/]\n"
        )
    finally:
        sdk.close()
    return rid
