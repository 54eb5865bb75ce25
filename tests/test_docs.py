"""Every ```python block in docs/ runs as written.

One test per page: the page's python blocks run in order in one namespace (`__name__` is
"__docs__"), in a temporary working directory. Blocks tagged otherwise (bash, text, ...)
are not run. A failure names the page, the block and its first line, and the traceback
points at the page's own line numbers.
"""

from __future__ import annotations

import re
import traceback
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
# Pages (relative to docs/) where no python block makes sense; every other page needs one.
NO_CODE: set[str] = set()

_OPEN = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`\s]*)")


class Block:
    """One fenced python block: its source and the 1-based line its code starts on."""

    def __init__(self, number: int, line: int, source: str) -> None:
        self.number, self.line, self.source = number, line, source

    @property
    def first_line(self) -> str:
        return next((s.strip() for s in self.source.splitlines() if s.strip()), "")


def python_blocks(path: Path) -> list[Block]:
    """The ```python blocks of a Markdown file, in order (fences of ``` or ~~~, any length)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = _OPEN.match(lines[i])
        if opening is None:
            i += 1
            continue
        fence, indent = opening["fence"], len(opening["indent"])
        closing = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        start = i + 1
        end = start
        while end < len(lines) and not closing.match(lines[end]):
            end += 1
        if end == len(lines):
            raise AssertionError(f"{path.name}: the code fence opened on line {i + 1} is "
                                 "never closed")
        if opening["info"].lower() == "python":
            body = [ln[indent:] if ln[:indent].strip() == "" else ln
                    for ln in lines[start:end]]
            blocks.append(Block(len(blocks) + 1, start + 1, "\n".join(body) + "\n"))
        i = end + 1
    return blocks


def _rel(page: Path) -> str:
    return page.relative_to(DOCS).as_posix()


def test_the_docs_exist():
    assert DOCS.is_dir() and PAGES, f"no Markdown pages under {DOCS}"


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_page_code_runs(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks(page)
    rel = _rel(page)
    if rel not in NO_CODE:
        assert blocks, f"docs/{rel} has no ```python block (list it in NO_CODE if none fits)"
    namespace: dict[str, object] = {"__name__": "__docs__"}
    for block in blocks:
        # Leading blank lines make tracebacks report the page's own line numbers.
        code = compile("\n" * (block.line - 1) + block.source, str(page), "exec")
        trace = None
        try:
            exec(code, namespace)
        except Exception as err:
            trace = "".join(traceback.format_exception(err))
        if trace is not None:  # failed outside the except clause: no chained noise
            pytest.fail(f"docs/{rel}: python block {block.number} of {len(blocks)} "
                        f"(line {block.line}: {block.first_line!r}) failed:\n{trace}",
                        pytrace=False)


def test_index_links_every_page_and_links_resolve():
    index = DOCS / "index.md"
    assert index.exists(), "docs/index.md is missing"
    linked = set(re.findall(r"\]\(([^)#\s]+\.md)(?:#[^)]*)?\)", index.read_text("utf-8")))
    missing = sorted(_rel(p) for p in PAGES if p != index and _rel(p) not in linked)
    assert not missing, f"docs/index.md does not link {missing}"
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s:]+\.md)(?:#[^)]*)?\)", page.read_text("utf-8")):
            assert (page.parent / target).exists(), f"docs/{_rel(page)} links to a missing " \
                                                     f"page {target}"
