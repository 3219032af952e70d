"""WebSocket fuzzing (issue 8, item 2): dozens of clients at once send malformed frames to a real
uvicorn; each frame gets the documented answer, a well-behaved pair keeps chatting, and nothing
leaks.

Frames come from a seeded generator (`random.Random`; the seed of a failing client is in the
message), each with its expected answer built in: an `error` with the documented code and the
`ref` echoed when it was a string or an integer (docs/protocol.md §3, §7), a reply for the few
valid ones, or the documented close code (§8) for the frame that ends a client. Fuzzed frames
that would reach the database are left out on purpose: they would test the pool, not the
parser. Flooders (message.send past the rate: `rate_limited`, then close 4429) and a calm pair
(acks and message.new, with their latency) run at the same time.

Answers on one connection come in frame order (frames are handled one at a time), so a client
pipelines its whole script and matches the replies one by one. A frame that closes the socket
(over 64 KiB: 1009; invalid UTF-8: 1007) goes last, once every earlier reply is in: the protocol
layer closes at once and would drop replies still queued.

Leaks are measured around a second round, after a warm-up round of the same shape: the hub's
counters back to zero, the event loop's tasks and uvicorn's connections back to the baseline,
no `Connection` or uvicorn protocol object alive, no ERROR logged but uvicorn's note on invalid
UTF-8, and the process RSS, gc-tracked objects and interpreter memory blocks (the server runs
in this process) within a tolerance.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import random
import statistics
import string
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from chat_service.realtime.connection import Connection
from chat_service.server import ABORT_STUCK_AFTER_S
from tests.conftest import LiveServer, LiveServerFactory
from tests.frame_schemas import validate_server_frame
from tests.helpers import API, bearer, signup

pytestmark = pytest.mark.backend_independent(suite="sqlite")  # see tests/conftest.py

log = logging.getLogger(__name__)

FRAME_LIMIT = 64 * 1024
TIMEOUT_S = 10.0
FUZZ_USERS = 9
SOCKETS_PER_FUZZ_USER = 3  # 27 fuzzing sockets at a time
WAVES = 2  # each fuzzing socket is a slot that connects, fuzzes and ends WAVES times
GARBAGE_FLOODERS = 2  # of those, pipelining many more frames
FLOOD_USERS = 3  # one socket each: the message rate is per user
FLOOD_FRAMES = 150
# A low message rate for the whole server: a flooder then needs fewer commits before its
# refusals start, so even a loaded machine refuses more than 50 sends within 10 s.
MESSAGE_RATE_PER_S, FLOOD_BURST = 2, 4  # 4 sends per 2 s
CASES_PER_CLIENT = (15, 40)
GARBAGE_FLOOD_CASES = 250
CALM_INTERVAL_S = 0.55  # under MESSAGE_RATE_PER_S
# Seen here after the warm-up round (~2400 frames, ~60 connections a round): RSS +0.1..1.5 MiB,
# gc objects -150..+550, memory blocks +300..+1100. A leak of one 64 KiB frame per connection,
# of one object per frame, or of two blocks (a string and its holder) per frame goes past these.
RSS_TOLERANCE_KIB = 8 * 1024
OBJECT_TOLERANCE = 2_000  # gc-tracked objects
BLOCK_TOLERANCE = 4_000  # sys.getallocatedblocks()
TASK_SLACK = 2

ABSENT: Any = object()  # no `ref` in the answer
SEVEN = ("join", "leave", "message.send", "typing", "read", "ping", "auth.refresh")

Json = dict[str, Any]


# --- the cases ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One client frame and its documented answer."""

    kind: str
    data: str | bytes | list[str]  # a list is one text message sent as fragments
    reply: str  # "error", "pong", "left", or "close"
    code: str | int | None = None  # the error code, or the close code
    ref: Any = ABSENT
    as_text: bool = False  # bytes sent in a text frame (invalid UTF-8)

    def preview(self) -> str:
        shown = self.data if isinstance(self.data, str | bytes) else "".join(self.data)
        return f"{self.kind} {shown[:120]!r}{'...' if len(shown) > 120 else ''}"


def random_text(rng: random.Random, size: int, alphabet: str = string.printable) -> str:
    return "".join(rng.choice(alphabet) for _ in range(size))


def unicode_text(rng: random.Random, size: int) -> str:
    pool = string.ascii_letters + "éßж中🙂\u200b\u00a0\\\"'\n\t"
    return random_text(rng, size, pool)


def dumps(rng: random.Random, frame: Json) -> str:
    return json.dumps(frame, ensure_ascii=rng.random() < 0.5)


