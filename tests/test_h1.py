"""The engine's own HTTP/1.1 for plain http:// origins (csrc/h1.c and worker.c's h1_* path),
against raw-socket servers on 127.0.0.1 that write exactly the bytes each test names: every
framing a server may use, split across reads, keep-alive and its races, broken answers, timeouts,
caps and cancellation; and beside libcurl, the same answers for the same requests."""
import json
import os
import socket
import threading
import time

import pytest

from semex import _engine


def body(text):
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": text}]}).encode()


def answer_json(text):
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()


def ok_response(payload, headers=b""):
    """An HTTP/1.1 200 with Content-Length (and any more header lines given)."""
    return (b"HTTP/1.1 200 OK\r\n" + headers + b"Content-Length: " + str(len(payload)).encode() +
            b"\r\n\r\n" + payload)


def read_request(f):
    """One request from a socket file: (head lines, body), or None at EOF."""
    head = []
    while True:
        line = f.readline()
        if not line:
            return None
        if line in (b"\r\n", b"\n"):
            break
        head.append(line.rstrip(b"\r\n").decode("latin-1"))
    length = 0
    for h in head[1:]:
        name, _, value = h.partition(":")
        if name.lower() == "content-length":
            length = int(value)
    data = f.read(length) if length else b""
    return head, data


class RawServer:
    """Accepts connections on 127.0.0.1 and runs handler(sock, f, server) on a thread each.
    Counts connections, and records request heads."""

    def __init__(self, handler):
        self.handler = handler
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1024)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1/chat/completions"
        self.connections = 0
        self.closed = 0
        self.heads = []
        self.lock = threading.Lock()
        self.stop = False
        self.threads = []
        self.accepter = threading.Thread(target=self._accept, daemon=True)
        self.accepter.start()

    def _accept(self):
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()
            self.threads.append(t)

    def _serve(self, conn):
        f = conn.makefile("rb")
        try:
            self.handler(conn, f, self)
        except (OSError, ValueError):
            pass
        finally:
            with self.lock:
                self.closed += 1
            try:
                conn.close()
            except OSError:
                pass

    def record(self, req):
        with self.lock:
            self.heads.append(req)

    def close(self):
        self.stop = True
        self.sock.close()


@pytest.fixture(autouse=True)
def own_path(monkeypatch):
    """These tests are about the own path: CI's libcurl-only run (SEMEX_HTTP=curl) must not
    turn it off here; each test that wants libcurl says own_http1=False."""
    monkeypatch.delenv("SEMEX_HTTP", raising=False)


@pytest.fixture
def raw():
    servers = []

    def make(handler):
        s = RawServer(handler)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


@pytest.fixture
def engine():
    e = _engine.Engine(max_in_flight=16)
    yield e
    e.close()


def serve_each(reply):
    """A handler answering each request on its connection with reply(request) until EOF."""
    def handler(conn, f, server):
        while True:
            req = read_request(f)
            if req is None:
                return
            server.record(req)
            conn.sendall(reply(req))
    return handler


def echo(req):
    content = json.loads(req[1])["messages"][0]["content"] if req[1] else "GET"
    return ok_response(answer_json("echo: " + content), b"Content-Type: application/json\r\n")


keepalive_echo = serve_each(echo)


def run(engine, url, bodies, headers=("Content-Type: application/json",), **kw):
    batch = engine.submit(url, list(headers), bodies, **kw)
    assert batch.wait(20), "the batch did not finish"
    return batch, batch.results()


def test_own_http1_carries_plain_http_and_answers_as_libcurl_does(raw):
    server = raw(keepalive_echo)
    bodies = [body(f"n{i}") for i in range(300)]
    seen = {}
    for own in (True, False):
        e = _engine.Engine(max_in_flight=10, own_http1=own)
        try:
            batch, _ = run(e, server.url, bodies, parse_chat=True)
            results = batch.chat_results()  # read by the worker, as it landed
            seen[own] = [(r[0], r[1], r[2], r[4], r[5]) for r in results], \
                        [r[6][0] for r in results]
            assert batch.transport == ("http1" if own else "curl")
        finally:
            e.close()
        if own:
            # kept alive: a few connections for 300 requests, not one per request
            assert server.connections <= 20, server.connections
    assert seen[True] == seen[False]
    assert seen[True][1] == [f"echo: n{i}" for i in range(300)]
    assert all(s == (_engine.OK, _engine.ERR_NONE, 200, None, 1) for s in seen[True][0])


