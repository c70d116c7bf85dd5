from __future__ import annotations

import subprocess
import sys

import pytest

from spare_tl.cli import build_parser, main
from spare_tl.stages.pipeline import PipelineConfig, run_pipeline
from spare_tl.testing import save_tiny_hf_llama

COMMANDS = [
    "run",
    "memorised",
    "behaviours",
    "activations",
    "statistics",
    "features",
    "evaluate",
    "steer",
    "attribution",
]


def test_console_script_help():
    out = subprocess.run(
        [sys.executable, "-m", "spare_tl.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for cmd in COMMANDS:
        assert cmd in out


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([cmd, "--help"])
    assert e.value.code == 0
    assert "usage" in capsys.readouterr().out


@pytest.mark.parametrize(
    "body,match",
    [
        ("[to_context]\nproportion = 1.5\n", "to_context: proportion K must be in"),
        ("[to_memory]\nedit_strength = -1.0\n", "to_memory: edit strength α must be a finite"),
        ("[to_memory]\nalpha = 1.0\n", "to_memory: unknown key(s) ['alpha']"),
        ("proportion = 0.1\n", "set per direction now: write them in a [to_context] table"),
        ("pool_size = 8\nfoo = 3\n", "unknown config key"),
        ("[behaviours]\ndemo_types = ['dxx']\n", "unknown type 'dxx'"),
    ],
)
def test_bad_config_fails_fast_with_a_message(tmp_path, capsys, body, match):
    path = tmp_path / "run.toml"
    path.write_text(body)
    assert main(["run", str(path)]) == 2
    assert match in capsys.readouterr().err


def test_layer_beyond_model_stops_before_any_long_work(tmp_path, monkeypatch):
    folder = save_tiny_hf_llama(tmp_path / "tiny", n_layers=2)
    import spare_tl.data.datasets as ds

    monkeypatch.setattr(ds, "load_dataset", lambda *a, **k: pytest.fail("dataset was loaded"))
    config = PipelineConfig(model=str(folder), layers=[5], saes=str(tmp_path))
    with pytest.raises(ValueError, match="outside tiny, which has 2 layers"):
        run_pipeline(config, until="features")


def test_sae_of_another_width_or_hook_is_refused(tmp_path, monkeypatch):
    from spare_tl.errors import SAEError
    from spare_tl.testing import tiny_sae

    folder = save_tiny_hf_llama(tmp_path / "tiny", n_layers=2)
    saes = tmp_path / "saes"
    tiny_sae("blocks.1.hook_resid_post", d_in=16, model_name="tiny").save_model(
        saes / "blocks.1.hook_resid_post"
    )
    config = PipelineConfig(model=str(folder), layers=[1], saes=str(saes))
    with pytest.raises(SAEError, match="d_in 16"):
        run_pipeline(config, until="features")
    with pytest.raises(SAEError, match="no SAE for layer"):
        run_pipeline(
            PipelineConfig(model=str(folder), layers=[0], saes=str(saes)), until="features"
        )


def test_config_reproduces_the_committed_features():
    """`spare-tl run configs/smollm2.toml` rebuilds the committed, sweep-chosen feature set
    (the features stage must not overwrite it with another setting)."""
    import torch

    from spare_tl.cache import REPO_ROOT
    from spare_tl.embedded import DEFAULT_FEATURES, EMBEDDED_DIR
    from spare_tl.features import FunctionalFeatures
    from spare_tl.stages.pipeline import features_from_config
    from spare_tl.stages.statistics import LayerStatistics

    config = PipelineConfig.from_file(REPO_ROOT / "configs" / "smollm2.toml")

    def saved(stage: str) -> dict[int, LayerStatistics]:
        return {
            int(p.parent.name[5:]): LayerStatistics.load(p)
            for p in sorted((EMBEDDED_DIR / stage).glob("layer*/layer*.safetensors"))
        }

    stats = saved("mutual_information")
    by_site = {site: saved(f"mutual_information_{site}") for site in config.site_layers}
    built = features_from_config(config, stats, config.model, by_site)
    committed = FunctionalFeatures.load(DEFAULT_FEATURES)
    for direction in ("context", "memory"):
        b, c = built.for_direction(direction), committed.for_direction(direction)
        assert sorted(b.layers) == sorted(c.layers) and b.proportion == c.proportion
        assert b.site == c.site and b.hook_names == c.hook_names
        assert built.strength(direction) == committed.strength(direction)
        for layer in c.layers:
            assert torch.equal(b.layers[layer].context_features, c.layers[layer].context_features)
            assert torch.equal(b.layers[layer].memory_features, c.layers[layer].memory_features)


def test_config_checks_each_direction_setting():
    with pytest.raises(ValueError, match="to_context layers .3. are not among the resid_post"):
        PipelineConfig(layers=[1, 2], to_context={"layers": [3]})
    with pytest.raises(ValueError, match="to_memory: unknown key"):
        PipelineConfig(layers=[1, 2], to_memory={"proportin": 0.1})
    with pytest.raises(ValueError, match="to_memory layers"):
        PipelineConfig(layers=[1, 2], to_memory={"layers": [5]})
    with pytest.raises(ValueError, match="to_memory: proportion K must be in"):
        PipelineConfig(layers=[1, 2], to_memory={"layers": [1], "proportion": 2.0})
    # the memory setting takes what it leaves unset from the context one
    config = PipelineConfig(
        layers=[1, 2], to_context={"layers": [1], "proportion": 0.2}, to_memory={"edit_strength": 4}
    )
    memory = config.direction_settings()["memory"]
    assert (memory.layers, memory.proportion, memory.edit_strength) == ((1,), 0.2, 4.0)
    assert config.direction_settings()["context"].edit_strength == 2.0


def test_config_file_of_the_one_setting_form_says_how_to_write_it(tmp_path):
    path = tmp_path / "old.toml"
    path.write_text("layers = [1]\nedit_strength = 3.0\nfeature_layers = [1]\n")
    with pytest.raises(ValueError, match=r"\[to_context\] table"):
        PipelineConfig.from_file(path)
