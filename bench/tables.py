"""A small table that renders as aligned text, Markdown or HTML (the bench and compare outputs)."""

from __future__ import annotations

import dataclasses
import html


@dataclasses.dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]
    right: set[int] = dataclasses.field(default_factory=set)  # right-aligned (numeric) columns
    note: str = ""

    def drop_empty_columns(self, keep: tuple[int, ...] = ()) -> Table:
        """Columns where every row is empty go (a report without memory figures has no memory column)."""
        cols = [i for i in range(len(self.headers)) if i in keep or any(r[i] for r in self.rows)]
        right = {cols.index(i) for i in self.right if i in cols}
        return Table(self.title, [self.headers[i] for i in cols], [[r[i] for i in cols] for r in self.rows],
                     right, self.note)

    def markdown(self) -> str:
        def esc(s: str) -> str:
            return s.replace("|", "\\|")

        lines = [f"### {self.title}", ""] if self.title else []
        lines.append("| " + " | ".join(esc(h) for h in self.headers) + " |")
        lines.append("|" + "|".join("---:" if i in self.right else "---" for i in range(len(self.headers))) + "|")
        lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in self.rows]
        if self.note:
            lines += ["", self.note]
        return "\n".join(lines) + "\n"

    def text(self) -> str:
        widths = [max([len(h)] + [len(r[i]) for r in self.rows]) for i, h in enumerate(self.headers)]

        def line(cells):
            return "  ".join(c.rjust(w) if i in self.right else c.ljust(w)
                             for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

        out = [self.title] if self.title else []
        out += [line(self.headers)] + [line(r) for r in self.rows]
        return "\n".join(out) + "\n"

    def html(self) -> str:
        def cell(tag, i, c):
            cls = ' class="num"' if i in self.right else ""
            return f"<{tag}{cls}>{html.escape(c)}</{tag}>"

        head = "".join(cell("th", i, h) for i, h in enumerate(self.headers))
        body = "\n".join("<tr>" + "".join(cell("td", i, c) for i, c in enumerate(r)) + "</tr>" for r in self.rows)
        title = f"<h3>{html.escape(self.title)}</h3>\n" if self.title else ""
        note = f"<p class=\"note\">{html.escape(self.note)}</p>\n" if self.note else ""
        return f"{title}<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>\n{note}"


def ms(v: float | None) -> str:
    """Milliseconds with about three significant digits."""
    if v is None:
        return ""
    return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 100 else f"{v:.0f}"


def num(v, fmt: str = "{:.1f}") -> str:
    return "" if v is None else fmt.format(v)
