"""The typed schema: every numeric knob of every group refuses an out-of-range or mistyped value up front,
in one line naming the key, the value and what is allowed; stages get typed values."""

from __future__ import annotations

import typing

import pydantic
import pytest

from helpers.paths import REPO
from penwright.core import schema
from penwright.core.config import compose
from penwright.core.errors import ConfigError

# Groups that appear only under a preset: compose with it to reach their knobs.
REACH = {"chain": ["experiment=wp_responses"], "trainer.fsdp": ["trainer=fsdp"]}
NUMERIC = (int, float)


def _knobs(model: type[schema.BaseModel], prefix: str = ""):
    """(key, FieldInfo) for every leaf of the schema, through nested groups (``X | None`` included)."""
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        nested = schema._models_of(info.annotation)
        if nested:
            for sub in nested:
                yield from _knobs(sub, f"{key}.")
        else:
            yield key, info


def _is_numeric(annotation) -> bool:
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    for arg in args:
        if typing.get_origin(arg) is typing.Annotated:
            arg = typing.get_args(arg)[0]
        if typing.get_origin(arg) is list:
            return _is_numeric(typing.get_args(arg)[0])
        if arg in NUMERIC:
            return True
    return False


def _is_list(annotation) -> bool:
    inner = typing.get_args(annotation)[0] if typing.get_origin(annotation) is typing.Annotated else annotation
    return typing.get_origin(inner) is list


NUMERIC_KNOBS = sorted(
    {key for key, info in _knobs(schema.Config) if _is_numeric(info.annotation)} - {"trainer.devices"}
)


def _base(key: str) -> list[str]:
    return next((v for k, v in REACH.items() if key.startswith(k)), [])


def _outside(key: str) -> list:
    """Values just outside the allowed range, on each side that has a bound."""
    info = schema.field_at(key)
    b = schema.bounds(info.annotation, info.metadata)
    integer = "int" in str(info.annotation) and "float" not in str(info.annotation)
    step = 1 if integer else 0.5
    out = []
    if "ge" in b:
        out.append(b["ge"] - step)
    if "gt" in b:
        out.append(b["gt"])
    if "le" in b:
        out.append(b["le"] + step)
    if "lt" in b:
        out.append(b["lt"])
    return out


def _compose_error(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as err:
        compose(overrides, config_dir=REPO / "conf")
    return str(err.value)


def test_the_walk_covers_every_group_and_bounds_every_numeric_knob():
    groups = {key.split(".")[0] for key in NUMERIC_KNOBS}
    assert groups >= {
        "seed",
        "data",
        "model",
        "trainer",
        "train",
        "sample",
        "export",
        "generate",
        "verbosify",
        "serve",
        "chain",
    }, groups
    assert len(NUMERIC_KNOBS) > 80
    for key in NUMERIC_KNOBS:
        assert _outside(key), f"{key}: a numeric knob without an allowed range in schema.py"


@pytest.mark.parametrize("key", NUMERIC_KNOBS)
def test_every_numeric_knob_refuses_out_of_range_values_in_one_line(key):
    for bad in _outside(key):
        value = f"[{bad},{bad}]" if _is_list(schema.field_at(key).annotation) else str(bad)
        message = _compose_error([*_base(key), f"{key}={value}"])
        assert "\n" not in message, message
        assert message.startswith(f"{key}="), message
        assert str(bad) in message and "allowed:" in message and "out of range" in message, message


@pytest.mark.parametrize("key", NUMERIC_KNOBS)
def test_every_numeric_knob_refuses_text_in_one_line(key):
    value = "[abc]" if _is_list(schema.field_at(key).annotation) else "abc"
    message = _compose_error([*_base(key), f"{key}={value}"])
    assert "\n" not in message and message.startswith(f"{key}=") and "abc" in message, message


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.schedule=cosnie", ["train.schedule='cosnie'", "one of cosine, linear, constant"]),
        ("trainer.precision=fp8", ["trainer.precision='fp8'", "bf16-mixed"]),
        ("export.gguf=[q5_k]", ["export.gguf=['q5_k']", "q8_0"]),
        ("trainer.devices=0", ["trainer.devices=0", "auto"]),
        ("train.resume=maybe", ["train.resume='maybe'", "not true or false"]),
        ("train.block_size=1000", ["train.block_size=1000", "model.n_positions=256"]),
        ("model.n_head=5", ["model.n_embd=128", "not divisible by model.n_head=5"]),
        ("data.take='(a)(b)'", ["data.take='(a)(b)'", "exactly one (group)"]),
        ("train.betas=[0.9,1.5]", ["train.betas=[0.9, 1.5]", "item 1", "0 <= value < 1"]),
        ("generate.prompts=[]", ["generate.prompts=[]", "too few items"]),
    ],
)
def test_choices_types_and_cross_field_rules_name_the_key(override, words):
    message = _compose_error([override])
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_a_params_file_with_a_bad_value_names_the_file(tmp_path):
    from penwright.core.config import write_params

    out = write_params(["train.lr=0.5"], tmp_path / "params.yaml", config_dir=REPO / "conf")
    out.write_text(out.read_text().replace("lr: 0.5", "lr: -0.5"))
    with pytest.raises(ConfigError, match=r"params.yaml: train.lr=-0.5: out of range \(allowed: 0 < value <= 1\)"):
        compose(params=out)
    out.write_text("train: {lr: [\n")  # a damaged file: one line, not a YAML traceback
    message = _compose_error_params(out)
    assert "params.yaml" in message and "not valid YAML" in message and "\n" not in message