def pick_ref(rng: random.Random) -> tuple[Any, Any, bool]:
    """(the ref to put in the frame or ABSENT, the ref the answer must echo, whether the ref
    itself makes the frame invalid)."""
    roll = rng.random()
    if roll < 0.25:
        return ABSENT, ABSENT, False
    if roll < 0.45:
        value: Any = rng.choice([0, -1, 2**63 - 1, -(2**63), 2**64 - 1, rng.randint(1, 10**6)])
        return value, value, False
    if roll < 0.7:
        value = unicode_text(rng, rng.randint(0, 30))
        return value, value, False
    if roll < 0.75:
        return None, ABSENT, False  # null is "no ref"
    # Not a string or an integer: never echoed, and it makes the frame invalid. (Booleans are
    # left to test_a_boolean_ref_is_not_echoed_as_a_number.)
    value = rng.choice([1.5, 2**64, -(2**63) - 1, 10**30, [], [1], {}, {"id": 1}])
    return value, ABSENT, True


def with_ref(frame: Json, ref: Any) -> Json:
    return frame if ref is ABSENT else {**frame, "ref": ref}


def room_id(rng: random.Random) -> str:
    return "r-" + random_text(rng, rng.randint(1, 20), string.ascii_letters + string.digits)


def valid_frame(rng: random.Random, frame_type: str) -> Json:
    """A frame of `frame_type` whose fields are valid (before any mutation)."""
    fields: dict[str, Json] = {
        "join": {"room_id": room_id(rng), "since_seq": rng.randint(0, 100), "limit": 10},
        "leave": {"room_id": room_id(rng)},
        "message.send": {
            "room_id": room_id(rng),
            "body": unicode_text(rng, rng.randint(1, 50)).strip() or "x",
            "client_id": f"c-{rng.getrandbits(64):x}",
        },
        "typing": {"room_id": room_id(rng)},
        "read": {"room_id": room_id(rng), "seq": rng.randint(0, 100)},
        "ping": {},
        "auth.refresh": {"access_token": "not." + random_text(rng, 20, string.ascii_letters)},
    }
    return {"type": frame_type, **fields[frame_type]}


STRING_FIELDS = {"room_id", "body", "client_id", "access_token"}
REQUIRED = {
    "join": ["room_id"],
    "leave": ["room_id"],
    "message.send": ["room_id", "body", "client_id"],
    "typing": ["room_id"],
    "read": ["room_id", "seq"],
    "ping": [],
    "auth.refresh": ["access_token"],
}
WRONG_FOR_STRING = [5, 5.5, True, False, None, [], ["r"], {}, {"id": "r"}]
WRONG_FOR_INT = ["5", 5.0, 1.5, True, [], {}, -1, 2**64, 2**62 + 1, -(2**63), 1e300]
OUT_OF_RANGE: dict[str, list[Any]] = {
    "room_id": ["", "x" * 65],
    "client_id": ["", "has space", "x" * 65, "é", "tab\there"],
    "body": ["", "   ", "\n\t "],
    "access_token": ["x" * 4097],
    "limit": [0, 201, -5, 10**6],
}


def gen_invalid_fields(rng: random.Random) -> Case:
    """One of the seven types, with a field missing, of the wrong type, out of range, or extra;
    or a body over MESSAGE_MAX_CHARS (too_large)."""
    frame_type = rng.choice(SEVEN)
    frame = valid_frame(rng, frame_type)
    fields = [k for k in frame if k != "type"]
    choices = ["extra"]
    if REQUIRED[frame_type]:
        choices.append("missing")
    if fields:
        choices += ["wrong", "wrong"]
    if set(fields) & set(OUT_OF_RANGE):
        choices.append("range")
    if frame_type == "message.send":
        choices.append("too_large")
    mutation = rng.choice(choices)
    code = "invalid_frame"
    if mutation == "extra":
        frame["x_" + random_text(rng, 5, string.ascii_lowercase)] = rng.choice([1, "a", None, []])
    elif mutation == "missing":
        del frame[rng.choice(REQUIRED[frame_type])]
    elif mutation == "wrong":
        name = rng.choice(fields)
        frame[name] = rng.choice(WRONG_FOR_STRING if name in STRING_FIELDS else WRONG_FOR_INT)
    elif mutation == "range":
        name = rng.choice(sorted(set(fields) & set(OUT_OF_RANGE)))
        frame[name] = rng.choice(OUT_OF_RANGE[name])
    else:
        frame["body"] = "b" * rng.randint(4001, 12000)
        code = "too_large"
    ref, echoed, bad_ref = pick_ref(rng)
    return Case(
        f"{frame_type}:{mutation}",
        dumps(rng, with_ref(frame, ref)),
        "error",
        "invalid_frame" if bad_ref else code,
        echoed,
    )