def test_the_request_head_is_what_libcurl_would_send(raw):
    server = raw(keepalive_echo)
    heads = {}
    for own in (True, False):
        server.heads.clear()
        e = _engine.Engine(max_in_flight=1, own_http1=own)
        try:
            run(e, server.url + "?api-version=1",
                [body("é ünïcode"), None],
                headers=["Content-Type: application/json", "Authorization: Bearer sk-x",
                         "X-Custom:  spaced value"])
        finally:
            e.close()
        heads[own] = list(server.heads)
    for own in (True, False):
        (post, post_body), (get, get_body) = heads[own]
        assert post[0] == "POST /v1/chat/completions?api-version=1 HTTP/1.1"
        assert get[0] == "GET /v1/chat/completions?api-version=1 HTTP/1.1"
        assert post_body == body("é ünïcode") and get_body == b""
        fields = {h.split(":", 1)[0].lower(): h.split(":", 1)[1].strip() for h in post[1:]}
        assert fields["host"] == f"127.0.0.1:{server.port}"
        assert fields["user-agent"] == "semex/0.1"
        assert fields["accept"] == "*/*"
        assert fields["authorization"] == "Bearer sk-x"
        assert fields["x-custom"] == "spaced value"
        assert fields["content-type"] == "application/json"
        assert fields["content-length"] == str(len(post_body))
        assert "expect" not in fields
    own_fields = {h.split(":")[0].lower() for h in heads[True][0][0][1:]}
    curl_fields = {h.split(":")[0].lower() for h in heads[False][0][0][1:]}
    # the same header set; libcurl also asks for gzip, which this path does not decode
    assert curl_fields - own_fields == {"accept-encoding"} and own_fields <= curl_fields


FRAMED = answer_json("framed answer " + "x" * 300)


def framed(kind):
    payload = FRAMED
    if kind == "length":
        return ok_response(payload), True
    if kind == "chunked":
        parts = [payload[:7], payload[7:150], payload[150:]]
        out = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n".replace(
            b"gzip, ", b"")
        for i, p in enumerate(parts):
            ext = b";name=value" if i == 1 else b""
            out += format(len(p), "X").encode() + ext + b"\r\n" + p + b"\r\n"
        return out + b"0\r\nX-Trailer: t\r\n\r\n", True
    if kind == "close":
        return b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + payload, False
    if kind == "continue":
        return (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: " +
                str(len(payload)).encode() + b"\r\n\r\n" + payload), True
    if kind == "leading-crlf":
        return b"\r\n\r\n" + ok_response(payload), True
    if kind == "lf-only":
        return (b"HTTP/1.1 200 OK\nContent-Length: " + str(len(payload)).encode() + b"\n\n" +
                payload), True
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["length", "chunked", "close", "continue", "lf-only",
                                  "leading-crlf"])
@pytest.mark.parametrize("dribble", [False, True])
def test_every_framing_split_anywhere(raw, engine, kind, dribble):
    response, keep = framed(kind)

    def handler(conn, f, server):
        while True:
            req = read_request(f)
            if req is None:
                return
            if dribble:  # a byte per send: every boundary of the reader is crossed
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                for i in range(len(response)):
                    conn.sendall(response[i:i + 1])
                    if i % 97 == 0:
                        time.sleep(0.001)
            else:
                conn.sendall(response)
            if not keep:
                return

    server = raw(handler)
    n = 3 if dribble else 20
    batch, results = run(engine, server.url, [body(str(i)) for i in range(n)])
    assert batch.transport == "http1"
    for r in results:
        assert (r[0], r[2], r[3], r[4], r[5]) == (_engine.OK, 200, FRAMED, None, 1), r
    if keep and not dribble:
        assert server.connections < n


