"""Every script's --help, the stage-file rules of DESIGN.md/STYLE.md (size, no cross-imports)."""
import ast
import os

import pytest

from conftest import ROOT, run

STAGES = ["prune.py", "make_pairs.py", "filter_pairs.py", "redpo.py", "online_loop.py", "evaluate.py"]
SCRIPTS = STAGES + ["tools/convert_vc2.py", "toy/train_teacher.py", "toy/study.py", "toy/sweep.py", "toy/guidance_error.py"]


@pytest.mark.parametrize("script", [s for s in SCRIPTS if os.path.exists(os.path.join(ROOT, s))])
def test_help(script):
    out = run(script, "--help").stdout
    assert "usage:" in out and "--" in out


@pytest.mark.parametrize("script", [s for s in STAGES if os.path.exists(os.path.join(ROOT, s))])
def test_stage_rules(script):
    src = open(os.path.join(ROOT, script)).read()
    assert len(src.splitlines()) <= 520, f"{script} is over the stage-file budget"
    tree = ast.parse(src)
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {s[:-3] for s in STAGES}, f"{script} imports another stage"
    assert ast.get_docstring(tree) and 'if __name__ == "__main__":' in src
