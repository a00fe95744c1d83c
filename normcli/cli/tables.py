"""Tables that fit the width they are printed at, without wrapping a row onto several lines.

Every table names a priority for each column. When the table is wider than the output:

1. headers are abbreviated (``running_mean`` -> ``mean``);
2. in a terminal, name columns (layers, nodes, files) are first held to a share of the width, their names
   shortened from the middle (``layer4.1.…downsample.1``) so the distinguishing end stays visible;
3. columns are dropped, the highest priority number first (a note says which);
4. in a terminal, names are shortened further until the row fits.

Piped output (stdout not a terminal) never shortens a name -- a script reading it gets every name whole --
and has no trailing padding. It fits ``COLUMNS`` when that is set, and is not limited otherwise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

from rich.cells import cell_len
from rich.text import Text

GAP = 2
ELLIPSIS = "…"
NAME_MIN = 8            # a shortened name keeps at least this many cells
NAME_SHARE = 0.45       # in a terminal, names give way before columns are dropped, down to this share
FLEX_PIPE_MAX = 64      # a flexible column (sparkline) with no known width

Cell = Union[str, Text]


@dataclass
class Column:
    """One column. ``priority`` 1 is never dropped; higher numbers are dropped first."""

    header: str
    priority: int = 1
    justify: str = "left"
    short: Optional[str] = None       # the abbreviated header
    name: bool = False                # holds names from the file: shortened from the middle, never in a pipe
    # a flexible column renders each cell for the width it is given (a sparkline: one character per channel
    # up to that width); ``want`` is the width each row would like, ``render(row_index, width)`` the cell
    want: Optional[Callable[[int], int]] = None
    render: Optional[Callable[[int, int], Cell]] = None
    min_width: int = 8
    header_for: Optional[Callable[[int], str]] = None  # the header at a given width (a flexible column)


@dataclass
class Fitted:
    """The lines of a table fitted to a width, and what fitting did."""

    lines: list[Text]
    dropped: list[str] = field(default_factory=list)
    shortened: bool = False
    flex_width: dict[str, int] = field(default_factory=dict)


def output_width(console) -> Optional[int]:
    """The width tables fit: the terminal's, or ``COLUMNS`` for a pipe, or None (no limit) for a pipe."""
    if console.is_terminal:
        return console.width
    text = os.environ.get("COLUMNS", "")
    return int(text) if text.isdigit() and int(text) > 0 else None


def is_terminal(console) -> bool:
    return bool(console.is_terminal)


