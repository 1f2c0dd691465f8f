"""docs/own_network.md's worked example, as written: its factory file and its command."""

import json
import re
import shlex
import sys
from pathlib import Path

import pandas as pd
from typer.testing import CliRunner

from cocoef_cli.cli import app

DOC = Path(__file__).resolve().parent.parent / "docs" / "own_network.md"


def test_the_worked_example_runs_and_reruns(tmp_path, monkeypatch):
    text = DOC.read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    command = re.search(r"```sh\n(.*?)```", text, re.S).group(1).replace("\\\n", " ")
    (tmp_path / "mynets.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    words = shlex.split(command)
    assert words[:2] == ["PYTHONPATH=.", "cocoef"]
    runner = CliRunner()
    res = runner.invoke(app, [*words[2:], "-q"])
    assert res.exit_code == 0, res.output
    out = tmp_path / words[words.index("--out") + 1]
    m = pd.read_csv(out / "metrics.csv")
    assert (m.model == "module").all() and set(m.seed) == {0, 1} and m.iter.max() == 20
    assert m.groupby("seed").train_loss.last().lt(m.groupby("seed").train_loss.first()).all()  # it learns
    rec = json.loads((out / "run.json").read_text())
    assert rec["config"]["model"] == {"name": "module", "_target_": "mynets.make", "l2": 0.0, "width": 4}
    res = runner.invoke(app, ["rerun", str(out)])
    assert res.exit_code == 0 and "identical" in res.output, res.output
    sys.modules.pop("mynets", None)
