"""conf/ is the single source of config: params.yaml matches it, every knob is documented, errors help."""

from __future__ import annotations

import re

import pytest
import yaml

from penwright.core.config import compose
from penwright.core.errors import ConfigError

GROUPS = ["data", "model", "trainer", "logger", "sample", "export", "generate", "verbosify", "experiment"]


def test_params_yaml_is_a_fresh_composition_of_conf(repo):
    committed = yaml.safe_load((repo / "params.yaml").read_text())
    fresh = compose(config_dir=repo / "conf").to_dict()
    assert committed == fresh, "params.yaml is stale: run `penwright params` and commit it"


@pytest.mark.parametrize("name", ["prompts", "responses"])
def test_writing_prompts_params_files_are_fresh_compositions_at_the_paths_its_dvc_yaml_uses(repo, name):
    path = repo / "pipelines" / "writing_prompts" / f"{name}.yaml"
    committed = yaml.safe_load(path.read_text())
    fresh = compose([f"experiment=wp_{name}"], config_dir=repo / "conf").to_dict()
    assert committed == fresh, f"{path} is stale: run `penwright params experiment=wp_{name} --output {path}`"
    stages = (repo / "pipelines" / "writing_prompts" / "dvc.yaml").read_text()
    assert "artifacts/writing_prompts/${item}/" in stages and "reports/writing_prompts/${item}/" in stages
    assert fresh["paths"] == {
        "artifacts": f"artifacts/writing_prompts/{name}",
        "reports": f"reports/writing_prompts/{name}",
    }
    assert fresh["data"]["out_dir"] == f"artifacts/writing_prompts/{name}/prepared"
    assert fresh["train"]["out_dir"] == f"artifacts/writing_prompts/{name}/model"
    assert fresh["export"]["out_dir"] == f"artifacts/writing_prompts/{name}/onnx"


def test_every_group_exists_and_composes(repo):
    for group in GROUPS:
        files = sorted((repo / "conf" / group).glob("*.yaml"))
        assert files, f"conf/{group}/ has no config"
        if group == "experiment":
            for f in files:
                compose([f"experiment={f.stem}"], config_dir=repo / "conf")
        else:
            for f in files:
                cfg = compose([f"{group}={f.stem}"], config_dir=repo / "conf")
                assert getattr(cfg, group) is not None


def test_every_config_file_opens_with_its_command_and_comments_every_knob(repo):
    for path in sorted((repo / "conf").rglob("*.yaml")):
        lines = path.read_text().splitlines()
        head = [line for line in lines[:3] if line.startswith("#")]
        assert any("penwright" in line for line in head), f"{path}: first lines must show the command that uses it"
        for number, line in enumerate(lines, start=1):
            if re.match(r"^\s*[A-Za-z_][\w.-]*:\s*\S", line) and not line.lstrip().startswith(("- ", "#")):
                assert "#" in line, f"{path}:{number}: knob without a one-line comment: {line.strip()}"


def test_unknown_key_names_the_key_and_suggests_the_close_one(repo):
    with pytest.raises(ConfigError) as err:
        compose(["data.val_fractoin=0.1"], config_dir=repo / "conf")
    message = str(err.value)
    assert "data.val_fractoin" in message and "data.val_fraction" in message and "group data" in message


def test_unknown_key_in_the_wrong_group_points_at_the_group_that_has_it(repo):
    with pytest.raises(ConfigError) as err:
        compose(["model.val_fraction=0.1"], config_dir=repo / "conf")
    assert "data.val_fraction" in str(err.value)


def test_params_file_mode_reads_the_composed_file(repo, tmp_path):
    from penwright.core.config import write_params

    out = write_params(["data.val_fraction=0.25"], tmp_path / "params.yaml", config_dir=repo / "conf")
    cfg = compose(params=out)
    assert cfg.data.val_fraction == 0.25
    assert compose(["data.val_fraction=0.5"], params=out).data.val_fraction == 0.5
    with pytest.raises(ConfigError, match="no such params file"):
        compose(params=tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    "override, words",
    [
        ("model=nonexistent", ["model=nonexistent", "conf/model/nonexistent.yaml", "gpt2-medium", "scratch_small"]),
        ("data.out_dir=${nope}", ["data.out_dir", "Interpolation key 'nope' not found"]),
        ("train.lr=[1", ["train.lr=[1", "key=value"]),
        ("+foo=1", ["foo: not a known key"]),
        ("train.lrr=0.1", ["train.lrr: not a known key", "train.lr"]),
    ],
)
def test_every_hydra_and_omegaconf_error_is_one_line_naming_the_key(repo, override, words):
    with pytest.raises(ConfigError) as err:
        compose([override], config_dir=repo / "conf")
    message = str(err.value)
    assert "\n" not in message, message
    for word in words:
        assert word in message, message