def shorten_middle(name: str, width: int) -> str:
    """``name`` in at most ``width`` cells, cut in the middle. The end distinguishes layers (``...block3.bn2``),
    so it keeps as many whole dotted parts as fit beside a short start."""
    if cell_len(name) <= width:
        return name
    if width <= 1:
        return ELLIPSIS[:width]
    keep = width - 1
    min_head = min(3, keep // 2)
    parts = name.split(".")
    tail = ""
    for i in range(len(parts) - 1, 0, -1):
        candidate = ".".join(parts[i:])
        if cell_len(candidate) > keep - min_head:
            break
        tail = candidate
    if not tail:  # not even the last part fits: cut inside it, most of the room to the end
        tail_cells = keep - max(1, keep // 4)
        for ch in reversed(name):
            if cell_len(tail) + cell_len(ch) > tail_cells:
                break
            tail = ch + tail
    head_cells = keep - cell_len(tail)
    head, used = "", 0
    for ch in name:
        if used + cell_len(ch) > head_cells:
            break
        head += ch
        used += cell_len(ch)
    return head + ELLIPSIS + tail


def join_names(names: Sequence[str], width: Optional[int]) -> str:
    """``a, b, c, … and 9 more`` within ``width`` cells, never cutting a name; all of them when width is None."""
    if width is None:
        return ", ".join(names)
    shown: list[str] = []
    for i, name in enumerate(names):
        rest = len(names) - i - 1
        more = f", … and {rest} more" if rest else ""
        candidate = ", ".join([*shown, name])
        if cell_len(candidate + more) > width and shown:
            return ", ".join(shown) + f", … and {len(names) - len(shown)} more"
        shown.append(name)
    return ", ".join(shown)


def _text(value: Cell) -> Text:
    return value.copy() if isinstance(value, Text) else Text(str(value))


def fit_table(columns: list[Column], rows: list[list[Cell]], width: Optional[int], terminal: bool) -> Fitted:
    """Lay the table out in ``width`` cells (None: as wide as it needs). Rows never wrap."""
    n = len(columns)
    cells = [[_text(row[i]) if columns[i].render is None else None for i in range(n)] for row in rows]
    headers = [c.header for c in columns]

    def natural(i: int) -> int:
        c = columns[i]
        if c.render is not None:
            wanted = max((c.want(r) for r in range(len(rows))), default=0)
            return max(cell_len(headers[i]), min(wanted, FLEX_PIPE_MAX if width is None else wanted))
        return max([cell_len(headers[i])] + [cells[r][i].cell_len for r in range(len(rows))])

    widths = [natural(i) for i in range(n)]
    kept = list(range(n))
    shortened = False

    def total(ws=None) -> int:
        ws = ws or widths
        return sum(ws[i] for i in kept) + GAP * (len(kept) - 1)

    def floor(i: int) -> int:
        """The width a column counts for while deciding what to drop."""
        c = columns[i]
        if c.render is not None:
            return max(min(c.min_width, widths[i]), cell_len(headers[i]))
        return widths[i]

    if width is not None and total() > width:
        for i, c in enumerate(columns):
            if c.short:
                headers[i] = c.short
        widths = [natural(i) for i in range(n)]
        flex_floor = [floor(i) for i in range(n)]
        if terminal:
            cap = max(NAME_MIN * 2, int(width * NAME_SHARE))
            for i in kept:
                if columns[i].name and flex_floor[i] > cap:
                    flex_floor[i] = max(cap, cell_len(headers[i]))
                    shortened = True

        def needed() -> int:
            return sum(flex_floor[i] for i in kept) + GAP * (len(kept) - 1)

        droppable = sorted((i for i in kept if columns[i].priority > 1),
                           key=lambda i: (-columns[i].priority, -i))
        dropped = []
        while needed() > width and droppable:
            i = droppable.pop(0)
            kept.remove(i)
            dropped.append(i)
        if needed() > width and terminal:
            # names give way until the row fits (each down to NAME_MIN)
            excess = needed() - width
            for i in sorted((i for i in kept if columns[i].name), key=lambda i: -flex_floor[i]):
                room = flex_floor[i] - max(NAME_MIN, cell_len(headers[i]))
                take = min(room, excess)
                if take > 0:
                    flex_floor[i] -= take
                    excess -= take
                    shortened = True
        widths = flex_floor
        # a flexible column takes what is left, up to what its rows want
        for i in kept:
            c = columns[i]
            if c.render is not None:
                spare = width - (sum(widths[j] for j in kept) + GAP * (len(kept) - 1))
                widths[i] = max(widths[i], min(natural(i), widths[i] + max(0, spare)))
        dropped_names = [columns[i].header for i in sorted(dropped)]
    else:
        dropped_names = []

    flex_width: dict[str, int] = {}
    for i in kept:
        c = columns[i]
        if c.render is not None:
            flex_width[c.header] = widths[i]
            for r in range(len(rows)):
                cells[r][i] = _text(c.render(r, widths[i]))
            if c.header_for is not None:
                headers[i] = c.header_for(widths[i]) if cell_len(c.header_for(widths[i])) <= widths[i] else headers[i]
        elif c.name:
            for r in range(len(rows)):
                if cells[r][i].cell_len > widths[i]:
                    if not terminal:
                        # a pipe never gets a cut name: the column is as wide as its longest name
                        widths[i] = cells[r][i].cell_len
                        continue
                    style = cells[r][i].style
                    cells[r][i] = Text(shorten_middle(cells[r][i].plain, widths[i]), style=style)
                    shortened = True

    lines = [_line([Text(headers[i], style="bold") for i in kept], [widths[i] for i in kept],
                   [columns[i].justify for i in kept])]
    for r in range(len(rows)):
        lines.append(_line([cells[r][i] for i in kept], [widths[i] for i in kept],
                           [columns[i].justify for i in kept]))
    return Fitted(lines, dropped_names, shortened, flex_width)


def _line(parts: list[Text], widths: list[int], justify: list[str]) -> Text:
    line = Text()
    for k, (part, w, how) in enumerate(zip(parts, widths, justify)):
        pad = max(0, w - part.cell_len)
        if k:
            line.append(" " * GAP)
        if how == "right":
            line.append(" " * pad)
            line.append_text(part)
        else:
            line.append_text(part)
            if k < len(parts) - 1:
                line.append(" " * pad)
    line.rstrip()
    return line


def print_table(console, columns: list[Column], rows: list[list[Cell]], title: Optional[Cell] = None,
                note_console=None) -> Fitted:
    """Fit and print a table on ``console``; say on ``note_console`` (stderr) which columns were dropped."""
    width = output_width(console)
    fitted = fit_table(columns, rows, width, is_terminal(console))
    if title is not None:
        t = _text(title)
        if width is not None and is_terminal(console) and t.cell_len > width:
            t = Text(shorten_middle(t.plain, width), style=t.style)
        console.print(t, soft_wrap=True)
    for line in fitted.lines:
        console.print(line, soft_wrap=True)
    if fitted.dropped and note_console is not None:
        note_console(f"{len(fitted.dropped)} column(s) left out to fit {width} columns: "
                     f"{', '.join(fitted.dropped)} (widen the terminal, or use --json for everything)")
    return fitted
