"""`fusepager trace`: a trace drawn as a message sequence diagram (fusepager/diagram.py), on
lines real mounts wrote, and the command run on a live mount's trace."""

from __future__ import annotations

import re
import subprocess
import sys
import typing
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from fusepager import diagram
from fusepager.cli import main
from fusepager.session import MountSession
from fusepager.trace import Trace
from kernelsim import messages as m
from kernelsim import port_allocate
from mounting import sh

ROOT = Path(__file__).resolve().parent.parent
SVG = "{http://www.w3.org/2000/svg}"

# Lines from real mounts' traces (the demo, a copy=call object on a store that filled up, the
# default manager, attributes changed with setfattr), in the order they came.
REAL_TRACE = """\
07:34:22.172072 manager serving store /tmp/demo/store at /tmp/demo/mnt with kernels k1 k2
07:34:22.172102 manager: kernels connect to unix:/tmp/demo/store/fusepager.sock
07:34:22.182361 manager created object hello
07:34:22.185891 mount truncated hello from 0 to 65536 bytes
07:34:22.194958 k1 -> hello memory_object_init(control=7 name=6 page_size=4096)
07:34:22.194987 hello -> k1 memory_object_ready(may_cache=0 copy_strategy=delay)
07:34:22.195088 k1 -> hello memory_object_data_request(control=7 offset=0x0 length=4096 desired_access=r--)
07:34:22.195333 hello -> k1 memory_object_data_supply(offset=0x0 data=<4096 bytes> lock_value=-w- precious=1 reply_to=null)
07:34:22.210539 k2 -> hello memory_object_init(control=10 name=9 page_size=16384)
07:34:22.210558 hello -> k2 memory_object_ready(may_cache=0 copy_strategy=delay)
07:34:22.210649 k2 -> hello memory_object_data_request(control=10 offset=0x4000 length=16384 desired_access=r--)
07:34:22.210762 hello -> k1 memory_object_lock_request(offset=0x4000 size=16384 should_return=dirty should_flush=1 lock_value=--- reply_to=5)
07:34:22.210850 k1 -> hello memory_object_lock_completed(control=7 offset=0x4000 length=16384)
07:34:22.210918 hello -> k2 memory_object_data_unavailable(offset=0x4000 size=16384)
07:34:22.218281 k1 -> hello memory_object_data_unlock(control=7 offset=0x0 length=4096 desired_access=-w-)
07:34:22.218488 hello -> k1 memory_object_lock_request(offset=0x0 size=4096 should_return=none should_flush=0 lock_value=--- reply_to=null)
07:34:22.227130 hello -> k1 memory_object_lock_request(offset=0x0 size=16384 should_return=dirty should_flush=0 lock_value=-w- reply_to=5)
07:34:22.227239 k1 -> hello memory_object_data_return(control=7 offset=0x0 data=<4096 bytes> dirty=1 kernel_copy=1)
07:34:22.227278 k1 -> hello memory_object_lock_completed(control=7 offset=0x0 length=16384)
07:36:04.716368 mount ctl hello: attributes may_cache=0 copy=call
07:36:04.716400 hello -> k1 memory_object_change_attributes(may_cache=0 copy_strategy=call reply_to=12)
07:36:04.716500 k1 -> hello memory_object_change_completed(may_cache=0 copy_strategy=call)
07:36:04.719548 k1 -> hello memory_object_copy(old_control=7 offset=0x0 length=65536 new_object=11)
07:36:04.719674 hello: copy 1 of 0x0+65536 for k1, served as hello~1
07:36:04.719751 k1 -> hello~1 memory_object_init(control=13 name=12 page_size=4096)
07:36:04.719767 hello~1 -> k1 memory_object_ready(may_cache=0 copy_strategy=delay)
07:36:04.720310 hello: copy 1 saved 1 page(s) from 0x2000 before they change
07:36:04.720940 k1 -> hello~1 memory_object_data_request(control=13 offset=0x2000 length=4096 desired_access=r--)
07:36:04.721219 hello~1 -> k1 memory_object_data_supply(offset=0x2000 data=<4096 bytes> lock_value=-w- precious=1 reply_to=null)
07:36:04.723577 k1 -> default memory_object_create(new_object=16 new_object_size=262144 new_control=17 new_name=15 new_page_size=4096)
07:36:04.723595 default manager: temporary 1 of 262144 bytes
07:36:04.723655 k1 -> hello~1 memory_object_data_return(control=13 offset=0x2000 data=<4096 bytes> dirty=0 kernel_copy=0)
07:36:04.723857 k1 -> default/1 memory_object_data_initialize(control=17 offset=0x0 data=<16384 bytes>)
07:36:04.726741 mount refused (EINVAL): /objects/hello/ctl: unknown command 'bogus'; commands: sync | flush [OFF LEN] | clean [OFF LEN] | lock OFF LEN PROT | destroy [REASON] | attributes [may_cache=0|1] [copy=none|call|delay]
07:36:04.731133 manager created object big
07:36:04.738617 mount refused (ENOSPC): [Errno 28] No space left on device
07:36:04.740757 hello cannot supply 0x4000+16384 to k2: writing snapshot /tmp/store/objects/hello/snapshots/1: No space left on device
07:36:04.740773 hello -> k2 memory_object_data_error(offset=0x4000 size=16384 error_value=KERN_MEMORY_FAILURE)
07:36:04.753251 mount ctl hello: destroy
07:36:04.753272 hello -> k1 memory_object_destroy(reason=KERN_TERMINATED)
07:36:04.753389 k1 -> hello memory_object_terminate(control=7 name=6)
07:36:04.754747 k1 -> default/1 memory_object_terminate(control=17 name=15)
07:36:04.754894 default manager: temporary 1 ended
"""

