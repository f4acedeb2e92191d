"""The tables of a report page, as rows of cell texts."""
from html.parser import HTMLParser


class Tables(HTMLParser):
    """Every <table id=...> of a page as a list of rows of cell texts (header row excluded)."""

    def __init__(self, text):
        super().__init__()
        self.tables, self._id, self._row, self._cell, self._in_head = {}, None, None, None, False
        self.images = 0
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._id = attrs.get("id")
            self.tables[self._id] = []
        elif tag == "thead":
            self._in_head = True
        elif tag == "tbody":
            self._in_head = False
        elif tag == "tr" and not self._in_head:
            self._row = []
        elif tag == "td":
            self._cell = ""
        elif tag == "img" and attrs.get("src", "").startswith("data:image/png;base64,"):
            self.images += 1

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag == "td":
            self._row.append(self._cell)
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[self._id].append(self._row)
            self._row = None

    def counts(self, table_id) -> dict:
        """{first cell: second cell as an int} of a table."""
        return {r[0]: int(r[1].replace(",", "")) for r in self.tables[table_id]}
