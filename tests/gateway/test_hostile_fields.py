"""Hostile request bodies through the real `openai` SDK, in front of an upstream that
records every body it receives: engine-internal fields, media URLs aimed at the worker's
network, and oversized lists and maps are refused (400 with `param`) or dropped, and the
upstream never sees them."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from engines.spec import MediaSpec
from gateway import allowlist
from gateway.media import _host_listed, public_address
from tests.conftest import ServerThread, start_gateway
from tests.recording_upstream import RecordingUpstream

CHAT = [{"role": "user", "content": "hi"}]
PNG = "data:image/png;base64," + "iVBORw0KGgo" * 8
PUBLIC_IP = "93.184.216.34"


@pytest.fixture(scope="module")
def gw(
    upstream: RecordingUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerThread]:
    ep = [upstream.url]
    models = [
        {"name": "strict", "engine": "openai", "endpoints": ep},
        {
            "name": "lenient",
            "engine": "openai",
            "endpoints": ep,
            "request_fields": {
                "allow_extra": ["top_k", "min_p", "repetition_penalty", "guided_json"],
                "unknown": "drop",
            },
            "media": {"accept": "data", "max_data_bytes": 2048},
        },
        {
            "name": "vision",
            "engine": "openai",
            "endpoints": ep,
            "media": {
                "accept": "https",
                "hosts": ["localhost", PUBLIC_IP, "127.0.0.1", "10.0.0.5", "*.example.org"],
            },
        },
        {"name": "embed", "engine": "openai", "endpoints": ep, "task": "embed"},
    ]
    server = start_gateway(models, tmp_path_factory.mktemp("hostile"))
    yield server
    server.stop()


@pytest.fixture
def client(gw: ServerThread, upstream: RecordingUpstream) -> Iterator[openai.OpenAI]:
    upstream.clear()
    with openai.OpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0) as c:
        yield c


def _refused(call: Any, param: str) -> dict[str, Any]:
    with pytest.raises(openai.BadRequestError) as info:
        call()
    err = info.value.response.json()["error"]
    assert err["param"] == param, err
    assert err["type"] == "invalid_request_error"
    return dict(err)


# --------------------------------------------------------------------------- the allowlist


def test_field_lists_cover_the_sdk() -> None:
    """Every field the official SDK can send is on the route's list (a new SDK field
    fails here, not silently in production)."""
    from openai.types import completion_create_params as comp
    from openai.types import embedding_create_params as emb
    from openai.types.chat import chat_completion_stream_options_param as so
    from openai.types.chat import completion_create_params as chat

    chat_fields = set(chat.CompletionCreateParamsBase.__annotations__) | {"stream"}
    assert chat_fields <= allowlist.CHAT_FIELDS
    comp_fields = set(comp.CompletionCreateParamsBase.__annotations__) | {"stream"}
    assert comp_fields <= allowlist.COMPLETION_FIELDS
    assert set(emb.EmbeddingCreateParams.__annotations__) <= allowlist.EMBEDDING_FIELDS
    assert set(so.ChatCompletionStreamOptionsParam.__annotations__) <= (
        allowlist.STREAM_OPTION_FIELDS
    )


HOSTILE_FIELDS: list[tuple[str, Any]] = [
    ("chat_template", "{{ ''.__class__.__mro__[1].__subclasses__() }}"),
    ("chat_template_kwargs", {"enable_thinking": True}),
    ("prompt_embeds", "gASVAAAAAAAAAA=="),
    ("guided_decoding_backend", "outlines"),
    ("mm_processor_kwargs", {"num_crops": 10**9}),
    ("api_base", "http://169.254.169.254/"),
    ("base_url", "http://169.254.169.254/"),
    ("logits_processors", ["os.system"]),
    ("kv_transfer_params", {"remote_host": "10.0.0.1"}),
    ("vllm_xargs", {"a": 1}),
    ("top_k", 5),  # an engine extension the strict model has not turned on
    ("some_future_field", 1),
]


@pytest.mark.parametrize(("field", "value"), HOSTILE_FIELDS)
def test_unknown_fields_refused_on_every_route(
    client: openai.OpenAI, upstream: RecordingUpstream, field: str, value: Any
) -> None:
    extra = {field: value}
    err = _refused(
        lambda: client.chat.completions.create(
            model="strict",
            messages=CHAT,  # type: ignore[arg-type]
            extra_body=extra,
        ),
        field,
    )
    assert field in err["message"]
    _refused(lambda: client.completions.create(model="strict", prompt="x", extra_body=extra), field)
    _refused(lambda: client.embeddings.create(model="embed", input="x", extra_body=extra), field)
    # Streamed requests are screened the same way.
    _refused(
        lambda: client.chat.completions.create(
            model="strict",
            messages=CHAT,  # type: ignore[arg-type]
            stream=True,
            extra_body=extra,
        ),
        field,
    )
    assert upstream.bodies == []


def test_nested_unknown_fields_refused(client: openai.OpenAI, upstream: RecordingUpstream) -> None:
    _refused(
        lambda: client.chat.completions.create(
            model="strict",
            messages=[{"role": "user", "content": "hi", "chat_template": "{{x}}"}],  # type: ignore[list-item, misc]
        ),
        "messages[0].chat_template",
    )
    _refused(
        lambda: client.chat.completions.create(
            model="strict",
            messages=CHAT,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True, "evil": 1},  # type: ignore[typeddict-unknown-key]
        ),
        "stream_options.evil",
    )
    assert upstream.bodies == []


def test_client_cache_salt_is_stripped(client: openai.OpenAI, upstream: RecordingUpstream) -> None:
    """The gateway sets cache_salt (per tenant, later); a client's never arrives."""
    out = client.chat.completions.create(
        model="strict",
        messages=CHAT,  # type: ignore[arg-type]
        extra_body={"cache_salt": "attacker-chosen-domain"},
    )
    assert out.choices[0].message.content == "ok"
    [(path, body)] = upstream.bodies
    assert path == "/v1/chat/completions"
    assert "cache_salt" not in body