# What the diagram labels each message of REAL_TRACE, in order.
LABELS = [
    ("k1", "hello", "init page_size=4096"),
    ("hello", "k1", "ready may_cache=0 copy=delay"),
    ("k1", "hello", "data_request 0x0+4096 r--"),
    ("hello", "k1", "data_supply 0x0+4096 lock -w- precious"),
    ("k2", "hello", "init page_size=16384"),
    ("hello", "k2", "ready may_cache=0 copy=delay"),
    ("k2", "hello", "data_request 0x4000+16384 r--"),
    ("hello", "k1", "lock_request 0x4000+16384 flush return=dirty lock ---"),
    ("k1", "hello", "lock_completed 0x4000+16384"),
    ("hello", "k2", "data_unavailable 0x4000+16384"),
    ("k1", "hello", "data_unlock 0x0+4096 -w-"),
    ("hello", "k1", "lock_request 0x0+4096 return=none lock ---"),
    ("hello", "k1", "lock_request 0x0+16384 return=dirty lock -w-"),
    ("k1", "hello", "data_return 0x0+4096 dirty kernel_copy"),
    ("k1", "hello", "lock_completed 0x0+16384"),
    ("hello", "k1", "change_attributes may_cache=0 copy=call"),
    ("k1", "hello", "change_completed may_cache=0 copy=call"),
    ("k1", "hello", "copy 0x0+65536"),
    ("k1", "hello~1", "init page_size=4096"),
    ("hello~1", "k1", "ready may_cache=0 copy=delay"),
    ("k1", "hello~1", "data_request 0x2000+4096 r--"),
    ("hello~1", "k1", "data_supply 0x2000+4096 lock -w- precious"),
    ("k1", "default", "create size=262144 page_size=4096"),
    ("k1", "hello~1", "data_return 0x2000+4096 clean"),
    ("k1", "default/1", "data_initialize 0x0+16384"),
    ("hello", "k2", "data_error 0x4000+16384 KERN_MEMORY_FAILURE"),
    ("hello", "k1", "destroy KERN_TERMINATED"),
    ("k1", "hello", "terminate"),
    ("k1", "default/1", "terminate"),
]


def parsed(text: str = REAL_TRACE) -> diagram.ParsedTrace:
    return diagram.parse_trace(text.splitlines())


def drawn(text: str = REAL_TRACE, notes: diagram.NotePolicy = "lifeline", **selection) -> diagram.Diagram:
    trace = parsed(text)
    return diagram.build_diagram(diagram.select(trace.events, diagram.Selection(**selection)), notes, trace.names)


