"""Chat completions on the simulator, through the official SDK over real HTTP."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from rules.tokens import count_message_tokens, count_tokens
from tests.fixtures.simulator import start_simulator

MODEL = "gpt-4.1-mini"


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]


def stream_text(client: OpenAI, **kwargs: object) -> tuple[list[str], list[object]]:
    pieces: list[str] = []
    chunks: list[object] = []
    for chunk in client.chat.completions.create(stream=True, **kwargs):  # type: ignore[call-overload]
        chunks.append(chunk)
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    return pieces, chunks


def raw_sse(sim, body: dict[str, object]) -> list[str]:  # type: ignore[no-untyped-def]
    request = urllib.request.Request(
        sim.base_url + "/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {sim.api_key}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        text = response.read().decode()
    assert text.endswith("data: [DONE]\n\n")
    return [event[len("data: ") :] for event in text.split("\n\n") if event]


@pytest.mark.unit
def test_simulator_models_are_the_price_table() -> None:
    """The simulator keeps its own list (it imports nothing of Sheepdog); it must stay in step."""
    from rules.prices import load_price_table
    from simulator.models import MODELS

    assert list(MODELS) == load_price_table().names()


@pytest.mark.unit
def test_the_estimate_counts_long_runs_and_unspaced_scripts() -> None:
    """A run of word characters is a token per ten characters at most; Han, kana and Hangul a
    token a character (they are written without spaces); English words stay one each."""
    assert count_tokens("The quick brown fox, jumps!") == 7
    assert count_tokens("internationalization") == 2
    assert count_tokens("x" * 57) == 6
    assert count_tokens("中文字符串") == 5 and count_tokens("カタカナ") == 4
    assert count_tokens("한국어 텍스트") == 6 and count_tokens("abc中文def") == 4


@pytest.mark.unit
@pytest.mark.parametrize(
    "text",
    [
        "",
        "Hello, world!",
        "naïve café: 3.14 -- ok?",
        "a\nb\tc",
        "中文字符\uff0c好吗\uff1f",
        "x" * 57,
        "abc中文def 한국어",
    ],
)
def test_simulator_counts_tokens_as_sheepdog_estimates(text: str) -> None:
    """The simulator's usage and Sheepdog's estimate count the same way (two copies, one rule)."""
    from simulator import tokens

    messages = [{"role": "system", "content": text}, {"role": "user", "content": text * 3}]
    assert tokens.count_tokens(text) == count_tokens(text)
    assert tokens.count_message_tokens(messages) == count_message_tokens(messages)


def test_models_lists_the_price_table(openai_client: OpenAI) -> None:
    from rules.prices import price_table

    ids = [model.id for model in openai_client.models.list()]
    assert ids == price_table().names()
    assert openai_client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        openai_client.models.retrieve("no-such-model")


def test_plain_completion_usage_and_determinism(openai_client: OpenAI) -> None:
    messages = ask("Tell me about sheep.")
    first = openai_client.chat.completions.create(model=MODEL, messages=messages)
    second = openai_client.chat.completions.create(model=MODEL, messages=messages)
    text = first.choices[0].message.content
    assert text and text == second.choices[0].message.content
    assert first.id != second.id
    assert first.object == "chat.completion"
    assert first.choices[0].finish_reason == "stop"
    assert first.usage is not None
    assert first.usage.prompt_tokens == count_message_tokens(messages)
    assert 20 <= first.usage.completion_tokens <= 60
    assert first.usage.completion_tokens == count_tokens(text)
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens
    words = text.split()
    assert all(word.isalpha() for word in words)  # English-ish words, not bytes
    other = openai_client.chat.completions.create(model=MODEL, messages=ask("Something else."))
    assert other.choices[0].message.content != text
    warmer = openai_client.chat.completions.create(model=MODEL, messages=messages, temperature=1.5)
    assert warmer.choices[0].message.content != text


def test_stream_equals_plain_answer_one_token_per_chunk(openai_client: OpenAI) -> None:
    messages = ask("Stream please.")
    plain = openai_client.chat.completions.create(model=MODEL, messages=messages)
    pieces, chunks = stream_text(
        openai_client, model=MODEL, messages=messages, stream_options={"include_usage": True}
    )
    assert "".join(pieces) == plain.choices[0].message.content
    assert all(count_tokens(piece) == 1 for piece in pieces)
    first, final, usage = chunks[0], chunks[-2], chunks[-1]
    assert first.choices[0].delta.role == "assistant"  # type: ignore[attr-defined]
    assert first.choices[0].delta.content == ""  # type: ignore[attr-defined]
    assert final.choices[0].finish_reason == "stop"  # type: ignore[attr-defined]
    assert usage.choices == []  # type: ignore[attr-defined]
    assert usage.usage == plain.usage  # type: ignore[attr-defined]
    assert all(chunk.usage is None for chunk in chunks[:-1])  # type: ignore[attr-defined]


def test_raw_sse_shape(simulator) -> None:  # type: ignore[no-untyped-def]
    body = {"model": MODEL, "messages": ask("raw"), "stream": True}
    events = raw_sse(simulator, body)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert all("usage" not in chunk for chunk in chunks)  # without include_usage
    assert len({chunk["id"] for chunk in chunks}) == 1
    with_usage = [
        json.loads(e)
        for e in raw_sse(simulator, {**body, "stream_options": {"include_usage": True}})[:-1]
    ]
    assert all(chunk["usage"] is None for chunk in with_usage[:-1])
    assert with_usage[-1]["choices"] == [] and with_usage[-1]["usage"]["total_tokens"] > 0


def test_max_tokens_stop_and_n(openai_client: OpenAI) -> None:
    messages = ask("Long answer.")
    short = openai_client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5)
    assert short.choices[0].finish_reason == "length"
    assert short.usage is not None and short.usage.completion_tokens == 5
    newer = openai_client.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=5
    )
    assert newer.choices[0].message.content == short.choices[0].message.content
    pieces, chunks = stream_text(openai_client, model=MODEL, messages=messages, max_tokens=5)
    assert len(pieces) == 5 and chunks[-1].choices[0].finish_reason == "length"  # type: ignore[attr-defined]

    full = openai_client.chat.completions.create(model=MODEL, messages=messages)
    words = (full.choices[0].message.content or "").split()
    stop = words[3]
    stopped = openai_client.chat.completions.create(model=MODEL, messages=messages, stop=[stop])
    content = stopped.choices[0].message.content or ""
    assert stop not in content and stopped.choices[0].finish_reason == "stop"
    assert stopped.usage is not None and stopped.usage.completion_tokens == count_tokens(content)

    with pytest.raises(openai.BadRequestError) as error:
        openai_client.chat.completions.create(model=MODEL, messages=messages, n=2)
    assert error.value.param == "n"  # type: ignore[attr-defined]


def test_request_errors(openai_client: OpenAI, simulator) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(openai.NotFoundError) as error:
        openai_client.chat.completions.create(model="gpt-99", messages=ask("x"))
    assert error.value.code == "model_not_found"
    assert error.value.body["type"] == "invalid_request_error"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        openai_client.chat.completions.create(model=MODEL, messages=[])
    with pytest.raises(openai.BadRequestError):
        openai_client.chat.completions.create(
            model=MODEL, messages=ask("x"), stream_options={"include_usage": True}
        )
    bad_key = OpenAI(base_url=simulator.base_url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as auth:
        bad_key.chat.completions.create(model=MODEL, messages=ask("x"))
    assert auth.value.code == "invalid_api_key"
    with pytest.raises(openai.NotFoundError):
        openai_client.get("/no/such/route", cast_to=object)


def test_reject_stream_options_like_a_relay() -> None:
    with start_simulator(reject_stream_options=True) as sim:
        client = OpenAI(base_url=sim.base_url, api_key="anything", max_retries=0)
        with pytest.raises(openai.BadRequestError) as error:
            stream_text(
                client, model=MODEL, messages=ask("x"), stream_options={"include_usage": True}
            )
        assert error.value.param == "stream_options"  # type: ignore[attr-defined]
        pieces, _ = stream_text(client, model=MODEL, messages=ask("x"))
        assert pieces


def test_async_client_many_concurrent_streams(simulator) -> None:  # type: ignore[no-untyped-def]
    async def one(client: AsyncOpenAI, index: int) -> str:
        stream = await client.chat.completions.create(
            model=MODEL, messages=ask(f"question {index % 5}"), stream=True
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def main() -> list[str]:
        async with AsyncOpenAI(
            base_url=simulator.base_url, api_key=simulator.api_key, max_retries=0
        ) as client:
            return await asyncio.gather(*(one(client, i) for i in range(50)))

    answers = asyncio.run(main())
    assert all(answers[i] == answers[i % 5] for i in range(50))
    assert len(set(answers)) == 5


def test_stats_log_arrivals(openai_client: OpenAI, simulator) -> None:  # type: ignore[no-untyped-def]
    simulator.reset()
    openai_client.chat.completions.create(model=MODEL, messages=ask("count me"))
    stats = simulator.stats()
    assert stats["counters"]["chat.requests"] == 1
    assert [entry["model"] for entry in stats["chat_requests"]] == [MODEL]
    assert stats["chat_requests"][0]["stream"] is False
