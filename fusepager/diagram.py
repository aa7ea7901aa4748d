"""`fusepager trace`: a mount's message log drawn as a message sequence diagram.

Pure functions, in the order the command uses them:

- `parse_trace` reads the lines of `MNT/trace` (see `fusepager.trace`) into typed events: a
  `MessageEvent` for each `SOURCE -> DESTINATION mach_name(field=value ...)` line, a `NoteEvent`
  for every other line the engine or the mount wrote (`hello: copy 1 saved ...`, `mount
  truncated ...`).
- `select` keeps the events a user asked for (objects, kernels, a time span, the first or last N
  messages).
- `build_diagram` makes the lifelines (kernels first, then memory objects, each in order of
  first appearance) and puts each note on the lifeline it is about, if any.
- `render_mermaid` writes Mermaid `sequenceDiagram` text; `layout` draws the diagram as shapes,
  which `render_svg` writes as SVG text and `render_png` paints with matplotlib (optional).

No browser and no external renderer: the SVG is written here, in a monospace font, so label
widths can be estimated from their length.
"""

from __future__ import annotations

import fnmatch
import math
import re
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from kernelsim import messages

# --- parsing -----------------------------------------------------------------------------------

KERNEL_TO_MANAGER = frozenset(kind.mach_name for kind in messages.KERNEL_TO_MANAGER)
MANAGER_TO_KERNEL = frozenset(kind.mach_name for kind in messages.MANAGER_TO_KERNEL)

_LINE = re.compile(r"(?P<clock>\d{1,2}:\d{2}:\d{2}(?:\.\d+)?) (?P<text>.*)")
# The message name is anchored on the prefixes Mach's messages have: a note such as `hello -> k1
# lost: ...` has an arrow but is not a message.  The source is the shortest name before ` -> `,
# the destination all up to the message name (object names may hold spaces).
_MESSAGE = re.compile(
    r"(?P<source>.+?) -> (?P<destination>.+) (?P<name>(?:memory_object|mach|netname)_[a-z0-9_]+)\((?P<fields>[^()]*)\)"
)
# `data=<4096 bytes>` is the one field value with a space in it (`messages._show`).
_FIELD = re.compile(r"(\w+)=(<[^>]*>|\S+)")
_BYTES = re.compile(r"<(\d+) bytes>")


@dataclass(frozen=True)
class MessageEvent:
    """One message line: `k1 -> hello memory_object_data_request(control=5 offset=0x0 ...)`."""

    line_number: int
    clock: str  # as the trace wrote it, HH:MM:SS.micro
    seconds: float  # since midnight, for --since and --until
    source: str
    destination: str
    name: str  # the Mach name, memory_object_data_request
    fields: Mapping[str, str]
    kernel: str  # which of source and destination is the kernel ...
    object: str  # ... and which the memory object (or `default`, the default manager)
    text: str  # the line without its time, for tooltips

    @property
    def label(self) -> str:
        return message_label(self.name, self.fields)

    @property
    def to_kernel(self) -> bool:
        return self.destination == self.kernel and self.source != self.kernel


@dataclass(frozen=True)
class NoteEvent:
    """Any other line: what the engine, the mount or the daemon did or refused."""

    line_number: int
    clock: str
    seconds: float
    text: str


Event = MessageEvent | NoteEvent


@dataclass(frozen=True)
class ParsedTrace:
    events: list[Event]
    lines: int  # lines read
    unparsed: int  # lines without a time stamp (not from a trace, or cut)

    @property
    def messages(self) -> list[MessageEvent]:
        return [event for event in self.events if isinstance(event, MessageEvent)]

    @property
    def names(self) -> list[str]:
        """Every kernel and object the messages name, for `build_diagram`."""
        return list(dict.fromkeys(name for message in self.messages for name in (message.kernel, message.object)))


def clock_seconds(clock: str) -> float:
    """`07:12:01.123456` (or `07:12`, `07:12:01`) as seconds since midnight."""
    parts = clock.split(":")
    if not 2 <= len(parts) <= 3:
        raise ValueError(f"not a time of day: {clock!r} (HH:MM[:SS[.micro]])")
    hours, minutes = int(parts[0]), int(parts[1])
    seconds = float(parts[2]) if len(parts) == 3 else 0.0
    if not (0 <= hours < 24 and 0 <= minutes < 60 and 0 <= seconds < 61):
        raise ValueError(f"not a time of day: {clock!r}")
    return hours * 3600 + minutes * 60 + seconds