# --- parsing and labels ------------------------------------------------------------------------


def test_every_message_line_becomes_a_message_with_its_direction_and_label():
    trace = parsed()
    assert trace.lines == len(REAL_TRACE.splitlines()) and trace.unparsed == 0
    assert [(message.source, message.destination, message.label) for message in trace.messages] == LABELS
    request = trace.messages[2]
    assert (request.clock, request.kernel, request.object, request.name) == ("07:34:22.195088", "k1", "hello", "memory_object_data_request")
    assert request.fields == {"control": "7", "offset": "0x0", "length": "4096", "desired_access": "r--"}
    assert request.seconds == pytest.approx(7 * 3600 + 34 * 60 + 22.195088)
    # an answer: the kernel is its destination
    supply = trace.messages[3]
    assert (supply.kernel, supply.object, supply.to_kernel) == ("k1", "hello", True)
    assert supply.fields["data"] == "<4096 bytes>"
    create = trace.messages[22]
    assert (create.kernel, create.object) == ("k1", "default")


def test_other_lines_are_notes_and_lines_without_a_time_are_counted_not_drawn():
    text = REAL_TRACE + "not a trace line\n07:40:00.000001 hello -> k1 lost: the kernel's control port is dead\n\n"
    trace = parsed(text)
    notes = [event for event in trace.events if isinstance(event, diagram.NoteEvent)]
    assert notes[0].text.startswith("manager serving store")
    assert "hello: copy 1 saved 1 page(s) from 0x2000 before they change" in [note.text for note in notes]
    # an arrow in a note is not a message: no Mach message name follows it
    assert notes[-1].text == "hello -> k1 lost: the kernel's control port is dead"
    assert trace.unparsed == 1
    assert len(trace.messages) == len(LABELS)


def test_object_names_with_spaces_and_unknown_message_kinds():
    trace = parsed(
        "10:00:00.000001 k1 -> my object memory_object_data_request(control=5 offset=0x1000 length=4096 desired_access=rw-)\n"
        "10:00:00.000002 my object -> k1 mach_notify_no_senders(mscount=3)\n"
    )
    first, second = trace.messages
    assert (first.source, first.destination, first.label) == ("k1", "my object", "data_request 0x1000+4096 rw-")
    # not in either direction list: the side already seen as a kernel is the kernel
    assert (second.kernel, second.object, second.label) == ("k1", "my object", "mach_notify_no_senders mscount=3")


# Values that show as something recognisable (`messages._show`); other numbers are 0x6000.
FIELD_VALUES = {"desired_access": 3, "lock_value": 2, "should_return": 1, "copy_strategy": 1, "page_size": 4096, "new_page_size": 4096}


def _instance(kind: type[m.Message]) -> m.Message:
    """A message of this kind with made-up values and real port rights."""
    port = port_allocate("test")
    values: dict[str, object] = {}
    for name, annotation in typing.get_type_hints(kind).items():
        if name in ("msg_id", "mach_name"):
            continue
        text = str(annotation)
        if "ReceiveRight" in text:
            values[name] = port_allocate(name)
        elif "SendOnceRight" in text:
            values[name] = port.make_send_once()
        elif "SendRight" in text or "PortRight" in text:
            values[name] = port.make_send()
        elif annotation is bytes:
            values[name] = b"x" * 8192
        elif annotation is bool:
            values[name] = True
        else:
            values[name] = FIELD_VALUES.get(name, 0x6000)
    return kind(**values)


