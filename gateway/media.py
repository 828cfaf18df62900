"""Media parts of chat messages (images, audio, video, files): the per-model policy.

Owns the content-part types a message may carry, whether a model takes media at all
(`ModelSpec.media.accept`: none / data / https), the checks of every media URL after
parsing (scheme, credentials, port, host against the model's list, the address it names
or resolves to), and the size cap of inline `data:` payloads. A worker such as vLLM
fetches the URLs it is given from its own network position; a URL that passed here can
only lead to a listed public host. It does not bound how many parts a request carries
(`gateway.bounds`).

Limit: the worker resolves the host again when it fetches; a listed host whose DNS an
attacker controls could rebind between the two look-ups. List only hosts you control.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from typing import Any
from urllib.parse import urlsplit

from engines.errors import InvalidRequest
from engines.spec import MediaSpec

TEXT_PARTS = frozenset({"text", "refusal"})
# part type → the key of its URL object (None: inline data only)
MEDIA_PARTS: dict[str, str | None] = {
    "image_url": "image_url",
    "video_url": "video_url",  # vLLM extension
    "audio_url": "audio_url",  # vLLM extension
    "input_audio": None,
    "file": None,
}
_MIME_PREFIX = {"image_url": "image/", "video_url": "video/", "audio_url": "audio/"}
_HOSTNAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,62}\.)*[a-z0-9-]{1,63}$")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_URL_MAX = 8192


def _bad(message: str, param: str) -> InvalidRequest:
    return InvalidRequest(message, param=param, code="invalid_media")


def public_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True for a globally routable unicast address. IPv4 embedded in IPv6 (mapped
    `::ffff:a.b.c.d`, NAT64 `64:ff9b::a.b.c.d`, 6to4) is judged by the IPv4 inside."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip in _NAT64:
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        elif ip.sixtofour is not None:
            ip = ip.sixtofour
        elif ip.teredo is not None:
            return False
    return bool(ip.is_global) and not ip.is_multicast


def _host_listed(host: str, hosts: list[str]) -> bool:
    for h in hosts:
        h = h.lower()
        if h.startswith("*."):
            if host.endswith(h[1:]) and host != h[2:]:
                return True
        elif host == h:
            return True
    return False


def _data_size(payload: str) -> int:
    """Decoded bytes of a base64 payload, without decoding it."""
    n = len(payload) - payload.count("=")
    return n * 3 // 4


def _check_data_url(url: str, kind: str, policy: MediaSpec, param: str) -> None:
    head, sep, payload = url[5:].partition(",")
    if not sep or not head.endswith(";base64"):
        raise _bad("A data: URL must be base64 encoded (data:<type>;base64,...).", param)
    mime = head[: -len(";base64")].lower()
    want = _MIME_PREFIX.get(kind)
    if want is not None and not mime.startswith(want):
        raise _bad(f"A {kind} data: URL must have a {want}* media type.", param)
    size = _data_size(payload)
    if size > policy.max_data_bytes:
        raise _bad(
            f"The inline payload is {size} bytes; at most {policy.max_data_bytes} allowed.", param
        )


def check_url(url: Any, kind: str, policy: MediaSpec, param: str) -> str | None:
    """Refuse a media URL the policy does not allow. Returns the host name still to
    resolve (`check_hosts`), or None when nothing is left to check."""
    if not isinstance(url, str) or not url:
        raise _bad("The media URL must be a non-empty string.", param)
    if url[:5].lower() == "data:":
        _check_data_url(url, kind, policy, param)
        return None
    if policy.accept != "https":
        raise _bad("This model accepts media only as inline data: URLs.", param)
    if len(url) > _URL_MAX or not url.isascii() or any(c in url for c in " \t\r\n\\"):
        raise _bad("The media URL is malformed.", param)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise _bad("The media URL is malformed.", param) from None
    if parts.scheme != "https":
        raise _bad("Media URLs must use https (or be inline data: URLs).", param)
    if parts.username is not None or parts.password is not None:
        raise _bad("Media URLs must not carry credentials.", param)
    if port not in (None, 443):
        raise _bad("Media URLs must use the default https port.", param)
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise _bad("The media URL has no host.", param)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is None and not _HOSTNAME.match(host):
        raise _bad("The media URL's host is malformed.", param)
    if not _host_listed(host, policy.hosts):
        raise _bad("The media URL's host is not on this model's list of media hosts.", param)
    if ip is not None:
        if not policy.allow_private and not public_address(ip):
            raise _bad("The media URL names a non-public address.", param)
        return None
    return host


def check_inline(part: dict[str, Any], kind: str, policy: MediaSpec, param: str) -> None:
    """`input_audio` (base64 `data`) and `file` (`file_data`) parts."""
    if kind == "input_audio":
        audio = part.get("input_audio")
        data = audio.get("data") if isinstance(audio, dict) else None
        if not isinstance(data, str):
            raise _bad("'input_audio.data' must be a base64 string.", param)
        size = _data_size(data)
    else:
        file = part.get("file")
        if not isinstance(file, dict):
            raise _bad("'file' must be an object.", param)
        if file.get("file_id") is not None:
            raise _bad("File references (file_id) are not supported; send file_data.", param)
        data = file.get("file_data")
        if not isinstance(data, str):
            raise _bad("'file.file_data' must be a string.", param)
        if data[:5].lower() == "data:":
            data = data.partition(",")[2]
        size = _data_size(data)
    if size > policy.max_data_bytes:
        raise _bad(
            f"The inline payload is {size} bytes; at most {policy.max_data_bytes} allowed.", param
        )


def check_part(part: Any, param: str, policy: MediaSpec, model: str, hosts: dict[str, str]) -> None:
    """One content part of a chat message; host names left to resolve go into `hosts`."""
    if not isinstance(part, dict):
        raise InvalidRequest("A content part must be an object.", param=param)
    kind = part.get("type")
    if kind in TEXT_PARTS:
        return
    if kind not in MEDIA_PARTS:
        raise InvalidRequest(
            f"Content part type {kind!r} is not supported."
            if isinstance(kind, str) and len(kind) <= 64
            else "Content part type is not supported.",
            param=f"{param}.type",
            code="invalid_media",
        )
    if policy.accept == "none":
        raise InvalidRequest(
            f"The model `{model}` does not accept {kind} content parts.",
            param=param,
            code="invalid_media",
        )
    key = MEDIA_PARTS[kind]
    if key is None:
        check_inline(part, kind, policy, param)
        return
    obj = part.get(key)
    url = obj.get("url") if isinstance(obj, dict) else obj
    host = check_url(url, kind, policy, f"{param}.{key}.url")
    if host is not None:
        hosts.setdefault(host, f"{param}.{key}.url")


async def check_hosts(hosts: dict[str, str], policy: MediaSpec) -> None:
    """Resolve each media host (host → the param of its first URL); refuse if any
    address it has is not public."""
    if policy.allow_private:
        return
    loop = asyncio.get_running_loop()
    for host, param in hosts.items():
        try:
            infos = await loop.getaddrinfo(host, 443, type=socket.SOCK_STREAM)
        except OSError:
            raise _bad("The media URL's host could not be resolved.", param) from None
        for info in infos:
            addr = str(info[4][0]).split("%", 1)[0]
            if not public_address(ipaddress.ip_address(addr)):
                raise _bad("The media URL's host resolves to a non-public address.", param)
