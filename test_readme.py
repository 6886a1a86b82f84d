"""The documentation's Python blocks run: every ```python block of README.md and docs/*.md, each in a fresh namespace,
in one fresh interpreter per file (as a reader would paste them, from the repository root, without the tests' Triton
interpreter), plus the README's first lines that CI reads."""
import glob
import os
import re
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
PAGES = ["README.md"] + sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "docs", "*.md")))
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)

RUNNER = """
import sys, traceback
blocks = {blocks!r}
for i, (line, code) in enumerate(blocks):
    try:
        exec(compile(code, "{page}, block at line %d" % line, "exec"), {{"__name__": "__main__"}})
    except BaseException:
        traceback.print_exc()
        sys.exit("{page}: the Python block at line %d failed" % line)
"""


def python_blocks(page):
    text = open(os.path.join(HERE, page), encoding="utf-8").read()
    return [(text.count("\n", 0, m.start()) + 2, m.group(1)) for m in BLOCK.finditer(text)]


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)])
def test_python_blocks_run(page):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("OMP_NUM_THREADS", "1")
    code = RUNNER.format(blocks=python_blocks(page), page=page)
    r = subprocess.run([sys.executable, "-c", code], cwd=HERE, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_readme_has_python_blocks_and_what_ci_reads():
    text = open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    assert python_blocks("README.md"), "the README shows the API in a ```python block"
    first = re.search(r"^```[a-z]*\n(.*?)^```", text, re.S | re.M).group(1).strip().splitlines()
    assert len(first) == 2, ".ci/run runs exactly the two lines of the README's first code block"
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in text    # .ci/run greps for it


def test_links_to_docs_and_figures_exist():
    for page in PAGES:
        text = open(os.path.join(HERE, page), encoding="utf-8").read()
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if not re.match(r"[a-z]+://", target):
                path = os.path.normpath(os.path.join(HERE, os.path.dirname(page), target))
                assert os.path.exists(path), f"{page} links to {target}, which does not exist"