@pytest.mark.parametrize("kind", sorted(set(m.MESSAGE_TYPES.values()), key=lambda kind: kind.mach_name), ids=lambda kind: kind.mach_name)
def test_every_kind_of_message_the_trace_writes_is_parsed_and_labelled(kind):
    """Lines written by the trace itself (fusepager.trace.Trace, as the mount writes them), for
    every message kind kernelsim defines."""
    trace = Trace(clock=lambda: 1_700_000_000.25)
    message = _instance(kind)
    kernel_side = kind in m.KERNEL_TO_MANAGER
    source, destination = ("k1", "obj~2") if kernel_side else ("obj~2", "k1")
    trace.message(source, destination, message)
    (line,) = trace.read(0, 1 << 20).decode().splitlines()
    (event,) = parsed(line).events
    assert isinstance(event, diagram.MessageEvent), line
    assert (event.source, event.destination, event.name) == (source, destination, kind.mach_name)
    if kind in m.KERNEL_TO_MANAGER or kind in m.MANAGER_TO_KERNEL:
        assert (event.kernel, event.object) == ("k1", "obj~2")
    label = event.label
    assert label.split()[0] == kind.mach_name.removeprefix("memory_object_")
    if "offset" in typing.get_type_hints(kind):
        assert "0x6000+" in label, label  # offset+length, whatever the length is called
    if "desired_access" in typing.get_type_hints(kind):
        assert label.endswith(" rw-"), label
    if "lock_value" in typing.get_type_hints(kind):
        assert " lock -w-" in label, label
    if "data" in typing.get_type_hints(kind):
        assert "+8192" in label, label  # the length of the data
    for port_field in ("control=", "reply_to=", "new_object=", "old_control="):
        assert port_field not in label


# --- lifelines, notes, selection ---------------------------------------------------------------


def test_lifelines_are_kernels_then_objects_in_order_of_appearance():
    assert [(p.name, p.kind) for p in drawn().participants] == [
        ("k1", "kernel"),
        ("k2", "kernel"),
        ("hello", "object"),
        ("hello~1", "object"),
        ("default", "object"),
        ("default/1", "object"),
    ]


def test_notes_go_on_the_lifeline_they_are_about():
    placed = {note.note.text: note.lifeline for note in drawn().notes}
    assert placed["manager created object hello"] == "hello"
    assert placed["mount truncated hello from 0 to 65536 bytes"] == "hello"
    assert placed["mount ctl hello: attributes may_cache=0 copy=call"] == "hello"
    assert placed["hello: copy 1 saved 1 page(s) from 0x2000 before they change"] == "hello"
    assert placed["default manager: temporary 1 of 262144 bytes"] == "default/1"  # temporary 1
    assert placed[next(text for text in placed if text.startswith("mount refused (EINVAL)"))] == "hello"  # from its path
    # about the daemon as a whole, or an object not drawn: left out by default
    assert not any(text.startswith(("manager serving", "manager:", "mount refused (ENOSPC)", "manager created object big")) for text in placed)
    # --notes: the daemon's own lines across every lifeline; still not an object not drawn
    everything = {note.note.text: note.lifeline for note in drawn(notes="all").notes}
    assert everything["manager: kernels connect to unix:/tmp/demo/store/fusepager.sock"] is None
    assert everything["mount refused (ENOSPC): [Errno 28] No space left on device"] is None
    assert "manager created object big" not in everything
    assert drawn(notes="none").notes == []
    assert diagram.note_lifeline("k1 is gone: its control port for hello died", ["k1", "hello"]) == "k1"


def test_selection_by_object_kernel_count_and_time():
    copies = drawn(objects=("hello*",))
    assert [p.name for p in copies.participants] == ["k1", "k2", "hello", "hello~1"]
    only_copy = drawn(objects=("hello~1",))
    assert {m.object for m in only_copy.messages} == {"hello~1"} and len(only_copy.messages) == 5
    assert [n.lifeline for n in only_copy.notes] == []  # hello is not drawn: its notes go
    k2 = drawn(kernels=("k2",))
    assert [p.name for p in k2.participants] == ["k2", "hello"]
    assert [m.label for m in k2.messages] == ["init page_size=16384", "ready may_cache=0 copy=delay", "data_request 0x4000+16384 r--", "data_unavailable 0x4000+16384", "data_error 0x4000+16384 KERN_MEMORY_FAILURE"]
    both = drawn(objects=("hello", "default"), kernels=("k1",))
    assert {m.object for m in both.messages} == {"hello", "default"}
    first = drawn(first=4)
    assert [m.label for m in first.messages] == [label for _, _, label in LABELS[:4]]
    assert [n.note.text for n in first.notes] == ["manager created object hello", "mount truncated hello from 0 to 65536 bytes"]
    last = drawn(last=2)
    assert [m.label for m in last.messages] == ["terminate", "terminate"]
    assert [n.note.text for n in last.notes] == ["default manager: temporary 1 ended"]
    window = drawn(since=diagram.clock_seconds("07:36:04.7196"), until=diagram.clock_seconds("07:36:04.72"))
    assert [m.label for m in window.messages] == ["init page_size=4096", "ready may_cache=0 copy=delay"]
    assert drawn(objects=("nothing",)).messages == []


