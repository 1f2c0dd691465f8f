"""Components from outside the package (``_target_``), user config folders, every launcher, and
the public base classes: a plugin package written to a temporary folder outside the repo tree."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from cocoef_cli.cli import app

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()

PLUGIN = '''
"""Plugins of every kind (a test package outside the cocoef tree)."""
import torch

from cocoef_cli import CodeScheme, Compressor, Method, Model, StragglerModel


class DenseIdentity(Compressor):
    """The identity, written as a plugin: C(x) = x."""

    unbiased = True

    def compress(self, v, rng):
        return v.clone()

    def bits(self):
        return self.value_bits * self.D


class Dither(Compressor):
    """Random dithering to s levels of ‖x‖_∞ (unbiased)."""

    unbiased = True
    randomized = True

    def __init__(self, D, levels=4):
        super().__init__(D)
        if levels < 1:
            raise ValueError(f"levels must be >= 1, got {levels}")
        self.levels = levels

    def compress(self, v, rng):
        u = rng.rand(*v.shape[1:], dtype=v.dtype).to(v.device)
        m = v.abs().amax(-1, keepdim=True)
        y = self.levels * v.abs() / torch.where(m > 0, m, torch.ones_like(m))
        xi = y.floor() + (u < y - y.floor()).to(v.dtype)
        return m * torch.sign(v) * xi / self.levels

    def bits(self):
        return self.D * 4 + 32


class IidStragglers(StragglerModel):
    """Bernoulli stragglers, written as a plugin (the base draw)."""

    def __init__(self, loads, rng, p=0.2):
        super().__init__(torch.full(loads.shape, float(p), dtype=torch.float64), rng)


class PlainCoco(Method):
    """COCO without error feedback, written as a plugin: ĝ = Σ_i a_i C(u_i)."""

    def step(self, U, z, a):
        return torch.bmm(a.unsqueeze(1), self.C.compress(U, self.rng)).squeeze(1)


class ScaledCoco(PlainCoco):
    """PlainCoco times a constant."""

    def __init__(self, cfg, C, R, M, D, dtype, device, rng, scale=1.0):
        super().__init__(cfg, C, R, M, D, dtype, device, rng)
        self.scale = scale

    def step(self, U, z, a):
        return self.scale * super().step(U, z, a)


class Cyclic(CodeScheme):
    """Cyclic repetition: device i holds partitions i, ..., i + d − 1 (mod N)."""

    def allocate(self, cfg, M, N, d, rng):
        i, j = torch.arange(M)[:, None], torch.arange(N)[None, :]
        return (((j - i) % N) < d).expand(rng.R, M, N).clone()


def iris():
    """Iris, loaded by a plugin."""
    from sklearn.datasets import load_iris

    X, y = load_iris(return_X_y=True)
    return X, y, "classification"


class LinearSoftmax(Model):
    """Multinomial logistic regression through the generic Model path (forward only)."""

    def __init__(self, data):
        self.f, self.C = data.features, data.n_classes
        self.D = self.C * (self.f + 1)

    def forward(self, theta, X):
        W = theta.view(self.C, self.f + 1)
        return X @ W[:, :-1].T + W[:, -1]


NotAComponent = int
'''

TINY = ["iters=12", "eval_every=4", "devices=4", "precision=float64"]


@pytest.fixture(scope="module")
def plugdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("outside")
    (d / "extplug.py").write_text(PLUGIN)
    return d


@pytest.fixture
def plug(plugdir, monkeypatch):
    """The plugin importable here (sys.path) and in workers (PYTHONPATH)."""
    monkeypatch.syspath_prepend(str(plugdir))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(plugdir), os.environ.get("PYTHONPATH", "")]))
    return plugdir


def _run(args, out):
    res = runner.invoke(app, ["run", *args, "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    return pd.read_csv(out / "metrics.csv"), json.loads((out / "run.json").read_text())


def test_every_kind_from_the_shell_reproduces_its_builtin(plug, tmp_path):
    """compressor, method, straggler, dataset and model as `custom` + `_target_` give the run of
    the built-ins they rewrite (the model through the generic torch.func path: to rounding)."""
    common = [*TINY, "code=sgc", "straggler.p=0.3"]
    builtin, _ = _run([*common, "compressor=identity", "method=coco", "dataset=iris", "model=softmax"], tmp_path / "a")
    ours, rec = _run(
        [
            *[o for o in common if not o.startswith("straggler")],
            "compressor=custom",
            "compressor._target_=extplug.DenseIdentity",
            "method=custom",
            "method._target_=extplug.PlainCoco",
            "straggler=custom",
            "straggler._target_=extplug.IidStragglers",
            "+straggler.p=0.3",
            "dataset=custom",
            "dataset._target_=extplug.iris",
            "model=custom",
            "model._target_=extplug.LinearSoftmax",
        ],
        tmp_path / "b",
    )
    assert rec["config"]["compressor"] == {"name": "custom", "_target_": "extplug.DenseIdentity"}
    assert len(ours) == len(builtin) == 4
    exact = ["seed", "iter", "bits_up", "n_received", "p", "d"]
    pd.testing.assert_frame_equal(ours[exact], builtin[exact])
    for col in ("train_loss", "grad_norm", "test_loss", "test_acc"):
        assert ours[col].tolist() == pytest.approx(builtin[col].tolist(), rel=1e-9, abs=1e-12), col
    assert ours.train_loss.iloc[-1] < ours.train_loss.iloc[0]


def test_a_plugin_code_and_keys_as_keyword_arguments(plug, tmp_path):
    args = [*TINY, "dataset=iris", "model=softmax", "code=custom", "code._target_=extplug.Cyclic", "+code.d=2"]
    args += ["method=custom", "method._target_=extplug.ScaledCoco", "+method.scale=0.5", "compressor=identity"]
    m, rec = _run(args, tmp_path / "c")
    assert rec["status"] == "completed" and rec["config"]["method"]["scale"] == 0.5
    assert m.d.iloc[0] == 2 and m.train_loss.iloc[-1] < m.train_loss.iloc[0]


BAD = [
    (["compressor=custom"], "compressor._target_=None", "not set"),
    (["compressor=custom", "compressor._target_=nopkg.X"], "compressor._target_='nopkg.X'", "cannot import nopkg"),
    (["compressor=custom", "compressor._target_=extplug.Dithr"], "compressor._target_", "did you mean extplug.Dither"),
    (
        ["compressor=custom", "compressor._target_=extplug.PlainCoco"],
        "compressor._target_",
        "not a subclass of Compressor",
    ),
    (
        ["compressor=custom", "compressor._target_=extplug.Dither", "+compressor.levls=3"],
        "compressor.levls=3",
        "compressor.levels",
    ),
    (
        ["compressor=custom", "compressor._target_=extplug.Dither", "+compressor.levels=0"],
        "compressor._target_",
        "levels must be >= 1",
    ),
    (["method=custom", "method._target_=extplug.NotAComponent"], "method._target_", "not a subclass of Method"),
    (["model=custom", "model._target_=extplug.iris"], "model._target_", "not a subclass of Model"),
    (
        ["straggler=custom", "straggler._target_=extplug.IidStragglers", "+straggler.q=1"],
        "straggler.q=1",
        "straggler.p",
    ),
]


@pytest.mark.parametrize("overrides,start,says", BAD)
def test_a_bad_target_or_key_exits_2_with_one_line_before_any_work(plug, tmp_path, overrides, start, says):
    out = tmp_path / "r"
    res = runner.invoke(app, ["run", *TINY, *overrides, "--out", str(out)])
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: " + start), res.output
    assert says in lines[0] and "accepted:" in lines[0], lines[0]
    assert not out.exists()


def _user_folder(tmp_path):
    conf = tmp_path / "myconf"
    (conf / "compressor").mkdir(parents=True)
    (conf / "compressor" / "mine.yaml").write_text("_target_: extplug.Dither\nlevels: 3\n")  # no name: the option's
    return conf


def test_a_user_config_folder_adds_options_to_the_builtin_groups(plug, tmp_path):
    conf = _user_folder(tmp_path)
    m, rec = _run([*TINY, "compressor=mine", "--config-dir", str(conf)], tmp_path / "r")
    assert rec["config"]["compressor"] == {"name": "mine", "_target_": "extplug.Dither", "levels": 3}
    assert m.compressor.iloc[0] == "mine" and m.bits_up.iloc[-1] > 0
    # its keys are overridable; built-in options are still there
    _, rec = _run([*TINY, "compressor=mine", "compressor.levels=2", "--config-dir", str(conf)], tmp_path / "r2")
    assert rec["config"]["compressor"]["levels"] == 2
    res = runner.invoke(app, ["list", "compressors", "--config-dir", str(conf)])
    assert res.exit_code == 0
    lines = {ln.split()[0]: ln for ln in res.stdout.splitlines() if ln.startswith("  ")}
    assert "Random dithering" in lines["mine"] and "topk" in lines and "custom" in lines
    bad = runner.invoke(app, ["run", *TINY, "compressor=mien", "--config-dir", str(conf), "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "did you mean mine?" in bad.stderr
    # the recorded config (with its _target_) reruns from run.json alone
    res = runner.invoke(app, ["rerun", str(tmp_path / "r"), "-q"])
    assert res.exit_code == 0 and "identical" in res.output, res.output


@pytest.mark.slow
def test_plugins_in_every_launcher(plugdir, tmp_path, monkeypatch):
    """basic, joblib with 2 workers and submitit_local: the workers import the _target_ (from the
    cwd for joblib, where the plugin lives and PYTHONPATH is not set) and agree on every row."""
    monkeypatch.syspath_prepend(str(plugdir))
    ovs = [*TINY, "compressor=custom", "compressor._target_=extplug.Dither", "+compressor.levels=3", "seed=0,1"]
    frames = {}
    for launcher, extra, cwd in [
        ("basic", [], None),
        ("joblib", ["--jobs", "2"], plugdir),
        ("submitit_local", [], None),
    ]:
        if cwd is not None:
            monkeypatch.chdir(cwd)
            monkeypatch.setenv("PYTHONPATH", str(ROOT))
        else:
            monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(plugdir), str(ROOT)]))
        out = tmp_path / launcher
        res = runner.invoke(app, ["sweep", "none", *ovs, "--launcher", launcher, *extra, "--out", str(out), "-q"])
        assert res.exit_code == 0, res.output
        index = pd.read_csv(out / "index.csv")
        assert index.status.tolist() == ["completed", "completed"], (launcher, index)
        frames[launcher] = pd.concat([pd.read_csv(out / j / "metrics.csv") for j in index.job])
    pd.testing.assert_frame_equal(frames["basic"], frames["joblib"])
    pd.testing.assert_frame_equal(frames["basic"], frames["submitit_local"])


def test_a_registered_name_reads_its_own_target():
    """A built-in entry whose group has a _target_ (e.g. a factory path) is built by its own code."""
    from cocoef_cli.registry import Registry

    reg = Registry("thing", base=int)

    @reg.register("builtin")
    class Builtin:
        pass

    cfg = {"name": "builtin", "_target_": "not.imported", "width": 3}
    assert reg.build(cfg, builtin=lambda cls: cls) is Builtin and not reg.plugin(cfg)
    assert reg.plugin({"name": "custom", "_target_": "x.Y"})


def test_a_config_dir_with_config_yaml_still_replaces_the_tree(tmp_path):
    import shutil

    conf = tmp_path / "full"
    shutil.copytree(ROOT / "conf", conf)
    shutil.rmtree(conf / "straggler")
    (conf / "straggler").mkdir()
    (conf / "straggler" / "bernoulli.yaml").write_text("name: bernoulli\np: 0.2\n")
    from cocoef_cli import config

    assert config.layers(conf) == [conf.resolve()]
    assert config.options("straggler", conf) == ["bernoulli"]  # the built-in tree is not searched
    shadow = tmp_path / "shadow" / "compressor"
    shadow.mkdir(parents=True)
    (shadow / "topk.yaml").write_text("name: topk\nratio: 0.5\n")
    res = runner.invoke(app, ["run", "--config-dir", str(shadow.parent), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "compressor/topk.yaml has the name of a built-in option" in res.stderr


def test_import_is_light_and_exports_the_base_classes():
    code = textwrap.dedent(
        """
        import sys
        import cocoef_cli
        assert "torch" not in sys.modules and "pandas" not in sys.modules, sorted(sys.modules)
        from cocoef_cli import CodeScheme, Compressor, Method, Model, StragglerModel, api
        from cocoef_cli.sim import codes, compressors, methods, stragglers
        from cocoef_cli import models
        assert (Compressor, CodeScheme, StragglerModel, Method, Model) == (compressors.Compressor,
            codes.CodeScheme, stragglers.StragglerModel, methods.Method, models.Model)
        assert callable(api.run)
        try:
            cocoef_cli.Nope
        except AttributeError:
            pass
        else:
            raise SystemExit("no AttributeError")
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT)
