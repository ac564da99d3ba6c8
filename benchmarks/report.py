"""Writing a benchmark's table into a markdown file between its markers."""

from __future__ import annotations

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_section(filename: str, name: str, heading: str, body: list[str]) -> str:
  """Replaces the `<!-- name:begin/end -->` section of ROOT/filename (appending it under
  `heading` the first time) with `body`; returns the section's text."""
  begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
  table = "\n".join([begin, *body, end])
  path = os.path.join(ROOT, filename)
  text = open(path).read() if os.path.exists(path) else ""
  if begin in text:
    text = text[:text.index(begin)] + table + text[text.index(end) + len(end):]
  else:
    text = text.rstrip() + f"\n\n## {heading}\n\n" + table + "\n"
  with open(path, "w") as f:
    f.write(text)
  return table