def test_an_idle_connection_the_server_closed_is_reopened_without_an_attempt(raw):
    """Each connection answers one request, then reads the next and closes without a word:
    the keep-alive race every client meets when a server times out an idle connection."""
    def handler(conn, f, server):
        req = read_request(f)
        server.record(req)
        conn.sendall(ok_response(answer_json("ok")))
        read_request(f)  # the next request on this connection: dropped

    server = raw(handler)
    e = _engine.Engine(max_in_flight=1)
    try:
        batch, results = run(e, server.url, [body(str(i)) for i in range(6)], max_retries=0)
    finally:
        e.close()
    assert [(r[0], r[5]) for r in results] == [(_engine.OK, 1)] * 6
    assert len(server.heads) == 6


def test_an_idle_connection_closed_by_the_server_is_dropped_and_replaced(raw, engine):
    """The server closes each connection right after its answer (no Connection: close): the
    idle connection's EOF is seen while nothing runs on it, so the next request opens a new
    one at once instead of failing on the old."""
    def handler(conn, f, server):
        req = read_request(f)
        server.record(req)
        conn.sendall(ok_response(answer_json("once")))

    server = raw(handler)
    for k in range(3):
        batch, results = run(engine, server.url, [body(str(k))], max_retries=0)
        assert (results[0][0], results[0][5]) == (_engine.OK, 1), results[0]
        time.sleep(0.2)  # the close reaches the idle connection
    assert server.connections == 3 and len(server.heads) == 3


def test_bytes_after_an_answer_keep_its_connection_from_being_reused(raw, engine):
    """A server that sends more than one answer's worth (a stray second response): the answer
    counts, the rest is not taken for the next request's answer."""
    server = raw(serve_each(lambda req: ok_response(answer_json("first")) +
                            ok_response(answer_json("stray"))))
    e = _engine.Engine(max_in_flight=1)
    try:
        batch, results = run(e, server.url, [body(str(i)) for i in range(4)], max_retries=0)
    finally:
        e.close()
    assert [(r[0], json.loads(r[3])["choices"][0]["message"]["content"]) for r in results] == \
        [(_engine.OK, "first")] * 4
    assert server.connections == 4


def test_a_fresh_connection_closed_without_an_answer_is_an_empty_reply_retried(raw, engine):
    def handler(conn, f, server):
        server.record(read_request(f))

    server = raw(handler)
    batch, results = run(engine, server.url, [body("x")], max_retries=2, backoff_base=0.01)
    state, kind, status, payload, error, attempts, _ = results[0]
    assert (state, kind, attempts) == (_engine.FAILED, _engine.ERR_CONNECTION, 3)
    assert "Empty reply from server" in error
    assert len(server.heads) == 3