def test_drop_policy_forwards_only_allowed_extensions(
    client: openai.OpenAI, upstream: RecordingUpstream
) -> None:
    out = client.chat.completions.create(
        model="lenient",
        messages=[{"role": "user", "content": "hi", "weird": 1}],  # type: ignore[list-item, misc]
        temperature=0.5,
        extra_body={
            "top_k": 5,
            "min_p": 0.1,
            "chat_template": "{{x}}",
            "prompt_embeds": "AAAA",
            "cache_salt": "mine",
            "nonsense": [1, 2],
        },
    )
    assert out.choices[0].message.content == "ok"
    [(_, body)] = upstream.bodies
    assert body["top_k"] == 5 and body["min_p"] == 0.1 and body["temperature"] == 0.5
    for gone in ("chat_template", "prompt_embeds", "cache_salt", "nonsense"):
        assert gone not in body
    assert body["messages"] == [{"role": "user", "content": "hi"}]
    upstream.clear()
    client.completions.create(model="lenient", prompt="x", extra_body={"api_base": "http://x"})
    [(_, body)] = upstream.bodies
    assert "api_base" not in body and body["prompt"] == "x"


def test_allowed_extension_is_bounded(client: openai.OpenAI, upstream: RecordingUpstream) -> None:
    deep: Any = {"type": "string"}
    for _ in range(40):
        deep = {"type": "object", "properties": {"a": deep}}
    _refused(
        lambda: client.chat.completions.create(
            model="lenient",
            messages=CHAT,  # type: ignore[arg-type]
            extra_body={"guided_json": deep},
        ),
        "guided_json",
    )
    assert upstream.bodies == []


# --------------------------------------------------------------------------- media


def _image(url: str, kind: str = "image_url") -> list[dict[str, Any]]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is this"},
                {"type": kind, kind: {"url": url}},
            ],
        }
    ]


def _chat(client: openai.OpenAI, model: str, messages: Any) -> Any:
    return client.chat.completions.create(model=model, messages=messages)


def test_text_model_refuses_every_media_part(
    client: openai.OpenAI, upstream: RecordingUpstream
) -> None:
    param = "messages[0].content[1]"
    _refused(lambda: _chat(client, "strict", _image(PNG)), param)
    _refused(lambda: _chat(client, "strict", _image(f"https://{PUBLIC_IP}/a.png")), param)
    audio = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "x"},
                {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
            ],
        }
    ]
    _refused(lambda: _chat(client, "strict", audio), param)
    file = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "x"},
                {"type": "file", "file": {"file_data": "data:application/pdf;base64,AAAA"}},
            ],
        }
    ]
    _refused(lambda: _chat(client, "strict", file), param)
    assert upstream.bodies == []


@pytest.mark.parametrize(
    ("url", "kind", "why"),
    [
        (f"https://{PUBLIC_IP}/a.png", "image_url", "only as inline data"),
        ("data:image/png;base64," + "A" * 4000, "image_url", "at most 2048"),
        ("data:text/html;base64,PGh0bWw+", "image_url", "image/"),
        ("data:image/png,rawbytes", "image_url", "base64"),
        ("file:///etc/passwd", "image_url", "only as inline data"),
    ],
)
def test_data_only_model(
    client: openai.OpenAI, upstream: RecordingUpstream, url: str, kind: str, why: str
) -> None:
    err = _refused(
        lambda: _chat(client, "lenient", _image(url, kind)), "messages[0].content[1].image_url.url"
    )
    assert why in err["message"]
    assert upstream.bodies == []