# --- Mermaid -----------------------------------------------------------------------------------


def test_mermaid_declares_lifelines_and_draws_one_arrow_per_message():
    text = diagram.render_mermaid(drawn(), title="demo; #1")
    lines = text.splitlines()
    assert lines[0] == "sequenceDiagram"
    assert lines[1] == "    title demo#59; #35;1"
    assert lines[2:8] == [
        "    participant k1",
        "    participant k2",
        "    participant hello",
        "    participant P1 as hello~1",
        "    participant default",
        "    participant P2 as default/1",
    ]
    arrows = [line.strip() for line in lines if "->>" in line]
    ids = {"hello~1": "P1", "default/1": "P2"}
    assert arrows == [f"{ids.get(src, src)}->>{ids.get(dst, dst)}: {label}" for src, dst, label in LABELS]
    assert "    Note over hello: hello: copy 1 saved 1 page(s) from 0x2000 before they change" in lines
    # what Mermaid would read as syntax is escaped: no `;` or `#` but in entity codes
    for line in lines[1:]:
        text = line.split(": ", 1)[-1].replace("<br/>", "")  # the text after `A->>B: ` or `Note over A: `
        assert not re.search(r"[;#<>]", re.sub(r"#\d+;", "", text)), line
    refused = next(line for line in lines if "unknown command" in line)
    assert "'bogus'#59; commands" in refused and "<br/>" in refused  # long notes wrap


def test_mermaid_aliases_names_that_are_not_plain_words():
    participants = [diagram.Participant(name, "object") for name in ("end", "k1-2", "P1", "a b", "ok_1")]
    assert diagram.mermaid_ids(participants) == {"end": "P2", "k1-2": "P3", "P1": "P1", "a b": "P4", "ok_1": "ok_1"}


# --- SVG and PNG -------------------------------------------------------------------------------


def svg_groups(svg: str, kind: str) -> list[ET.Element]:
    return [g for g in ET.fromstring(svg).iter(f"{SVG}g") if g.get("class") == kind]


def test_svg_is_well_formed_with_a_lifeline_per_participant_and_an_arrow_per_message():
    shown = drawn()
    svg = diagram.render_svg(diagram.layout(shown, title="the demo & more"))
    root = ET.fromstring(svg)  # well-formed XML
    assert root.tag == f"{SVG}svg" and float(root.get("width")) > 500 and float(root.get("height")) > 29 * 20
    lifelines = svg_groups(svg, "lifeline")
    assert [g.find(f"{SVG}title").text for g in lifelines] == [
        "kernel k1", "kernel k2", "memory object hello", "memory object hello~1", "memory object default", "memory object default/1",
    ]  # fmt: skip
    centre = {}
    for group, participant in zip(lifelines, shown.participants):
        (line,) = group.findall(f"{SVG}line")
        assert line.get("x1") == line.get("x2")  # vertical
        centre[participant.name] = float(line.get("x1"))
        assert [t.text for t in group.findall(f"{SVG}text")] == [participant.name, participant.name]  # box on top and at the bottom
    assert list(centre.values()) == sorted(centre.values())  # left to right in order

    arrows = svg_groups(svg, "message")
    assert len(arrows) == len(LABELS)
    previous_y = 0.0
    for group, (source, destination, label) in zip(arrows, LABELS):
        (line,) = group.findall(f"{SVG}line")
        (head,) = group.findall(f"{SVG}polygon")
        tip_x = float(head.get("points").split()[0].split(",")[0])
        assert float(line.get("x1")) == pytest.approx(centre[source])
        assert tip_x == pytest.approx(centre[destination], abs=2)  # the head at the destination
        assert " ".join(t.text for t in group.findall(f"{SVG}text")) == label
        assert group.find(f"{SVG}title").text.startswith(f"{source} -> {destination} memory_object_")
        y = float(line.get("y1"))
        assert y > previous_y  # time goes down
        previous_y = y
    times = [g.find(f"{SVG}text").text for g in svg_groups(svg, "time")]
    assert times[:3] == ["07:34:22.182361", "07:34:22.185891", "07:34:22.194958"]
    notes = svg_groups(svg, "note")
    assert any("copy 1 saved 1 page(s)" in "".join(t.text for t in g.findall(f"{SVG}text")) for g in notes)
    assert svg_groups(svg, "title")[0].find(f"{SVG}text").text == "the demo & more"
    assert svg_groups(diagram.render_svg(diagram.layout(shown, show_time=False)), "time") == []