@pytest.mark.parametrize("response, words", [
    (b"HTTP/1.1 2x0 OK\r\n\r\n", "status code"),
    (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP/1.x response"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello", "conflicting"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n", "Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 3\r\n\r\nabc", "encoded"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "chunk size"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n", "line end"),
    (b"HTTP/1.1 200 OK\r\nNo colon here\r\n\r\n", "header line"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", "outstanding read data"),
    (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n", "too long"),
])
def test_a_broken_answer_fails_its_request_with_the_reason(raw, engine, response, words):
    def handler(conn, f, server):
        read_request(f)
        conn.sendall(response)
        conn.shutdown(socket.SHUT_WR)
        f.read()

    server = raw(handler)
    batch, results = run(engine, server.url, [body("x"), body("y")], max_retries=0)
    for state, kind, status, payload, error, attempts, _ in results:
        assert state == _engine.FAILED and kind == _engine.ERR_CONNECTION, (kind, error)
        assert words in error, error


def test_a_stalled_body_times_out(raw, engine):
    release = threading.Event()

    def handler(conn, f, server):
        read_request(f)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        release.wait(10)

    server = raw(handler)
    t0 = time.monotonic()
    batch, results = run(engine, server.url, [body("x")], timeout=0.3, max_retries=0)
    release.set()
    state, kind, status, payload, error, attempts, _ = results[0]
    assert (state, kind) == (_engine.FAILED, _engine.ERR_TIMEOUT)
    assert "timed out" in error and "47 bytes received" in error, error  # head + 7 of body
    assert time.monotonic() - t0 < 5


def test_max_body_and_large_bodies_both_ways(raw, engine):
    big = b"y" * 3_000_000

    server = raw(serve_each(lambda req: ok_response(big if b"big" in req[1][:200]
                                                    else answer_json("small"))))
    huge_request = body("big" + "z" * 5_000_000)  # more than a socket buffer: partial writes
    batch, results = run(engine, server.url, [huge_request, body("small")], max_retries=0)
    assert results[0][0] == _engine.OK and results[0][3] == big
    assert results[1][0] == _engine.OK
    assert sorted(len(data) for _, data in server.heads) == \
        sorted([len(huge_request), len(body("small"))])
    batch, results = run(engine, server.url, [huge_request, body("small")], max_retries=0,
                         max_body=1_000_000)
    assert (results[0][0], results[0][1]) == (_engine.FAILED, _engine.ERR_BODY_CAP)
    assert results[1][0] == _engine.OK


def test_cancel_closes_the_connections_of_stopped_requests(raw):
    eofs = []

    def handler(conn, f, server):
        server.record(read_request(f))
        f.read()  # returns at EOF: when the engine closed its side
        with server.lock:
            eofs.append(1)

    server = raw(handler)
    e = _engine.Engine(max_in_flight=8)
    try:
        batch = e.submit(server.url, ["Content-Type: application/json"],
                         [body(str(i)) for i in range(8)])
        deadline = time.monotonic() + 5
        while len(server.heads) < 8 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(server.heads) == 8 and not eofs
        batch.cancel()
        assert batch.wait(5)
        assert [r[0] for r in batch.results()] == [_engine.CANCELLED] * 8
        deadline = time.monotonic() + 5
        while len(eofs) < 8 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(eofs) == 8
    finally:
        e.close()


def test_a_refused_connection_is_a_connection_error_as_with_libcurl():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    out = {}
    for own in (True, False):
        e = _engine.Engine(max_in_flight=4, own_http1=own)
        try:
            batch, results = run(e, f"http://127.0.0.1:{port}/v1/chat/completions",
                                 [body("x")], max_retries=1, backoff_base=0.01)
        finally:
            e.close()
        state, kind, status, payload, error, attempts, _ = results[0]
        out[own] = (state, kind, status, attempts)
        assert "connection error (Couldn't connect to server)" in error, error
        assert f"port {port}" in error
    assert out[True] == out[False] == (_engine.FAILED, _engine.ERR_CONNECTION, 0, 2)


def test_localhost_and_ipv6_literals_take_the_own_path(raw, engine):
    server = raw(keepalive_echo)
    batch, results = run(engine, f"http://localhost:{server.port}/v1/chat/completions",
                         [body("loc")])
    assert batch.transport == "http1" and results[0][0] == _engine.OK
    assert ("Host: localhost:%d" % server.port) in server.heads[-1][0]
    if socket.has_ipv6:
        six = socket.socket(socket.AF_INET6)
        try:
            six.bind(("::1", 0))
        except OSError:
            pytest.skip("no IPv6 loopback here")  # the IPv4 half above ran
        six.listen(8)
        port6 = six.getsockname()[1]

        def serve6():
            conn, _ = six.accept()
            keepalive_echo(conn, conn.makefile("rb"), server)
            conn.close()

        t = threading.Thread(target=serve6, daemon=True)
        t.start()
        batch, results = run(engine, f"http://[::1]:{port6}/v1/chat/completions", [body("six")])
        six.close()
        assert batch.transport == "http1" and results[0][0] == _engine.OK, results[0]
        assert ("Host: [::1]:%d" % port6) in server.heads[-1][0]


@pytest.mark.parametrize("url, headers, env, own, expected", [
    ("http://127.0.0.1:{p}/v1/x", [], {}, True, "http1"),
    ("HTTP://127.0.0.1:{p}/v1/x#frag", [], {}, True, "http1"),
    ("http://127.0.0.1:{p}/v1/x", [], {}, False, "curl"),
    ("https://127.0.0.1:{p}/v1/x", [], {}, True, "curl"),
    ("http://semex-test.invalid:{p}/v1/x", [], {}, True, "curl"),
    ("http://127.1:{p}/v1/x", [], {}, True, "curl"),
    ("http://user:pw@127.0.0.1:{p}/v1/x", [], {}, True, "curl"),
    ("http://127.0.0.1:{p}/v1/../x", [], {}, True, "curl"),
    ("http://127.0.0.1:{p}/v1/a b", [], {}, True, "curl"),
    ("http://127.0.0.1:{p}/v1/x", ["Accept-Encoding: gzip"], {}, True, "curl"),
    ("http://127.0.0.1:{p}/v1/x", ["Transfer-Encoding: chunked"], {}, True, "curl"),
    ("http://127.0.0.1:{p}/v1/x", ["Accept:"], {}, True, "curl"),
    ("http://127.0.0.1:{p}/v1/x", ["X-Empty;"], {}, True, "curl"),
    ("http://127.0.0.1:{p}/v1/x", [], {"http_proxy": "http://127.0.0.1:9"}, True, "curl"),
    ("http://127.0.0.1:{p}/v1/x", [], {"ALL_PROXY": "http://127.0.0.1:9"}, True, "curl"),
    ("http://127.0.0.1:{p}/v1/x", [], {"http_proxy": "http://127.0.0.1:9", "no_proxy": "*"},
     True, "http1"),
    ("http://127.0.0.1:{p}/v1/x", [], {"http_proxy": "http://127.0.0.1:9",
                                        "no_proxy": "localhost, 127.0.0.1"}, True, "http1"),
    ("http://localhost:{p}/v1/x", [], {"http_proxy": "http://127.0.0.1:9",
                                        "NO_PROXY": "LOCALHOST:8080"}, True, "http1"),
    ("http://[::1]:{p}/v1/x", [], {"all_proxy": "http://127.0.0.1:9", "no_proxy": "[::1]"},
     True, "http1"),
    ("http://127.0.0.1:{p}/v1/x", [], {"http_proxy": "http://127.0.0.1:9",
                                        "no_proxy": "127.0.0.10,.example.com"}, True, "curl"),
    ("http://127.0.0.1:{p}/v1/x", [], {"SEMEX_HTTP": "curl"}, True, "curl"),
])
def test_which_requests_the_own_path_takes(raw, monkeypatch, url, headers, env, own, expected):
    server = raw(keepalive_echo)
    for name in ("http_proxy", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY", "SEMEX_HTTP"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    e = _engine.Engine(max_in_flight=2, own_http1=own)
    try:
        batch = e.submit(url.format(p=server.port), headers, [body("route")], max_retries=0,
                         timeout=2, connect_timeout=1)
        assert batch.transport == expected
        batch.cancel()
        batch.wait(5)
    finally:
        e.close()


def test_many_in_flight_over_many_connections(raw):
    """200 in flight, each answer delayed: as many connections open, each reused."""
    def late(req):
        time.sleep(0.05)
        return ok_response(answer_json("late"))

    server = raw(serve_each(late))
    e = _engine.Engine(max_in_flight=200)
    try:
        batch, results = run(e, server.url, [body(str(i)) for i in range(1000)])
    finally:
        e.close()
    assert [r[0] for r in results] == [_engine.OK] * 1000
    assert 150 <= server.connections <= 260, server.connections


def test_a_connection_that_never_completes_times_out_on_connect_timeout():
    """A listener whose accept queue is full and never drained: the SYN goes unanswered, as
    with a host that drops packets, and connect_timeout ends the attempt on both paths."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(0)
    port = lst.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):  # fill the accept queue (its length is backlog + 1 on Linux)
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            fillers.append(s)
        time.sleep(0.1)
        out = {}
        for own in (True, False):
            e = _engine.Engine(max_in_flight=1, own_http1=own)
            try:
                t0 = time.monotonic()
                batch, results = run(e, f"http://127.0.0.1:{port}/v1/chat/completions",
                                     [body("x")], max_retries=0, connect_timeout=0.3,
                                     timeout=10)
                took = time.monotonic() - t0
            finally:
                e.close()
            state, kind, status, payload, error, attempts, _ = results[0]
            out[own] = (state, kind)
            assert took < 5, took
            if own:
                assert "Connection timed out after" in error, error
        assert out[True] == out[False] == (_engine.FAILED, _engine.ERR_TIMEOUT)
    finally:
        for s in fillers:
            s.close()
        lst.close()
