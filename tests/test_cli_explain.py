"""A CLI that explains itself: unknown keys and options (closest match, accepted keys, hints),
`cocoef list` / `cocoef show`, `--dry-run`, an identical rerun, help texts."""

import pytest
from typer.testing import CliRunner

from cocoef_cli import config
from cocoef_cli.cli import app
from cocoef_cli.errors import ConfigError

runner = CliRunner()
TINY = ["dataset.n=200", "dataset.dim=4", "devices=5", "iters=6", "eval_every=3", "code.d=2"]

UNKNOWN = [  # overrides, start of the message, what it must say
    (["straggler.pp=0.3"], "straggler.pp=", ["did you mean straggler.p?", "accepted: straggler.p"]),
    (
        ["compressor.ratoi=0.1"],
        "compressor.ratoi=",
        [
            "unknown key of compressor=topk",
            "did you mean compressor.ratio?",
            "compressor.k, compressor.ratio, compressor.index_bits",
        ],
    ),
    (["dataset.path=x.csv"], "dataset.path=", ["dataset.path belongs to dataset=csv", "dataset.n"]),
    (["+compressor.levelz=3"], "compressor.levelz=", ["did you mean compressor.levels (of compressor=qsgd)?"]),
    (
        ["compressor=sign", "+compressor.k=3"],
        "compressor.k=",
        ["compressor.k belongs to compressor=randk, randk_unbiased, topk", "accepted: compressor.value_bits"],
    ),
    (["+itres=4"], "itres=", ["did you mean iters?", "accepted: devices, iters"]),
    (["p=0.3"], "p=", ["did you mean straggler.p?"]),
    (["stragler.p=0.3"], "stragler.p=", ["did you mean straggler.p?"]),
    (["compressor=topkk"], "compressor=", ["did you mean topk?", "grouped_sign"]),
    (["+baseline=cocoo"], "baseline=", ["unknown baseline, did you mean coco?", "coco_diana"]),
    (["baseline=cocoo"], "baseline=", ["unknown baseline, did you mean coco?", "coco_diana"]),
    (["experiment=smoke"], "experiment=", ["accepted: +experiment=smoke"]),
    (["+experiment=smok"], "experiment=", ["did you mean smoke?"]),
    (["hydra.verbose=true"], "hydra.verbose=", ["Hydra's own keys do nothing"]),
    (["hydra.job.chdir=true"], "hydra.job.chdir=", ["Hydra's own keys do nothing"]),
    (["compressor.index_bits=lg2"], "compressor.index_bits=", ["did you mean log2?"]),
]


@pytest.mark.parametrize("overrides,start,says", UNKNOWN, ids=[" ".join(u[0]) for u in UNKNOWN])
def test_unknown_key_or_option_exits_2_naming_the_accepted_and_the_closest(tmp_path, overrides, start, says):
    out = tmp_path / "never"
    res = runner.invoke(app, ["run", *TINY, *overrides, "--out", str(out)])
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: " + start), res.output
    for s in says:
        assert s in lines[0], lines[0]
    assert not out.exists()


def test_every_option_and_preset_declares_the_keys_it_sets():
    """The declared-keys rule accepts every shipped option and preset (their keys are the YAML's)."""
    for g in config.GROUPS:
        for o in config.options(g):
            cfg = config.compose([f"{g}={o}"])
            config._check_declared(cfg, None)
    for preset in config.PRESETS:
        for o in config.options(preset):
            config.validate(config.compose([f"+{preset}={o}"]))


def test_undeclared_key_in_a_recorded_config_is_rejected():
    """validate (also behind `cocoef rerun`) rejects a key no option declares, not only compose."""
    cfg = config.compose(TINY)
    cfg["straggler"]["q"] = 0.5
    with pytest.raises(ConfigError, match=r"straggler\.q=0\.5: unknown key of straggler=bernoulli"):
        config.validate(cfg)
    cfg = config.compose(TINY)
    cfg["iterations"] = 5
    with pytest.raises(ConfigError, match="did you mean iters"):
        config.validate(cfg)


def test_list_every_group_with_whole_descriptions():
    from cocoef_cli import explain

    res = runner.invoke(app, ["list"])
    assert res.exit_code == 0, res.output
    for g in explain.LISTABLE:
        assert f"{g}s:\n" in res.stdout
    # whole first paragraphs: the two that used to be cut mid-sentence
    assert '"unbiased compression in gradient coding" baseline).' in res.stdout
    assert "ĝ = Σ_i a_i h_i over the devices that answered; " in res.stdout and "as last received." in res.stdout
    for g in explain.LISTABLE:
        for name, doc in explain.listing(g):
            assert doc and doc[-1] in ".)", (g, name, doc)
    for kind in ["baselines", "baseline", "experiments", "compressors", "optim", "runtime"]:
        res = runner.invoke(app, ["list", kind])
        assert res.exit_code == 0 and res.stdout.count(":\n") == 1, (kind, res.output)
    res = runner.invoke(app, ["list", "baselines"])
    assert "coco_diana" in res.stdout and "COCO-DIANA" in res.stdout
    res = runner.invoke(app, ["list", "compressorz"])
    assert res.exit_code == 2 and "did you mean compressor" in res.stderr


