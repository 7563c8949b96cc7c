"""Fault injection on chat completions: configured rules, runtime changes, a request header."""

from __future__ import annotations

import json
import time

import openai
import pytest
from openai import OpenAI

from simulator.config import FaultRule, SimulatorConfig
from tests.fixtures.simulator import start_simulator

MODEL = "gpt-4.1-mini"


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def chat(client: OpenAI, text: str = "hello", **kwargs: object):  # type: ignore[no-untyped-def]
    return client.chat.completions.create(model=MODEL, messages=ask(text), **kwargs)  # type: ignore[call-overload]


def stream(client: OpenAI, text: str = "hello", **kwargs: object) -> list[str]:
    pieces = []
    for chunk in chat(client, text, stream=True, **kwargs):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    return pieces


def test_429_with_retry_after(openai_client: OpenAI, simulator) -> None:  # type: ignore[no-untyped-def]
    simulator.set_faults([{"status": 429, "retry_after_s": 7}])
    with pytest.raises(openai.RateLimitError) as error:
        chat(openai_client)
    assert error.value.response.headers["retry-after"] == "7"
    assert error.value.status_code == 429


@pytest.mark.parametrize("status", [500, 503])
def test_server_errors(openai_client: OpenAI, simulator, status: int) -> None:  # type: ignore[no-untyped-def]
    simulator.set_faults([{"status": status}])
    with pytest.raises(openai.InternalServerError) as error:
        chat(openai_client, stream=True)
    assert error.value.status_code == status


def test_first_k_then_sdk_retry_succeeds(simulator) -> None:  # type: ignore[no-untyped-def]
    simulator.set_faults([{"status": 429, "retry_after_s": 0.05, "first": 2}])
    retrying = OpenAI(base_url=simulator.base_url, api_key=simulator.api_key, max_retries=2)
    reply = chat(retrying, "retry me")
    assert reply.choices[0].message.content
    assert simulator.stats()["counters"]["faults.status.429"] == 2


def test_match_targets_one_request(openai_client: OpenAI, simulator) -> None:  # type: ignore[no-untyped-def]
    simulator.set_faults([FaultRule(match="POISON", status=500)])
    assert chat(openai_client, "a normal question").choices[0].message.content
    with pytest.raises(openai.InternalServerError):
        chat(openai_client, "this one is POISON")
    # Only the last user message counts.
    messages = [
        {"role": "user", "content": "POISON"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "fine"},
    ]
    assert openai_client.chat.completions.create(model=MODEL, messages=messages)  # type: ignore[arg-type]


def test_probability_is_a_deterministic_share(openai_client: OpenAI, simulator) -> None:  # type: ignore[no-untyped-def]
    def outcomes() -> list[bool]:
        simulator.set_faults([{"status": 503, "probability": 0.3}])
        result = []
        for _ in range(40):
            try:
                chat(openai_client, max_tokens=1)
                result.append(True)
            except openai.InternalServerError:
                result.append(False)
        return result

    first, second = outcomes(), outcomes()
    assert first == second
    assert 4 <= first.count(False) <= 20


def test_header_faults_apply_to_one_request(openai_client: OpenAI) -> None:
    header = {"X-Sim-Faults": json.dumps({"status": 429, "retry_after_s": 1})}
    with pytest.raises(openai.RateLimitError):
        chat(openai_client, extra_headers=header)
    assert chat(openai_client).choices[0].message.content
    with pytest.raises(openai.BadRequestError):
        chat(openai_client, extra_headers={"X-Sim-Faults": "{not json"})