def test_svg_escapes_and_fits_long_labels():
    text = (
        "10:00:00.000001 k1 -> a<b>&\"c\x01 memory_object_init(control=1 name=2 page_size=4096)\n"
        "10:00:00.000002 a<b>&\"c\x01: a note with <angle> & ampersand\n"
        "10:00:00.000003 a<b>&\"c\x01 -> k1 memory_object_lock_request(offset=0x7fffffffffff000 size=1099511627776 "
        "should_return=dirty should_flush=1 lock_value=rwx reply_to=5)\n"
    )
    shown = drawn(text)
    svg = diagram.render_svg(diagram.layout(shown))
    ET.fromstring(svg)
    (lifeline_k1, lifeline_object) = svg_groups(svg, "lifeline")
    assert lifeline_object.find(f"{SVG}text").text == 'a<b>&"c?'
    (note,) = svg_groups(svg, "note")
    assert "<angle> & ampersand" in note.find(f"{SVG}text").text
    long_arrow = svg_groups(svg, "message")[1]
    label = " ".join(t.text for t in long_arrow.findall(f"{SVG}text"))
    assert label == "lock_request 0x7fffffffffff000+1099511627776 flush return=dirty lock rwx"
    assert len(long_arrow.findall(f"{SVG}text")) == 2  # wrapped
    # the lifelines are far enough apart for the widest line of the label
    xs = [float(g.find(f"{SVG}line").get("x1")) for g in (lifeline_k1, lifeline_object)]
    widest = max(len(t.text) for t in long_arrow.findall(f"{SVG}text"))
    assert xs[1] - xs[0] >= widest * diagram.CHAR_WIDTH


def test_png_is_painted_with_matplotlib(tmp_path):
    picture = diagram.layout(drawn(first=6))
    path = tmp_path / "trace.png"
    diagram.render_png(picture, str(path))
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (picture.width, picture.height)


# --- the command -------------------------------------------------------------------------------


