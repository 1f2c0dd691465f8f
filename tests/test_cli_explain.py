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
    (["compressor.ratoi=0.1"], "compressor.ratoi=", ["unknown key of compressor=topk", "did you mean compressor.ratio?",
                                                     "compressor.k, compressor.ratio, compressor.index_bits"]),
    (["dataset.path=x.csv"], "dataset.path=", ["dataset.path belongs to dataset=csv", "dataset.n"]),
    (["+compressor.levelz=3"], "compressor.levelz=", ["did you mean compressor.levels (of compressor=qsgd)?"]),
    (["compressor=sign", "+compressor.k=3"], "compressor.k=",
     ["compressor.k belongs to compressor=randk, randk_unbiased, topk", "accepted: compressor.value_bits"]),
    (["+itres=4"], "itres=", ["did you mean iters?", "accepted: devices, iters"]),
    (["p=0.3"], "p=", ["did you mean straggler.p?"]),
    (["stragler.p=0.3"], "stragler.p=", ["did you mean straggler.p?"]),
    (["compressor=topkk"], "compressor=", ["did you mean topk?", "grouped_sign"]),
    (["+baseline=cocoo"], "baseline=", ["unknown baseline, did you mean coco?", "coco_diana"]),
    (["baseline=coco"], "baseline=", ["accepted: +baseline=coco"]),
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