def test_ttft_and_chunk_delay(openai_client: OpenAI) -> None:
    # 50 ms between chunks, not 10: on a busy box (test modules run in parallel) this process
    # may read the first chunk some tens of ms late, and the later ones then arrive bunched.
    header = {"X-Sim-Faults": json.dumps({"ttft_ms": 300, "chunk_delay_ms": 50})}
    started = time.monotonic()
    arrivals = []
    for chunk in chat(openai_client, stream=True, max_tokens=10, extra_headers=header):
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic() - started)
    assert arrivals[0] >= 0.3
    # The server cannot send the tenth chunk before 0.3 + 9 x 0.05 s; measured from the start,
    # not from the first arrival, which a busy box may read late (the gap then shrinks).
    assert arrivals[-1] >= 0.3 + 9 * 0.05 * 0.95
    started = time.monotonic()
    chat(openai_client, max_tokens=10, extra_headers=header)  # plain: ttft + delays, then all
    assert time.monotonic() - started >= 0.3 + 9 * 0.05


def test_stream_cut_drops_connection(openai_client: OpenAI, simulator) -> None:  # type: ignore[no-untyped-def]
    simulator.set_faults([{"match": "cut me", "cut_after": 3}])
    pieces: list[str] = []
    with pytest.raises((openai.APIConnectionError, openai.APIError)):
        for chunk in chat(openai_client, "cut me", stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
    assert len(pieces) == 3
    assert simulator.stats()["counters"]["faults.cut"] == 1
    assert len(stream(openai_client, "not cut")) >= 20  # the server is fine afterwards


def test_stream_stall_hits_client_timeout(simulator) -> None:  # type: ignore[no-untyped-def]
    client = OpenAI(
        base_url=simulator.base_url, api_key=simulator.api_key, max_retries=0, timeout=0.5
    )
    header = {"X-Sim-Faults": json.dumps({"stall_after": 2, "stall_s": 3})}
    pieces: list[str] = []
    started = time.monotonic()
    with pytest.raises((openai.APITimeoutError, openai.APIConnectionError)):
        for chunk in chat(client, stream=True, extra_headers=header):
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
    assert len(pieces) == 2
    assert time.monotonic() - started < 2.5
    # A patient client gets the whole answer after the stall.
    header = {"X-Sim-Faults": json.dumps({"stall_after": 2, "stall_s": 0.3})}
    patient = OpenAI(base_url=simulator.base_url, api_key=simulator.api_key, max_retries=0)
    assert stream(patient, extra_headers=header) == stream(patient)


def test_runtime_config_and_reset(openai_client: OpenAI, simulator) -> None:  # type: ignore[no-untyped-def]
    config = simulator.configure(answer_tokens=[3, 3])
    assert config["answer_tokens"] == [3, 3]
    assert len(stream(openai_client, "short")) == 3
    simulator.reset()
    assert len(stream(openai_client, "short")) >= 20


def test_startup_faults_from_config_file_and_key(tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = SimulatorConfig(
        api_key="sk-own", faults=[FaultRule(model="gpt-4.1", status=503, first=1)]
    )
    path = tmp_path / "sim.json"
    path.write_text(config.model_dump_json())
    assert SimulatorConfig.from_file(path) == config
    with start_simulator(**config.model_dump()) as sim:
        client = OpenAI(base_url=sim.base_url, api_key="sk-own", max_retries=0)
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="gpt-4.1", messages=ask("x"))  # type: ignore[arg-type]
        assert client.chat.completions.create(model="gpt-4.1", messages=ask("x"))  # type: ignore[arg-type]
        with pytest.raises(openai.AuthenticationError):
            OpenAI(base_url=sim.base_url, api_key="sk-other", max_retries=0).models.list()


@pytest.mark.unit
def test_cli_options_override_config_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from simulator.__main__ import parse_args

    path = tmp_path / "sim.json"
    path.write_text(SimulatorConfig(ttft_ms=5, api_key="a").model_dump_json())
    config, host, port = parse_args(
        [
            "--config",
            str(path),
            "--api-key",
            "b",
            "--port",
            "9",
            "--no-batch-api",
            "--time-scale",
            "50",
            "--chunk-delay-ms",
            "2",
        ]
    )
    assert (config.api_key, config.ttft_ms, config.chunk_delay_ms) == ("b", 5, 2)
    assert config.no_batch_api and config.time_scale == 50 and port == 9 and host == "127.0.0.1"