def gen_bad_json(rng: random.Random) -> Case:
    """Text that is not JSON (or that the parser refuses: numbers beyond a double, nesting
    beyond 1024 levels, lone surrogates): invalid_json, and no ref (it could not be read)."""
    frame = with_ref(valid_frame(rng, rng.choice(SEVEN)), "r1")
    text = dumps(rng, frame)
    candidates: list[Callable[[], str]] = [
        lambda: text[: rng.randint(1, len(text) - 1)],  # truncated
        lambda: rng.choice("<'#}]),:;") + random_text(rng, rng.randint(0, 60)),
        lambda: text.replace('"', "'"),
        lambda: text[:-1] + ",}",
        lambda: '{type: "ping"}',
        lambda: "",
        lambda: " " * rng.randint(1, 10),
        lambda: "\ufeff" + text,
        lambda: '{"type": "ping", "ref": NaN}',
        lambda: '{"type": "read", "room_id": "r", "seq": 1e400}',
        lambda: "[" * 10_000 + "]" * 10_000,
        lambda: '{"a":' * 5000 + "1" + "}" * 5000,
        lambda: '{"type": "ping", "ref": "\\ud800"}',
        lambda: text + text,
        lambda: "x" * rng.randint(60_000, FRAME_LIMIT - 10),  # near the size limit
    ]
    return Case("bad_json", rng.choice(candidates)(), "error", "invalid_json")


def gen_not_an_object(rng: random.Random) -> Case:
    value = rng.choice(
        [[], [{"type": "ping"}], 5, -1.5, "ping", '{"type": "ping"}', None, True, False, 2**70]
    )
    return Case("not_an_object", json.dumps(value), "error", "invalid_frame")


def gen_bad_type(rng: random.Random) -> Case:
    """`type` missing or not a string: invalid_frame, with the ref when it was valid."""
    frame = valid_frame(rng, rng.choice(SEVEN))
    ref, echoed, _ = pick_ref(rng)
    if rng.random() < 0.3:
        del frame["type"]
    else:
        frame["type"] = rng.choice([5, None, True, ["ping"], {"t": "ping"}, 1.5])
    return Case("bad_type", dumps(rng, with_ref(frame, ref)), "error", "invalid_frame", echoed)


def gen_unknown_type(rng: random.Random) -> Case:
    """`type` a string but not one of the seven: unknown_type, with the ref when it was valid
    (the type is looked up before the fields are checked)."""
    name = rng.choice(
        [
            "PING",
            "Join",
            "message.sent",
            "message",
            "hello",
            "error",
            "ping ",
            "",
            "\x01",
            unicode_text(rng, rng.randint(1, 40)),
        ]
    )
    if name in SEVEN:
        name += "!"
    ref, echoed, _ = pick_ref(rng)  # a bad ref is not echoed, but the type is looked up first
    frame = with_ref({"type": name, "room_id": room_id(rng)}, ref)
    return Case("unknown_type", dumps(rng, frame), "error", "unknown_type", echoed)


def gen_nul(rng: random.Random) -> Case:
    """A NUL in a frame: escaped (\\u0000), it is refused before the type is even looked at
    (invalid_frame, ref echoed: Postgres cannot store one); raw, the text is not JSON."""
    frame = valid_frame(rng, rng.choice(SEVEN))
    ref, echoed, _ = pick_ref(rng)
    frame = with_ref(frame, ref)
    where = rng.choice([k for k, v in frame.items() if isinstance(v, str)] + ["x_\x00"])
    if where.startswith("x_"):
        frame[where] = 1
    else:
        cut = rng.randint(0, len(frame[where]))
        frame[where] = frame[where][:cut] + "\x00" + frame[where][cut:]
        if where == "ref":
            echoed = frame["ref"]
    text = dumps(rng, frame)
    assert "\\u0000" in text
    if rng.random() < 0.2:  # a raw control character inside a string is not JSON
        return Case("nul_raw", text.replace("\\u0000", "\x00"), "error", "invalid_json")
    return Case("nul", text, "error", "invalid_frame", echoed)


def gen_deep(rng: random.Random) -> Case:
    """Deep nesting within the parser's depth: an unknown field (invalid_frame, ref echoed)
    or a nested ref (invalid_frame, not echoed)."""
    depth = rng.randint(100, 1000)
    nested = "[" * depth + "]" * depth
    if rng.random() < 0.5:
        text = f'{{"type": "ping", "ref": "deep", "nested": {nested}}}'
        return Case("deep_field", text, "error", "invalid_frame", "deep")
    return Case("deep_ref", f'{{"type": "ping", "ref": {nested}}}', "error", "invalid_frame")


def gen_binary(rng: random.Random) -> Case:
    """Binary frames get invalid_frame (unread, so no ref), whatever they hold."""
    data = rng.choice(
        [
            b"",
            json.dumps({"type": "ping", "ref": "bin"}).encode(),
            rng.randbytes(rng.randint(1, 2000)),
            b"\xff\xfe\x00",
        ]
    )
    return Case("binary", data, "error", "invalid_frame")


