"""ServerConnection against hand-built client bytes: one behaviour per test.

Expected bytes are built with ``wire`` (plain ``struct`` from doc/proto.md), never with the
module's own structs.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wire import (
    C_FIXED_NEWSTYLE,
    C_NO_ZEROES,
    Chunk,
    OptionReply,
    SimpleReply,
    chunks,
    client_flags,
    events_until_need_data,
    greeting,
    info_data,
    meta_data,
    option,
    option_replies,
    request,
    sent,
    simple_reply,
    string,
)

from deltavol.nbd.constants import Cmd, CmdFlag, Errno, Info, Opt, Rep, TransmissionFlag
from deltavol.nbd.events import (
    NEED_DATA,
    BadRequest,
    Closed,
    ExportInfo,
    OptExportName,
    OptInfo,
    OptList,
    OptMetaContext,
    Request,
)
from deltavol.nbd.server_conn import ProtocolStateError, ServerConnection

F = TransmissionFlag
FLAGS = F.HAS_FLAGS | F.SEND_FLUSH | F.SEND_TRIM | F.SEND_WRITE_ZEROES | F.CAN_MULTI_CONN
DISK = ExportInfo(name="disk", size=1 << 20, flags=int(FLAGS), description="scratch disk", max_block=65536)
DISK_FUA = ExportInfo(name="disk", size=1 << 20, flags=int(FLAGS | F.SEND_FUA), max_block=65536)

ACK = Rep.ACK
INFO_EXPORT = struct.pack(">HQH", Info.EXPORT, DISK.size, DISK.flags)
INFO_BLOCK_SIZE = struct.pack(">HIII", Info.BLOCK_SIZE, 1, 4096, 65536)
BASE_ALLOCATION = b"base:allocation"
STATE_HOLE, STATE_ZERO = 1, 2
REPLY_FLAG_DONE = 1
TYPE_NONE, TYPE_OFFSET_DATA, TYPE_OFFSET_HOLE, TYPE_BLOCK_STATUS = 0, 1, 2, 5
TYPE_ERROR = (1 << 15) + 1


# --- helpers --------------------------------------------------------------------------------
def in_options(flags: int = C_FIXED_NEWSTYLE | C_NO_ZEROES) -> ServerConnection:
    """A connection whose greeting is drained and whose client flags are accepted."""
    conn = ServerConnection()
    sent(conn)
    conn.receive_data(client_flags(flags))
    assert conn.next_event() is NEED_DATA
    return conn


def one_event(conn: ServerConnection, data: bytes) -> object:
    conn.receive_data(data)
    return conn.next_event()


def set_meta(conn: ServerConnection, name: str = "disk") -> None:
    """Negotiate structured replies and base:allocation for ``name``; drain the replies."""
    assert one_event(conn, option(Opt.STRUCTURED_REPLY)) is NEED_DATA
    event = one_event(conn, option(Opt.SET_META_CONTEXT, meta_data(name, ["base:allocation"])))
    assert isinstance(event, OptMetaContext)
    conn.reply_meta_context(True)
    sent(conn)


def in_transmission(
    export: ExportInfo = DISK, *, structured: bool = False, meta: bool = False
) -> ServerConnection:
    """A connection that went through OPT_GO for ``export``; all output drained."""
    conn = in_options()
    if meta:
        set_meta(conn, export.name)
    elif structured:
        assert one_event(conn, option(Opt.STRUCTURED_REPLY)) is NEED_DATA
    event = one_event(conn, option(Opt.GO, info_data(export.name)))
    assert isinstance(event, OptInfo)
    conn.reply_info(export)
    sent(conn)
    return conn


def only_event(conn: ServerConnection, data: bytes) -> object:
    """Feed ``data``; it must produce exactly one event and then NEED_DATA."""
    conn.receive_data(data)
    events = events_until_need_data(conn)
    assert len(events) == 1, events
    return events[0]


def err_reply(data: bytes) -> tuple[int, int, bytes]:
    """(errno, message length, message) of an NBD_REPLY_TYPE_ERROR payload."""
    errno, length = struct.unpack_from(">IH", data)
    return errno, length, data[6:]


# --- greeting and client flags --------------------------------------------------------------
def test_greeting_is_nbdmagic_ihaveopt_and_both_handshake_flags() -> None:
    assert sent(ServerConnection()) == greeting(0b11)


def test_client_flags_need_all_four_bytes() -> None:
    conn = ServerConnection()
    assert one_event(conn, client_flags()[:3]) is NEED_DATA
    assert one_event(conn, client_flags()[3:]) is NEED_DATA
    assert conn.phase.value == "options"


@pytest.mark.parametrize("flags", [1 << 2, 1 << 31, C_FIXED_NEWSTYLE | 1 << 5])
def test_unknown_client_flags_close_without_reply(flags: int) -> None:
    conn = ServerConnection()
    sent(conn)
    event = one_event(conn, client_flags(flags))
    assert isinstance(event, Closed) and not event.clean
    assert sent(conn) == b""


def test_client_without_fixed_newstyle_is_still_served() -> None:
    conn = in_options(0)
    assert isinstance(one_event(conn, option(Opt.LIST)), OptList)


# --- NBD_OPT_EXPORT_NAME ---------------------------------------------------------------------
def test_export_name_event_carries_the_name() -> None:
    assert one_event(in_options(), option(Opt.EXPORT_NAME, b"disk")) == OptExportName("disk")


def test_export_name_reply_has_124_zero_bytes_without_no_zeroes() -> None:
    conn = in_options(C_FIXED_NEWSTYLE)
    one_event(conn, option(Opt.EXPORT_NAME, b"disk"))
    conn.accept_export(DISK)
    assert sent(conn) == struct.pack(">QH", DISK.size, DISK.flags) + bytes(124)
    assert conn.phase.value == "transmission"


def test_export_name_reply_has_no_zero_bytes_with_no_zeroes() -> None:
    conn = in_options(C_FIXED_NEWSTYLE | C_NO_ZEROES)
    one_event(conn, option(Opt.EXPORT_NAME, b"disk"))
    conn.accept_export(DISK)
    assert sent(conn) == struct.pack(">QH", DISK.size, DISK.flags)


def test_export_name_enforces_the_exports_maximum_payload() -> None:
    conn = in_options()
    one_event(conn, option(Opt.EXPORT_NAME, b"disk"))
    conn.accept_export(DISK)
    event = only_event(conn, request(Cmd.WRITE, data=bytes(DISK.max_block + 1)))
    assert isinstance(event, BadRequest) and event.errno == Errno.EINVAL


def test_refused_export_name_is_a_hard_disconnect() -> None:
    conn = in_options()
    one_event(conn, option(Opt.EXPORT_NAME, b"nope"))
    closed = conn.refuse_export_name("no such export")
    assert not closed.clean
    assert sent(conn) == b""
    assert conn.next_event() == closed


# --- NBD_OPT_LIST ----------------------------------------------------------------------------
def test_list_replies_one_server_per_export_then_ack() -> None:
    conn = in_options()
    assert one_event(conn, option(Opt.LIST)) == OptList()
    conn.reply_list(["a", "disk"])
    assert option_replies(sent(conn)) == [
        OptionReply(Opt.LIST, Rep.SERVER, string("a")),
        OptionReply(Opt.LIST, Rep.SERVER, string("disk")),
        OptionReply(Opt.LIST, ACK, b""),
    ]


def test_list_with_data_is_invalid_and_raises_no_event() -> None:
    conn = in_options()
    assert one_event(conn, option(Opt.LIST, b"x")) is NEED_DATA
    [reply] = option_replies(sent(conn))
    assert (reply.opt, reply.rep) == (Opt.LIST, Rep.ERR_INVALID)


# --- NBD_OPT_INFO / NBD_OPT_GO ---------------------------------------------------------------
def test_go_event_carries_name_and_information_requests() -> None:
    event = one_event(in_options(), option(Opt.GO, info_data("disk", [Info.NAME, 3])))
    assert event == OptInfo("disk", (Info.NAME, Info.BLOCK_SIZE), go=True)


def test_go_known_export_sends_export_and_block_size_then_ack() -> None:
    conn = in_options()
    one_event(conn, option(Opt.GO, info_data("disk")))
    conn.reply_info(DISK)
    replies = option_replies(sent(conn))
    assert replies[-1] == OptionReply(Opt.GO, ACK, b"")  # and no zero padding after it
    assert sorted(r.data for r in replies[:-1]) == sorted([INFO_EXPORT, INFO_BLOCK_SIZE])
    assert {(r.opt, r.rep) for r in replies[:-1]} == {(Opt.GO, Rep.INFO)}


def test_go_enters_transmission() -> None:
    conn = in_options()
    one_event(conn, option(Opt.GO, info_data("disk")))
    conn.reply_info(DISK)
    assert conn.phase.value == "transmission"
    assert isinstance(only_event(conn, request(Cmd.FLUSH)), Request)


def test_go_sends_name_and_description_when_requested() -> None:
    conn = in_options()
    one_event(conn, option(Opt.GO, info_data("disk", [Info.NAME, Info.DESCRIPTION])))
    conn.reply_info(DISK)
    infos = {r.data for r in option_replies(sent(conn)) if r.rep == Rep.INFO}
    assert struct.pack(">H", Info.NAME) + b"disk" in infos
    assert struct.pack(">H", Info.DESCRIPTION) + b"scratch disk" in infos


def test_go_without_requests_sends_no_name_or_description() -> None:
    conn = in_options()
    one_event(conn, option(Opt.GO, info_data("disk")))
    conn.reply_info(DISK)
    kinds = {r.data[:2] for r in option_replies(sent(conn)) if r.rep == Rep.INFO}
    assert struct.pack(">H", Info.NAME) not in kinds
    assert struct.pack(">H", Info.DESCRIPTION) not in kinds


def test_info_known_export_replies_like_go_but_stays_in_options() -> None:
    conn = in_options()
    assert one_event(conn, option(Opt.INFO, info_data("disk"))) == OptInfo("disk", (), go=False)
    conn.reply_info(DISK)
    replies = option_replies(sent(conn))
    assert replies[-1] == OptionReply(Opt.INFO, ACK, b"")
    assert INFO_EXPORT in {r.data for r in replies}
    assert conn.phase.value == "options"
    assert isinstance(one_event(conn, option(Opt.LIST)), OptList)


@pytest.mark.parametrize("opt", [Opt.INFO, Opt.GO])
def test_unknown_export_gets_err_unknown_and_options_go_on(opt: Opt) -> None:
    conn = in_options()
    one_event(conn, option(opt, info_data("nope")))
    conn.reply_info(None, "no export 'nope'")
    assert option_replies(sent(conn)) == [OptionReply(opt, Rep.ERR_UNKNOWN, b"no export 'nope'")]
    assert conn.phase.value == "options"
    assert isinstance(one_event(conn, option(Opt.LIST)), OptList)


def test_refusal_reply_type_is_the_applications_choice() -> None:
    conn = in_options()
    one_event(conn, option(Opt.GO, info_data("busy")))
    conn.reply_info(None, "in use", Rep.ERR_POLICY)
    assert option_replies(sent(conn)) == [OptionReply(Opt.GO, Rep.ERR_POLICY, b"in use")]


# --- NBD_OPT_STRUCTURED_REPLY ----------------------------------------------------------------
def test_structured_reply_is_acked() -> None:
    conn = in_options()
    assert one_event(conn, option(Opt.STRUCTURED_REPLY)) is NEED_DATA
    assert option_replies(sent(conn)) == [OptionReply(Opt.STRUCTURED_REPLY, ACK, b"")]
    assert conn.structured_replies


def test_structured_reply_twice_is_invalid() -> None:
    conn = in_options()
    one_event(conn, option(Opt.STRUCTURED_REPLY))
    sent(conn)
    assert one_event(conn, option(Opt.STRUCTURED_REPLY)) is NEED_DATA
    [reply] = option_replies(sent(conn))
    assert (reply.opt, reply.rep) == (Opt.STRUCTURED_REPLY, Rep.ERR_INVALID)
    assert conn.structured_replies


def test_structured_reply_with_data_is_invalid() -> None:
    conn = in_options()
    assert one_event(conn, option(Opt.STRUCTURED_REPLY, b"\0")) is NEED_DATA
    [reply] = option_replies(sent(conn))
    assert reply.rep == Rep.ERR_INVALID
    assert not conn.structured_replies


# --- meta contexts ---------------------------------------------------------------------------
def test_set_meta_context_before_structured_replies_is_invalid() -> None:
    conn = in_options()
    data = meta_data("disk", ["base:allocation"])
    assert one_event(conn, option(Opt.SET_META_CONTEXT, data)) is NEED_DATA
    [reply] = option_replies(sent(conn))
    assert (reply.opt, reply.rep) == (Opt.SET_META_CONTEXT, Rep.ERR_INVALID)


def test_meta_context_event_carries_name_and_queries() -> None:
    conn = in_options()
    data = meta_data("disk", ["base:", "x-a:b"])
    event = one_event(conn, option(Opt.LIST_META_CONTEXT, data))
    assert event == OptMetaContext("disk", ("base:", "x-a:b"), set=False)


@pytest.mark.parametrize(
    "queries", [[], ["base:"], ["base:allocation"], ["x-other:thing", "base:allocation"]]
)
def test_list_meta_context_lists_base_allocation(queries: list[str]) -> None:
    conn = in_options()
    one_event(conn, option(Opt.LIST_META_CONTEXT, meta_data("disk", queries)))
    conn.reply_meta_context(True)
    # The context id in LIST replies is reserved: SHOULD be zero.
    assert option_replies(sent(conn)) == [
        OptionReply(Opt.LIST_META_CONTEXT, Rep.META_CONTEXT, bytes(4) + BASE_ALLOCATION),
        OptionReply(Opt.LIST_META_CONTEXT, ACK, b""),
    ]


@pytest.mark.parametrize("queries", [["x-other:thing"], ["base:nothing"], ["qemu:dirty-bitmap:a"]])
def test_list_meta_context_matching_nothing_is_just_ack(queries: list[str]) -> None:
    conn = in_options()
    one_event(conn, option(Opt.LIST_META_CONTEXT, meta_data("disk", queries)))
    conn.reply_meta_context(True)
    assert option_replies(sent(conn)) == [OptionReply(Opt.LIST_META_CONTEXT, ACK, b"")]


def test_set_meta_context_selects_base_allocation_with_an_id() -> None:
    conn = in_options()
    one_event(conn, option(Opt.STRUCTURED_REPLY))
    sent(conn)
    one_event(conn, option(Opt.SET_META_CONTEXT, meta_data("disk", ["base:allocation"])))
    conn.reply_meta_context(True)
    context, ack = option_replies(sent(conn))
    assert (context.opt, context.rep, context.data[4:]) == (
        Opt.SET_META_CONTEXT,
        Rep.META_CONTEXT,
        BASE_ALLOCATION,
    )
    assert ack == OptionReply(Opt.SET_META_CONTEXT, ACK, b"")
    assert conn.meta_contexts == {struct.unpack(">I", context.data[:4])[0]}


@pytest.mark.parametrize("queries", [[], ["base:"], ["x-other:thing"]])
def test_set_meta_context_selecting_nothing_is_just_ack(queries: list[str]) -> None:
    conn = in_options()
    one_event(conn, option(Opt.STRUCTURED_REPLY))
    sent(conn)
    one_event(conn, option(Opt.SET_META_CONTEXT, meta_data("disk", queries)))
    conn.reply_meta_context(True)
    assert option_replies(sent(conn)) == [OptionReply(Opt.SET_META_CONTEXT, ACK, b"")]
    assert not conn.meta_contexts


@pytest.mark.parametrize("opt", [Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT])
def test_meta_context_for_unknown_export_is_err_unknown(opt: Opt) -> None:
    conn = in_options()
    one_event(conn, option(Opt.STRUCTURED_REPLY))
    sent(conn)
    one_event(conn, option(opt, meta_data("nope", ["base:allocation"])))
    conn.reply_meta_context(False, "no export 'nope'")
    assert option_replies(sent(conn)) == [OptionReply(opt, Rep.ERR_UNKNOWN, b"no export 'nope'")]


def test_failed_set_meta_context_drops_the_earlier_selection() -> None:
    # "Issuing this command replaces all previously-set metadata contexts (including when
    # this command fails)".
    conn = in_options()
    set_meta(conn)
    one_event(conn, option(Opt.SET_META_CONTEXT, meta_data("nope", ["base:allocation"])))
    conn.reply_meta_context(False, "no export 'nope'")
    assert not conn.meta_contexts


def test_malformed_set_meta_context_drops_the_earlier_selection() -> None:
    conn = in_options()
    set_meta(conn)
    one_event(conn, option(Opt.SET_META_CONTEXT, b"\0\0\0"))
    assert not conn.meta_contexts


def test_meta_context_set_for_another_export_is_not_active_after_go() -> None:
    conn = in_options()
    set_meta(conn, "other")
    one_event(conn, option(Opt.GO, info_data("disk")))
    conn.reply_info(DISK)
    event = only_event(conn, request(Cmd.BLOCK_STATUS, length=4096))
    assert isinstance(event, BadRequest) and event.errno == Errno.EINVAL


def test_meta_context_set_for_the_go_export_is_active() -> None:
    conn = in_options()
    set_meta(conn, "disk")
    one_event(conn, option(Opt.GO, info_data("disk")))
    conn.reply_info(DISK)
    assert isinstance(only_event(conn, request(Cmd.BLOCK_STATUS, length=4096)), Request)


# --- options the connection answers itself ---------------------------------------------------
@pytest.mark.parametrize("opt", [99, 0, 0xFFFFFFFF, Opt.PEEK_EXPORT, 11])
def test_unsupported_option_gets_err_unsup_and_the_stream_goes_on(opt: int) -> None:
    conn = in_options()
    event = one_event(conn, option(opt, b"some data") + option(Opt.LIST))
    assert event == OptList()
    [reply] = option_replies(sent(conn))
    assert (reply.opt, reply.rep) == (opt, Rep.ERR_UNSUP)


MALFORMED = {
    "info name runs past the end": (Opt.GO, struct.pack(">I", 10) + b"disk"),
    "info without request count": (Opt.GO, string("disk")),
    "info count larger than data": (Opt.INFO, string("disk") + struct.pack(">HH", 2, 0)),
    "info trailing byte": (Opt.GO, info_data("disk") + b"\0"),
    "info name too long": (Opt.GO, info_data("d" * 4097)),
    "info name with NUL": (Opt.GO, info_data(b"di\0sk")),
    "info name not utf-8": (Opt.GO, info_data(b"\xff\xfe")),
    "info empty payload": (Opt.INFO, b""),
    "meta without query count": (Opt.LIST_META_CONTEXT, string("disk")),
    "meta query past the end": (
        Opt.LIST_META_CONTEXT,
        string("disk") + struct.pack(">II", 1, 50) + b"base:",
    ),
    "meta more queries than data": (
        Opt.LIST_META_CONTEXT,
        string("disk") + struct.pack(">I", 2) + string("base:"),
    ),
    "meta trailing bytes": (Opt.LIST_META_CONTEXT, meta_data("disk", ["base:"]) + b"xx"),
    "meta query too long": (Opt.LIST_META_CONTEXT, meta_data("disk", ["x" * 4097])),
}


@pytest.mark.parametrize("opt,data", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_option_data_is_err_invalid_and_the_stream_goes_on(opt: Opt, data: bytes) -> None:
    conn = in_options()
    assert one_event(conn, option(opt, data) + option(Opt.LIST)) == OptList()
    [reply] = option_replies(sent(conn))
    assert (reply.opt, reply.rep) == (opt, Rep.ERR_INVALID)


def test_option_longer_than_the_limit_closes() -> None:
    conn = in_options()
    header = struct.pack(">QII", 0x49484156454F5054, Opt.GO, 1 << 20)
    event = one_event(conn, header)
    assert isinstance(event, Closed) and not event.clean


def test_abort_is_acked_and_closes_cleanly() -> None:
    conn = in_options()
    event = one_event(conn, option(Opt.ABORT))
    assert isinstance(event, Closed) and event.clean
    assert option_replies(sent(conn)) == [OptionReply(Opt.ABORT, ACK, b"")]


def test_abort_with_data_is_still_acked() -> None:
    conn = in_options()
    assert isinstance(one_event(conn, option(Opt.ABORT, b"junk")), Closed)
    assert option_replies(sent(conn)) == [OptionReply(Opt.ABORT, ACK, b"")]


def test_bad_option_magic_closes() -> None:
    conn = in_options()
    event = one_event(conn, option(Opt.LIST, magic=0x1234))
    assert isinstance(event, Closed) and not event.clean
    assert sent(conn) == b""


def test_option_fed_byte_by_byte_gives_the_same_event() -> None:
    conn = ServerConnection()
    stream = client_flags() + option(Opt.GO, info_data("disk", [Info.NAME]))
    for i in range(len(stream) - 1):
        conn.receive_data(stream[i : i + 1])
        assert conn.next_event() is NEED_DATA
    assert one_event(conn, stream[-1:]) == OptInfo("disk", (Info.NAME,), go=True)


def test_eof_during_options_is_an_unclean_close() -> None:
    conn = in_options()
    conn.receive_data(option(Opt.LIST)[:5])
    conn.receive_data(b"")
    event = conn.next_event()
    assert isinstance(event, Closed) and not event.clean


# --- transmission: parsing -------------------------------------------------------------------
def test_read_request_becomes_an_event() -> None:
    conn = in_transmission()
    event = only_event(conn, request(Cmd.READ, cookie=7, offset=512, length=4096))
    assert event == Request(7, Cmd.READ, CmdFlag(0), 512, 4096)


def test_request_fed_byte_by_byte_gives_the_same_event() -> None:
    conn = in_transmission()
    stream = request(Cmd.TRIM, cookie=0xFEEDFACECAFEBEEF, offset=1 << 40, length=1 << 20)
    for i in range(len(stream) - 1):
        assert one_event(conn, stream[i : i + 1]) is NEED_DATA
    event = one_event(conn, stream[-1:])
    assert event == Request(0xFEEDFACECAFEBEEF, Cmd.TRIM, CmdFlag(0), 1 << 40, 1 << 20)


def test_write_payload_becomes_request_data() -> None:
    conn = in_transmission()
    payload = bytes(range(256)) * 4
    event = only_event(conn, request(Cmd.WRITE, cookie=3, offset=4096, data=payload))
    assert event == Request(3, Cmd.WRITE, CmdFlag(0), 4096, 1024, payload)


def test_write_split_at_every_boundary_gives_the_same_event() -> None:
    payload = b"abcdefgh" * 8
    stream = request(Cmd.WRITE, cookie=3, data=payload) + request(Cmd.FLUSH, cookie=4)
    expected = [Request(3, Cmd.WRITE, CmdFlag(0), 0, 64, payload), Request(4, Cmd.FLUSH, 0, 0, 0)]
    for cut in range(1, len(stream)):
        conn = in_transmission()
        events = []
        for part in (stream[:cut], stream[cut:]):
            conn.receive_data(part)
            events += events_until_need_data(conn)
        assert events == expected, cut


def test_oversized_write_is_refused_and_its_payload_skipped() -> None:
    conn = in_transmission()  # DISK.max_block is 64 KiB
    big = request(Cmd.WRITE, cookie=1, data=bytes(65537))
    conn.receive_data(big + request(Cmd.READ, cookie=2, length=512))
    refused, read = events_until_need_data(conn)
    assert isinstance(refused, BadRequest)
    assert (refused.cookie, refused.cmd, refused.errno) == (1, Cmd.WRITE, Errno.EINVAL)
    assert read == Request(2, Cmd.READ, CmdFlag(0), 0, 512)


def test_oversized_write_fed_in_pieces_still_resynchronises() -> None:
    conn = in_transmission()
    stream = request(Cmd.WRITE, cookie=1, data=b"\xaa" * 70000) + request(Cmd.FLUSH, cookie=2)
    events: list[object] = []
    for pos in range(0, len(stream), 997):
        conn.receive_data(stream[pos : pos + 997])
        events += events_until_need_data(conn)
    assert [type(e) for e in events] == [BadRequest, Request]
    assert events[1] == Request(2, Cmd.FLUSH, CmdFlag(0), 0, 0)


def test_oversized_read_is_refused_einval() -> None:
    conn = in_transmission()
    event = only_event(conn, request(Cmd.READ, cookie=5, length=65537))
    assert isinstance(event, BadRequest) and (event.cookie, event.errno) == (5, Errno.EINVAL)


BAD_FLAGS = {
    "read+fua without SEND_FUA": (Cmd.READ, CmdFlag.FUA),
    "read+no_hole": (Cmd.READ, CmdFlag.NO_HOLE),
    "flush+req_one": (Cmd.FLUSH, CmdFlag.REQ_ONE),
    "trim+fast_zero": (Cmd.TRIM, CmdFlag.FAST_ZERO),
    "cache+df": (Cmd.CACHE, CmdFlag.DF),
    "zeroes+unknown bit": (Cmd.WRITE_ZEROES, 1 << 7),
    "read+bit 15": (Cmd.READ, 1 << 15),
}


@pytest.mark.parametrize("cmd,flags", BAD_FLAGS.values(), ids=BAD_FLAGS.keys())
def test_flags_not_valid_for_the_command_are_einval(cmd: Cmd, flags: int) -> None:
    conn = in_transmission()
    event = only_event(conn, request(cmd, cookie=9, flags=flags, length=512))
    assert isinstance(event, BadRequest)
    assert (event.cookie, event.cmd, event.errno) == (9, cmd, Errno.EINVAL)


DISK_DF = ExportInfo(name="disk", size=1 << 20, flags=int(FLAGS | F.SEND_DF), max_block=65536)


def advertised_flags(conn: ServerConnection) -> int:
    """Transmission flags of the NBD_INFO_EXPORT reply to an OPT_GO for ``disk``."""
    event = one_event(conn, option(Opt.GO, info_data("disk")))
    assert isinstance(event, OptInfo)
    conn.reply_info(DISK_DF)
    info = option_replies(sent(conn))[0].data
    (flags,) = struct.unpack_from(">H", info, 10)
    return int(flags)


def test_df_is_not_advertised_without_structured_replies() -> None:
    # "NBD_FLAG_SEND_DF ... MUST NOT be set if structured replies have not been negotiated"
    assert advertised_flags(in_options()) == int(FLAGS)


def test_df_is_not_advertised_after_export_name_without_structured_replies() -> None:
    conn = in_options()
    one_event(conn, option(Opt.EXPORT_NAME, b"disk"))
    conn.accept_export(DISK_DF)
    assert sent(conn) == struct.pack(">QH", DISK_DF.size, FLAGS)


def test_read_with_df_without_structured_replies_is_einval() -> None:
    conn = in_options()
    advertised_flags(conn)
    event = only_event(conn, request(Cmd.READ, cookie=3, flags=CmdFlag.DF, length=512))
    assert isinstance(event, BadRequest) and (event.cookie, event.errno) == (3, Errno.EINVAL)


def test_df_is_advertised_and_accepted_with_structured_replies() -> None:
    conn = in_options()
    assert one_event(conn, option(Opt.STRUCTURED_REPLY)) is NEED_DATA
    sent(conn)
    assert advertised_flags(conn) == int(FLAGS | F.SEND_DF)
    event = only_event(conn, request(Cmd.READ, cookie=3, flags=CmdFlag.DF, length=512))
    assert isinstance(event, Request) and event.df


@pytest.mark.parametrize("cmd", [Cmd.READ, Cmd.FLUSH, Cmd.CACHE, Cmd.WRITE_ZEROES])
def test_fua_is_accepted_on_every_command_when_send_fua_is_advertised(cmd: Cmd) -> None:
    # "provided NBD_FLAG_SEND_FUA has been negotiated, ... the server MUST accept all
    # commands with this bit set (even by ignoring the bit)".
    conn = in_transmission(DISK_FUA)
    event = only_event(conn, request(cmd, flags=CmdFlag.FUA, length=512))
    assert isinstance(event, Request) and event.flags == CmdFlag.FUA


def test_write_with_bad_flags_still_consumes_its_payload() -> None:
    conn = in_transmission()
    stream = request(Cmd.WRITE, cookie=1, flags=CmdFlag.DF, data=b"x" * 100)
    conn.receive_data(stream + request(Cmd.FLUSH, cookie=2))
    refused, flush = events_until_need_data(conn)
    assert isinstance(refused, BadRequest) and refused.errno == Errno.EINVAL
    assert flush == Request(2, Cmd.FLUSH, CmdFlag(0), 0, 0)


@pytest.mark.parametrize("cmd", [8, 42, 0xFFFF])
def test_unknown_command_is_einval(cmd: int) -> None:
    conn = in_transmission()
    event = only_event(conn, request(cmd, cookie=11, length=512))
    assert isinstance(event, BadRequest)
    assert (event.cookie, event.cmd, event.errno) == (11, cmd, Errno.EINVAL)


def test_disc_closes_cleanly() -> None:
    conn = in_transmission()
    event = one_event(conn, request(Cmd.DISC))
    assert isinstance(event, Closed) and event.clean
    assert sent(conn) == b""


def test_bad_request_magic_closes() -> None:
    conn = in_transmission()
    event = one_event(conn, request(Cmd.READ, length=512, magic=0x12560953))
    assert isinstance(event, Closed) and not event.clean


def test_eof_mid_write_payload_is_an_unclean_close() -> None:
    conn = in_transmission()
    conn.receive_data(request(Cmd.WRITE, data=bytes(100))[:-1])
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"")
    event = conn.next_event()
    assert isinstance(event, Closed) and not event.clean


def test_eof_mid_skipped_payload_is_an_unclean_close() -> None:
    conn = in_transmission()
    conn.receive_data(request(Cmd.WRITE, data=bytes(70000))[:-1])
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"")
    event = conn.next_event()
    assert isinstance(event, Closed) and not event.clean


def test_eof_mid_header_is_an_unclean_close() -> None:
    conn = in_transmission()
    conn.receive_data(request(Cmd.READ, length=512)[:10])
    conn.receive_data(b"")
    event = conn.next_event()
    assert isinstance(event, Closed) and not event.clean


def test_eof_between_requests_delivers_them_then_closes() -> None:
    conn = in_transmission()
    conn.receive_data(request(Cmd.FLUSH))
    conn.receive_data(b"")
    assert isinstance(conn.next_event(), Request)
    assert isinstance(conn.next_event(), Closed)


def test_block_status_without_meta_context_is_einval() -> None:
    conn = in_transmission(structured=True)
    event = only_event(conn, request(Cmd.BLOCK_STATUS, cookie=4, length=4096))
    assert isinstance(event, BadRequest) and (event.cookie, event.errno) == (4, Errno.EINVAL)


def test_block_status_with_meta_context_is_a_request() -> None:
    conn = in_transmission(meta=True)
    event = only_event(conn, request(Cmd.BLOCK_STATUS, cookie=4, flags=CmdFlag.REQ_ONE, length=9))
    assert event == Request(4, Cmd.BLOCK_STATUS, CmdFlag.REQ_ONE, 0, 9)


def test_after_closed_next_event_repeats_the_same_closed() -> None:
    conn = in_transmission()
    closed = one_event(conn, request(Cmd.READ, length=1, magic=0))
    conn.receive_data(request(Cmd.FLUSH))
    assert conn.next_event() == closed
    assert sent(conn) == b""


def test_input_buffer_stays_bounded_with_pipelined_requests() -> None:
    conn = in_transmission()
    stream = b"".join(request(Cmd.READ, cookie=i, length=512) for i in range(100_000))
    # After the first 5 bytes every piece is a multiple of the request size, so no piece ends
    # on a request boundary and the buffer is never empty when more data arrives.
    conn.receive_data(stream[:5])
    for pos in range(5, len(stream), 28 * 146):
        conn.receive_data(stream[pos : pos + 28 * 146])
        for event in events_until_need_data(conn):
            assert isinstance(event, Request)
    held = conn._rx.held  # 2.8 MB went through
    assert held < 2 << 20


# --- transmission: reply encoding ------------------------------------------------------------
def test_send_ok_is_a_simple_reply() -> None:
    conn = in_transmission()
    conn.send_ok(0x0102030405060708)
    assert simple_reply(sent(conn)) == SimpleReply(0, 0x0102030405060708, b"")


def test_send_ok_with_structured_replies_is_still_simple() -> None:
    conn = in_transmission(structured=True)
    conn.send_ok(5)
    assert simple_reply(sent(conn)) == SimpleReply(0, 5, b"")


def test_send_error_without_structured_replies_is_simple() -> None:
    conn = in_transmission()
    conn.send_error(6, Errno.ENOSPC, "disk full")
    assert simple_reply(sent(conn)) == SimpleReply(Errno.ENOSPC, 6, b"")


def test_send_error_with_structured_replies_is_an_error_chunk() -> None:
    conn = in_transmission(structured=True)
    conn.send_error(6, Errno.EIO, "bad sector")
    [chunk] = chunks(sent(conn))
    assert (chunk.flags, chunk.type, chunk.cookie) == (REPLY_FLAG_DONE, TYPE_ERROR, 6)
    assert err_reply(chunk.payload) == (Errno.EIO, 10, b"bad sector")


def test_long_error_message_is_cut_to_4096_bytes_of_valid_utf8() -> None:
    conn = in_transmission(structured=True)
    conn.send_error(6, Errno.EIO, "a" + "é" * 3000)
    [chunk] = chunks(sent(conn))
    _, length, message = err_reply(chunk.payload)
    assert length == len(message) <= 4096
    assert message.decode("utf-8").startswith("aé")


def test_long_refusal_message_is_cut_to_4096_bytes_of_valid_utf8() -> None:
    conn = in_options()
    one_event(conn, option(Opt.GO, info_data("nope")))
    conn.reply_info(None, "a" + "é" * 3000)
    [reply] = option_replies(sent(conn))
    assert len(reply.data) <= 4096
    reply.data.decode("utf-8")


def test_simple_read_sends_header_then_data_with_holes_as_zeroes() -> None:
    conn = in_transmission()
    conn.send_read(8, 1024, [(3, b"abc"), (4, None), (2, b"de")])
    assert simple_reply(sent(conn)) == SimpleReply(0, 8, b"abc\0\0\0\0de")


def test_structured_read_sends_data_and_hole_chunks_done_on_the_last() -> None:
    conn = in_transmission(structured=True)
    conn.send_read(8, 1024, [(3, b"abc"), (4096, None), (2, b"de")])
    assert chunks(sent(conn)) == [
        Chunk(0, TYPE_OFFSET_DATA, 8, struct.pack(">Q", 1024) + b"abc"),
        Chunk(0, TYPE_OFFSET_HOLE, 8, struct.pack(">QI", 1027, 4096)),
        Chunk(REPLY_FLAG_DONE, TYPE_OFFSET_DATA, 8, struct.pack(">Q", 5123) + b"de"),
    ]


def test_structured_read_of_one_hole_is_one_done_hole_chunk() -> None:
    conn = in_transmission(structured=True)
    conn.send_read(8, 0, [(65536, None)])
    assert chunks(sent(conn)) == [Chunk(REPLY_FLAG_DONE, TYPE_OFFSET_HOLE, 8, struct.pack(">QI", 0, 65536))]


def test_structured_read_without_pieces_is_a_done_none_chunk() -> None:
    conn = in_transmission(structured=True)
    conn.send_read(8, 0, [])
    assert chunks(sent(conn)) == [Chunk(REPLY_FLAG_DONE, TYPE_NONE, 8, b"")]


def test_structured_zero_length_read_is_a_done_none_chunk() -> None:
    # An OFFSET_DATA chunk is at least 9 bytes (an offset and one byte of data).
    conn = in_transmission(structured=True)
    event = only_event(conn, request(Cmd.READ, cookie=8, offset=4096, length=0))
    assert isinstance(event, Request) and event.length == 0
    conn.send_read(8, 4096, [(0, b"")])
    assert chunks(sent(conn)) == [Chunk(REPLY_FLAG_DONE, TYPE_NONE, 8, b"")]


def test_structured_read_sends_no_chunk_for_an_empty_piece() -> None:
    conn = in_transmission(structured=True)
    conn.send_read(8, 1024, [(3, b"abc"), (0, None), (0, b"")])
    data = struct.pack(">Q", 1024) + b"abc"
    assert chunks(sent(conn)) == [Chunk(REPLY_FLAG_DONE, TYPE_OFFSET_DATA, 8, data)]


def test_block_status_reply_has_context_id_and_descriptors() -> None:
    conn = in_transmission(meta=True)
    [context_id] = conn.meta_contexts
    conn.send_block_status(12, [(4096, STATE_HOLE | STATE_ZERO), (512, 0)])
    [chunk] = chunks(sent(conn))
    assert (chunk.flags, chunk.type, chunk.cookie) == (REPLY_FLAG_DONE, TYPE_BLOCK_STATUS, 12)
    assert chunk.payload == struct.pack(">IIIII", context_id, 4096, 3, 512, 0)


def test_replies_to_outstanding_requests_are_allowed_after_disc() -> None:
    # NBD_CMD_DISC: "The server MUST handle all outstanding requests" before closing.
    conn = in_transmission()
    conn.receive_data(request(Cmd.FLUSH, cookie=1) + request(Cmd.DISC))
    events = events_until_need_data(conn)
    assert isinstance(events[-1], Closed) and events[-1].clean
    conn.send_ok(1)
    assert simple_reply(sent(conn)) == SimpleReply(0, 1, b"")


# --- calling the wrong method for the phase --------------------------------------------------
Answer = Callable[[ServerConnection], object]

SENDS: dict[str, Answer] = {
    "send_ok": lambda c: c.send_ok(1),
    "send_error": lambda c: c.send_error(1, Errno.EIO),
    "send_read": lambda c: c.send_read(1, 0, [(1, b"x")]),
    "send_block_status": lambda c: c.send_block_status(1, [(1, 0)]),
}


@pytest.mark.parametrize("call", SENDS.values(), ids=SENDS.keys())
def test_transmission_replies_before_transmission_raise(call: Answer) -> None:
    conn = in_options()
    with pytest.raises(ProtocolStateError):
        call(conn)
    assert sent(conn) == b""


def test_block_status_reply_without_meta_context_raises() -> None:
    conn = in_transmission(structured=True)
    with pytest.raises(ProtocolStateError):
        conn.send_block_status(1, [(1, 0)])


OPTION_ANSWERS: dict[str, Answer] = {
    "reply_list": lambda c: c.reply_list([]),
    "reply_info": lambda c: c.reply_info(DISK),
    "reply_meta_context": lambda c: c.reply_meta_context(True),
    "accept_export": lambda c: c.accept_export(DISK),
    "refuse_export_name": lambda c: c.refuse_export_name("no"),
}


@pytest.mark.parametrize("call", OPTION_ANSWERS.values(), ids=OPTION_ANSWERS.keys())
def test_option_answers_without_a_pending_option_raise(call: Answer) -> None:
    for conn in (ServerConnection(), in_options(), in_transmission()):
        with pytest.raises(ProtocolStateError):
            call(conn)


def test_answer_for_another_option_raises() -> None:
    conn = in_options()
    one_event(conn, option(Opt.LIST))
    with pytest.raises(ProtocolStateError):
        conn.reply_info(DISK)
    with pytest.raises(ProtocolStateError):
        conn.accept_export(DISK)
    conn.reply_list([])  # the right answer still works


def test_next_event_while_an_option_is_pending_raises() -> None:
    conn = in_options()
    one_event(conn, option(Opt.LIST))
    with pytest.raises(ProtocolStateError):
        conn.next_event()


def test_option_answer_after_close_raises() -> None:
    conn = in_options()
    one_event(conn, option(Opt.ABORT))
    with pytest.raises(ProtocolStateError):
        conn.reply_list([])


# --- transmission: receiving in place (asyncio.BufferedProtocol) -----------------------------
BIG = ExportInfo(name="disk", size=1 << 30, flags=int(FLAGS), max_block=4 << 20)


def receive_in_place(conn: ServerConnection, data: bytes, piece: int = 1 << 30) -> list[object]:
    """Put ``data`` where ``get_buffer`` says, at most ``piece`` bytes a call, and take the
    events after each call, as ``NbdConnection`` does (it skips that when ``buffer_updated``
    says nothing can be parsed: then there must be no event)."""
    events: list[object] = []
    pos = 0
    while pos < len(data):
        view = conn.get_buffer()
        assert len(view) > 0
        n = min(len(view), piece, len(data) - pos)
        view[:n] = data[pos : pos + n]
        more = conn.buffer_updated(n)
        pos += n
        got = events_until_need_data(conn)
        assert more or not got, f"buffer_updated said no event could come, then {got}"
        events += got
    return events


def test_large_write_payload_is_received_into_the_request_buffer() -> None:
    conn = in_transmission(BIG)
    payload = bytes(range(256)) * 4096  # 1 MiB
    stream = request(Cmd.WRITE, cookie=7, offset=1 << 20, data=payload)
    assert receive_in_place(conn, stream[:5000]) == []
    view = conn.get_buffer()
    assert len(view) == len(payload) - (5000 - 28)  # the rest of the payload, nothing more
    view[:] = stream[5000:]
    conn.buffer_updated(len(view))
    event = conn.next_event()
    assert event == Request(7, Cmd.WRITE, CmdFlag(0), 1 << 20, len(payload), payload)
    assert isinstance(event, Request) and view.obj is event.data  # received there: no copy
    assert conn.next_event() is NEED_DATA and conn.buffered == 0


def test_buffer_updated_says_false_only_while_a_payload_is_not_whole() -> None:
    conn = in_transmission(BIG)
    payload = bytes(range(256)) * 4096  # 1 MiB
    stream = request(Cmd.WRITE, cookie=7, offset=0, data=payload) + request(Cmd.FLUSH, cookie=8)
    said, events, pos = [], [], 0
    while pos < len(stream):
        view = conn.get_buffer()
        n = min(len(view), 100_000, len(stream) - pos)
        view[:n] = stream[pos : pos + n]
        del view
        said.append(conn.buffer_updated(n))
        pos += n
        if said[-1]:
            events += events_until_need_data(conn)
    # True for the receive with the header, False for the payload's next ones until the
    # one that makes it whole, True for the FLUSH after it
    assert said[0] and not any(said[1:-2]) and said[-2:] == [True, True] and len(said) > 5
    assert [e.cookie for e in events] == [7, 8] and events[0].data == payload  # type: ignore[attr-defined]


def test_after_an_in_place_payload_the_next_large_payload_is_not_copied_at_all() -> None:
    conn = in_transmission(BIG)
    first, second = b"\x01" * (1 << 20), b"\x02" * (1 << 20)
    stream = request(Cmd.WRITE, cookie=1, offset=0, data=first)
    assert receive_in_place(conn, stream[:1000]) == []
    view = conn.get_buffer()
    view[:] = stream[1000:]
    conn.buffer_updated(len(view))
    del view
    [event] = events_until_need_data(conn)
    assert event.data == first  # type: ignore[attr-defined]
    header = conn.get_buffer()
    assert len(header) == 28  # only the next request's header, not a slice of its payload
    header[:] = request(Cmd.WRITE, cookie=2, offset=1 << 20, length=len(second))
    del header
    conn.buffer_updated(28)
    assert conn.next_event() is NEED_DATA
    sink = conn.get_buffer()
    assert len(sink) == len(second)  # the whole payload straight into its own buffer
    sink[:] = second
    conn.buffer_updated(len(sink))
    [event] = events_until_need_data(conn)
    assert event.data == second and event.data is sink.obj  # type: ignore[attr-defined]
    del sink
    # a small request after it: read whole, and the receive buffer offers its full room again
    assert receive_in_place(conn, request(Cmd.FLUSH, cookie=3) + request(Cmd.FLUSH, cookie=4)) == [
        Request(3, Cmd.FLUSH, CmdFlag(0), 0, 0),
        Request(4, Cmd.FLUSH, CmdFlag(0), 0, 0),
    ]
    assert len(conn.get_buffer()) > 64 * 1024


def test_requests_after_an_in_place_payload_are_parsed_in_order() -> None:
    conn = in_transmission(BIG)
    payload = b"\x5a" * 300_000
    stream = (
        request(Cmd.WRITE, cookie=1, data=payload)
        + request(Cmd.READ, cookie=2, length=4096)
        + request(Cmd.WRITE, cookie=3, data=b"small")
    )
    events = receive_in_place(conn, stream, piece=70_000)
    assert events == [
        Request(1, Cmd.WRITE, CmdFlag(0), 0, len(payload), payload),
        Request(2, Cmd.READ, CmdFlag(0), 0, 4096),
        Request(3, Cmd.WRITE, CmdFlag(0), 0, 5, b"small"),
    ]


def test_receive_data_fills_an_in_place_payload_too() -> None:
    """Bytes fed as ``bytes`` (TLS bytes that came early) go where the payload waits."""
    conn = in_transmission(BIG)
    payload = b"\xa5" * 200_000
    stream = request(Cmd.WRITE, cookie=1, data=payload) + request(Cmd.FLUSH, cookie=2)
    assert receive_in_place(conn, stream[:1000]) == []
    conn.receive_data(stream[1000:])
    assert events_until_need_data(conn) == [
        Request(1, Cmd.WRITE, CmdFlag(0), 0, len(payload), payload),
        Request(2, Cmd.FLUSH, CmdFlag(0), 0, 0),
    ]


def test_eof_mid_in_place_payload_is_an_unclean_close() -> None:
    conn = in_transmission(BIG)
    receive_in_place(conn, request(Cmd.WRITE, data=bytes(500_000))[:-1])
    conn.receive_data(b"")
    event = conn.next_event()
    assert isinstance(event, Closed) and not event.clean


def test_eof_after_a_write_header_alone_is_an_unclean_close() -> None:
    conn = in_transmission()
    assert one_event(conn, request(Cmd.WRITE, length=100)) is NEED_DATA
    conn.receive_data(b"")
    event = conn.next_event()
    assert isinstance(event, Closed) and not event.clean


def test_buffer_offered_is_never_empty_however_much_waits_unparsed() -> None:
    """Requests left unparsed (reading paused) must not leave ``get_buffer`` no room: a
    receive into an empty buffer reads as end of file."""
    conn = in_transmission(BIG)
    stream = b"".join(request(Cmd.READ, cookie=i, length=512) for i in range(40_000))  # 1.1 MB
    pos = 0
    while pos < len(stream):
        view = conn.get_buffer()
        assert len(view) > 0
        n = min(len(view), len(stream) - pos)
        view[:n] = stream[pos : pos + n]
        conn.buffer_updated(n)
        pos += n
    events = events_until_need_data(conn)
    assert [e.cookie for e in events if isinstance(e, Request)] == list(range(40_000))


@given(
    st.lists(
        st.one_of(
            st.tuples(st.just(Cmd.WRITE), st.integers(0, 300_000)),
            st.tuples(st.just(Cmd.READ), st.integers(1, 1 << 20)),
            st.tuples(st.just(Cmd.FLUSH), st.just(0)),
        ),
        min_size=1,
        max_size=8,
    ),
    st.integers(1, 200_000),
)
@settings(max_examples=40, deadline=None)
def test_in_place_gives_the_events_of_receive_data(reqs: list[tuple[Cmd, int]], piece: int) -> None:
    stream = b""
    for cookie, (cmd, n) in enumerate(reqs):
        if cmd is Cmd.WRITE:
            stream += request(cmd, cookie=cookie, data=bytes([cookie % 251]) * n)
        else:
            stream += request(cmd, cookie=cookie, length=n)
    whole = in_transmission(BIG)
    whole.receive_data(stream)
    assert receive_in_place(in_transmission(BIG), stream, piece) == events_until_need_data(whole)


def test_receive_buffer_stays_small_until_transmission() -> None:
    """Nothing has authenticated a client before transmission: what it makes the server
    hold stays a few KiB (a long option grows the buffer only as far as it needs)."""
    conn = ServerConnection()
    assert receive_in_place(conn, client_flags(C_FIXED_NEWSTYLE | C_NO_ZEROES)) == []
    assert conn._rx.held <= 16 * 1024
    data = option(Opt.GO, info_data("x" * 4000))
    while data:
        view = conn.get_buffer()
        n = min(len(view), len(data))
        view[:n] = data[:n]
        conn.buffer_updated(n)
        data = data[n:]
    assert isinstance(conn.next_event(), OptInfo) and conn._rx.held <= 16 * 1024
    conn.reply_info(BIG)
    assert receive_in_place(conn, request(Cmd.FLUSH)) != []
    assert conn._rx.held >= 128 * 1024  # in transmission: room for a burst of requests
