"""Every ```python block in docs/ runs as written, and the MkDocs site builds.

One test per page: the page's python blocks run in order in one namespace (`__name__` is
"__docs__"), in a temporary working directory. Blocks tagged otherwise (bash, text, ...)
are not run. A failure names the page, the block and its first line, and the traceback
points at the page's own line numbers.

The API reference (docs/reference/) is generated from docstrings by `::: ftrain.<name>`
directives and has no python blocks; its names must import. mkdocs.yml's nav lists every
page, and `mkdocs build --strict` passes (when mkdocs is installed: the docs and dev
extras).
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import subprocess
import sys
import time
import traceback
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
MKDOCS_YML = ROOT / "mkdocs.yml"
PAGES = sorted(DOCS.rglob("*.md"))
# Pages (relative to docs/) where no python block makes sense; every other page needs one.
NO_CODE: set[str] = set()
# Folders (relative to docs/) of generated pages: `::: ftrain.<name>` directives, no code.
GENERATED = ("reference/",)

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


def _generated(rel: str) -> bool:
    return rel.startswith(GENERATED)


def test_the_docs_exist():
    assert DOCS.is_dir() and PAGES, f"no Markdown pages under {DOCS}"


@pytest.mark.parametrize("page", PAGES, ids=[_rel(p) for p in PAGES])
def test_page_code_runs(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks(page)
    rel = _rel(page)
    if _generated(rel):
        assert not blocks, f"docs/{rel} is generated from docstrings; put examples in " \
                           "the docstrings or a guide page"
        return
    if rel not in NO_CODE:
        assert blocks, f"docs/{rel} has no ```python block (list it in NO_CODE if none fits)"
    # An importable module, so torch.compile (which imports the module a traced function
    # was defined in) captures functions defined on the page instead of falling back.
    module = types.ModuleType("__docs__")
    monkeypatch.setitem(sys.modules, "__docs__", module)
    namespace: dict[str, object] = module.__dict__
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


_DIRECTIVE = re.compile(r"^:::[ \t]+(?P<name>[\w.]+)[ \t]*$", re.MULTILINE)


def _resolve(name: str) -> object:
    """Import `a.b.c` as a module, or as an attribute of the longest importable prefix."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(name)


def test_reference_pages_name_importable_objects():
    pages = [p for p in PAGES if _generated(_rel(p))]
    assert pages, "no API reference pages under docs/reference/"
    for page in pages:
        names = _DIRECTIVE.findall(page.read_text("utf-8"))
        if page.name != "index.md":
            assert names, f"docs/{_rel(page)} has no `::: ftrain.<name>` directive"
        for name in names:
            try:
                _resolve(name)
            except (ImportError, AttributeError) as err:
                pytest.fail(f"docs/{_rel(page)}: `::: {name}` does not import: {err}",
                            pytrace=False)


def _nav_pages(nav: object) -> list[str]:
    """Every page a mkdocs nav names (entries are "page.md", {title: "page.md"} or
    {title: [entries]}); external links are skipped."""
    if isinstance(nav, str):
        return [] if "://" in nav else [nav]
    if isinstance(nav, list):
        return [p for item in nav for p in _nav_pages(item)]
    if isinstance(nav, dict):
        return [p for value in nav.values() for p in _nav_pages(value)]
    raise AssertionError(f"unexpected nav entry {nav!r} in mkdocs.yml")


def test_mkdocs_nav_lists_every_page():
    yaml = pytest.importorskip("yaml")
    assert MKDOCS_YML.exists(), "mkdocs.yml is missing"
    config = yaml.safe_load(MKDOCS_YML.read_text("utf-8"))
    assert config.get("docs_dir", "docs") == "docs"
    listed = _nav_pages(config["nav"])
    repeated = sorted({p for p in listed if listed.count(p) > 1})
    assert not repeated, f"mkdocs.yml's nav lists {repeated} more than once"
    pages = {_rel(p) for p in PAGES}
    missing = sorted(pages - set(listed))
    unknown = sorted(set(listed) - pages)
    assert not missing, f"mkdocs.yml's nav does not list {missing}"
    assert not unknown, f"mkdocs.yml's nav lists pages that do not exist: {unknown}"


def test_mkdocs_build_is_strict_clean(tmp_path: Path):
    for module in ("mkdocs", "mkdocstrings", "mkdocstrings_handlers.python"):
        if importlib.util.find_spec(module.split(".")[0]) is None or \
                importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (pip install -e '.[docs]')")
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(MKDOCS_YML),
         "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - start
    problems = [line for line in done.stderr.splitlines()
                if line.startswith(("WARNING", "ERROR")) or "Aborted" in line]
    assert done.returncode == 0, "mkdocs build --strict failed:\n" + \
        ("\n".join(problems) or done.stderr[-4000:])
    assert (tmp_path / "site" / "index.html").exists()
    assert seconds < 60, f"the docs build took {seconds:.0f} s (budget 60 s)"