def test_data_only_model_accepts_a_small_inline_image(
    client: openai.OpenAI, upstream: RecordingUpstream
) -> None:
    _chat(client, "lenient", _image(PNG))
    [(_, body)] = upstream.bodies
    assert body["messages"][0]["content"][1]["image_url"]["url"] == PNG


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("file:///etc/passwd", "image_url"),
        ("gopher://127.0.0.1:6379/_FLUSHALL", "image_url"),
        (f"http://{PUBLIC_IP}/a.png", "image_url"),
        ("ftp://example.org/a.png", "image_url"),
        ("https://127.0.0.1/a.png", "image_url"),  # listed, but loopback
        ("https://10.0.0.5/a.png", "image_url"),  # listed, but private
        ("https://[::1]/a.png", "image_url"),
        ("https://[::ffff:127.0.0.1]/a.png", "image_url"),
        ("https://[::ffff:7f00:1]/a.png", "image_url"),
        ("https://169.254.169.254/latest/meta-data/", "image_url"),
        ("https://localhost/a.png", "image_url"),  # listed, resolves to loopback
        ("https://evil.example.com/a.png", "image_url"),  # not listed
        (f"https://user:pw@{PUBLIC_IP}/a.png", "image_url"),
        (f"https://{PUBLIC_IP}:8443/a.png", "image_url"),
        (f"https://{PUBLIC_IP}\\@evil.example.com/a.png", "image_url"),
        ("https://2130706433/a.png", "image_url"),  # 127.0.0.1 as one decimal number
        ("file:///etc/passwd", "video_url"),
        ("gopher://127.0.0.1:6379/_x", "audio_url"),
        ("data:image/png;base64,AAAA", "video_url"),  # wrong media type for the part
    ],
)
def test_https_model_checks_every_url(
    client: openai.OpenAI, upstream: RecordingUpstream, url: str, kind: str
) -> None:
    _refused(
        lambda: _chat(client, "vision", _image(url, kind)), f"messages[0].content[1].{kind}.url"
    )
    assert upstream.bodies == []


def test_https_model_forwards_a_listed_public_host(
    client: openai.OpenAI, upstream: RecordingUpstream
) -> None:
    url = f"https://{PUBLIC_IP}/cat.png"
    _chat(client, "vision", _image(url))
    [(_, body)] = upstream.bodies
    assert body["messages"][0]["content"][1]["image_url"]["url"] == url


def test_unknown_part_types_refused(client: openai.OpenAI, upstream: RecordingUpstream) -> None:
    msgs = [{"role": "user", "content": [{"type": "image_embeds", "image_embeds": "AAAA"}]}]
    _refused(lambda: _chat(client, "vision", msgs), "messages[0].content[0].type")
    assert upstream.bodies == []


def test_address_judgement() -> None:
    ip = ipaddress.ip_address
    for bad in (
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "::1",
        "fe80::1",
        "fc00::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "64:ff9b::7f00:1",
        "2002:7f00:1::",
        "2001:0::1",
    ):
        assert not public_address(ip(bad)), bad
    for good in ("93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946", "::ffff:93.184.216.34"):
        assert public_address(ip(good)), good
    assert _host_listed("a.example.org", ["*.example.org"])
    assert not _host_listed("example.org", ["*.example.org"])
    assert not _host_listed("evilexample.org", ["*.example.org"])
    with pytest.raises(ValueError):
        MediaSpec(accept="https")


# --------------------------------------------------------------------------- bounds


def _deep(levels: int) -> dict[str, Any]:
    d: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        d = {"type": "object", "properties": {"x": d}}
    return d


def _tool(i: int, description: str = "", parameters: Any = None) -> dict[str, Any]:
    fn: dict[str, Any] = {"name": f"f{i}", "description": description}
    fn["parameters"] = parameters if parameters is not None else {"type": "object"}
    return {"type": "function", "function": fn}


