"""scripts/mutation.sh's table stays runnable: every module it names exists (objective.py may not
yet) and every test file or test it runs against is collected; an unknown module is refused."""
from __future__ import annotations

import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "mutation.sh")


def table() -> list[tuple[str, list[str]]]:
    text = open(SCRIPT).read()
    body = re.search(r'^TABLE="\n(.*?)^"', text, re.S | re.M).group(1)
    return [(m.strip(), t.split()) for m, t in (line.split("|") for line in body.splitlines() if line.strip())]


def test_every_row_names_existing_modules_and_tests():
    rows = table()
    assert {m for m, _ in rows} >= {"massl/loss.py", "massl/memory.py", "massl/schedules.py", "massl/optim.py",
                                    "massl/checkpoint/manager.py", "massl/checkpoint/resume.py",
                                    "massl/data/epoch_plan.py"}
    for module, tests in rows:
        assert os.path.isfile(os.path.join(ROOT, module)) or module == "massl/objective.py", module
        if not os.path.isfile(os.path.join(ROOT, module)):
            continue
        for t in tests:
            path, _, name = t.partition("::")
            assert os.path.isfile(os.path.join(ROOT, path)), t
            assert not name or f"def {name}(" in open(os.path.join(ROOT, path)).read(), t


def test_an_unknown_module_is_refused():
    out = subprocess.run(["bash", SCRIPT, "massl/no_such_module.py"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and out.stderr.startswith("error: "), out.stderr
