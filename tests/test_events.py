"""The wire protocol, pure: request parsing, per-event argument validation, serialisers."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appchat.protocol import events as ev
from appchat.protocol.errors import AppError, BadRequest, Internal, NotFound, UnknownEvent
from appchat.protocol.models import MAX_ID, Conversation, Message, UnreadCount, format_ts

from .support import RFC3339_UTC

SPEC_CODES = {
    "bad_request",
    "unauthorized",
    "forbidden",
    "not_found",
    "rate_limited",
    "unknown_event",
    "unavailable",
    "internal",
}
MAX_CONTENT = 4000


def frame_error(frame: str | bytes) -> ev.FrameError:
    with pytest.raises(ev.FrameError) as info:
        ev.parse_request(frame)
    assert isinstance(info.value.error, BadRequest)
    assert info.value.error.code == "bad_request"
    return info.value


def bad(parser: Any, args: dict[str, Any]) -> BadRequest:
    with pytest.raises(BadRequest) as info:
        parser(args)
    assert info.value.code == "bad_request"
    return info.value


def send(args: dict[str, Any]) -> ev.SendMessageArgs:
    return ev.parse_send_message(args, MAX_CONTENT)


# --- the envelope --------------------------------------------------------------------------


def test_double_encoded_args_as_in_the_original() -> None:
    frame = '{"name":"Event.AddConversation","args":"{\\"user_id\\":1,\\"application_id\\":100}"}'
    request = ev.parse_request(frame)
    assert request == ev.Request(
        name="Event.AddConversation", args={"user_id": 1, "application_id": 100}, id=None
    )


def test_object_args_are_accepted_too() -> None:
    frame = json.dumps({"name": "Event.GetConversationList", "args": {"user_id": 1}})
    assert ev.parse_request(frame).args == {"user_id": 1}


def test_bytes_frame_is_accepted() -> None:
    frame = json.dumps({"name": "Event.GetUnreadInfo", "args": "{}"}).encode()
    assert ev.parse_request(frame) == ev.Request("Event.GetUnreadInfo", {}, None)


@pytest.mark.parametrize("frame", ['{"name":"Event.X"}', '{"name":"Event.X","args":null}'])
def test_missing_or_null_args_mean_empty_object(frame: str) -> None:
    assert ev.parse_request(frame).args == {}


@pytest.mark.parametrize(
    "args",
    [
        "[1, 2]",  # double-encoded, but not an object
        '"{}"',  # triple-encoded: a string once decoded
        "1",
        "true",
        [1, 2],
        5,
        True,
        1.5,
    ],
)
def test_args_that_are_not_an_object_are_bad_request(args: Any) -> None:
    err = frame_error(json.dumps({"name": "Event.X", "args": args, "id": "r1"}))
    assert err.name == "Event.X"
    assert err.request_id == "r1"


@pytest.mark.parametrize("args", ["", "{", "{'user_id': 1}", "nope", '{"a":1}x'])
def test_args_string_that_is_not_json_is_bad_request(args: str) -> None:
    err = frame_error(json.dumps({"name": "Event.X", "args": args, "id": 3}))
    assert err.name == "Event.X"
    assert err.request_id == 3


@pytest.mark.parametrize("frame", ["[]", "[1]", "1", '"x"', "null", "true", '"{}"'])
def test_non_object_frames_are_bad_request_with_no_name(frame: str) -> None:
    err = frame_error(frame)
    assert err.name is None
    assert err.request_id is None


@pytest.mark.parametrize(
    "frame",
    ["", "   ", "{", '{"name":', "{name: 1}", "NaN", b"\xff\xfe", b'{"name":"\xff"}', "[" * 5000],
)
def test_invalid_json_is_bad_request_with_no_name(frame: str | bytes) -> None:
    err = frame_error(frame)
    assert err.name is None
    assert err.request_id is None


@pytest.mark.parametrize("request_id", ["abc", "", 7, 0, -3, 1.5, 2**63])
def test_string_or_number_id_is_kept(request_id: Any) -> None:
    frame = json.dumps({"name": "Event.X", "args": "{}", "id": request_id})
    assert ev.parse_request(frame).id == request_id


@pytest.mark.parametrize("request_id", [True, False, {"a": 1}, [1], {}])
def test_bool_or_structured_id_is_bad_request(request_id: Any) -> None:
    err = frame_error(json.dumps({"name": "Event.X", "args": "{}", "id": request_id}))
    assert err.request_id is None
    assert err.name is None


def test_null_id_means_no_id() -> None:
    assert ev.parse_request('{"name":"Event.X","id":null}').id is None


@pytest.mark.parametrize("name", [None, 1, True, ["Event.X"], {"n": 1}])
def test_name_missing_or_not_a_string_gives_error_name_null(name: Any) -> None:
    doc: dict[str, Any] = {"args": "{}", "id": "q"}
    if name is not None:
        doc["name"] = name
    err = frame_error(json.dumps(doc))
    assert err.name is None
    assert err.request_id == "q"  # the id was readable, so it is echoed


def test_unknown_name_still_parses() -> None:
    # Whether a name is known is the service's business: it answers unknown_event.
    assert ev.parse_request('{"name":"Event.Nope"}').name == "Event.Nope"


def test_unknown_event_error_truncates_long_names() -> None:
    err = ev.unknown_event("E" * 1000)
    assert isinstance(err, UnknownEvent)
    assert err.code == "unknown_event"
    assert len(err.message) < 100
    assert "E" * 64 in err.message


# --- strict integer arguments ---------------------------------------------------------------

# (parser, field, other args that make the call otherwise valid, minimum accepted value)
INT_FIELDS = [
    (ev.parse_add_conversation, "application_id", {}, 1),
    (ev.parse_add_conversation, "user_id", {"application_id": 100}, 1),
    (ev.parse_get_conversation_list, "user_id", {}, 1),
    (ev.parse_get_message_list, "executor_id", {"session_channel": "100"}, 1),
    (ev.parse_get_message_list, "before_id", {"session_channel": "100"}, 0),
    (ev.parse_get_message_list, "after_id", {"session_channel": "100"}, 0),
    (ev.parse_get_message_list, "limit", {"session_channel": "100"}, 1),
    (send, "sender_id", {"session_channel": "100", "content": "hi"}, 1),
    (ev.parse_read_message, "executor_id", {"session_channel": "100", "message_id": 1}, 1),
    (ev.parse_read_message, "message_id", {"session_channel": "100"}, 1),
    (ev.parse_get_unread_info, "user_id", {}, 1),
]
INT_IDS = [f"{p.__name__}.{f}" for p, f, _, _ in INT_FIELDS]

NOT_INTEGERS = ["1", "100", " 1", "0x10", 1.0, 1.5, 1e3, True, False, [1], {"v": 1}]


@pytest.mark.parametrize(("parser", "field", "base", "minimum"), INT_FIELDS, ids=INT_IDS)
@pytest.mark.parametrize("value", NOT_INTEGERS, ids=repr)
def test_ids_must_be_json_integers(
    parser: Any, field: str, base: dict[str, Any], minimum: int, value: Any
) -> None:
    err = bad(parser, {**base, field: value})
    assert field in err.message


@pytest.mark.parametrize(("parser", "field", "base", "minimum"), INT_FIELDS, ids=INT_IDS)
def test_ids_must_fit_signed_64_bits_and_respect_the_minimum(
    parser: Any, field: str, base: dict[str, Any], minimum: int
) -> None:
    for value in (minimum - 1, -1, -(2**63), 2**63, 2**64, 2**100):
        bad(parser, {**base, field: value})


@pytest.mark.parametrize(("parser", "field", "base", "minimum"), INT_FIELDS, ids=INT_IDS)
def test_ids_in_range_are_accepted(
    parser: Any, field: str, base: dict[str, Any], minimum: int
) -> None:
    top = ev.MAX_PAGE if field == "limit" else MAX_ID
    for value in (minimum, 1, top):
        assert getattr(parser({**base, field: value}), field) == value


def test_ids_over_64_bits_inside_a_frame_are_rejected() -> None:
    # orjson reads integers past 64 bits as floats; either way it is bad_request.
    for big in (2**63, 2**64 - 1, 2**64, 2**70):
        args = ev.parse_request(
            json.dumps({"name": "Event.AddConversation", "args": {"application_id": big}})
        ).args
        bad(ev.parse_add_conversation, args)


@pytest.mark.parametrize(
    ("parser", "field", "base"),
    [
        (ev.parse_add_conversation, "application_id", {"user_id": 1}),
        (ev.parse_read_message, "message_id", {"session_channel": "1"}),
    ],
)
def test_required_ids(parser: Any, field: str, base: dict[str, Any]) -> None:
    assert "required" in bad(parser, base).message
    assert "required" in bad(parser, {**base, field: None}).message


def test_acting_ids_may_be_omitted() -> None:
    assert ev.parse_add_conversation({"application_id": 5}) == ev.AddConversationArgs(5, None)
    assert ev.parse_get_conversation_list({}) == ev.GetConversationListArgs(None, False)
    assert ev.parse_get_unread_info({}) == ev.GetUnreadInfoArgs(None)
    assert ev.parse_read_message({"session_channel": "9", "message_id": 4}) == (
        ev.ReadMessageArgs("9", None, 4)
    )
    assert send({"session_channel": "9", "content": "x"}).sender_id is None
    assert ev.parse_get_message_list({"session_channel": "9"}).executor_id is None


# --- session_channel ------------------------------------------------------------------------

CHANNEL_PARSERS = [
    (ev.parse_get_message_list, {}),
    (send, {"content": "hi"}),
    (ev.parse_read_message, {"message_id": 1}),
]


@pytest.mark.parametrize(("parser", "base"), CHANNEL_PARSERS)
def test_session_channel_string_or_integer(parser: Any, base: dict[str, Any]) -> None:
    assert parser({**base, "session_channel": "100"}).session_channel == "100"
    assert parser({**base, "session_channel": 100}).session_channel == "100"
    assert parser({**base, "session_channel": 2**63 - 1}).session_channel == str(2**63 - 1)
    assert parser({**base, "session_channel": "x" * 64}).session_channel == "x" * 64


@pytest.mark.parametrize(("parser", "base"), CHANNEL_PARSERS)
@pytest.mark.parametrize("value", [True, False, 1.5, 100.0, [100], {"c": 1}, "", "x" * 65])
def test_session_channel_invalid(parser: Any, base: dict[str, Any], value: Any) -> None:
    assert "session_channel" in bad(parser, {**base, "session_channel": value}).message


@pytest.mark.parametrize(("parser", "base"), CHANNEL_PARSERS)
def test_session_channel_required(parser: Any, base: dict[str, Any]) -> None:
    assert "required" in bad(parser, base).message
    assert "required" in bad(parser, {**base, "session_channel": None}).message


# --- SendMessage content, content_type, client_msg_id ----------------------------------------


def test_send_message_full_parse() -> None:
    args = send(
        {
            "session_channel": "10",
            "sender_id": 1,
            "content": "Hey",
            "content_type": 2,
            "client_msg_id": "c-1",
        }
    )
    assert args == ev.SendMessageArgs("10", 1, "Hey", 2, "c-1")


@pytest.mark.parametrize("content", [None, "", 1, 0, True, ["a"], {"a": "b"}, 1.5])
def test_content_must_be_a_non_empty_string(content: Any) -> None:
    args: dict[str, Any] = {"session_channel": "1", "content": content}
    assert "content" in bad(send, args).message


@pytest.mark.parametrize("content", ["\x00", "a\x00", "\x00b", "hello\x00world"])
def test_content_without_nul(content: str) -> None:
    assert "U+0000" in bad(send, {"session_channel": "1", "content": content}).message


def test_content_length_is_counted_in_code_points() -> None:
    for unit in ("a", "é", "€", "😀"):
        exact = unit * MAX_CONTENT
        assert send({"session_channel": "1", "content": exact}).content == exact
        bad(send, {"session_channel": "1", "content": exact + unit})
    # 4-byte characters: far more bytes than the limit, still accepted by code points
    assert len(("😀" * MAX_CONTENT).encode()) == 4 * MAX_CONTENT


def test_content_limit_is_the_one_passed_in() -> None:
    assert ev.parse_send_message({"session_channel": "1", "content": "abc"}, 3).content == "abc"
    with pytest.raises(BadRequest):
        ev.parse_send_message({"session_channel": "1", "content": "abcd"}, 3)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (None, 1),
        (1, 1),
        (2, 2),
        (0, 1),
        (3, 1),
        (-1, 1),
        (2**70, 1),
        ("2", 1),
        (2.0, 1),
        (True, 1),
        ([2], 1),
        ({"t": 2}, 1),
    ],
)
def test_content_type_other_than_int_1_or_2_means_text(given: Any, expected: int) -> None:
    args: dict[str, Any] = {"session_channel": "1", "content": "x"}
    if given is not None:
        args["content_type"] = given
    assert send(args).content_type == expected


@pytest.mark.parametrize("value", ["a", "x" * 64, "😀" * 64, "4f7a-11ee"])
def test_client_msg_id_accepted(value: str) -> None:
    args = {"session_channel": "1", "content": "x", "client_msg_id": value}
    assert send(args).client_msg_id == value


@pytest.mark.parametrize("value", ["", "x" * 65, "😀" * 65, 5, 0, True, ["a"], {"a": 1}, 1.5])
def test_client_msg_id_rejected(value: Any) -> None:
    args = {"session_channel": "1", "content": "x", "client_msg_id": value}
    assert "client_msg_id" in bad(send, args).message


def test_client_msg_id_absent_or_null() -> None:
    assert send({"session_channel": "1", "content": "x"}).client_msg_id is None
    assert send({"session_channel": "1", "content": "x", "client_msg_id": None}).client_msg_id is (
        None
    )


# --- GetMessageList paging arguments --------------------------------------------------------


def test_get_message_list_defaults() -> None:
    assert ev.parse_get_message_list({"session_channel": "100", "executor_id": 1}) == (
        ev.GetMessageListArgs("100", 1, None, None, ev.DEFAULT_PAGE)
    )
    assert ev.DEFAULT_PAGE == 50
    assert ev.MAX_PAGE == 500


@pytest.mark.parametrize("limit", [0, -1, 501, 10_000])
def test_limit_out_of_bounds(limit: int) -> None:
    assert (
        "limit" in bad(ev.parse_get_message_list, {"session_channel": "1", "limit": limit}).message
    )


@pytest.mark.parametrize("limit", [1, 50, 499, 500])
def test_limit_in_bounds(limit: int) -> None:
    assert ev.parse_get_message_list({"session_channel": "1", "limit": limit}).limit == limit


@pytest.mark.parametrize(("before", "after"), [(5, 3), (0, 0), (1, 10**6)])
def test_before_and_after_together_rejected(before: int, after: int) -> None:
    err = bad(
        ev.parse_get_message_list, {"session_channel": "1", "before_id": before, "after_id": after}
    )
    assert "before_id" in err.message


def test_one_cursor_at_a_time_is_fine() -> None:
    before = ev.parse_get_message_list({"session_channel": "1", "before_id": 7, "limit": 5})
    assert (before.before_id, before.after_id, before.limit) == (7, None, 5)
    after = ev.parse_get_message_list({"session_channel": "1", "after_id": 0})
    assert (after.before_id, after.after_id, after.limit) == (None, 0, 50)


# --- GetConversationList all, RefreshToken token --------------------------------------------


@pytest.mark.parametrize("value", [True, False])
def test_all_boolean(value: bool) -> None:
    assert ev.parse_get_conversation_list({"all": value}).all is value
    assert ev.parse_get_conversation_list({}).all is False


@pytest.mark.parametrize("value", ["true", "false", 1, 0, "yes", [True], {"all": True}, 1.0])
def test_all_must_be_a_boolean(value: Any) -> None:
    assert "all" in bad(ev.parse_get_conversation_list, {"all": value}).message


def test_refresh_token_args() -> None:
    assert ev.parse_refresh_token({"token": "a.b.c"}) == ev.RefreshTokenArgs("a.b.c")
    for value in (None, "", 5, True, ["a.b.c"], {"t": "x"}):
        bad(ev.parse_refresh_token, {"token": value})
    bad(ev.parse_refresh_token, {})
    bad(ev.parse_refresh_token, {"token": "x" * (ev.MAX_TOKEN_LEN + 1)})
    assert ev.parse_refresh_token({"token": "x" * ev.MAX_TOKEN_LEN}).token == "x" * 8192


def test_unknown_extra_args_are_ignored() -> None:
    args = ev.parse_get_unread_info({"user_id": 3, "colour": "blue", "extra": [1]})
    assert args == ev.GetUnreadInfoArgs(3)


# --- serialisers ----------------------------------------------------------------------------

CONV = Conversation(
    id=2, application_id=100, create_at=1583432310698284, update_at=1583465369321142
)
MSG = Message(
    id=10,
    application_id=100,
    sender_id=1,
    content="Hey",
    content_type=1,
    status=0,
    create_at=1583465369321142,
    update_at=1583465369321143,
)


def test_format_ts_is_rfc3339_utc_with_six_fraction_digits() -> None:
    assert format_ts(1583465369321142) == "2020-03-06T03:29:29.321142Z"
    assert format_ts(0) == "1970-01-01T00:00:00.000000Z"
    assert format_ts(1) == "1970-01-01T00:00:00.000001Z"
    assert format_ts(1_000_000) == "1970-01-01T00:00:01.000000Z"
    for us in (0, 1, 999_999, 1583465369321142, 4102444799999999):
        text = format_ts(us)
        assert RFC3339_UTC.match(text), text
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
        assert parsed.tzinfo is not None
        assert parsed.utcoffset().total_seconds() == 0  # type: ignore[union-attr]  # not naive: asserted above
        assert round(parsed.timestamp() * 1_000_000) == us


def test_conversation_object_shape() -> None:
    assert ev.conversation_obj(CONV) == {
        "id": 2,
        "session_channel": "100",
        "application_id": 100,
        "create_at": "2020-03-05T18:18:30.698284Z",
        "update_at": "2020-03-06T03:29:29.321142Z",
        "status": "open",
        "assignee_id": None,
        "snooze_until": None,
        "last_message": None,
        "rev": 0,
    }


def test_message_object_shape() -> None:
    assert ev.message_obj(MSG) == {
        "id": 10,
        "session_channel": "100",
        "content": "Hey",
        "sender_id": 1,
        "status": 0,
        "create_at": "2020-03-06T03:29:29.321142Z",
        "update_at": "2020-03-06T03:29:29.321143Z",
        "content_type": 1,
        "rev": 0,
    }


def test_message_object_carries_the_history_fields_only_when_set() -> None:
    changed = Message(
        10, 100, 1, "", 1, 0, 1583465369321142, 1583465369321143,
        private=True, rev=7, edited_at=1583465369321143, deleted=True,
    )  # fmt: skip
    obj = ev.message_obj(changed)
    assert obj["private"] is True and obj["deleted"] is True and obj["rev"] == 7
    assert obj["edited_at"] == "2020-03-06T03:29:29.321143Z"
    plain = ev.message_obj(MSG)
    assert "private" not in plain and "deleted" not in plain and "edited_at" not in plain


def test_message_object_carries_client_msg_id_only_when_set() -> None:
    obj = ev.message_obj(
        Message(10, 100, 1, "x", 2, 1, 1583465369321142, 1583465369321142, client_msg_id="c")
    )
    assert obj["client_msg_id"] == "c"
    assert obj["content_type"] == 2
    assert obj["status"] == 1
    assert "client_msg_id" not in ev.message_obj(MSG)


def test_message_list_has_capital_m_and_has_more() -> None:
    assert ev.message_list([MSG], True) == {"Messages": [ev.message_obj(MSG)], "has_more": True}
    empty = ev.message_list([], False)
    assert empty == {"Messages": [], "has_more": False}
    assert "messages" not in empty


def test_conversation_list_shape() -> None:
    page = ev.conversation_page([CONV], has_more=False)
    assert page == {
        "conversations": [ev.conversation_obj(CONV)],
        "has_more": False,
        "next_cursor": None,
    }
    assert ev.conversation_page([], has_more=False)["conversations"] == []
    more = ev.conversation_page([CONV], has_more=True)
    assert more["has_more"] is True
    assert ev.parse_get_conversation_list({"cursor": more["next_cursor"]}).cursor == (
        CONV.update_at,
        CONV.id,
    )


def test_unread_info_shape_and_total() -> None:
    info = ev.unread_info([UnreadCount(100, 3), UnreadCount(7, 0), UnreadCount(9, 2)])
    assert info == {
        "total": 5,
        "conversations": [
            {"session_channel": "100", "application_id": 100, "unread": 3},
            {"session_channel": "7", "application_id": 7, "unread": 0},
            {"session_channel": "9", "application_id": 9, "unread": 2},
        ],
    }
    assert ev.unread_info([]) == {"total": 0, "conversations": []}


def test_message_read_push_body() -> None:
    assert ev.message_read(100, 2, 11) == {
        "session_channel": "100",
        "reader_id": 2,
        "message_id": 11,
    }


def test_reply_shape() -> None:
    result = {"message": ev.message_obj(MSG)}
    assert orjson.loads(ev.reply(ev.SEND_MESSAGE, result)) == {
        "name": "Event.SendMessage",
        "ok": True,
        "result": result,
    }
    assert orjson.loads(ev.reply(ev.READ_MESSAGE, None)) == {
        "name": "Event.ReadMessage",
        "ok": True,
        "result": None,
    }


@pytest.mark.parametrize("request_id", ["abc", 0, 17, 1.5, ""])
def test_reply_and_error_reply_echo_the_id(request_id: Any) -> None:
    doc = orjson.loads(ev.reply("Event.X", {}, request_id))
    assert doc["id"] == request_id
    assert type(doc["id"]) is type(request_id)
    err = orjson.loads(ev.error_reply("Event.X", NotFound("gone"), request_id))
    assert err["id"] == request_id


def test_error_reply_shape() -> None:
    assert orjson.loads(
        ev.error_reply("Event.GetMessageList", NotFound("no such conversation"))
    ) == {
        "name": "Event.GetMessageList",
        "ok": False,
        "result": None,
        "error": {"code": "not_found", "message": "no such conversation"},
    }
    doc = orjson.loads(ev.error_reply(None, BadRequest()))
    assert doc["name"] is None
    assert "name" in doc
    assert doc["error"] == {"code": "bad_request", "message": "malformed request"}
    assert "id" not in doc
    assert orjson.loads(ev.error_reply("E", Internal()))["error"]["code"] == "internal"


def test_push_shape_has_no_id() -> None:
    body = {"message": ev.message_obj(MSG)}
    assert orjson.loads(ev.push(ev.RECEIVE_MESSAGE, body)) == {
        "name": "Event.ReceiveMessage",
        "ok": True,
        "result": body,
    }
    assert orjson.loads(ev.push(ev.RESYNC, None)) == {
        "name": "Event.Resync",
        "ok": True,
        "result": None,
    }


# --- properties -----------------------------------------------------------------------------

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(codec="utf-8"), max_size=20)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(st.characters(codec="utf-8"), max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
EVENT_NAMES = st.sampled_from(
    [ev.ADD_CONVERSATION, ev.SEND_MESSAGE, ev.READ_MESSAGE, "Event.Nope", ""]
) | st.text(max_size=12)


def assert_frame_error(exc: ev.FrameError) -> None:
    assert isinstance(exc.error, AppError)
    assert exc.error.code in SPEC_CODES
    assert exc.name is None or isinstance(exc.name, str)
    assert exc.request_id is None or (
        not isinstance(exc.request_id, bool) and isinstance(exc.request_id, str | int | float)
    )
    # the error reply for it can always be written
    doc = orjson.loads(ev.error_reply(exc.name, exc.error, exc.request_id))
    assert doc["ok"] is False


def parse_or_frame_error(frame: str | bytes) -> ev.Request | None:
    try:
        request = ev.parse_request(frame)
    except ev.FrameError as exc:
        assert_frame_error(exc)
        return None
    assert isinstance(request.name, str)
    assert isinstance(request.args, dict)
    return request


@settings(max_examples=200, deadline=None)
@given(st.text() | st.binary())
def test_parse_request_arbitrary_input(frame: str | bytes) -> None:
    parse_or_frame_error(frame)


@settings(max_examples=200, deadline=None)
@given(JSON_VALUES)
def test_parse_request_arbitrary_json(value: Any) -> None:
    parse_or_frame_error(json.dumps(value))


@settings(max_examples=200, deadline=None)
@given(
    name=st.one_of(st.none(), EVENT_NAMES, JSON_VALUES),
    args=st.one_of(st.none(), JSON_VALUES, JSON_VALUES.map(json.dumps), st.text(max_size=10)),
    request_id=st.one_of(st.none(), JSON_VALUES),
    drop=st.sets(st.sampled_from(["name", "args", "id"])),
)
def test_parse_request_arbitrary_envelopes(
    name: Any, args: Any, request_id: Any, drop: set[str]
) -> None:
    doc = {"name": name, "args": args, "id": request_id}
    for key in drop:
        del doc[key]
    parse_or_frame_error(json.dumps(doc))


@settings(max_examples=200, deadline=None)
@given(
    name=EVENT_NAMES,
    args=st.dictionaries(st.text(st.characters(codec="utf-8"), max_size=8), JSON_VALUES),
    request_id=st.one_of(
        st.none(),
        st.text(st.characters(codec="utf-8")),
        st.integers(-(2**63), 2**63 - 1),
        st.floats(allow_nan=False, allow_infinity=False),
    ),
    double_encoded=st.booleans(),
)
def test_well_formed_frames_round_trip(
    name: str, args: dict[str, Any], request_id: Any, double_encoded: bool
) -> None:
    doc = {"name": name, "args": json.dumps(args) if double_encoded else args}
    if request_id is not None:
        doc["id"] = request_id
    request = ev.parse_request(json.dumps(doc))
    assert request == ev.Request(name=name, args=args, id=request_id)


ARG_KEYS = st.sampled_from(
    [
        "user_id",
        "application_id",
        "session_channel",
        "executor_id",
        "sender_id",
        "message_id",
        "before_id",
        "after_id",
        "limit",
        "content",
        "content_type",
        "client_msg_id",
        "all",
        "token",
    ]
) | st.text(max_size=6)
ARG_VALUES = (
    JSON_VALUES
    | st.integers()
    | st.floats()
    | st.text()
    | st.sampled_from([0, 1, 2, -1, 2**63 - 1, 2**63, "1", "100", "", "\x00", True, False])
)
PARSERS = [
    ev.parse_add_conversation,
    ev.parse_get_conversation_list,
    ev.parse_get_message_list,
    send,
    ev.parse_read_message,
    ev.parse_get_unread_info,
    ev.parse_refresh_token,
]


def _is_id(value: Any, minimum: int = 1) -> bool:
    return type(value) is int and minimum <= value <= MAX_ID


@settings(max_examples=200, deadline=None)
@given(parser=st.sampled_from(PARSERS), args=st.dictionaries(ARG_KEYS, ARG_VALUES, max_size=8))
def test_event_parsers_raise_only_app_errors(parser: Any, args: dict[str, Any]) -> None:
    try:
        parsed = parser(args)
    except AppError as exc:
        assert exc.code in SPEC_CODES
        assert isinstance(exc.message, str)
        assert exc.message
        return
    # What a parser lets through satisfies the SPEC's argument rules.
    for field in ("user_id", "executor_id", "sender_id"):
        value = getattr(parsed, field, None)
        assert value is None or _is_id(value)
    for field in ("application_id", "message_id"):
        if hasattr(parsed, field):
            assert _is_id(getattr(parsed, field))
    if hasattr(parsed, "session_channel"):
        assert isinstance(parsed.session_channel, str)
        assert 1 <= len(parsed.session_channel) <= ev.MAX_CHANNEL_LEN
    if isinstance(parsed, ev.GetMessageListArgs):
        assert 1 <= parsed.limit <= ev.MAX_PAGE
        assert parsed.before_id is None or parsed.after_id is None
        for cursor in (parsed.before_id, parsed.after_id):
            assert cursor is None or _is_id(cursor, minimum=0)
    if isinstance(parsed, ev.SendMessageArgs):
        assert isinstance(parsed.content, str)
        assert 1 <= len(parsed.content) <= MAX_CONTENT
        assert "\x00" not in parsed.content
        assert parsed.content_type in (1, 2)
        cmid = parsed.client_msg_id
        assert cmid is None or (isinstance(cmid, str) and 1 <= len(cmid) <= 64)
    if isinstance(parsed, ev.GetConversationListArgs):
        assert parsed.all is True or parsed.all is False
    if isinstance(parsed, ev.RefreshTokenArgs):
        assert isinstance(parsed.token, str)
        assert parsed.token


def test_nan_and_infinity_are_not_ids() -> None:
    for value in (math.nan, math.inf, -math.inf):
        bad(ev.parse_add_conversation, {"application_id": value})


def test_format_ts_matches_fromtimestamp() -> None:
    us = 1583465369321142
    expected = datetime.fromtimestamp(us // 1_000_000, UTC).replace(microsecond=us % 1_000_000)
    assert format_ts(us) == expected.isoformat().replace("+00:00", "Z")


def test_an_api_key_is_stored_apart_and_shown_as_sent() -> None:
    stored = ev.api_client_msg_id("crm-7")
    assert len(stored) > ev.MAX_CLIENT_MSG_ID_LEN  # no client_msg_id is ever this long
    with pytest.raises(BadRequest):
        ev.parse_send_message(
            {"session_channel": "1", "content": "x", "client_msg_id": stored}, 100
        )
    assert ev.message_obj(replace(MSG, client_msg_id=stored))["client_msg_id"] == "crm-7"
    # A client's own id is shown as it is, even one that looks like the prefix.
    for own in (ev.API_KEY_PREFIX, "server-api:crm-7", "crm-7"):
        assert ev.message_obj(replace(MSG, client_msg_id=own))["client_msg_id"] == own