BOUNDS: list[tuple[str, dict[str, Any], str]] = [
    ("tool count", {"tools": [_tool(i) for i in range(129)]}, "tools"),
    ("tools size", {"tools": [_tool(i, "d" * 30_000) for i in range(10)]}, "tools"),
    ("tool depth", {"tools": [_tool(0, parameters=_deep(40))]}, "tools[0].function.parameters"),
    ("functions", {"functions": [{"name": f"f{i}"} for i in range(129)]}, "functions"),
    (
        "schema depth",
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": _deep(40)},
            }
        },
        "response_format.json_schema.schema",
    ),
    ("logit_bias entries", {"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
    ("logit_bias value", {"logit_bias": {"42": 1e9}}, "logit_bias"),
    ("logit_bias key", {"logit_bias": {"abc": 1}}, "logit_bias"),
    ("metadata pairs", {"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ("metadata value", {"metadata": {"k": "v" * 600}}, "metadata"),
    ("messages", {"messages": [{"role": "user", "content": "x"}] * 2049}, "messages"),
    ("message chars", {"messages": [{"role": "user", "content": "x" * 1_000_001}]}, "messages"),
    (
        "content parts",
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}] * 257}]},
        "messages[0].content",
    ),
    (
        "tool calls",
        {
            "messages": [
                {"role": "user", "content": "x"},
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": str(i),
                            "type": "function",
                            "function": {"name": "f", "arguments": "{}"},
                        }
                        for i in range(129)
                    ],
                },
            ]
        },
        "messages[1].tool_calls",
    ),
]


@pytest.mark.parametrize(("name", "fields", "param"), BOUNDS, ids=[b[0] for b in BOUNDS])
def test_bounds_refused_before_the_worker(
    client: openai.OpenAI,
    upstream: RecordingUpstream,
    name: str,
    fields: dict[str, Any],
    param: str,
) -> None:
    kwargs: dict[str, Any] = {"model": "strict", "messages": CHAT, **fields}
    _refused(lambda: client.chat.completions.create(**kwargs), param)
    assert upstream.bodies == []


def test_completion_logit_bias_bounded(client: openai.OpenAI, upstream: RecordingUpstream) -> None:
    _refused(
        lambda: client.completions.create(model="strict", prompt="x", logit_bias={"1": 101}),
        "logit_bias",
    )
    assert upstream.bodies == []


def test_bounds_are_settings(upstream: RecordingUpstream, tmp_path: Path) -> None:
    server = start_gateway(
        [{"name": "strict", "engine": "openai", "endpoints": [upstream.url]}],
        tmp_path,
        max_messages=2,
        max_tools=1,
    )
    try:
        with openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0) as c:
            upstream.clear()
            _refused(
                lambda: c.chat.completions.create(model="strict", messages=CHAT * 3), "messages"
            )  # type: ignore[arg-type]
            _refused(
                lambda: c.chat.completions.create(
                    model="strict",
                    messages=CHAT,  # type: ignore[arg-type]
                    tools=[_tool(0), _tool(1)],  # type: ignore[list-item]
                ),
                "tools",
            )
            assert upstream.bodies == []
            c.chat.completions.create(model="strict", messages=CHAT * 2, tools=[_tool(0)])  # type: ignore[arg-type, list-item]
            assert len(upstream.bodies) == 1
    finally:
        server.stop()


# --------------------------------------------------------------------------- OpenAI's error details


def test_missing_model_is_400_param_model(gw: ServerThread, upstream: RecordingUpstream) -> None:
    upstream.clear()
    for path, body in (
        ("/v1/chat/completions", {"messages": CHAT}),
        ("/v1/completions", {"prompt": "x"}),
        ("/v1/embeddings", {"input": "x"}),
    ):
        resp = httpx.post(gw.url + path, json=body)
        assert resp.status_code == 400
        err = resp.json()["error"]
        assert err["param"] == "model" and "model" in err["message"]
    resp = httpx.post(gw.url + "/v1/chat/completions", json={"model": 7, "messages": CHAT})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "model"
    assert upstream.bodies == []


def test_max_tokens_past_the_context_is_context_length_exceeded(client: openai.OpenAI) -> None:
    err = _refused(
        lambda: client.chat.completions.create(model="strict", messages=CHAT, max_tokens=10**6),  # type: ignore[arg-type]
        "max_tokens",
    )
    assert err["code"] == "context_length_exceeded"


def test_wrong_method_is_405(gw: ServerThread) -> None:
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        for method in ("GET", "PUT", "DELETE"):
            resp = httpx.request(method, gw.url + path)
            assert resp.status_code == 405, (method, path)
            assert resp.headers["allow"] == "POST"
            assert set(resp.json()["error"]) == {"message", "type", "param", "code"}
    resp = httpx.get(gw.url + "/v1/load_lora_adapter")
    assert resp.status_code == 405
    assert "POST" in resp.headers["allow"]
    with openai.OpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0) as c:
        with pytest.raises(openai.APIStatusError) as info:
            c.get("/chat/completions", cast_to=object)
        assert info.value.status_code == 405