def test_the_command_says_what_is_wrong_with_exit_status_2(tmp_path, capsys):
    assert main(["trace", str(tmp_path / "missing")]) == 2
    assert "fusepager trace: cannot read" in capsys.readouterr().err
    (tmp_path / "empty.trace").write_text("07:00:00.000001 manager created object hello\n")
    assert main(["trace", str(tmp_path / "empty.trace")]) == 2
    assert "no messages in" in capsys.readouterr().err
    saved = tmp_path / "saved.trace"
    saved.write_text(REAL_TRACE)
    assert main(["trace", str(saved), "--object", "nothing"]) == 2
    assert f"none of the {len(LABELS)} messages" in capsys.readouterr().err
    assert main(["trace", str(saved), "--svg", "-", "--mermaid"]) == 2  # SVG and Mermaid both on stdout
    assert "-o FILE" in capsys.readouterr().err
    assert main(["trace", str(saved), "--svg", "-", "--last", "3"]) == 0
    svg = capsys.readouterr().out
    assert svg.startswith("<?xml") and len(svg_groups(svg, "message")) == 3
    with pytest.raises(SystemExit) as stop:
        main(["trace", str(saved), "--since", "7 o'clock"])
    assert stop.value.code == 2
    with pytest.raises(SystemExit) as stop:
        main(["trace", str(saved), "--first", "0"])
    assert stop.value.code == 2
    assert main(["trace", str(saved), "--kernel", "k2", "--first", "2", "--mermaid"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-2:] == ["    k2->>hello: init page_size=16384", "    hello->>k2: ready may_cache=0 copy=delay"]


def test_help_explains_with_examples():
    result = subprocess.run([sys.executable, "-m", "fusepager", "trace", "--help"], check=False, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0
    for text in ("--mermaid", "--svg FILE", "--object NAME", "--last N", "--since", "examples:", "fusepager trace /mnt/pager --svg trace.svg"):
        assert text in result.stdout


def trace_command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fusepager", "trace", *args], check=False, capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_the_command_draws_a_live_mounts_trace(tmp_path):
    with MountSession(tmp_path / "store", tmp_path / "mnt", ["k1:4096:256", "k2:16384:64"]) as session:
        mnt = session.mountpoint
        obj = mnt / "objects" / "hello"
        sh(f"mkdir {obj} && printf 'page zero' > {obj}/data && truncate -s 64K {obj}/data")
        session.command("k1 map hello 64K")
        assert session.command("k1 read hello 9 text") == "ok read 0x10000 9 'page zero'"
        session.command("k2 map hello 64K")
        assert session.command("k2 read hello+16384 4").endswith(" 00000000")  # a hole
        session.command("k1 write hello+100 from k1")
        assert sh(f"dd if={obj}/data bs=1 skip=100 count=7 status=none").stdout == "from k1"  # k1 returns it
        before = [line for line in (mnt / "trace").read_text().splitlines() if " memory_object_" in line]
        kinds = {re.search(r"memory_object_\w+", line).group() for line in before}
        assert {"memory_object_init", "memory_object_data_unavailable", "memory_object_data_unlock", "memory_object_data_return"} <= kinds

        mermaid = trace_command(str(mnt / "trace"), "--mermaid")
        assert mermaid.returncode == 0, mermaid.stderr
        lines = mermaid.stdout.splitlines()
        assert lines[:4] == ["sequenceDiagram", "    participant k1", "    participant k2", "    participant hello"]
        arrows = [line.strip() for line in lines if "->>" in line]
        assert len(arrows) >= len(before)  # the trace may have grown since
        expected = [re.match(r"\S+ (\S+) -> (\S+) ", line).group(1, 2) for line in before]
        assert [tuple(arrow.split(":")[0].split("->>")) for arrow in arrows[: len(before)]] == expected
        assert "k1->>hello: data_request 0x0+4096 r--" in arrows
        assert "hello->>k2: data_unavailable 0x4000+16384" in arrows
        assert "k1->>hello: data_unlock 0x0+4096 -w-" in arrows
        assert any(arrow.startswith("k1->>hello: data_return 0x0+4096 dirty") for arrow in arrows)
        assert any(line.startswith("    Note over hello: mount truncated hello from ") for line in lines)

        # The mount point stands for its trace; an SVG with one arrow per message.
        svg_path = tmp_path / "trace.svg"
        drawing = trace_command(str(mnt), "--first", str(len(before)), "--svg", str(svg_path))
        assert drawing.returncode == 0, drawing.stderr
        assert f"{len(before)} messages" in drawing.stderr and "lifelines k1 k2 hello" in drawing.stderr
        svg = svg_path.read_text()
        assert len(svg_groups(svg, "message")) == len(before)
        assert [g.find(f"{SVG}title").text for g in svg_groups(svg, "lifeline")] == ["kernel k1", "kernel k2", "memory object hello"]

        only_k2 = trace_command(str(mnt), "--kernel", "k2", "--no-notes")
        assert only_k2.returncode == 0, only_k2.stderr
        assert all(line.strip().startswith(("k2->>", "hello->>k2")) for line in only_k2.stdout.splitlines() if "->>" in line)
        assert "participant k1" not in only_k2.stdout and "Note" not in only_k2.stdout

        missing = trace_command(str(mnt / "nosuch"))
        assert missing.returncode == 2 and "fusepager trace: cannot read" in missing.stderr
