"""The engine's chat-answer reader (csrc/chatjson.c) gives exactly what json.loads gives.

Every body below is served verbatim by the fake server ([[rawb64=...]]) and read through
LM, whose workers parse answers in C and leave anything unusual to json.loads. The expected
result is computed here with json.loads and the same field rules, so any difference between
the fast reader and Python's parser fails the test.
"""
import base64
import json

import pytest

from semex import errors as E


def _body(content='"hi"', finish='"stop"', usage='{"prompt_tokens": 3, "completion_tokens": 4,'
          ' "total_tokens": 7}', extra=""):
    parts = []
    msg = '{"role": "assistant"' + (f', "content": {content}' if content is not None else "") + "}"
    choice = '{"index": 0, "message": ' + msg
    if finish is not None:
        choice += f', "finish_reason": {finish}'
    choice += "}"
    parts.append(f'"choices": [{choice}]')
    if usage is not None:
        parts.append(f'"usage": {usage}')
    return ("{" + ", ".join(parts) + extra + "}").encode()


BODIES = [
    # plain, escapes of every kind, non-ASCII raw and escaped, surrogate pairs
    _body(),
    _body(content=r'"line\nnext \"q\" back\\slash \/ \t\r\b\f"'),
    _body(content='"caf\u00e9 \u65e5\u672c \U0001f600"'),
    _body(content=r'"caf\u00e9 \u65E5 \ud83d\ude00 \u0000 end"'),
    _body(content='""'),
    _body(content="null"),
    _body(finish="null"),
    _body(finish=None),
    _body(finish='"len\\u0067th"'),
    _body(usage=None),
    _body(usage="null"),
    _body(usage='{"prompt_tokens": null, "total_tokens": 5}'),
    _body(usage='{}'),
    _body(usage='{"prompt_tokens": 1.5, "completion_tokens": 1, "total_tokens": 2.5}'),
    _body(usage='{"prompt_tokens": 123456789012345678901234, "completion_tokens": 0,'
                ' "total_tokens": 1}'),
    # things the fast reader leaves to json.loads (or that json.loads refuses)
    _body(content=r'"lone \ud800 surrogate"'),
    _body(content=r'"lone low \udc00"'),
    _body(content='"raw\ncontrol"'),
    _body(content='"bad escape \\x41"'),
    _body(content="42"),
    _body(content='["a", "b"]'),
    _body(content=None),
    _body(extra=', "choices": [{"message": {"content": "second wins"}}]'),
    _body(extra=', "nan": NaN'),
    _body(extra=', "deep": ' + "[" * 70 + "]" * 70),
    _body(extra=', "x": 1e400, "y": -0.0e-1, "z": [true, false, null, {}]'),
    _body() + b" \n\t",
    _body() + b" trailing",
    b'\xef\xbb\xbf' + _body(),
    _body(content='"bad utf8 \u00ff"').replace(b"\xc3\xbf", b"\xff"),
    b'{"choices": []}',
    b'{"choices": [1]}',
    b'{"choices": [{"message": "text"}]}',
    b'[1, 2]',
    b'{"choices": [{"message": {"content": "a"}}]',
    b'{"choices": [{"message": {"content": "a"}}], "usage": [1]}',
    b'{"ch\\u006fices": [{"message": {"content": "escaped key"}}]}',
    b'{"choices": [{"message": {"content": "first"}}, {"message": {"content": "second"}}]}',
]


def _count(v):
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 \
        else 0


def _reference(body: bytes):
    """What LM returns for this body, by json.loads and the documented field rules."""
    try:
        answer = json.loads(body)
        choice = answer["choices"][0]
        content = choice["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return ("error", E.ResponseFormatError), None
    usage = answer.get("usage")
    tokens = (0, 0, 0)
    if isinstance(usage, dict):  # counts that are not numbers count as 0
        tokens = tuple(_count(usage.get(k)) for k in
                       ("prompt_tokens", "completion_tokens", "total_tokens"))
    if content is None:
        return ("error", E.ResponseFormatError), tokens
    return ("ok", content, choice.get("finish_reason")), tokens


@pytest.mark.parametrize("index", range(len(BODIES)))
def test_fast_reader_matches_json_loads(index, make_lm):
    body = BODIES[index]
    expected, tokens = _reference(body)
    key = "[[rawb64=" + base64.urlsafe_b64encode(body).decode() + "]]"
    lm = make_lm(max_retries=0)
    out = lm([[{"role": "user", "content": key}]])
    if expected[0] == "ok":
        assert out.errors == [None]
        assert out.outputs == [expected[1]]
        assert type(out.outputs[0]) is type(expected[1])
        assert out.finish_reasons == [expected[2]]
    else:
        assert out.outputs == [None]
        assert isinstance(out.errors[0], expected[1])
    if tokens is not None:
        assert (out.usage.prompt_tokens, out.usage.completion_tokens,
                out.usage.total_tokens) == tokens


def test_many_answers_in_one_window_keep_their_rows(make_lm):
    bodies = [_body(content=json.dumps(f"row {i} \u00e9\n" * (i % 5)),
                    usage=f'{{"prompt_tokens": {i}, "completion_tokens": 1, '
                          f'"total_tokens": {i + 1}}}') for i in range(300)]
    keys = ["[[rawb64=" + base64.urlsafe_b64encode(b).decode() + "]]" for b in bodies]
    lm = make_lm(max_concurrency=32)
    out = lm([[{"role": "user", "content": k}] for k in keys])
    assert out.outputs == [f"row {i} \u00e9\n" * (i % 5) for i in range(300)]
    assert out.usage.prompt_tokens == sum(range(300))
    assert out.usage.total_tokens == sum(range(300)) + 300
