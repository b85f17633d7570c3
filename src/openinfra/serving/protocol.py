"""The prefill worker's wire protocol: length-prefixed JSON frames over loopback TCP.

A frame is a 4-byte big-endian unsigned length ``n`` (1 <= n <= :data:`MAX_FRAME` bytes) then
``n`` bytes of UTF-8 JSON holding one object. Requests and replies (one reply per request, in
order, on the same connection)::

    {"op": "ping"}                                   -> {"ok": true, "pid": 1234}
    {"op": "prefill", "id": "req-1", "prompt": [..], "temperature": 0.0}
        -> {"ok": true, "id": "req-1", "first_token": 17, "n_prompt_tokens": 70,
            "keys": ["<hex>", ...], "partial": true, "reused_tokens": 64, "prefill_s": 0.012}
    anything malformed                               -> {"ok": false, "id": <id or null>, "error": "..."}

``keys`` are the block-store keys of the prompt's pages in order (hex of 32 bytes); ``partial``
says the last one is the request's own partial page. A frame whose length is out of bounds gets an
error reply and the connection is closed (the stream cannot be resynchronized); any other bad
frame gets an error reply and the connection stays usable.
"""

from __future__ import annotations

import json
import socket
import struct

__all__ = ["MAX_FRAME", "MAX_ID_CHARS", "ProtocolError", "FrameTooLarge", "send_frame", "recv_frame",
           "validate_prefill", "validate_prefill_reply"]

MAX_FRAME = 8 << 20  # bytes: a 256k-token prompt as JSON is ~2 MiB
MAX_ID_CHARS = 128
_LEN = struct.Struct(">I")


class ProtocolError(ValueError):
    """A frame or message that breaks the protocol (the message names what)."""


class FrameTooLarge(ProtocolError):
    """A length prefix out of bounds: the rest of the stream cannot be trusted."""


def send_frame(sock: socket.socket, obj: dict) -> None:
    body = json.dumps(obj, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise FrameTooLarge(f"frame of {len(body)} bytes exceeds MAX_FRAME={MAX_FRAME}")
    sock.sendall(_LEN.pack(len(body)) + body)


def _recv_exact(sock: socket.socket, n: int, what: str) -> bytes:
    buf = bytearray()
    while len(buf) < n:  # bounded: each recv returns >= 1 byte or ends the loop
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError(f"connection closed by peer while reading {what} ({len(buf)} of {n} bytes)")
        buf += chunk
    return bytes(buf)


def recv_frame(sock: socket.socket, body_timeout_s: float | None = None) -> dict | None:
    """The next frame's object; None on a clean close before a frame starts. Waits for the frame to
    start as long as the socket's timeout allows; once it has started, the rest must arrive within
    ``body_timeout_s`` seconds per read when given (a peer that stalls mid-frame cannot hold a
    reader forever). Raises :class:`FrameTooLarge` (bad length), :class:`ProtocolError` (not a JSON
    object), ``ConnectionError`` (closed mid-frame) or ``TimeoutError``."""
    first = sock.recv(_LEN.size)
    if not first:
        return None
    if body_timeout_s is not None:
        sock.settimeout(body_timeout_s)
    head = first + (_recv_exact(sock, _LEN.size - len(first), "the frame length") if len(first) < _LEN.size else b"")
    (n,) = _LEN.unpack(head)
    if not 1 <= n <= MAX_FRAME:
        raise FrameTooLarge(f"frame length {n} is outside 1..{MAX_FRAME} bytes")
    body = _recv_exact(sock, n, "the frame body")
    try:
        obj = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"frame is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"frame must hold a JSON object, got {type(obj).__name__}")
    return obj


def validate_prefill(msg: dict, vocab_size: int, max_prompt: int) -> tuple[str, list[int], float]:
    """``(id, prompt, temperature)`` of a prefill request, or ProtocolError naming the bad field."""
    rid = msg.get("id")
    if not isinstance(rid, str) or not 1 <= len(rid) <= MAX_ID_CHARS:
        raise ProtocolError(f"'id' must be a string of 1..{MAX_ID_CHARS} characters")
    prompt = msg.get("prompt")
    if not isinstance(prompt, list) or not 1 <= len(prompt) <= max_prompt:
        raise ProtocolError(f"'prompt' must be a list of 1..{max_prompt} token ids")
    if any(type(t) is not int or not 0 <= t < vocab_size for t in prompt):
        raise ProtocolError(f"'prompt' token ids must be ints in [0, {vocab_size})")
    temperature = msg.get("temperature", 0.0)
    if type(temperature) not in (int, float) or not 0.0 <= temperature <= 100.0:
        raise ProtocolError("'temperature' must be a number in [0, 100]")
    return rid, prompt, float(temperature)


def validate_prefill_reply(msg: dict, rid: str, n_prompt: int, page_size: int) -> dict:
    """Check a worker's prefill reply for request ``rid`` (``n_prompt`` tokens) field by field;
    returns it with ``keys`` as bytes. ProtocolError names what is wrong (a worker bug or version
    mismatch, never silently decoded)."""
    if not msg.get("ok"):
        raise ProtocolError(f"prefill worker refused request {rid!r}: {msg.get('error', 'no error message')}")
    if msg.get("id") != rid:
        raise ProtocolError(f"prefill reply is for request {msg.get('id')!r}, expected {rid!r}")
    keys = msg.get("keys")
    n_pages = -(-n_prompt // page_size)
    if not isinstance(keys, list) or len(keys) != n_pages or not all(isinstance(k, str) and len(k) == 64 for k in keys):
        raise ProtocolError(f"prefill reply for {rid!r}: 'keys' must be {n_pages} hex keys of 32 bytes")
    for name, kind in (("first_token", int), ("n_prompt_tokens", int), ("reused_tokens", int),
                       ("prefill_s", (int, float)), ("partial", bool)):
        if not isinstance(msg.get(name), kind):
            raise ProtocolError(f"prefill reply for {rid!r}: '{name}' missing or not {kind}")
    if msg["n_prompt_tokens"] != n_prompt:
        raise ProtocolError(f"prefill reply for {rid!r}: n_prompt_tokens {msg['n_prompt_tokens']} != {n_prompt}")
    try:
        msg["keys"] = [bytes.fromhex(k) for k in keys]
    except ValueError:
        raise ProtocolError(f"prefill reply for {rid!r}: 'keys' are not hex") from None
    return msg
