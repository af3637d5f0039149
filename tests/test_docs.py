"""Every code block of README.md and docs/ runs, the generated tables match their results files,
and the API reference covers every public module.

Each Markdown page runs as one script: its ```python blocks in order, in one namespace
(``>>>`` blocks and ```pycon blocks as doctests in that namespace). A block preceded by
``<!-- skip: reason -->`` is not run; the reason is required.
"""

from __future__ import annotations

import doctest
import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import residual

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```\s*$", re.DOTALL | re.MULTILINE)
SKIP = re.compile(r"<!-- skip: (.+?) -->\s*$")
FLAGS = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS


def code_blocks(text: str) -> list[tuple[int, str, str]]:
    """(line, language, code) of every fenced block not marked ``<!-- skip: reason -->``."""
    blocks = []
    for match in FENCE.finditer(text):
        language, code = match.group(1), match.group(2)
        if language not in ("python", "pycon"):
            continue
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        if "<!-- skip" in before:
            assert SKIP.search(before), f"a skip marker needs a reason: {before!r}"
            continue
        blocks.append((text.count("\n", 0, match.start()) + 1, language, code))
    return blocks


def run_page(page: Path) -> None:
    namespace: dict[str, object] = {"__name__": f"docs_{page.stem}"}
    name = str(page.relative_to(ROOT)) if page.is_relative_to(ROOT) else page.name
    torch.manual_seed(0)
    for line, language, code in code_blocks(page.read_text()):
        where = f"{name}:{line}"
        if language == "pycon" or code.lstrip().startswith(">>>"):
            test = doctest.DocTestParser().get_doctest(code, namespace, where, name, line)
            runner = doctest.DocTestRunner(optionflags=FLAGS)
            runner.run(test, clear_globs=False)
            assert not runner.failures, f"{where}: a doctest failed (output above)"
        else:
            exec(compile(code, where, "exec"), namespace)


PAGES_WITH_CODE = [p for p in PAGES if code_blocks(p.read_text())]


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=lambda p: str(p.relative_to(ROOT)))
def test_code_blocks_run(page: Path) -> None:
    run_page(page)


def test_skip_markers_name_a_reason() -> None:
    for page in PAGES:
        for line in page.read_text().splitlines():
            if "<!-- skip" in line:
                assert SKIP.search(line), f"{page.name}: {line!r} gives no reason"


def test_code_block_runner_fails_on_a_wrong_doctest(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("```python\nx = 2\n```\n\n```pycon\n>>> x + 1\n4\n```\n")
    with pytest.raises(AssertionError, match="doctest failed"):
        run_page(page)


def test_tables_match_their_results_files() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "gen_tables.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def docs_script(name: str):  # docs/*.py are scripts, not modules of the package
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "docs"))


def test_table_check_fails_on_an_edited_figure() -> None:
    gen_tables = docs_script("gen_tables")
    page = ROOT / "docs" / "benchmarks.md"
    text = page.read_text()
    assert gen_tables.render(text, page) == text
    edited = re.sub(r"\| 0\.9(\d\d)", r"| 0.8\1", text, count=1)
    assert edited != text
    assert gen_tables.render(edited, page) == text


def test_examples_results_become_a_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gen_tables = docs_script("gen_tables")
    monkeypatch.setattr(gen_tables, "EXAMPLE_RESULTS", tmp_path)
    monkeypatch.setitem(gen_tables.TABLES, "digits", lambda: gen_tables.examples("digits_*"))
    for model, accuracy in (("mlp", 0.991667), ("resnet", 0.994444)):
        run = {
            "command": f"python examples/train_digits.py --model {model}",
            "threads": 1,
            "seed": 0,
            "torch": "2.13.0+cpu",
            "metrics": {"test_accuracy": accuracy, "parameters": 269434, "train_seconds": 65.7},
        }
        (tmp_path / f"digits_{model}.json").write_text(json.dumps(run))
    page = tmp_path / "page.md"
    table = gen_tables.render("<!-- table: digits -->\nstale\n<!-- /table -->\n", page)
    assert "| `--model resnet` | 99.44% | 269,434 | 65.7 s |" in table
    assert "`python examples/train_digits.py --model mlp` (torch 2.13.0+cpu, 1 thread(s)" in table
    monkeypatch.setitem(gen_tables.TABLES, "digits", lambda: gen_tables.examples("missing_*"))
    with pytest.raises(KeyError, match="no results files"):
        gen_tables.render("<!-- table: digits -->\n<!-- /table -->\n", page)


def test_api_reference_covers_every_public_module() -> None:
    modules = ["core", "errors", *residual._SUBMODULES]
    for module in modules:
        page = ROOT / "docs" / "api" / f"{module}.md"
        assert page.exists(), f"no API page for residual.{module}: add {page.name} and its nav"
        assert f"::: residual.{module}\n" in page.read_text()
        assert importlib.import_module(f"residual.{module}").__all__
    top = (ROOT / "docs" / "api" / "residual.md").read_text()
    for name in residual.__all__:
        assert f"`{name}`" in top, f"docs/api/residual.md does not list residual.{name}"


def test_api_reference_renders_every_public_name(tmp_path: Path) -> None:
    pytest.importorskip("mkdocstrings", reason="needs the 'docs' extra: pip install -e '.[docs]'")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, done.stderr[-4000:]
    pages = "".join(page.read_text() for page in (tmp_path / "api").rglob("*.html"))
    for module in ["core", "errors", *residual._SUBMODULES]:
        for name in importlib.import_module(f"residual.{module}").__all__:
            assert f'id="residual.{module}.{name}"' in pages, f"residual.{module}.{name}"


def test_every_page_is_in_the_nav() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in (ROOT / "docs").rglob("*.md"):
        rel = page.relative_to(ROOT / "docs").as_posix()
        assert f": {rel}\n" in nav, f"docs/{rel} is not in mkdocs.yml's nav"


def test_docstring_fencing_for_the_api_reference() -> None:
    pytest.importorskip("griffe", reason="needs the 'docs' extra: pip install -e '.[docs]'")
    module = docs_script("griffe_doctests")
    assert not doctest.testmod(module, optionflags=FLAGS).failed
    fenced = module.fence_doctests("```python\n>>> 1\n```\n>>> 2\n2")
    assert fenced == "```python\n>>> 1\n```\n```pycon\n>>> 2\n2\n```"
    assert module.ROLE.sub(r"`\1`", ":class:`~torch.nn.Linear`") == "`torch.nn.Linear`"


def test_install_advice_names_the_distribution() -> None:
    """``pip install 'NAME[extra]'`` hints use pyproject's name (PyPI refuses torch-residual)."""
    name = re.search(r'^name = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M)
    assert name is not None and name.group(1) == "pytorch-residual"
    files = [ROOT / "README.md", ROOT / "conftest.py", *PAGES]
    for folder in ("residual", "tests", "examples", "benchmarks"):
        files += (ROOT / folder).rglob("*.py")
    files.remove(Path(__file__))
    stale = [
        str(f.relative_to(ROOT))
        for f in files
        if re.search(r"(?<!py)torch-residual", f.read_text())
    ]
    assert not stale, f"'torch-residual' in {stale}: the distribution is {name.group(1)}"
