"""Every ```python block of README.md and docs/*.md runs as written.

Each page's blocks run in sequence in one fresh interpreter (a subprocess started in an empty
temporary folder), as a reader pasting them one after the other would: names defined by one block
are visible in the next, nothing else is. A block preceded by ``<!-- gpu -->`` needs a CUDA device
with CuPy and is left out without one (the rest of the page still runs). Other fenced blocks
(```bash, ```text, …) are not run. A failing block is named by page and line.

Keep the examples small: all pages together run in well under a minute on two cores.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python\s*$")
GPU_MARK = re.compile(r"^\s*<!--\s*gpu\b.*-->\s*$")
TIMEOUT = 240

DRIVER = r"""
import json, sys, traceback
blocks = json.loads(sys.stdin.read())
ns = {"__name__": "__main__"}
for b in blocks:
    try:
        exec(compile(b["code"], f"{b['page']}:{b['line']}", "exec"), ns)
    except SystemExit as exc:
        if exc.code not in (0, None):
            print(f"DOC BLOCK FAILED: {b['page']} line {b['line']}: SystemExit({exc.code!r})", file=sys.stderr)
            sys.exit(1)
    except BaseException:
        traceback.print_exc()
        print(f"DOC BLOCK FAILED: {b['page']} line {b['line']}", file=sys.stderr)
        sys.exit(1)
"""


def blocks(page: Path) -> list[dict]:
    """The ```python blocks of a page: code, 1-based line of the opening fence, gpu flag."""
    lines = page.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        if FENCE.match(lines[i]):
            start = i
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            prev = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()), "")
            out.append({"page": page.relative_to(ROOT).as_posix(), "line": start + 1,
                        "code": "\n".join(lines[start + 1:j]) + "\n", "gpu": bool(GPU_MARK.match(prev))})
            i = j + 1
        else:
            i += 1
    return out


def _have_gpu() -> bool:
    try:
        from qnref import backend

        return bool(backend.gpu_available())
    except Exception:  # noqa: BLE001 - no CuPy, no driver, no device: all mean "no GPU"
        return False


PAGES_WITH_CODE = [p for p in PAGES if blocks(p)]


def test_every_page_with_python_blocks_is_collected():
    names = {p.relative_to(ROOT).as_posix() for p in PAGES_WITH_CODE}
    assert "README.md" in names and "docs/training.md" in names
    assert sum(len(blocks(p)) for p in PAGES_WITH_CODE) >= 19


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_page_blocks_run_in_sequence(page, tmp_path):
    todo = blocks(page)
    if not _have_gpu():
        todo = [b for b in todo if not b["gpu"]]
    if not todo:
        pytest.skip(f"{page.name}: only GPU blocks and no GPU")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "QNREF_COMM": "serial",
           "MPLBACKEND": "Agg"}
    r = subprocess.run([sys.executable, "-c", DRIVER], input=json.dumps(todo), capture_output=True, text=True,
                       cwd=tmp_path, env=env, timeout=TIMEOUT)
    assert r.returncode == 0, f"{page.name}:\n{r.stderr[-4000:]}"


def test_gpu_marker_is_recognised(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("text\n\n<!-- gpu -->\n```python\nimport cupy\n```\n\n```python\nx = 1\n```\n")
    got = _blocks_of(page)
    assert [b["gpu"] for b in got] == [True, False] and got[0]["line"] == 4


def _blocks_of(page: Path) -> list[dict]:
    """:func:`blocks` for a page outside the repository (the test above)."""
    global ROOT
    old, ROOT = ROOT, page.parent
    try:
        return blocks(page)
    finally:
        ROOT = old
