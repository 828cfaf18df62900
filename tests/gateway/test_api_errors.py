"""Bad input never reaches an engine: each case answers with the OpenAI error envelope and
the status the `openai` SDK maps to its matching exception class."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import DEFAULT_MODEL, EMBED_MODEL, ServerThread

CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture
def client(embedded_gateway: ServerThread) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=f"{embedded_gateway.url}/v1", api_key="unused", max_retries=0
    ) as client:
        yield client


def _envelope(resp: httpx.Response) -> dict[str, Any]:
    body = resp.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return dict(body["error"])


def _running(server: ServerThread) -> int:
    return int(server.gateway.served.statuses()[DEFAULT_MODEL].running)


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"n": 1000}, "n"),
        ({"n": 0}, "n"),
        ({"max_tokens": 10**6}, "max_tokens"),
        ({"max_completion_tokens": 10**6}, "max_completion_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": 5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"stop": [str(i) for i in range(40)]}, "stop"),
        ({"stop": "x" * 5000}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"top_logprobs": 5}, "top_logprobs"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
def test_chat_bounds_are_400_with_param(
    client: openai.OpenAI, embedded_gateway: ServerThread, kwargs: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=DEFAULT_MODEL,
            messages=CHAT,  # type: ignore[arg-type]
            **kwargs,
        )
    err = _envelope(info.value.response)
    assert err["param"] == param
    assert err["type"] == "invalid_request_error"
    assert _running(embedded_gateway) == 0


def test_bad_messages(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=DEFAULT_MODEL, messages=[])
    assert _envelope(info.value.response)["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=DEFAULT_MODEL, messages=[{"role": "wizard", "content": "x"}]
        )  # type: ignore[list-item, misc]
    assert _envelope(info.value.response)["param"] == "messages[0].role"


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"prompt": ["a"] * 500}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": "hi", "logprobs": 50}, "logprobs"),
        ({"prompt": "hi", "n": 99}, "n"),
        ({"prompt": ["a"] * 60, "n": 16}, "n"),
    ],
)
def test_completion_bounds(client: openai.OpenAI, kwargs: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=DEFAULT_MODEL, **kwargs)
    assert _envelope(info.value.response)["param"] == param


def test_unknown_model_is_404_model_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=CHAT)  # type: ignore[arg-type]
    err = _envelope(info.value.response)
    assert err["code"] == "model_not_found"
    assert err["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-model", input="x")


def test_wrong_task_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=EMBED_MODEL, messages=CHAT)  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=DEFAULT_MODEL, input="x")


def test_embedding_bounds(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=EMBED_MODEL, input="")
    assert _envelope(info.value.response)["param"] == "input"
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=EMBED_MODEL, input=["ok"] * 5000)
    assert _envelope(info.value.response)["param"] == "input"


def test_malformed_json_and_non_object(embedded_gateway: ServerThread) -> None:
    url = f"{embedded_gateway.url}/v1/chat/completions"
    for body in (b"{not json", b"[1, 2]", b""):
        resp = httpx.post(url, content=body, headers={"content-type": "application/json"})
        assert resp.status_code == 400
        assert _envelope(resp)["code"] == "invalid_json"


def test_body_too_large_is_413(embedded_gateway: ServerThread) -> None:
    limit = embedded_gateway.gateway.settings.max_body_bytes
    big = b'{"model": "x", "prompt": "' + b"a" * (limit + 10) + b'"}'
    resp = httpx.post(f"{embedded_gateway.url}/v1/completions", content=big)
    assert resp.status_code == 413
    _envelope(resp)

    def chunks() -> Any:  # no content-length: the limit must hold while streaming in
        for _ in range(limit // 65536 + 2):
            yield b"a" * 65536

    resp = httpx.post(f"{embedded_gateway.url}/v1/completions", content=chunks())
    assert resp.status_code == 413

    # The SDK has no class of its own for 413: it raises its generic APIStatusError.
    with (
        openai.OpenAI(base_url=f"{embedded_gateway.url}/v1", api_key="x", max_retries=0) as sdk,
        pytest.raises(openai.APIStatusError) as info,
    ):
        sdk.completions.create(model=DEFAULT_MODEL, prompt="a" * (limit + 10))
    assert info.value.status_code == 413


def test_dangerous_fields_refused(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=DEFAULT_MODEL,
            messages=CHAT,  # type: ignore[arg-type]
            extra_body={"logits_processors": ["os.system"]},
        )
    assert _envelope(info.value.response)["param"] == "logits_processors"


def test_unknown_route_is_enveloped_404(embedded_gateway: ServerThread) -> None:
    resp = httpx.get(f"{embedded_gateway.url}/v1/nope")
    assert resp.status_code == 404
    _envelope(resp)


def test_errors_are_counted(embedded_gateway: ServerThread, client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=DEFAULT_MODEL, messages=CHAT, n=1000)  # type: ignore[arg-type]
    text = httpx.get(f"{embedded_gateway.url}/metrics").text
    assert 'gateway_errors_total{model="' in text
    assert 'type="invalid_request_error"' in text


def test_prompt_plus_max_tokens_past_the_context(client: openai.OpenAI) -> None:
    """OpenAI's shape (issue 8): 400, `code: context_length_exceeded`, not a silent clamp."""
    long = [{"role": "user", "content": "tell me about the sea " * 40}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=DEFAULT_MODEL, messages=long, max_tokens=2000)  # type: ignore[arg-type]
    err = _envelope(info.value.response)
    assert err["code"] == "context_length_exceeded"
    assert err["param"] == "max_tokens"
    assert "maximum context length is 2048 tokens" in err["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=DEFAULT_MODEL, messages=CHAT, max_tokens=10**6)  # type: ignore[arg-type]
    assert _envelope(info.value.response)["code"] == "context_length_exceeded"
    # Without an explicit max_tokens the model's default applies and is not an error.
    out = client.chat.completions.create(model=DEFAULT_MODEL, messages=CHAT)  # type: ignore[arg-type]
    assert out.choices[0].message.content is not None
