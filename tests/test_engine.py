"""semex._engine directly: the contract the Python layer builds on."""
import asyncio
import json
import os
import select

import pytest

from semex import _engine


def body(text):
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": text}]}).encode()


@pytest.fixture
def engine():
    e = _engine.Engine(max_in_flight=32)
    yield e
    e.close()


def headers(server):
    return ["Content-Type: application/json", f"Authorization: Bearer {server.api_key}"]


def test_results_are_tuples_in_input_order(server, engine):
    batch = engine.submit(server.base_url + "/chat/completions", headers(server),
                          [body(f"n{i}") for i in range(50)])
    assert batch.wait(10) is True and batch.done and batch.completed == 50 and len(batch) == 50
    results = batch.results()
    for i, (state, kind, status, payload, error, attempts, latency) in enumerate(results):
        assert (state, kind, status, error, attempts) == (_engine.OK, _engine.ERR_NONE, 200,
                                                         None, 1)
        assert json.loads(payload)["choices"][0]["message"]["content"] == f"echo: n{i}"
        assert latency >= 0
    assert batch.progress() == (50, 50, 0, 0, 0, 0)


def test_eventfd_becomes_readable_when_done(server, engine):
    batch = engine.submit(server.base_url + "/chat/completions", headers(server),
                          [body("a [[lat=200]]")])
    fd = batch.fileno()
    assert select.select([fd], [], [], 0)[0] == []
    assert select.select([fd], [], [], 5)[0] == [fd]
    assert batch.done
    assert batch.clear_notify() == 1
    assert select.select([fd], [], [], 0)[0] == []


def test_cancel_ends_every_slot_cancelled_and_keeps_finished_ones(server, engine):
    bodies = [body("fast")] + [body(f"slow{i} [[stall]]") for i in range(10)]
    batch = engine.submit(server.base_url + "/chat/completions", headers(server), bodies)
    assert not batch.wait(0.5)
    batch.cancel()
    assert batch.wait(2)
    states = [r[0] for r in batch.results()]
    assert states == [_engine.OK] + [_engine.CANCELLED] * 10
    assert batch.results()[1][1] == _engine.ERR_CANCELLED


def test_close_cancels_pending_work_and_refuses_new(server):
    e = _engine.Engine()
    batch = e.submit(server.base_url + "/chat/completions", headers(server),
                     [body("x [[stall]]")] * 3)
    e.close()
    assert e.closed and "closed" in repr(e)
    assert batch.done and {r[0] for r in batch.results()} == {_engine.CANCELLED}
    with pytest.raises(_engine.EngineError, match="closed"):
        e.submit(server.base_url, [], [b""])
    e.close()  # idempotent


def test_queue_limit_rejects_oversized_submissions(server):
    e = _engine.Engine(queue_limit=10)
    try:
        with pytest.raises(_engine.EngineError, match="queue is full"):
            e.submit(server.base_url, [], [b"{}"] * 11)
    finally:
        e.close()


def test_submit_checks_its_arguments(engine):
    with pytest.raises(TypeError, match=r"bodies\[1\]"):
        engine.submit("http://127.0.0.1:1/", [], [b"ok", "not bytes"])
    with pytest.raises(TypeError, match=r"headers\[0\]"):
        engine.submit("http://127.0.0.1:1/", [1], [b"ok"])
    with pytest.raises(ValueError, match="line break"):
        engine.submit("http://127.0.0.1:1/", ["X: a\r\nY: b"], [b"ok"])
    with pytest.raises(ValueError, match="tokens"):
        engine.submit("http://127.0.0.1:1/", [], [b"ok"], [1.0, 2.0])
    with pytest.raises(ValueError, match="timeout"):
        engine.submit("http://127.0.0.1:1/", [], [b"ok"], timeout=0)
    with pytest.raises(ValueError, match="workers"):
        _engine.Engine(workers=0)


def test_a_batch_comes_only_from_submit(engine):
    # On every Python semex supports (3.9 has no Py_TPFLAGS_DISALLOW_INSTANTIATION: module.c
    # clears tp_new there instead): Python code cannot build a Batch with no work behind it.
    with pytest.raises(TypeError, match="cannot create"):
        _engine.Batch()
    with pytest.raises(TypeError):
        _engine.Batch.__new__(_engine.Batch)
    assert type(engine.submit("http://127.0.0.1:1/", [], [])) is _engine.Batch


def test_empty_batch_is_done_at_once(engine):
    batch = engine.submit("http://127.0.0.1:1/", [], [])
    assert batch.done and batch.wait(0) and batch.results() == []


def test_discarding_a_running_batch_cancels_its_transfers(server, engine):
    batch = engine.submit(server.base_url + "/chat/completions", headers(server),
                          [body(f"d{i} [[stall]]") for i in range(5)])
    assert not batch.wait(0.3)
    del batch
    import time
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and server.stats()["open_connections"]:
        time.sleep(0.05)
    assert [r["outcome"] for r in server.log()] == ["client_closed"] * 5
    assert engine.stats()["in_flight"] == 0


def test_two_workers_share_the_load(server):
    e = _engine.Engine(workers=2, max_in_flight=64)
    try:
        batch = e.submit(server.base_url + "/chat/completions", headers(server),
                         [body(f"w{i}") for i in range(500)])
        assert batch.wait(20)
        assert [json.loads(r[3])["choices"][0]["message"]["content"]
                for r in batch.results()] == [f"echo: w{i}" for i in range(500)]
    finally:
        e.close()


def test_engine_in_a_fork_child_refuses_with_a_clear_error(server, engine):
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            assert engine.forked
            try:
                engine.submit(server.base_url, [], [b"{}"])
            except _engine.EngineError as exc:
                code = 0 if "fork" in str(exc) else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert not engine.forked


def test_wait_on_the_loop_thread_through_add_reader(server, engine):
    async def main():
        from semex._runtime import wait_async
        batch = engine.submit(server.base_url + "/chat/completions", headers(server),
                              [body(f"a{i} [[lat=20]]") for i in range(20)], notify_each=True)
        ticks = []
        await wait_async(batch, lambda: ticks.append(batch.completed))
        return batch, ticks

    batch, ticks = asyncio.run(main())
    assert batch.done and ticks[-1] == 20