def parse_fields(text: str) -> dict[str, str]:
    """`control=5 offset=0x0 data=<4096 bytes>` as a dict of the texts."""
    return dict(_FIELD.findall(text))


def parse_trace(lines: Iterable[str]) -> ParsedTrace:
    events: list[Event] = []
    kernels: set[str] = set()
    count = unparsed = 0
    for number, raw in enumerate(lines, 1):
        count += 1
        line = raw.rstrip("\r\n")
        match = _LINE.fullmatch(line)
        if match is None:
            if line.strip():
                unparsed += 1
            continue
        clock, text = match["clock"], match["text"]
        seconds = clock_seconds(clock)
        message = _MESSAGE.fullmatch(text)
        if message is None:
            events.append(NoteEvent(number, clock, seconds, text))
            continue
        source, destination, name = message["source"], message["destination"], message["name"]
        # Which side is the kernel follows from the message kind (the direction the protocol
        # sends it); for a kind the protocol lists in neither direction, from what was seen.
        if name in KERNEL_TO_MANAGER:
            kernel, obj = source, destination
        elif name in MANAGER_TO_KERNEL:
            kernel, obj = destination, source
        elif destination in kernels and source not in kernels:
            kernel, obj = destination, source
        else:
            kernel, obj = source, destination
        kernels.add(kernel)
        events.append(MessageEvent(number, clock, seconds, source, destination, name, parse_fields(message["fields"]), kernel, obj, text))
    return ParsedTrace(events, count, unparsed)


# --- labels ------------------------------------------------------------------------------------


def short_name(name: str) -> str:
    """`memory_object_data_request` -> `data_request`: the prefix every label would repeat."""
    return name.removeprefix("memory_object_")


def _length(fields: Mapping[str, str], *keys: str) -> str:
    for key in keys:
        value = fields.get(key)
        if value is not None:
            found = _BYTES.fullmatch(value)
            return found.group(1) if found else value
    return "?"


def _range(fields: Mapping[str, str], *length_keys: str) -> str:
    return f"{fields.get('offset', '?')}+{_length(fields, *length_keys)}"


def _attributes(fields: Mapping[str, str]) -> str:
    return f"may_cache={fields.get('may_cache', '?')} copy={fields.get('copy_strategy', '?')}"


def message_label(name: str, fields: Mapping[str, str]) -> str:
    """A short label with what a reader checks: offset+length, access, lock, flags.  Port names
    are left out (they are numbers private to each process)."""
    short = short_name(name)
    if name == "memory_object_init":
        return f"{short} page_size={fields.get('page_size', '?')}"
    if name in ("memory_object_data_request", "memory_object_data_unlock"):
        return f"{short} {_range(fields, 'length')} {fields.get('desired_access', '?')}"
    if name == "memory_object_data_supply":
        label = f"{short} {_range(fields, 'data')} lock {fields.get('lock_value', '?')}"
        return label + (" precious" if fields.get("precious") == "1" else "")
    if name in ("memory_object_data_unavailable", "memory_object_lock_completed", "memory_object_copy", "memory_object_data_initialize"):
        return f"{short} {_range(fields, 'length', 'size', 'data')}"
    if name == "memory_object_lock_request":
        flush = " flush" if fields.get("should_flush") == "1" else ""
        return f"{short} {_range(fields, 'size')}{flush} return={fields.get('should_return', '?')} lock {fields.get('lock_value', '?')}"
    if name == "memory_object_data_return":
        label = f"{short} {_range(fields, 'data')} {'dirty' if fields.get('dirty') == '1' else 'clean'}"
        return label + (" kernel_copy" if fields.get("kernel_copy") == "1" else "")
    if name == "memory_object_data_error":
        return f"{short} {_range(fields, 'size')} {fields.get('error_value', '?')}"
    if name == "memory_object_destroy":
        return f"{short} {fields.get('reason', '?')}"
    if name in ("memory_object_ready", "memory_object_change_attributes", "memory_object_change_completed"):
        return f"{short} {_attributes(fields)}"
    if name == "memory_object_supply_completed":
        label = f"{short} {_range(fields, 'length')} {fields.get('result', '?')}"
        return label if fields.get("result") == "KERN_SUCCESS" else f"{label} at {fields.get('error_offset', '?')}"
    if name == "memory_object_create":
        return f"{short} size={fields.get('new_object_size', '?')} page_size={fields.get('new_page_size', '?')}"
    if name == "memory_object_terminate":
        return short
    # Anything else (a notification, a kind added later): its fields as the trace gave them.
    return " ".join([short, *(f"{key}={value}" for key, value in fields.items())])


