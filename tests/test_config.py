"""Config validation: every shipped config loads; bad keys and values name the field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from histodiffusion.config import budget_name, config_from_dict, load_config
from histodiffusion.errors import ConfigError, UserError
from histodiffusion.presets import PRESETS
from tests.helpers import CONFIGS, raw_config


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.experiment
    assert cfg.data.resolution == cfg.data.resolution  # validated int


def test_smoke_uses_tiny_preset() -> None:
    assert load_config(CONFIGS / "smoke.yaml").preset == "tiny"


def test_unknown_key_names_path_and_suggests() -> None:
    raw = raw_config(dict(resolutoin=64))
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw, source="x.yaml")
    text = str(err.value)
    assert "x.yaml: data.resolutoin: unknown key" in text
    assert "did you mean 'resolution'" in text


def test_unknown_nested_key_in_list_item() -> None:
    raw = raw_config(dict(pool=[{"dataset": "ebhi", "wieght": 2}]))
    with pytest.raises(ConfigError, match=r"data\.pool\.0\.wieght: unknown key; did you mean 'weight'"):
        config_from_dict(raw)


def test_wrong_type_and_range_are_named() -> None:
    with pytest.raises(ConfigError, match=r"data\.resolution: .*integer.*'big'"):
        config_from_dict(raw_config(dict(resolution="big")))
    with pytest.raises(ConfigError, match=r"data\.max_bad_fraction: .*less than or equal to 1"):
        config_from_dict(raw_config(dict(max_bad_fraction=3)))
    with pytest.raises(ConfigError, match=r"split_fractions: three positive fractions"):
        config_from_dict(raw_config(dict(target={"dataset": "ebhi", "split_fractions": [0.5, 0.5, 0.5]})))


def test_missing_required_key() -> None:
    raw = raw_config()
    del raw["data"]["pool"]
    with pytest.raises(ConfigError, match=r"data\.pool: required key is missing"):
        config_from_dict(raw)


def test_source_needs_exactly_one_of_dataset_or_path() -> None:
    with pytest.raises(ConfigError, match="exactly one of 'dataset'"):
        config_from_dict(raw_config(dict(pool=[{"dataset": "ebhi", "path": "/x"}])))


def test_unknown_preset() -> None:
    raw = raw_config()
    raw["preset"] = "huge"
    with pytest.raises(ConfigError, match="preset: unknown preset 'huge'"):
        config_from_dict(raw)


def test_preset_is_laid_under_the_file() -> None:
    cfg = config_from_dict({**raw_config(), "preset": "tiny"})
    assert cfg.data.resolution == PRESETS["tiny"]["data"]["resolution"]
    cfg = config_from_dict({**raw_config(dict(resolution=48)), "preset": "tiny"})
    assert cfg.data.resolution == 48


def test_set_overrides_nested_and_list_items() -> None:
    cfg = config_from_dict(raw_config(dict(pool=["ebhi", "lc25000"])),
                           ["data.resolution=96", "data.pool.1.weight=2.5", "seed=7"])
    assert cfg.data.resolution == 96 and cfg.seed == 7
    assert cfg.data.pool[1].weight == 2.5


@pytest.mark.parametrize("bad", ["data.resolution", "data.pool.9.weight=1", "data..x=1"])
def test_bad_set_is_refused(bad: str) -> None:
    with pytest.raises(ConfigError, match="--set"):
        config_from_dict(raw_config(), [bad])


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("experiment: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_hash_ignores_where_data_lives_but_not_what_it_is() -> None:
    a = config_from_dict(raw_config(dict(root="/a")))
    b = config_from_dict(raw_config(dict(root="/b")))
    c = config_from_dict(raw_config(dict(root="/a", resolution=32)))
    assert a.section_hash("data") == b.section_hash("data")
    assert a.section_hash("data") != c.section_hash("data")


@pytest.mark.parametrize("budget,name", [(0.01, "1pct"), (0.05, "5pct"), (0.25, "25pct"),
                                         (0.005, "0p5pct"), (20, "20perclass")])
def test_budget_names(budget, name) -> None:
    assert budget_name(budget) == name


def test_hash_ignores_settings_that_do_not_change_results() -> None:
    a = config_from_dict(raw_config())
    b = config_from_dict(raw_config(), ["pretrain.train.time_limit_minutes=30", "pretrain.train.checkpoint_every=7",
                                  "autoencoder.train.log_every=3"])
    c = config_from_dict(raw_config(), ["pretrain.train.lr=0.123"])
    assert a.section_hash("pretrain") == b.section_hash("pretrain")
    assert a.section_hash("pretrain") != c.section_hash("pretrain")


def test_every_config_key_is_documented() -> None:
    """`histodiffusion config --keys` lists a meaning for every key (from the field docstrings)."""
    from histodiffusion.config import describe_keys

    rows = describe_keys()
    assert len(rows) > 100
    assert [path for path, _, text in rows if not text] == []


@pytest.mark.parametrize("override", ["seed=-1", "data.target.split_seed=-1", "evaluate.seeds=[0,-3]"])
def test_negative_seeds_are_refused(override: str) -> None:
    """numpy refuses negative seeds: a config error naming the key, not a traceback from inside a stage."""
    with pytest.raises(ConfigError, match=r"(seed|split_seed|seeds\.1): Input should be greater than or equal to 0"):
        config_from_dict(raw_config(), [override])


def test_yaml_with_byte_order_mark_loads(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(b"\xef\xbb\xbfexperiment: bom\ndata: {target: pcam, pool: [ebhi]}\n")
    assert load_config(path).experiment == "bom"


@pytest.mark.parametrize(("encoding", "said"), [("latin-1", "is not UTF-8 text"), ("utf-16", "is UTF-16 text")])
def test_yaml_in_another_encoding_names_the_file(tmp_path: Path, encoding: str, said: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes("experiment: caf\u00e9\ndata: {target: pcam, pool: [ebhi]}\n".encode(encoding))
    with pytest.raises(UserError, match=re.escape(f"{path} {said}") + ".*save it as UTF-8"):
        load_config(path)