def test_show_keys_defaults_types_and_math():
    res = runner.invoke(app, ["show", "compressor", "topk"])
    assert res.exit_code == 0, res.output
    row = next(line for line in res.stdout.splitlines() if line.startswith("compressor.ratio "))
    assert row.split()[1:3] == ["0.1", "number"] and "(0, 1]" in row
    assert "‖C(x) − x‖² ≤ (1 − k/D)‖x‖²" in res.stdout  # the docstring's math
    res = runner.invoke(app, ["show", "straggler"])  # the default option
    assert res.exit_code == 0 and "straggler=bernoulli" in res.stdout and "straggler.p" in res.stdout
    res = runner.invoke(app, ["show", "baselines", "coco_diana"])
    assert res.exit_code == 0 and "override /method: coco_diana" in res.stdout
    res = runner.invoke(app, ["show", "compressor", "topkk"])
    assert res.exit_code == 2 and "did you mean topk?" in res.stderr


def test_show_and_list_a_plugin_of_a_user_config_folder(tmp_path):
    import shutil
    from pathlib import Path

    mine = tmp_path / "mine"
    shutil.copytree(Path(__file__).resolve().parent.parent / "conf", mine)
    (mine / "compressor" / "topk_bitmap.yaml").write_text(
        "# Top-k with a bitmap of the kept indices.\nname: topk\nk: null\nratio: 0.5  # half of D\n"
        "index_bits: bitmap\nvalue_bits: 32\n"
    )
    res = runner.invoke(app, ["show", "compressor", "topk_bitmap", "--config-dir", str(mine)])
    assert res.exit_code == 0, res.output
    assert "component topk" in res.stdout and "Top-k with a bitmap" in res.stdout and "contraction" in res.stdout
    row = next(line for line in res.stdout.splitlines() if line.startswith("compressor.ratio "))
    assert row.split()[1] == "0.5" and row.endswith("half of D")
    res = runner.invoke(app, ["list", "compressors", "--config-dir", str(mine)])
    assert "topk_bitmap        Top-k with a bitmap of the kept indices." in res.stdout


def test_dry_run_prints_the_config_and_run_id_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["run", *TINY, "straggler.p=0.3", "--dry-run"])
    assert res.exit_code == 0, res.output
    import yaml

    printed = yaml.safe_load(res.stdout)
    assert printed["straggler"] == {"name": "bernoulli", "p": 0.3} and printed["devices"] == 5
    rid = next(line for line in res.stdout.splitlines() if line.startswith("# run_id: ")).split()[-1]
    assert list(tmp_path.iterdir()) == []
    res = runner.invoke(app, ["run", *TINY, "straggler.p=0.3", "--out", "r", "-q"])
    assert res.exit_code == 0
    import json

    assert json.loads((tmp_path / "r" / "run.json").read_text())["run_id"] == rid
    res = runner.invoke(app, ["run", *TINY, "straggler.p=1.3", "--dry-run"])
    assert res.exit_code == 2 and "straggler.p" in res.stderr


def test_help_texts_are_clean_for_every_verb():
    from cocoef_cli.cli import app as the_app

    verbs = [c.name or c.callback.__name__.replace("_", "-") for c in the_app.registered_commands]
    assert {"run", "list", "show", "sweep", "rerun", "report", "figures", "tune", "check-code", "bench"} <= set(verbs)
    for verb in verbs:
        res = runner.invoke(app, [verb, "--help"], env={"COLUMNS": "200"})
        assert res.exit_code == 0 and "Usage" in res.stdout, verb
        assert "<bool>" not in res.stdout, verb  # a flag takes no value
    res = runner.invoke(app, ["run", "--help"], env={"COLUMNS": "200"})
    assert "the package's own conf/ folder" in res.stdout and "default: conf/)" not in res.stdout


def test_baseline_is_picked_with_or_without_plus_and_leaves_run_id_alone():
    """conf/config.yaml declares ``baseline: null``: ``baseline=ARM`` works without ``+``, the older
    ``+baseline=ARM`` (and ``++``) gives the same config, and no config gains a ``baseline`` key (so
    run_ids recorded before the default existed stay valid)."""
    from cocoef_cli.record import run_id

    plain = config.load(["baseline=coco_diana"])
    assert plain == config.load(["+baseline=coco_diana"]) == config.load(["++baseline=coco_diana"])
    assert plain["method"]["name"] == "coco_diana" and "baseline" not in plain
    assert "baseline" not in config.load([]) and run_id(plain) != run_id(config.load([]))
    res = runner.invoke(app, ["run", *TINY, "baseline=gc", "--dry-run"])
    assert res.exit_code == 0 and "name: gc" in res.output, res.output