# --- selecting ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    """What to keep of a trace.  Names are shell-style patterns (`hello*` keeps the copies
    `hello~1`, ...); empty means all."""

    objects: tuple[str, ...] = ()
    kernels: tuple[str, ...] = ()
    since: float | None = None  # seconds since midnight
    until: float | None = None
    first: int | None = None  # messages
    last: int | None = None


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return not patterns or any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def select(events: Sequence[Event], selection: Selection) -> list[Event]:
    """The events kept, in order.  Notes are kept here and placed (or dropped) by
    `build_diagram`; --first N keeps the longest start of the trace with N messages, --last N
    the longest end."""
    kept: list[Event] = []
    for event in events:
        if selection.since is not None and event.seconds < selection.since:
            continue
        if selection.until is not None and event.seconds > selection.until:
            continue
        if isinstance(event, MessageEvent) and not (_matches(event.object, selection.objects) and _matches(event.kernel, selection.kernels)):
            continue
        kept.append(event)
    positions = [index for index, event in enumerate(kept) if isinstance(event, MessageEvent)]
    if selection.first is not None:
        end = positions[selection.first] if selection.first < len(positions) else len(kept)
        kept = kept[:end] if selection.first > 0 else []
    if selection.last is not None:
        positions = [index for index, event in enumerate(kept) if isinstance(event, MessageEvent)]
        if selection.last <= 0:
            kept = []
        elif selection.last < len(positions):
            kept = kept[positions[-selection.last - 1] + 1 :]
    return kept


# --- the diagram -------------------------------------------------------------------------------

NotePolicy = Literal["lifeline", "all", "none"]


@dataclass(frozen=True)
class Participant:
    name: str
    kind: Literal["kernel", "object"]


@dataclass(frozen=True)
class PlacedNote:
    note: NoteEvent
    lifeline: str | None  # None: about the whole daemon, drawn across every lifeline


DiagramItem = MessageEvent | PlacedNote


@dataclass(frozen=True)
class Diagram:
    participants: list[Participant]
    items: list[DiagramItem]

    @property
    def messages(self) -> list[MessageEvent]:
        return [item for item in self.items if isinstance(item, MessageEvent)]

    @property
    def notes(self) -> list[PlacedNote]:
        return [item for item in self.items if isinstance(item, PlacedNote)]


# Notes about the daemon as a whole.  They name kernels in passing (`... with kernels k1 k2`),
# which must not put them on k1's lifeline.
_DAEMON_NOTES = ("manager serving ", "manager: ")
# `mount refused (EINVAL): /objects/hello/ctl: ...`: the object is in the path.
_OBJECT_PATH = re.compile(r"/objects/([^/\s:]+)")
# `default manager: temporary 3 of 65536 bytes`: the temporary is the object `default/3`.
_TEMPORARY = re.compile(r"default manager: temporary (\d+)\b")


def note_lifeline(text: str, names: Iterable[str]) -> str | None:
    """The lifeline a note is about: the object in a mount path it gives, the default manager's
    temporary it names, else the first word that names a lifeline (`hello: copy 1 saved ...`,
    `mount truncated hello ...`, `k1 is gone: ...`); None for notes about the daemon as a whole
    or about no lifeline in `names`."""
    known = set(names)
    if text.startswith(_DAEMON_NOTES):
        return None
    path = _OBJECT_PATH.search(text)
    if path is not None and path.group(1) in known:
        return path.group(1)
    temporary = _TEMPORARY.match(text)
    if temporary is not None and f"default/{temporary.group(1)}" in known:
        return f"default/{temporary.group(1)}"
    for word in text.split():
        word = word.rstrip(":,;")
        if word in known:
            return word
    return None


def build_diagram(events: Sequence[Event], notes: NotePolicy = "lifeline", names: Iterable[str] = ()) -> Diagram:
    """Lifelines from the messages kept; notes on the lifeline they are about ('lifeline'),
    those plus the daemon's own across all lifelines ('all'), or none.  `names` are the
    lifelines of the whole trace (`ParsedTrace.names`): a note about one that the selection
    left out is dropped rather than put on another lifeline it mentions in passing."""
    kernels: dict[str, None] = {}
    objects: dict[str, None] = {}
    for event in events:
        if isinstance(event, MessageEvent):
            kernels.setdefault(event.kernel)
            objects.setdefault(event.object)
    # A name seen as a kernel stays a kernel (a kernel and an object sharing a name is not
    # something the engine makes).
    participants = [Participant(name, "kernel") for name in kernels]
    participants += [Participant(name, "object") for name in objects if name not in kernels]
    drawn = {participant.name for participant in participants}
    known = drawn | set(names)
    items: list[DiagramItem] = []
    for event in events:
        if isinstance(event, MessageEvent):
            items.append(event)
        elif notes != "none":
            subject = note_lifeline(event.text, known)
            if subject in drawn:
                items.append(PlacedNote(event, subject))
            elif subject is None and notes == "all" and drawn and not _names_an_object(event.text):
                items.append(PlacedNote(event, None))
    return Diagram(participants, items)


def _names_an_object(text: str) -> bool:
    # A note about an object that sent no message drawn (`manager created object big`, `mount
    # refused (ENOENT): /objects/nosuch/...`) is not about the daemon as a whole: it stays out
    # even with --notes.
    prefixes = ("manager created object ", "manager removed object ", "mount truncated ", "mount ctl ", "mount ready ", "mount set ")
    return text.startswith(prefixes) or _OBJECT_PATH.search(text) is not None


# --- Mermaid -----------------------------------------------------------------------------------

# Words Mermaid's sequence diagrams reserve; a lifeline with such a name gets an alias.
_MERMAID_KEYWORDS = frozenset(
    "participant actor as note over left right of loop alt else opt par and rect end critical break box "
    "activate deactivate autonumber title create destroy link links properties details sequencediagram "
    "acctitle accdescr".split()
)
_MERMAID_ID = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
# In Mermaid's text `;` ends a statement and `#` starts an entity code; `<` `>` would be HTML.
_MERMAID_ESCAPES = {"#": "#35;", ";": "#59;", "<": "#60;", ">": "#62;", '"': "#34;", "%": "#37;"}
MERMAID_NOTE_WIDTH = 60


def mermaid_text(text: str) -> str:
    """Text Mermaid shows as written: entity codes for what it would read as syntax, and no
    control characters (a line break would end the statement)."""
    return "".join(_MERMAID_ESCAPES.get(char, "?" if ord(char) < 32 or ord(char) == 127 else char) for char in text)


def mermaid_ids(participants: Sequence[Participant]) -> dict[str, str]:
    """Each lifeline's Mermaid id: its name when that is a plain word, else `P<n>` (the name is
    then shown with `as`).  Names like `hello~1`, `k1-2` or `default/3` are not safe as ids."""
    names = {participant.name for participant in participants}
    ids: dict[str, str] = {}
    number = 0
    for participant in participants:
        name = participant.name
        if _MERMAID_ID.fullmatch(name) and name.lower() not in _MERMAID_KEYWORDS:
            ids[name] = name
            continue
        while True:
            number += 1
            candidate = f"P{number}"
            if candidate not in names:
                break
        ids[name] = candidate
    return ids


def render_mermaid(diagram: Diagram, title: str | None = None) -> str:
    ids = mermaid_ids(diagram.participants)
    out = ["sequenceDiagram"]
    if title:
        out.append(f"    title {mermaid_text(title)}")
    for participant in diagram.participants:
        identifier = ids[participant.name]
        if identifier == participant.name:
            out.append(f"    participant {identifier}")
        else:
            out.append(f"    participant {identifier} as {mermaid_text(participant.name)}")
    everyone = f"{ids[diagram.participants[0].name]},{ids[diagram.participants[-1].name]}" if diagram.participants else ""
    for item in diagram.items:
        if isinstance(item, MessageEvent):
            out.append(f"    {ids[item.source]}->>{ids[item.destination]}: {mermaid_text(item.label)}")
        else:
            over = ids[item.lifeline] if item.lifeline is not None else everyone
            lines = textwrap.wrap(item.note.text, MERMAID_NOTE_WIDTH, break_on_hyphens=False) or [""]
            out.append(f"    Note over {over}: {'<br/>'.join(mermaid_text(line) for line in lines)}")
    return "\n".join(out) + "\n"


# --- drawing -----------------------------------------------------------------------------------
# `layout` turns a diagram into shapes in pixels, time going down; `render_svg` and
# `render_png` only paint them, so both pictures are the same.

FONT_SIZE = 12.0
SMALL_FONT_SIZE = 10.0
CHAR_RATIO = 0.61  # a monospace character's width in em (0.6 in DejaVu Sans Mono, a little over)
CHAR_WIDTH = FONT_SIZE * CHAR_RATIO
LINE_HEIGHT = 15.0
BOX_HEIGHT = 30.0
BOX_NAME_CHARS = 24  # longer lifeline names are shortened in their box (the tooltip has them)
LABEL_CHARS = 56  # longer message labels wrap (a lock_request's is 50 or so)
NOTE_CHARS = 52
MIN_GAP = 130.0
MARGIN = 12.0
FONT_FAMILY = "DejaVu Sans Mono, Menlo, Consolas, Liberation Mono, monospace"

COLOURS = {
    "to_object": "#1f4e9c",  # kernel -> memory object: requests, returns
    "to_kernel": "#2e6b30",  # memory object -> kernel: answers, lock requests
    "error": "#b3261e",  # data_error, destroy
    "kernel_fill": "#dce6f5",
    "object_fill": "#e2f0d9",
    "note_fill": "#fff8c5",
    "note_stroke": "#c9b458",
    "lifeline": "#9a9a9a",
    "time": "#808080",
    "text": "#1a1a1a",
}
_ERROR_MESSAGES = frozenset({"memory_object_data_error", "memory_object_destroy"})


@dataclass(frozen=True)
class Line:
    x1: float
    y1: float
    x2: float
    y2: float
    colour: str
    width: float = 1.0
    dashed: bool = False


@dataclass(frozen=True)
class Polygon:
    points: tuple[tuple[float, float], ...]
    colour: str


@dataclass(frozen=True)
class Rect:
    x: float
    y: float
    width: float
    height: float
    fill: str
    stroke: str


@dataclass(frozen=True)
class Text:
    x: float
    y: float  # the baseline
    text: str
    colour: str = COLOURS["text"]
    size: float = FONT_SIZE
    anchor: Literal["start", "middle", "end"] = "start"
    bold: bool = False
    halo: bool = False  # a white outline, so a label that crosses a lifeline stays readable

    def extent(self) -> tuple[float, float]:
        width = len(self.text) * self.size * CHAR_RATIO
        left = {"start": self.x, "middle": self.x - width / 2, "end": self.x - width}[self.anchor]
        return left, left + width


Shape = Line | Polygon | Rect | Text


@dataclass
class Group:
    """Shapes that belong together: a lifeline, a message (its arrow and label), a note, a
    time stamp, the title.  `tooltip` is what a browser shows on hovering (the trace line)."""

    kind: Literal["lifeline", "message", "note", "time", "title"]
    tooltip: str
    shapes: list[Shape] = field(default_factory=list)


@dataclass
class Drawing:
    width: float
    height: float
    groups: list[Group]


def _wrap(text: str, width: int) -> list[str]:
    return textwrap.wrap(text, width, break_on_hyphens=False, break_long_words=True) or [""]


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def layout(diagram: Diagram, *, show_time: bool = True, title: str | None = None) -> Drawing:
    participants = diagram.participants
    column = {participant.name: index for index, participant in enumerate(participants)}
    box_widths = [max(80.0, len(_shorten(p.name, BOX_NAME_CHARS)) * CHAR_WIDTH + 24) for p in participants]

    # Horizontal: the gaps between neighbouring lifelines grow until every label fits over its
    # arrow (shortest arrows first: a long one then only takes what its span still lacks).
    gaps = [max(MIN_GAP, (box_widths[i] + box_widths[i + 1]) / 2 + 24) for i in range(len(participants) - 1)]
    labels = {id(message): _wrap(message.label, LABEL_CHARS) for message in diagram.messages}
    spans = sorted(
        {(min(column[m.source], column[m.destination]), max(column[m.source], column[m.destination]), max(map(len, labels[id(m)]))) for m in diagram.messages},
        key=lambda span: span[1] - span[0],
    )
    for low, high, chars in spans:
        if high == low:
            continue
        need = chars * CHAR_WIDTH + 28
        have = sum(gaps[low:high])
        if have < need:
            for index in range(low, high):
                gaps[index] += (need - have) / (high - low)
    centres = [0.0]
    for gap in gaps:
        centres.append(centres[-1] + gap)

    groups: list[Group] = []
    y = 0.0
    if title:
        groups.append(Group("title", title, [Text(centres[-1] / 2 if centres else 0, y + 16, title, size=14, anchor="middle", bold=True)]))
        y += 30
    top = y
    y += BOX_HEIGHT + 18
    times: list[tuple[float, str]] = []
    for item in diagram.items:
        if isinstance(item, MessageEvent):
            group, y = _message_group(item, labels[id(item)], centres[column[item.source]], centres[column[item.destination]], y)
            groups.append(group)
            times.append((y - 10 + 4, item.clock))  # level with the arrow (10 above the next row)
        else:
            if item.lifeline is not None:
                centre = centres[column[item.lifeline]]
                lines = _wrap(item.note.text, NOTE_CHARS)
                width = max(map(len, lines)) * CHAR_WIDTH + 16
                left = centre - width / 2
            else:
                left = centres[0] - box_widths[0] / 2
                width = centres[-1] + box_widths[-1] / 2 - left
                lines = _wrap(item.note.text, max(20, int((width - 16) / CHAR_WIDTH)))
            height = len(lines) * LINE_HEIGHT + 10
            y += 4
            shapes: list[Shape] = [Rect(left, y, width, height, COLOURS["note_fill"], COLOURS["note_stroke"])]
            shapes += [Text(left + 8, y + 5 + LINE_HEIGHT * (k + 1) - 3, line) for k, line in enumerate(lines)]
            groups.append(Group("note", item.note.text, shapes))
            times.append((y + LINE_HEIGHT + 2, item.note.clock))
            y += height + 10
    bottom = y + 8

    lifelines = []
    for participant, centre, width in zip(participants, centres, box_widths):
        kind = "kernel" if participant.kind == "kernel" else "memory object"
        fill = COLOURS["kernel_fill"] if participant.kind == "kernel" else COLOURS["object_fill"]
        stroke = COLOURS["to_object"] if participant.kind == "kernel" else COLOURS["to_kernel"]
        name = _shorten(participant.name, BOX_NAME_CHARS)
        shapes = [Line(centre, top + BOX_HEIGHT, centre, bottom, COLOURS["lifeline"], dashed=True)]
        for box_top in (top, bottom):
            shapes.append(Rect(centre - width / 2, box_top, width, BOX_HEIGHT, fill, stroke))
            shapes.append(Text(centre, box_top + BOX_HEIGHT / 2 + 4, name, anchor="middle", bold=True))
        lifelines.append(Group("lifeline", f"{kind} {participant.name}", shapes))
    groups = lifelines + groups  # lifelines under everything else

    if show_time and times:
        left_edge = min(_left(shape) for group in groups for shape in group.shapes)
        for baseline, clock in times:
            groups.append(Group("time", clock, [Text(left_edge - 10, baseline, clock, COLOURS["time"], SMALL_FONT_SIZE, "end")]))
    return _normalised(groups)


def _message_group(message: MessageEvent, lines: list[str], x1: float, x2: float, y: float) -> tuple[Group, float]:
    """The arrow of one message with its label above it; returns the group and the next y."""
    colour = COLOURS["error"] if message.name in _ERROR_MESSAGES else COLOURS["to_kernel" if message.to_kernel else "to_object"]
    shapes: list[Shape] = []
    if x1 == x2:  # a message to itself: a loop to the right, the label beside it
        y += LINE_HEIGHT * len(lines) + 2
        shapes += [Line(x1, y - 6, x1 + 30, y - 6, colour, 1.4), Line(x1 + 30, y - 6, x1 + 30, y + 6, colour, 1.4), Line(x1 + 30, y + 6, x1 + 1, y + 6, colour, 1.4)]
        shapes.append(Polygon(((x1 + 1, y + 6), (x1 + 10, y + 2), (x1 + 10, y + 10)), colour))
        shapes += [Text(x1 + 36, y - 8 - LINE_HEIGHT * (len(lines) - 1 - k), line, colour, halo=True) for k, line in enumerate(lines)]
        return Group("message", message.text, shapes), y + 20
    y += LINE_HEIGHT * len(lines) + 2
    direction = 1 if x2 > x1 else -1
    tip = x2 - direction  # stop a pixel short of the lifeline
    shapes.append(Line(x1, y, tip - direction * 8, y, colour, 1.4))
    shapes.append(Polygon(((tip, y), (tip - direction * 10, y - 4.5), (tip - direction * 10, y + 4.5)), colour))
    middle = (x1 + x2) / 2
    shapes += [Text(middle, y - 6 - LINE_HEIGHT * (len(lines) - 1 - k), line, colour, anchor="middle", halo=True) for k, line in enumerate(lines)]
    return Group("message", message.text, shapes), y + 10


def _left(shape: Shape) -> float:
    return _bounds(shape)[0]


def _bounds(shape: Shape) -> tuple[float, float, float, float]:
    """left, top, right, bottom (text estimated from its length)."""
    if isinstance(shape, Line):
        return min(shape.x1, shape.x2), min(shape.y1, shape.y2), max(shape.x1, shape.x2), max(shape.y1, shape.y2)
    if isinstance(shape, Polygon):
        xs, ys = [x for x, _ in shape.points], [y for _, y in shape.points]
        return min(xs), min(ys), max(xs), max(ys)
    if isinstance(shape, Rect):
        return shape.x, shape.y, shape.x + shape.width, shape.y + shape.height
    left, right = shape.extent()
    return left, shape.y - shape.size, right, shape.y + shape.size * 0.3


def _normalised(groups: list[Group]) -> Drawing:
    """Move everything so the picture starts at the margin, and size it."""
    bounds = [_bounds(shape) for group in groups for shape in group.shapes]
    if not bounds:
        return Drawing(2 * MARGIN, 2 * MARGIN, groups)
    left, top = min(b[0] for b in bounds), min(b[1] for b in bounds)
    right, bottom = max(b[2] for b in bounds), max(b[3] for b in bounds)
    dx, dy = MARGIN - left, MARGIN - top
    moved = [Group(group.kind, group.tooltip, [_moved(shape, dx, dy) for shape in group.shapes]) for group in groups]
    # Whole pixels, so a PNG has exactly the SVG's size.
    return Drawing(math.ceil(right - left + 2 * MARGIN), math.ceil(bottom - top + 2 * MARGIN), moved)


def _moved(shape: Shape, dx: float, dy: float) -> Shape:
    if isinstance(shape, Line):
        return Line(shape.x1 + dx, shape.y1 + dy, shape.x2 + dx, shape.y2 + dy, shape.colour, shape.width, shape.dashed)
    if isinstance(shape, Polygon):
        return Polygon(tuple((x + dx, y + dy) for x, y in shape.points), shape.colour)
    if isinstance(shape, Rect):
        return Rect(shape.x + dx, shape.y + dy, shape.width, shape.height, shape.fill, shape.stroke)
    return Text(shape.x + dx, shape.y + dy, shape.text, shape.colour, shape.size, shape.anchor, shape.bold, shape.halo)


# --- SVG ---------------------------------------------------------------------------------------


def xml_text(text: str) -> str:
    """Text safe in XML content and attribute values: escaped, and without the control
    characters XML 1.0 forbids (an object name may hold any byte but `/` and NUL)."""
    text = "".join(char if char in "\t\n" or (ord(char) >= 32 and not 0xD800 <= ord(char) <= 0xDFFF and char not in "\ufffe\uffff") else "?" for char in text)
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def _number(value: float) -> str:
    return f"{value:.1f}".rstrip("0").rstrip(".")


def _svg_shape(shape: Shape) -> str:
    if isinstance(shape, Line):
        dash = ' stroke-dasharray="4 4"' if shape.dashed else ""
        return (
            f'<line x1="{_number(shape.x1)}" y1="{_number(shape.y1)}" x2="{_number(shape.x2)}" y2="{_number(shape.y2)}" '
            f'stroke="{shape.colour}" stroke-width="{_number(shape.width)}"{dash}/>'
        )
    if isinstance(shape, Polygon):
        points = " ".join(f"{_number(x)},{_number(y)}" for x, y in shape.points)
        return f'<polygon points="{points}" fill="{shape.colour}"/>'
    if isinstance(shape, Rect):
        return (
            f'<rect x="{_number(shape.x)}" y="{_number(shape.y)}" width="{_number(shape.width)}" height="{_number(shape.height)}" '
            f'rx="3" fill="{shape.fill}" stroke="{shape.stroke}"/>'
        )
    weight = ' font-weight="bold"' if shape.bold else ""
    weight += ' stroke="#ffffff" stroke-width="3" paint-order="stroke"' if shape.halo else ""
    size = f' font-size="{_number(shape.size)}"' if shape.size != FONT_SIZE else ""
    # xml:space keeps runs of spaces and the `---` of a lock value as written.
    return (
        f'<text x="{_number(shape.x)}" y="{_number(shape.y)}" fill="{shape.colour}" text-anchor="{shape.anchor}"{size}{weight} '
        f'xml:space="preserve">{xml_text(shape.text)}</text>'
    )


def render_svg(drawing: Drawing) -> str:
    width, height = _number(drawing.width), _number(drawing.height)
    out = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
            f'font-family="{FONT_FAMILY}" font-size="{_number(FONT_SIZE)}">'
        ),
        '<rect width="100%" height="100%" fill="#ffffff"/>',
    ]
    for group in drawing.groups:
        out.append(f'<g class="{group.kind}"><title>{xml_text(group.tooltip)}</title>')
        out += [f"  {_svg_shape(shape)}" for shape in group.shapes]
        out.append("</g>")
    out.append("</svg>")
    return "\n".join(out) + "\n"


# --- PNG (matplotlib, optional) ----------------------------------------------------------------

PNG_MAX_PIXELS = 60000  # matplotlib's Agg draws at most 2**16 pixels a side


class DiagramError(Exception):
    """Something the user can fix: said in words, no traceback."""


def render_png(drawing: Drawing, path: str, dpi: int = 100) -> None:
    """Paint the drawing with matplotlib (the `bench` extra) at one pixel a unit."""
    try:
        from matplotlib import patheffects
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
        from matplotlib.patches import FancyBboxPatch
        from matplotlib.patches import Polygon as PolygonPatch
    except ImportError as error:
        raise DiagramError(f"--png needs matplotlib ({error}); install it (pip install matplotlib) or use --svg") from None
    if max(drawing.width, drawing.height) > PNG_MAX_PIXELS:
        raise DiagramError(f"the diagram is {drawing.width:.0f}x{drawing.height:.0f} px, too big for a PNG: select less (--last N, --object) or use --svg")
    figure = Figure(figsize=(drawing.width / dpi, drawing.height / dpi), dpi=dpi)
    FigureCanvasAgg(figure)
    axes = figure.add_axes((0, 0, 1, 1))
    axes.set_xlim(0, drawing.width)
    axes.set_ylim(drawing.height, 0)  # y grows downwards, as in SVG
    axes.axis("off")
    points = 72 / dpi  # a pixel in points
    alignment = {"start": "left", "middle": "center", "end": "right"}
    for group in drawing.groups:
        for shape in group.shapes:
            if isinstance(shape, Line):
                axes.add_line(Line2D([shape.x1, shape.x2], [shape.y1, shape.y2], color=shape.colour, linewidth=shape.width * points, linestyle=(0, (4, 4)) if shape.dashed else "-"))
            elif isinstance(shape, Polygon):
                axes.add_patch(PolygonPatch(shape.points, closed=True, facecolor=shape.colour, edgecolor="none"))
            elif isinstance(shape, Rect):
                axes.add_patch(
                    FancyBboxPatch((shape.x, shape.y), shape.width, shape.height, boxstyle="round,pad=0,rounding_size=3", facecolor=shape.fill, edgecolor=shape.stroke, linewidth=points)
                )
            else:
                text = axes.text(
                    shape.x, shape.y, shape.text, color=shape.colour, fontsize=shape.size * points, family="monospace",
                    ha=alignment[shape.anchor], va="baseline", fontweight="bold" if shape.bold else "normal",
                )
                if shape.halo:
                    text.set_path_effects([patheffects.withStroke(linewidth=3 * points, foreground="white")])
    figure.savefig(path, dpi=dpi, facecolor="white")