def gen_valid(rng: random.Random) -> Case:
    """Well-formed frames mixed in, answered without touching the database."""
    ref, echoed, bad_ref = pick_ref(rng)
    if bad_ref:
        ref, echoed = "v", "v"
    roll = rng.random()
    if roll < 0.3:
        return Case("ping", dumps(rng, with_ref({"type": "ping"}, ref)), "pong", None, echoed)
    if roll < 0.45:  # a fragmented message is one frame to the application
        text = dumps(rng, with_ref({"type": "ping"}, ref))
        cut = rng.randint(1, len(text) - 1)
        return Case("ping_fragments", [text[:cut], text[cut:]], "pong", None, echoed)
    if roll < 0.6:
        frame = with_ref({"type": "leave", "room_id": room_id(rng)}, ref)
        return Case("leave", dumps(rng, frame), "left", None, echoed)
    if roll < 0.8:  # a room not joined on this connection
        frame = with_ref({"type": "typing", "room_id": room_id(rng)}, ref)
        return Case("typing_unjoined", dumps(rng, frame), "error", "forbidden", echoed)
    frame = with_ref(valid_frame(rng, "auth.refresh"), ref)
    return Case("auth_refresh_garbage", dumps(rng, frame), "error", "forbidden", echoed)


GENERATORS: list[tuple[Callable[[random.Random], Case], int]] = [
    (gen_invalid_fields, 30),
    (gen_bad_json, 15),
    (gen_not_an_object, 5),
    (gen_bad_type, 8),
    (gen_unknown_type, 10),
    (gen_deep, 4),
    (gen_nul, 4),
    (gen_binary, 8),
    (gen_valid, 20),
]


def gen_case(rng: random.Random) -> Case:
    generator = rng.choices([g for g, _ in GENERATORS], [w for _, w in GENERATORS])[0]
    return generator(rng)


