"""Every ```python block of README.md and docs/*.md runs here, on the CPU, so that a snippet cannot rot.

How the pages are run (docs/testing.md says the same to whoever writes them):
- The python blocks of one page run in order, in one namespace: a block may use the names an earlier
  block of the same page defined. Each page starts from an empty namespace, in a fresh temporary folder
  that is the working directory, so files a snippet writes (a checkpoint) land there.
- A block preceded by `<!-- gpu -->` (on the line just before its fence) needs CUDA: it runs only where
  torch sees a CUDA device, and the page's other blocks must not depend on it.
- A block preceded by `<!-- skip -->` is a fragment that is never run; use it sparingly.
- Blocks in other languages (bash, text, an unlabelled fence) are not run; the README's two commands are
  checked against .ci/run below.
A failing block shows in the traceback as PAGE:LINE, the line of the page it failed on.

The blocks run as a reader pastes them into Python's interactive prompt, line by line
(code.InteractiveConsole, the prompt's own rules): a blank line ends an indented block there, so a blank
line inside a class body, or a `with` block followed by a statement without a blank line between them,
fails here as it fails in the reader's REPL.
"""

from __future__ import annotations

import code
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\S*)\s*$")
MARKER = re.compile(r"^<!--\s*(gpu|skip)\s*-->\s*$")


@dataclass
class Block:
    page: str
    line: int  # of the block's first code line, 1-based
    language: str
    marker: str  # "", "gpu" or "skip"
    code: str


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown page, in order."""
    lines = path.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        marker = MARKER.match(lines[i - 1]) if i else None
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        assert end is not None, f"{path.name}:{i + 1}: a code fence that never closes"
        out.append(Block(path.relative_to(ROOT).as_posix(), i + 2, fence[1], marker[1] if marker else "",
                         "\n".join(lines[i + 1 : end]) + "\n"))
        i = end + 1
    return out


def run_page(path: Path) -> int:
    """Run the page's python blocks in order in one namespace; returns how many ran."""
    namespace: dict = {"__name__": f"docs_{path.stem.replace('-', '_')}"}
    ran = 0
    for block in blocks(path):
        if block.language != "python" or block.marker == "skip":
            continue
        if block.marker == "gpu" and not torch.cuda.is_available():
            paste(block, namespace, run=False)  # (still pasted: the prompt must take every line)
            continue
        paste(block, namespace)
        ran += 1
    return ran


class _Prompt(code.InteractiveConsole):
    """Python's interactive prompt, raising what it would print: a syntax error or an exception."""

    def showsyntaxerror(self, filename=None, **kwargs):
        raise SyntaxError(f"the prompt refuses this line: {self._line!r}")

    def showtraceback(self):
        raise

    def runcode(self, code):
        if self.run:
            super().runcode(code)


def paste(block: Block, namespace: dict, run: bool = True) -> None:
    """Paste a block into the interactive prompt line by line, then a blank line, as a reader would; an error
    names the page's line. run=False: the prompt compiles each statement without running it."""
    prompt = _Prompt(namespace, filename=block.page)
    prompt.run = run
    lines = block.code.splitlines() + [""]
    for offset, line in enumerate(lines):
        prompt._line = line
        try:
            prompt.push(line)
        except BaseException as err:
            raise AssertionError(f"{block.page}:{block.line + offset}: pasted into Python's prompt, this line "
                                 f"fails: {type(err).__name__}: {err}") from err


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_page_snippets_run(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    python = [b for b in blocks(path) if b.language == "python"]
    assert all(b.marker != "skip" for b in python if path.name == "README.md"), "the README's snippets all run"
    import torch.distributed as dist

    try:
        with torch.random.fork_rng(devices=[]):  # a snippet's manual_seed stays on its page
            run_page(path)
    finally:  # a page that failed half way must not leave a process group to the tests after it
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def test_readme_quick_start_runs_alone(tmp_path, monkeypatch):
    """A new user copies the first snippet alone into a fresh interpreter: it must not need anything else."""
    monkeypatch.chdir(tmp_path)
    first = next(b for b in blocks(ROOT / "README.md") if b.language == "python")
    assert len(first.code.strip().splitlines()) <= 14, "the quick start stays about 10 lines"
    assert "cuda" not in first.code
    paste(first, {"__name__": "quick_start"})
    assert (tmp_path / "best_model.pt").exists()
    from fusedvq.tools.cli import main

    assert main(["check", str(tmp_path / "best_model.pt"), "--features", "187"]) == 0  # as the README says


def test_fences_and_markers_are_known():
    for path in PAGES:
        for block in blocks(path):
            assert block.language in ("python", "bash", "text", ""), f"{block.page}:{block.line}: {block.language}"
            if block.marker:
                assert block.language == "python", f"{block.page}:{block.line}: a marker on a non-python block"


def test_readme_commands_are_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    commands = [b.code.strip() for b in blocks(ROOT / "README.md") if b.language == "bash"]
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.startswith("python3 -m venv")]
    assert len(ci) == 1 and ci[0] in commands, "the README's test command is exactly .ci/run's"
    demo = next(c for c in commands if c.endswith("fusedvq demo"))
    words = shlex.split(demo)
    assert "-e" in words and words[words.index("-e") + 1] == ".", "the demo installs the package alone"
    assert "[test]" not in demo and "fusedvq[" not in readme.replace("'.[test]'", "")
    assert "pip install fusedvq" not in readme  # it is on no package index


def _prose(text: str) -> str:
    """text without its fenced blocks and inline code (where brackets are code, not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lowercase, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.*)$", re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_readme_is_a_manual_and_its_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    for page in PAGES:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", _prose(page.read_text())):
            if "://" in target:
                continue
            linked = (page.parent / target) if target else page
            assert linked.exists(), f"{page.name}: a link to {target}, which does not exist"
            if anchor:
                assert anchor in _anchors(linked), f"{page.name}: a link to {target}#{anchor}, no such heading"
    linked = set(re.findall(r"\]\(docs/([\w-]+\.md)", text))
    assert linked == {p.name for p in PAGES if p.parent.name == "docs"}, "the README links every docs/ page"


def test_the_api_page_names_every_public_name():
    import fusedvq

    text = (ROOT / "docs" / "api.md").read_text()
    missing = [name for name in fusedvq.__all__ if f"`{name}`" not in text]
    assert not missing, f"docs/api.md does not mention {missing}"