def _compose_error_params(path) -> str:
    with pytest.raises(ConfigError) as err:
        compose(params=path)
    return str(err.value)


def test_stages_get_typed_frozen_values():
    cfg = compose(config_dir=REPO / "conf")
    assert isinstance(cfg.train.lr, float) and isinstance(cfg.train.batch_size, int)
    assert isinstance(cfg.train.resume, bool) and cfg.chain is None
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        cfg.train.lr = 1.0  # frozen: a stage cannot change the config another reads


def test_the_cli_prints_one_line_and_exits_2(tmp_path):
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-m", "penwright.cli", "train", "train.lr=-1"], cwd=REPO, capture_output=True, text=True
    )
    assert run.returncode == 2 and run.stderr.strip() == "error: train.lr=-1: out of range (allowed: 0 < value <= 1)"


def test_the_schema_names_the_callers_key_and_the_shared_layer_its_value():
    from penwright.core.errors import InvalidValue
    from penwright.inference.sampling import SamplingConfig

    assert "chain.top_k" in _compose_error(["experiment=wp_responses", "chain.top_k=-1"])
    assert "generate.top_k" in _compose_error(["generate.top_k=-1"])
    with pytest.raises(InvalidValue, match=r"^top_k=-1"):  # library code takes plain values, not key names
        SamplingConfig(top_k=-1)


@pytest.mark.parametrize(
    "overrides",
    [
        ["trainer.precision=16"],  # Lightning's short aliases
        ["trainer.precision=bf16"],
        ["trainer.precision=transformer-engine"],
        ["trainer.strategy=ddp_notebook"],  # several GPUs from Jupyter / Colab
        ["trainer.strategy=deepspeed"],  # registered with Lightning
        ["trainer.devices=-1"],  # every GPU
        ["trainer.devices='0,1'"],
        ["trainer.devices=[0,1]"],
        ["export.gguf=q8_0"],  # one type, not a list
        ["export.gguf=null", "export.quantize=q8"],
        ["generate.stop=null", "logger.tags=null", "data.csv_prefix=null"],
        ["serve.api_key=123456", "generate.prompts=[1984]", "data.csv_column=2020"],  # Hydra reads these as ints
        ["generate.do_sample=false", "generate.temperature=0"],  # greedy: the temperature is unused
        ["experiment=wp_responses", "chain.seed=null"],
    ],
)
def test_values_lightning_yaml_and_hydra_users_write_are_accepted(overrides):
    cfg = compose(overrides, config_dir=REPO / "conf")
    if "serve.api_key=123456" in overrides:
        assert cfg.serve.api_key == "123456" and cfg.generate.prompts == ["1984"] and cfg.data.csv_column == "2020"
    if "generate.stop=null" in overrides:
        assert cfg.generate.stop == [] and cfg.logger.tags == [] and cfg.data.csv_prefix is None
    if "export.gguf=q8_0" in overrides:
        assert cfg.export.gguf == ["q8_0"]


def test_chain_without_its_settings_is_one_line():
    from penwright.generate.chain import chain

    with pytest.raises(ConfigError, match="^chain: no chain settings .* experiment=wp_responses"):
        chain(compose([], config_dir=REPO / "conf"))