def gen_terminal(rng: random.Random) -> Case | None:
    """How the client ends: a normal close (None), or a frame the documented close code ends."""
    roll = rng.random()
    if roll < 0.4:
        return None
    if roll < 0.55:
        text = '{"type": "ping", "ref": "' + "x" * rng.randint(FRAME_LIMIT, 2 * FRAME_LIMIT) + '"}'
        return Case("oversize_text", text, "close", 1009)
    if roll < 0.65:
        return Case("oversize_binary", rng.randbytes(FRAME_LIMIT + 1), "close", 1009)
    if roll < 0.8:
        parts = ["x" * (FRAME_LIMIT // 3)] * 4  # each fragment small, the message too big
        return Case("oversize_fragments", parts, "close", 1009)
    # RFC 6455 §8.1: a text frame that is not UTF-8 fails the connection with 1007.
    bad = rng.choice([b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xe2\x82"])
    data = b'{"type": "ping", "ref": "' + bad + b'"}'
    return Case("invalid_utf8", data, "close", 1007, as_text=True)


# --- clients ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Account:
    id: str
    token: str


async def new_account(http: httpx.AsyncClient, name: str) -> Account:
    body = await signup(http, name)
    return Account(body["user"]["id"], body["access_token"])


async def open_socket(live: LiveServer, account: Account) -> ClientConnection:
    ws = await connect(
        f"{live.ws}/ws",
        additional_headers=bearer(account.token),
        open_timeout=TIMEOUT_S,
        close_timeout=3,
        ping_interval=None,
        compression=None,
        max_size=None,
    )
    hello = await recv_json(ws)
    assert hello["type"] == "hello", hello
    return ws


async def recv_json(ws: ClientConnection, within: float = TIMEOUT_S) -> Json:
    raw = await asyncio.wait_for(ws.recv(), within)
    assert isinstance(raw, str), f"the server sent a binary frame: {raw!r}"
    frame: Json = json.loads(raw)
    validate_server_frame(frame)  # every answer matches asyncapi.yaml
    return frame


async def send_case(ws: ClientConnection, case: Case) -> None:
    if isinstance(case.data, list):
        await ws.send(case.data)  # an iterable: one message, in fragments
    elif case.as_text:
        await ws.send(case.data, text=True)  # bytes in a text frame, unchecked
    else:
        await ws.send(case.data)


def mismatch(case: Case, frame: Json) -> str | None:
    """Why `frame` is not the documented answer to `case` (None when it is)."""
    if frame.get("type") != case.reply:
        return f"expected {case.reply} {case.code or ''}, got {frame}"
    if case.reply == "error" and frame.get("code") != case.code:
        return f"expected error {case.code}, got {frame}"
    if case.reply == "error" and not frame.get("detail"):
        return f"an error without detail: {frame}"
    if frame.get("ref", ABSENT) != case.ref:
        expected = "no ref" if case.ref is ABSENT else f"ref {case.ref!r}"
        return f"expected {expected}, got {frame}"
    return None


async def fuzz_client(ws: ClientConnection, seed: int, count: int) -> list[str]:
    """Pipeline `count` generated frames, match every answer in order, then end the way the
    generator says. Returns what went wrong, each naming the seed and the frame."""
    rng = random.Random(seed)
    cases = [gen_case(rng) for _ in range(count)]
    terminal = gen_terminal(rng)
    failures: list[str] = []

    async def send_all() -> None:
        for case in cases:
            await send_case(ws, case)

    async def read_all() -> None:
        for case in cases:
            frame = await recv_json(ws)
            problem = mismatch(case, frame)
            if problem:
                failures.append(f"seed {seed}: {case.preview()}: {problem}")

    try:
        await asyncio.gather(send_all(), read_all())
        if terminal is None:
            await ws.send(json.dumps({"type": "ping", "ref": "last"}))
            frame = await recv_json(ws)
            assert frame == {"type": "pong", "ref": "last"}, frame
            await ws.close()
        else:
            with contextlib.suppress(ConnectionClosed):  # the server may close mid-message
                await send_case(ws, terminal)
            failures += await expect_close(ws, terminal, seed)
    except (AssertionError, TimeoutError, ConnectionClosed) as exc:
        failures.append(f"seed {seed}: {exc!r}")
    return failures


async def expect_close(ws: ClientConnection, case: Case, seed: int) -> list[str]:
    try:
        frame = await recv_json(ws)
    except ConnectionClosed as exc:
        if exc.rcvd is None or exc.rcvd.code != case.code:
            return [f"seed {seed}: {case.preview()}: expected close {case.code}, got {exc!r}"]
        return []
    return [f"seed {seed}: {case.preview()}: expected close {case.code}, got {frame}"]


@dataclass
class Flood:
    frames: list[tuple[float, Json]] = field(default_factory=list)  # (when received, frame)
    close: tuple[int, str] | None = None


async def flood_client(ws: ClientConnection, room: str, tag: str) -> Flood:
    """Send FLOOD_FRAMES message.send as fast as possible; read until the server closes the
    socket, or until every frame has its reply."""
    result = Flood()

    async def read() -> None:
        with contextlib.suppress(ConnectionClosed):
            while len(result.frames) < FLOOD_FRAMES:
                result.frames.append((time.monotonic(), await recv_json(ws)))
        if ws.protocol.close_rcvd is not None:
            result.close = (ws.protocol.close_rcvd.code, ws.protocol.close_rcvd.reason)

    reader = asyncio.create_task(read())
    with contextlib.suppress(ConnectionClosed):
        for n in range(FLOOD_FRAMES):
            frame = {"type": "message.send", "room_id": room, "body": f"flood {n}"}
            await ws.send(json.dumps({**frame, "client_id": f"{tag}-{n}", "ref": n}))
    await asyncio.wait_for(reader, TIMEOUT_S * 3)
    return result


def flood_problems(flood: Flood, tag: str) -> list[str]:
    """Documented (§7, §8, §9): acks while within the rate, then `rate_limited` (with its ref
    and retry_after) for each send over it, and close 4429 "back off 30 s" once more than 50
    sends were refused within 10 s. That last rule depends on how fast the server gets through
    the flood, so it is judged by the client's clock, with a second of slack either way."""
    frames = [frame for _, frame in flood.frames]
    kinds = [(f["type"], f.get("code")) for f in frames]
    refused_at = [at for at, f in flood.frames if f.get("code") == "rate_limited"]
    problems = []
    if kinds[:FLOOD_BURST] != [("ack", None)] * FLOOD_BURST:
        problems.append(f"{tag}: the burst was not acked first: {kinds[: FLOOD_BURST + 2]}")
    if set(kinds) - {("ack", None), ("error", "rate_limited")}:
        problems.append(f"{tag}: unexpected frames {set(kinds)}")
    if [f.get("ref") for f in frames] != list(range(len(frames))):
        problems.append(f"{tag}: replies out of order or without their ref")
    for frame in frames:
        if frame["type"] == "error" and not (
            isinstance(frame.get("retry_after"), int) and frame["retry_after"] >= 1
        ):
            problems.append(f"{tag}: rate_limited without retry_after: {frame}")
    fast = any(refused_at[n + 50] - refused_at[n] < 9 for n in range(len(refused_at) - 50))
    if flood.close is not None:
        if flood.close[0] != 4429 or "back off 30 s" not in flood.close[1]:
            problems.append(f"{tag}: expected close 4429 'back off 30 s', got {flood.close}")
        slow = all(refused_at[n + 49] - refused_at[n] > 11 for n in range(len(refused_at) - 49))
        if len(refused_at) < 50 or slow:
            problems.append(f"{tag}: closed after {len(refused_at)} refusals: too early")
    elif fast:
        problems.append(f"{tag}: over 50 refusals within 10 s and no close")
    return problems


@dataclass
class Chat:
    ack_ms: list[float] = field(default_factory=list)
    delivery_ms: list[float] = field(default_factory=list)
    seqs: list[int] = field(default_factory=list)


async def calm_chat(
    sender: ClientConnection,
    listener: ClientConnection,
    room: str,
    tag: str,
    until: asyncio.Event,
    minimum: int = 3,
) -> Chat:
    """One message every CALM_INTERVAL_S while `until` is unset: each must be acked, and reach
    the listener (and the sender's own socket) as message.new, in seq order."""
    chat = Chat()
    sent_at: dict[str, float] = {}
    received: asyncio.Queue[Json] = asyncio.Queue()

    async def listen() -> None:
        while True:
            frame = await recv_json(listener, within=3600)
            if frame["type"] == "message.new":
                await received.put(frame)

    listening = asyncio.create_task(listen())
    try:
        n = 0
        while not until.is_set() or n < minimum:
            client_id = f"{tag}-{n}"
            frame = {"type": "message.send", "room_id": room, "body": f"calm {n}"}
            sent_at[client_id] = time.perf_counter()
            await sender.send(json.dumps({**frame, "client_id": client_id, "ref": n}))
            ack = await next_of(sender, "ack")
            chat.ack_ms.append((time.perf_counter() - sent_at[client_id]) * 1000)
            assert (ack["ref"], ack["client_id"]) == (n, client_id), ack
            own = await next_of(sender, "message.new")
            assert own["message"] == ack["message"], own
            event = await asyncio.wait_for(received.get(), TIMEOUT_S)
            chat.delivery_ms.append((time.perf_counter() - sent_at[client_id]) * 1000)
            assert event["message"] == ack["message"], event
            chat.seqs.append(ack["message"]["seq"])
            n += 1
            await asyncio.sleep(CALM_INTERVAL_S)
    finally:
        listening.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listening
    return chat


async def next_of(ws: ClientConnection, frame_type: str) -> Json:
    while True:
        frame = await recv_json(ws)
        if frame["type"] == frame_type:
            return frame
        assert frame["type"] == "presence", f"expected {frame_type}, got {frame}"


# --- the rounds ---------------------------------------------------------------------------------


@dataclass
class Cast:
    fuzzers: list[Account]
    flooders: list[Account]
    calm: Account
    listener: Account
    calm_room: str
    flood_room: str


async def make_cast(live: LiveServer) -> Cast:
    async with httpx.AsyncClient(base_url=live.http, timeout=30) as http:
        fuzzers = [await new_account(http, f"fuzz{n}") for n in range(FUZZ_USERS)]
        flooders = [await new_account(http, f"flood{n}") for n in range(FLOOD_USERS)]
        calm, listener = await new_account(http, "calm"), await new_account(http, "listener")
        rooms = []
        for name, members in (("calm", [listener]), ("flood", flooders)):
            response = await http.post(
                f"{API}/rooms", json={"name": name}, headers=bearer(calm.token)
            )
            assert response.status_code == 201, response.text
            rooms.append(response.json()["id"])
            for member in members:
                joined = await http.post(
                    f"{API}/rooms/{rooms[-1]}/join", headers=bearer(member.token)
                )
                assert joined.status_code == 200, joined.text
    return Cast(fuzzers, flooders, calm, listener, rooms[0], rooms[1])


@dataclass
class RoundResult:
    failures: list[str]
    calm: Chat
    frames_sent: int
    seconds: float


def script_length(slot: int) -> int:
    if slot < GARBAGE_FLOODERS:
        return GARBAGE_FLOOD_CASES
    return random.Random(slot).randint(*CASES_PER_CLIENT)


async def fuzz_slot(live: LiveServer, account: Account, seed: int, count: int) -> list[str]:
    """WAVES sessions one after the other: connect, fuzz, end (so sockets also churn)."""
    failures = []
    for wave in range(WAVES):
        ws = await open_socket(live, account)
        try:
            failures += await fuzz_client(ws, seed * 10 + wave, count)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 3)
    return failures


async def calm_pair(live: LiveServer, cast: Cast) -> tuple[ClientConnection, ClientConnection]:
    sockets = await open_socket(live, cast.calm), await open_socket(live, cast.listener)
    for ws in sockets:
        await ws.send(json.dumps({"type": "join", "room_id": cast.calm_room, "limit": 1}))
        await next_of(ws, "joined")
    return sockets


async def quiet_chat(live: LiveServer, cast: Cast) -> Chat:
    """The calm pair alone: the latency to compare with."""
    calm_ws, listener_ws = await calm_pair(live, cast)
    quiet = asyncio.Event()
    quiet.set()
    try:
        return await calm_chat(calm_ws, listener_ws, cast.calm_room, "quiet", quiet, minimum=5)
    finally:
        for ws in (calm_ws, listener_ws):
            await ws.close()


async def fuzz_round(live: LiveServer, cast: Cast, round_no: int) -> RoundResult:
    """Fuzzing slots and flooders all at once, while the calm pair chats."""
    started = time.monotonic()
    calm_ws, listener_ws = await calm_pair(live, cast)
    slots = [user for user in cast.fuzzers for _ in range(SOCKETS_PER_FUZZ_USER)]
    flood_sockets = await asyncio.gather(*(open_socket(live, user) for user in cast.flooders))
    done = asyncio.Event()
    calm = asyncio.create_task(
        calm_chat(calm_ws, listener_ws, cast.calm_room, f"calm{round_no}", done)
    )
    try:
        fuzzed, floods = await asyncio.gather(
            asyncio.gather(
                *(
                    fuzz_slot(live, user, seed=round_no * 1000 + n, count=script_length(n))
                    for n, user in enumerate(slots)
                )
            ),
            asyncio.gather(
                *(
                    flood_client(ws, cast.flood_room, f"flood{round_no}-{n}")
                    for n, ws in enumerate(flood_sockets)
                )
            ),
        )
    except BaseException:
        calm.cancel()
        raise
    finally:
        done.set()
    chat = await asyncio.wait_for(calm, TIMEOUT_S * 2)
    failures = [problem for slot in fuzzed for problem in slot]
    for n, flood in enumerate(floods):
        failures += flood_problems(flood, f"flooder {n}")
    for ws in (*flood_sockets, calm_ws, listener_ws):
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.close(), 3)
    log.info(
        "round %d: %.1f s; floods (replies, close): %s",
        round_no,
        time.monotonic() - started,
        [(len(flood.frames), flood.close) for flood in floods],
    )
    frames = WAVES * sum(script_length(n) for n in range(len(slots)))
    return RoundResult(failures, chat, frames, time.monotonic() - started)


# --- leak measures ------------------------------------------------------------------------------


def rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


def heap() -> tuple[int, int]:
    """(gc-tracked objects, memory blocks the interpreter holds: strings and bytes too)."""
    gc.collect()
    return len(gc.get_objects()), sys.getallocatedblocks()


def alive(kind: type) -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if isinstance(obj, kind))


async def settle(condition: Callable[[], bool], what: Callable[[], str], wait_s: float = 5) -> None:
    deadline = time.monotonic() + wait_s
    while not condition():
        assert time.monotonic() < deadline, f"not back within {wait_s} s: {what()}"
        await asyncio.sleep(0.05)


async def quiesce(live: LiveServer) -> None:
    """Everything of a round is gone: hub counters at zero, uvicorn's connections closed, and
    no connection object left, ours or uvicorn's (the server keeps each of its protocol objects
    for ABORT_STUCK_AFTER_S after the app is done, in case the peer stopped reading)."""
    hub = live.app.state.hub
    await settle(lambda: all(v == 0 for v in hub.stats().values()), lambda: str(hub.stats()))
    state = live.server.server_state
    await settle(lambda: not state.connections, lambda: f"{len(state.connections)} connections")
    assert alive(Connection) == 0
    await settle(
        lambda: alive(WebSocketsSansIOProtocol) == 0,
        lambda: f"{alive(WebSocketsSansIOProtocol)} uvicorn websocket protocols",
        wait_s=ABORT_STUCK_AFTER_S + 5,
    )


# --- tests --------------------------------------------------------------------------------------


class ErrorLog(logging.Filter):
    """What the server logs at ERROR, kept as text; the traceback is then cut off the record.
    (A traceback holds the frames it came through, and so the connection: a kept record, as
    pytest's log capture keeps them, would keep that connection alive and look like a leak.)"""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            trace = logging.Formatter().formatException(record.exc_info) if record.exc_info else ""
            self.lines.append(f"{record.name}: {record.getMessage()}\n{trace}".strip())
            record.exc_info = record.exc_text = None
        return True


@pytest.fixture
def server_errors() -> Iterator[ErrorLog]:
    """The server's ERROR records, as text. Below WARNING nothing is logged meanwhile: pytest
    keeps every record, which would blur the memory measures (hundreds per round)."""
    errors = ErrorLog()
    loggers = [logging.getLogger(name) for name in ("uvicorn", "chat_service", "httpx")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addFilter(errors)
        logger.setLevel(logging.WARNING)
    logging.getLogger("uvicorn.error").addFilter(errors)
    yield errors
    logging.getLogger("uvicorn.error").removeFilter(errors)
    for logger, level in zip(loggers, levels, strict=True):
        logger.removeFilter(errors)
        logger.setLevel(level)


@pytest.fixture
async def fuzz_server(live_server_factory: LiveServerFactory) -> LiveServer:
    return await live_server_factory(
        signup_ip_limit="1000/hour",
        message_rate_per_s=MESSAGE_RATE_PER_S,
        message_burst=FLOOD_BURST,
    )


async def test_fuzzed_frames_get_documented_answers_and_leave_nothing_behind(
    fuzz_server: LiveServer, server_errors: ErrorLog
) -> None:
    live = fuzz_server
    cast = await make_cast(live)
    quiet = await quiet_chat(live, cast)
    warm_up = await fuzz_round(live, cast, round_no=1)
    assert warm_up.failures == [], "\n".join(warm_up.failures[:40])
    await quiesce(live)
    baseline_tasks = len(asyncio.all_tasks())
    baseline_rss, baseline_heap = rss_kib(), heap()
    measured = await fuzz_round(live, cast, round_no=2)
    assert measured.failures == [], "\n".join(measured.failures[:40])
    await quiesce(live)
    await settle(
        lambda: len(asyncio.all_tasks()) <= baseline_tasks + TASK_SLACK,
        lambda: f"{len(asyncio.all_tasks())} tasks, baseline {baseline_tasks}",
    )
    object_growth, block_growth = (
        now - then for now, then in zip(heap(), baseline_heap, strict=True)
    )
    # No crash anywhere, and no ERROR line for any bad input (invalid UTF-8 included: uvicorn
    # would log each with a traceback; server.py closes 1007 quietly).
    assert server_errors.lines == [], "\n".join(server_errors.lines[:5])
    rss_growth = rss_kib() - baseline_rss

    # Every calm message was acked and delivered, none lost, in one unbroken seq run.
    seqs = quiet.seqs + warm_up.calm.seqs + measured.calm.seqs
    assert seqs == list(range(1, len(seqs) + 1)), seqs
    assert min(len(warm_up.calm.seqs), len(measured.calm.seqs)) >= 3
    log.info(
        "fuzz: %d + %d frames in %.1f s + %.1f s; calm ack ms median %.1f max %.1f, "
        "delivery ms median %.1f max %.1f (%d messages; alone: ack median %.1f max %.1f); "
        "tasks %d (baseline %d); RSS growth %d KiB; Python objects %+d, blocks %+d",
        warm_up.frames_sent,
        measured.frames_sent,
        warm_up.seconds,
        measured.seconds,
        statistics.median(measured.calm.ack_ms),
        max(measured.calm.ack_ms),
        statistics.median(measured.calm.delivery_ms),
        max(measured.calm.delivery_ms),
        len(measured.calm.seqs),
        statistics.median(quiet.ack_ms),
        max(quiet.ack_ms),
        len(asyncio.all_tasks()),
        baseline_tasks,
        rss_growth,
        object_growth,
        block_growth,
    )
    assert object_growth < OBJECT_TOLERANCE, f"{object_growth} more Python objects"
    assert block_growth < BLOCK_TOLERANCE, f"{block_growth} more memory blocks"
    assert rss_growth < RSS_TOLERANCE_KIB, f"RSS grew {rss_growth} KiB"


def test_the_generator_covers_every_kind_and_its_oracle_is_right() -> None:
    """The generator, checked against itself: every kind of case comes up within a round's
    worth of seeds, and the answers it expects follow the documented rules."""
    kinds: set[str] = set()
    codes: set[Any] = set()
    for seed in range(120):
        rng = random.Random(seed)
        for _ in range(40):
            case = gen_case(rng)
            kinds.add(case.kind.split(":")[0])
            codes.add(case.code)
            if case.kind in ("bad_json", "binary", "not_an_object", "nul_raw"):
                assert case.ref is ABSENT, case
        terminal = gen_terminal(rng)
        if terminal is not None:
            kinds.add(terminal.kind)
            codes.add(terminal.code)
    assert {"bad_json", "binary", "unknown_type", "bad_type", "deep_field", "deep_ref"} <= kinds
    assert {"nul", "nul_raw"} <= kinds
    assert {"oversize_text", "oversize_binary", "oversize_fragments", "invalid_utf8"} <= kinds
    assert set(SEVEN) <= kinds | {"ping"}
    expected_codes = {"invalid_json", "invalid_frame", "unknown_type", "too_large", "forbidden"}
    assert expected_codes | {1009, 1007} <= codes


async def test_a_boolean_ref_is_not_echoed_as_a_number(fuzz_server: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=fuzz_server.http) as http:
        account = await new_account(http, "boolref")
    ws = await open_socket(fuzz_server, account)
    try:
        for ref in (True, False):
            await ws.send(json.dumps({"type": "ping", "ref": ref}))
            frame = await recv_json(ws)
            assert (frame["type"], frame["code"]) == ("error", "invalid_frame"), frame
            assert "ref" not in frame or frame["ref"] is ref, frame
    finally:
        await ws.close()


async def test_a_flood_of_sends_to_a_room_not_mine_is_rate_limited(
    fuzz_server: LiveServer,
) -> None:
    async with httpx.AsyncClient(base_url=fuzz_server.http) as http:
        account = await new_account(http, "outsider")
    ws = await open_socket(fuzz_server, account)
    try:
        codes = []
        for n in range(30):
            frame = {"type": "message.send", "room_id": "no-such-room", "body": "x"}
            await ws.send(json.dumps({**frame, "client_id": f"c{n}"}))
            codes.append((await recv_json(ws))["code"])
        assert codes[:FLOOD_BURST] == ["not_found"] * FLOOD_BURST, codes
        assert "rate_limited" in codes, codes
    finally:
        await ws.close()
