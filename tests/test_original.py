"""Importing the SpARE paper's published cache (``spare_tl.studies.original``).

Tests on the real cache are skipped (with the reason) when ``../shared/reference/
spare-original-cache`` is absent; everything else runs on small synthetic files in the same
layout.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from spare_tl.cli import main as cli_main
from spare_tl.errors import MalformedCacheError, UnsafePickleError
from spare_tl.features import FunctionalFeatures, LayerFeatures
from spare_tl.studies.original import (
    PAPER_SETTINGS,
    OriginalCache,
    OriginalPromptRecord,
    export_grouped_prompts,
    export_statistics,
    import_original,
    load_memorised_set,
)

D_SAE = 16

# (context, memory) features per layer, measured on the paper's cache
LLAMA3_K007 = {13: (489, 229), 14: (482, 212), 15: (428, 96), 16: (404, 45)}
LLAMA2_K007 = {12: (502, 404), 13: (450, 391), 14: (460, 360), 15: (400, 335)}
GEMMA2_K001 = {23: (62, 45), 24: (42, 18), 25: (37, 18), 29: (33, 24), 30: (31, 26), 31: (33, 32)}


# --------------------------------------------------------------------------------------
# A synthetic cache in the original layout
# --------------------------------------------------------------------------------------


def _record(item: int, prompt_type: str, sub_em: int, org_em: int) -> dict:
    return {
        "sub_answer": ["Paris"],
        "org_answer": ["London"],
        "pred_answer": "Paris" if sub_em else "London" if org_em else "Rome",
        "sub_answer_em": sub_em,
        "org_answer_em": org_em,
        "item_idx": item,
        "demonstration_ids": [7, 8, 9],
        "prompt_type": prompt_type,
        "ss_loss": 1.0,
        "so_loss": 3.0,
    }


def _write_mi(path: Path, layer: int, mi: torch.Tensor, expectation: torch.Tensor) -> None:
    folder = path / "mutual_information"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"mi_scores": mi, "expectation": expectation}, folder / f"layer-{layer} mi_expectation.pt"
    )


def _write_func(path: Path, layer: int, context: torch.Tensor, memory: torch.Tensor) -> None:
    folder = path / "func_weights" / "grouped_activations" / f"layer{layer}"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(context, folder / "use_context_weight.pt")
    torch.save(memory, folder / "use_parameter_weight.pt")


@pytest.fixture()
def synthetic(tmp_path: Path) -> Path:
    """``<tmp>/cache/toy-model``: MI for layers 1, 2, 5; func_weights for 1, 2."""
    model_dir = tmp_path / "cache" / "toy-model"
    g = torch.Generator().manual_seed(0)
    for layer in (1, 2, 5):
        # MI 15, 14, ..., 0 on latents 0..15; expectation alternates in sign, latent 1 is 0
        mi = torch.arange(D_SAE - 1, -1, -1, dtype=torch.float64)
        expectation = torch.tensor([(-1.0) ** i for i in range(D_SAE)], dtype=torch.float32)
        expectation[1] = 0.0
        _write_mi(model_dir, layer, mi, expectation)
    for layer in (1, 2):
        _write_func(
            model_dir, layer, torch.rand(D_SAE, generator=g), torch.rand(D_SAE, generator=g)
        )
    prompts = model_dir / "grouped_prompts"
    prompts.mkdir()
    records = [
        _record(0, "dss_s", 1, 0),
        _record(0, "dso_s", 0, 1),
        _record(1, "doo_s", 0, 0),
        _record(1, "doo_s", 1, 1),
    ]
    (prompts / "3shot-seed42-results.json").write_text(json.dumps(records))
    (prompts / "4shot-seed43-results.json").write_text(json.dumps(records[:1]))
    torch.save({3, 1, 4}, model_dir.parent / "nqswap-toy-model-memorised_set")
    (model_dir.parent / "macnoise-toy-model-memorised_set").write_bytes(pickle.dumps({5, 9}))
    return model_dir


# --------------------------------------------------------------------------------------
# The paper's cache
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "expected", "proportion"),
    [
        ("Meta-Llama-3-8B", LLAMA3_K007, 0.07),
        ("Llama-2-7b-hf", LLAMA2_K007, 0.07),
        ("gemma-2-9b", GEMMA2_K001, 0.01),
    ],
)
def test_import_reproduces_paper_counts(reference_cache: Path, model, expected, proportion):
    features = import_original(reference_cache / model, list(expected), proportion)
    assert features.counts() == expected
    assert features.model_name == model
    assert features.metadata["source"] == "spare-original-cache"
    # the original statistics: pre-top-k ReLU codes for the Llama TopK SAEs
    assert features.latent_code == ("encode" if model == "gemma-2-9b" else "relu_pre")
    for layer, f in features.layers.items():
        assert f.hook_name == f"blocks.{layer}.hook_resid_post"
        assert f.d_sae == 131072
        # context features have E > 0, memory features E < 0, no overlap
        stats = OriginalCache(reference_cache / model).statistics(layer)
        assert (stats.expectation[f.context_features] > 0).all()
        assert (stats.expectation[f.memory_features] < 0).all()
        assert not set(f.context_features.tolist()) & set(f.memory_features.tolist())


def test_paper_settings_import(reference_cache: Path):
    features = import_original(
        reference_cache / "gemma-2-9b", **PAPER_SETTINGS["gemma-2-9b"].as_kwargs()
    )
    assert features.counts() == GEMMA2_K001
    assert features.strength("context") == 3.0
    assert features.strength("memory") == 1.8
    # layer 26, which the released code also uses when steering to context
    assert import_original(reference_cache / "gemma-2-9b", [26], 0.01).counts() == {26: (26, 25)}


def test_real_cache_contents(reference_cache: Path):
    cache = OriginalCache(reference_cache / "Meta-Llama-3-8B")
    assert cache.functional_layers() == [13, 14, 15, 16]
    assert 13 in cache.mi_layers() and 30 in cache.mi_layers()
    stats = cache.statistics(13)
    assert stats.mutual_information.dtype == torch.float64
    assert stats.expectation.dtype == torch.float32
    context, memory = cache.functional_activations(13)
    assert context.shape == memory.shape == (131072,)
    records = cache.grouped_prompts()
    assert len(records) == 16335
    assert {r.prompt_type for r in records} == {"dss", "dso", "doo"}
    assert {(r.shots, r.seed) for r in records} == {
        (k, s) for k in (3, 4, 5) for s in range(42, 47)
    }
    counts = {b: sum(r.behaviour == b for r in records) for b in ("context", "memory", "neither")}
    assert counts == {"context": 7979, "memory": 4367, "neither": 3989}
    assert len(cache.grouped_prompts(shots=[3], seeds=[42])) == 1089
    nqswap = cache.memorised_set("nqswap")
    assert len(nqswap) == 2349 and all(isinstance(i, int) for i in nqswap)
    assert len(cache.memorised_set("macnoise")) == 2188


def test_real_layer_without_func_weights(reference_cache: Path):
    with pytest.raises(FileNotFoundError, match=r"layer 10 .*no functional.*\[13, 14, 15, 16\]"):
        import_original(reference_cache / "Meta-Llama-3-8B", [13, 10], 0.07)


def test_cli_json_on_real_cache(reference_cache: Path, tmp_path: Path, capsys):
    out = tmp_path / "features"
    rc = cli_main(
        [
            "import-original",
            str(reference_cache / "Meta-Llama-3-8B"),
            "--layers",
            "13",
            "16",
            "--proportion",
            "0.07",
            "--edit-strength",
            "2",
            "--output",
            str(out),
            "--json",
        ]
    )
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["layers"] == {
        "13": {"context": 489, "memory": 229},
        "16": {"context": 404, "memory": 45},
    }
    loaded = FunctionalFeatures.load(out)
    assert loaded.counts() == {13: (489, 229), 16: (404, 45)}
    assert loaded.edit_strength == 2.0


# --------------------------------------------------------------------------------------
# Synthetic cache: reading, selection, errors
# --------------------------------------------------------------------------------------


def test_synthetic_layers_and_selection(synthetic: Path):
    cache = OriginalCache(synthetic)
    assert cache.model_name == "toy-model"
    assert cache.mi_layers() == [1, 2, 5]
    assert cache.functional_layers() == [1, 2]
    # total MI = 120; K = 0.2: the cumulative MI 15, 29 first exceeds 24 at k = 2
    features = import_original(synthetic, [1], 0.2, edit_strength=2.5, sae_ids={1: "my-sae"})
    f = features.layers[1]
    # first 2 latents (by MI) with E != 0: 0 (E=+1) and 2 (E=+1); latent 1 has E = 0
    assert f.context_features.tolist() == [0, 2]
    assert f.memory_features.tolist() == []
    assert f.sae_id == "my-sae"
    assert features.edit_strength == 2.5
    context, memory = cache.functional_activations(1)
    assert torch.equal(f.context_activations, context)
    assert torch.equal(f.memory_activations, memory)
    # K = 0.3: 15, 29, 42 first exceeds 36 at k = 3: latents 0, 2 (context), 3 (memory)
    f = import_original(synthetic, [1, 2], 0.3).layers[2]
    assert f.context_features.tolist() == [0, 2]
    assert f.memory_features.tolist() == [3]


def test_hook_template(synthetic: Path):
    features = import_original(synthetic, [1, 2], 0.5, hook_template="blocks.{layer}.hook_x")
    assert features.layers[2].hook_name == "blocks.2.hook_x"
    with pytest.raises(ValueError, match="must contain"):
        import_original(synthetic, [1], 0.5, hook_template="blocks.0.hook_resid_post")


def test_save_load_round_trip(synthetic: Path, tmp_path: Path):
    features = import_original(
        synthetic, [1, 2], 0.3, edit_strength=3.0, edit_strength_to_memory=1.8
    )
    loaded = FunctionalFeatures.load(features.save(tmp_path / "saved"))
    assert loaded.counts() == features.counts()
    assert loaded.model_name == "toy-model"
    assert loaded.proportion == 0.3
    assert (loaded.edit_strength, loaded.edit_strength_to_memory) == (3.0, 1.8)
    assert loaded.metadata == features.metadata
    for layer, f in features.layers.items():
        g = loaded.layers[layer]
        assert g.hook_name == f.hook_name
        for name in (
            "context_features",
            "memory_features",
            "context_activations",
            "memory_activations",
        ):
            assert torch.equal(getattr(g, name), getattr(f, name)), name


def test_grouped_prompt_records(synthetic: Path):
    records = OriginalCache(synthetic).grouped_prompts()
    assert len(records) == 5
    first = records[0]
    assert (first.shots, first.seed, first.prompt_type, first.behaviour) == (
        3,
        42,
        "dss",
        "context",
    )
    assert [r.behaviour for r in records[:4]] == ["context", "memory", "neither", "neither"]
    assert first.confidence == pytest.approx(0.75)  # so / (ss + so)
    assert records[1].confidence == pytest.approx(0.25)  # ss / (ss + so)
    assert records[2].confidence == 0.0
    assert records[4].shots == 4 and records[4].seed == 43
    assert OriginalPromptRecord.from_dict(json.loads(json.dumps(first.to_dict()))) == first
    assert len(OriginalCache(synthetic).grouped_prompts(shots=[4])) == 1


def test_exported_statistics_match_the_original_cache(synthetic: Path, tmp_path: Path):
    from safetensors.torch import load_file

    out = export_statistics(synthetic, tmp_path / "stats")
    tensors = load_file(str(out / "statistics.safetensors"))
    stats = OriginalCache(synthetic).statistics(5)
    assert torch.equal(tensors["layer5.mutual_information"], stats.mutual_information)
    assert torch.equal(tensors["layer5.expectation"], stats.expectation)
    meta = json.loads((out / "statistics.json").read_text())
    assert meta["layers"] == [1, 2, 5]
    assert meta["summary"]["1"]["total_mutual_information"] == pytest.approx(120.0)
    assert json.loads((out / "config.json").read_text())["complete"] is True

    out = export_grouped_prompts(synthetic, tmp_path / "prompts")
    lines = (out / "grouped_prompts.jsonl").read_text().splitlines()
    assert len(lines) == 5
    summary = json.loads((out / "grouped_prompts.json").read_text())
    assert summary["behaviours"] == {"context": 2, "memory": 1, "neither": 2}
    assert summary["by_prompt_type"]["dss"] == {"context": 2}


def test_cli_json_synthetic(synthetic: Path, tmp_path: Path, capsys):
    out = tmp_path / "out"
    args = ["import-original", str(synthetic), "--layers", "1", "2", "--proportion", "0.3"]
    assert cli_main([*args, "--output", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["layers"]["2"] == {"context": 2, "memory": 1}
    assert FunctionalFeatures.load(out).counts() == {1: (2, 1), 2: (2, 1)}
    assert cli_main([*args, "--output", str(out)]) == 0
    assert "layer 1: 2 context, 1 memory features" in capsys.readouterr().out
    # errors become exit code 2 with the message
    bad = ["import-original", str(synthetic), "--layers", "5", "--proportion", "0.3"]
    assert cli_main([*bad, "--output", str(out)]) == 2
    assert "layer 5" in capsys.readouterr().err


def test_missing_and_not_a_cache(tmp_path: Path, synthetic: Path):
    with pytest.raises(FileNotFoundError, match="no SpARE cache folder"):
        OriginalCache(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        OriginalCache(tmp_path / "empty")
    cache = OriginalCache(synthetic)
    with pytest.raises(FileNotFoundError, match=r"layer 7.*available layers: \[1, 2, 5\]"):
        cache.statistics(7)
    with pytest.raises(FileNotFoundError, match=r"layer 7.*available layers: \[1, 2, 5\]"):
        import_original(synthetic, [1, 7], 0.1)
    with pytest.raises(FileNotFoundError, match=r"layer 5 has mutual information.*\[1, 2\]"):
        import_original(synthetic, [5], 0.1)
    with pytest.raises(FileNotFoundError, match=r"layer 5 has no functional.*\[1, 2\]"):
        cache.functional_activations(5)
    with pytest.raises(FileNotFoundError, match="no memorised set"):
        load_memorised_set(tmp_path / "missing_set")


@pytest.mark.parametrize("proportion", [0.0, -0.1, 1.5])
def test_proportion_out_of_range(synthetic: Path, proportion: float):
    with pytest.raises(ValueError, match=r"proportion K must be in \(0, 1\]"):
        import_original(synthetic, [1], proportion)


def test_bad_layer_arguments(synthetic: Path):
    with pytest.raises(ValueError, match="at least one layer"):
        import_original(synthetic, [], 0.1)
    with pytest.raises(ValueError, match="repeat"):
        import_original(synthetic, [1, 1], 0.1)
    with pytest.raises(ValueError, match="not imported"):
        import_original(synthetic, [1], 0.1, sae_ids={2: "x"})


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        ({"mi": torch.zeros(D_SAE), "expectation": torch.zeros(D_SAE)}, "'mi_scores'"),
        (torch.zeros(D_SAE), "expected a dict"),
        ({"mi_scores": torch.zeros(2, D_SAE), "expectation": torch.zeros(D_SAE)}, "1-D"),
        ({"mi_scores": torch.zeros(D_SAE), "expectation": torch.zeros(D_SAE + 1)}, "length"),
        ({"mi_scores": [0.0] * D_SAE, "expectation": torch.zeros(D_SAE)}, "not a tensor"),
    ],
)
def test_malformed_mi_file(synthetic: Path, payload, match: str):
    path = synthetic / "mutual_information" / "layer-1 mi_expectation.pt"
    torch.save(payload, path)
    with pytest.raises(MalformedCacheError, match=match):
        import_original(synthetic, [1], 0.1)


def test_malformed_func_and_truncated_files(synthetic: Path):
    _write_func(synthetic, 1, torch.zeros(D_SAE + 2), torch.zeros(D_SAE + 2))
    with pytest.raises(MalformedCacheError, match="16 latents but the functional"):
        import_original(synthetic, [1], 0.1)
    _write_func(synthetic, 1, torch.zeros(D_SAE), torch.zeros(D_SAE - 1))
    with pytest.raises(MalformedCacheError, match="differ"):
        import_original(synthetic, [1], 0.1)
    (synthetic / "mutual_information" / "layer-2 mi_expectation.pt").write_bytes(b"garbage")
    with pytest.raises(MalformedCacheError, match="cannot be read"):
        import_original(synthetic, [2], 0.1)


def test_tensor_file_with_code_is_refused(synthetic: Path, tmp_path: Path):
    marker = tmp_path / "pwned"
    path = synthetic / "mutual_information" / "layer-1 mi_expectation.pt"
    torch.save({"mi_scores": _Exploit(marker), "expectation": torch.zeros(D_SAE)}, path)
    with pytest.raises(UnsafePickleError, match="system"):
        import_original(synthetic, [1], 0.1)
    assert not marker.exists()


def test_malformed_grouped_prompts(synthetic: Path):
    path = synthetic / "grouped_prompts" / "3shot-seed42-results.json"
    path.write_text("[{")
    with pytest.raises(MalformedCacheError, match="not valid JSON"):
        OriginalCache(synthetic).grouped_prompts()
    record = _record(0, "dss_s", 1, 0)
    path.write_text(json.dumps([{**record, "prompt_type": "xyz"}]))
    with pytest.raises(MalformedCacheError, match="prompt_type 'xyz'"):
        OriginalCache(synthetic).grouped_prompts()
    del record["ss_loss"]
    path.write_text(json.dumps([record]))
    with pytest.raises(MalformedCacheError, match=r"\[0\]: missing keys \['ss_loss'\]"):
        OriginalCache(synthetic).grouped_prompts()


# --------------------------------------------------------------------------------------
# Memorised sets: safe loading
# --------------------------------------------------------------------------------------


def test_memorised_sets_synthetic(synthetic: Path):
    cache = OriginalCache(synthetic)
    assert cache.memorised_set("nqswap") == frozenset({1, 3, 4})  # torch zip
    assert cache.memorised_set("macnoise") == frozenset({5, 9})  # plain pickle
    with pytest.raises(ValueError, match="nqswap' or 'macnoise"):
        cache.memorised_set("squad")  # type: ignore[arg-type]


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("fmt", ["torch", "pickle", "pickle-protocol-0"])
def test_malicious_pickle_is_refused(tmp_path: Path, fmt: str):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil-memorised_set"
    payload = {1, 2, _Exploit(marker)}
    if fmt == "torch":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=0 if fmt.endswith("0") else 4))
    with pytest.raises(UnsafePickleError, match="system"):
        load_memorised_set(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("payload", "match"),
    [({"a", "b"}, "non-integer"), ({1: 2}, "expected a set"), ({True, 2}, "non-integer")],
)
def test_memorised_set_wrong_content(tmp_path: Path, payload, match: str):
    path = tmp_path / "set"
    path.write_bytes(pickle.dumps(payload))
    with pytest.raises(MalformedCacheError, match=match):
        load_memorised_set(path)


def test_memorised_set_tensor_refused(tmp_path: Path):
    path = tmp_path / "set"
    torch.save(torch.arange(3), path)
    with pytest.raises(MalformedCacheError, match="expected a set"):
        load_memorised_set(path)
    path.write_bytes(b"not a pickle")
    with pytest.raises(MalformedCacheError, match="not a readable pickle"):
        load_memorised_set(path)


def test_real_memorised_sets_load_safely(reference_cache: Path):
    for model in ("Llama-2-7b-hf", "Meta-Llama-3-8B", "gemma-2-9b"):
        for dataset in ("nqswap", "macnoise"):
            s = OriginalCache(reference_cache / model).memorised_set(dataset)
            assert len(s) > 1000 and min(s) >= 0


# --------------------------------------------------------------------------------------
# Steering with the imported features on a tiny model
# --------------------------------------------------------------------------------------


def _remap(features: FunctionalFeatures, mapping: dict[int, int]) -> FunctionalFeatures:
    """The same features placed at other layers (with those layers' hook names)."""
    layers = {}
    for old, new in mapping.items():
        f = features.layers[old]
        layers[new] = LayerFeatures(
            layer=new,
            hook_name=f"blocks.{new}.hook_resid_post",
            context_features=f.context_features,
            memory_features=f.memory_features,
            context_activations=f.context_activations,
            memory_activations=f.memory_activations,
            latent_code=f.latent_code,
        )
    return FunctionalFeatures(
        model_name="tiny-llama",
        layers=layers,
        proportion=features.proportion,
        edit_strength=features.edit_strength,
        metadata=features.metadata,
    )


def test_imported_llama3_features_steer_a_tiny_model(reference_cache: Path, tiny_model):
    """The paper's Llama-3-8B layers 13-16 moved onto a tiny model's layers 0-3, with random
    131072-latent SAEs: steering runs, edits every layer and changes the output."""
    from spare_tl.methods.spare import steer
    from spare_tl.testing import tiny_sae

    imported = import_original(
        reference_cache / "Meta-Llama-3-8B", **PAPER_SETTINGS["Meta-Llama-3-8B"].as_kwargs()
    )
    features = _remap(imported, {13: 0, 14: 1, 15: 2, 16: 3})
    model = tiny_model
    d_model = model.cfg.d_model
    saes = {
        layer: tiny_sae(f"blocks.{layer}.hook_resid_post", d_in=d_model, d_sae=131072, seed=layer)
        for layer in range(4)
    }
    tokens = model.to_tokens(["context: a\nquestion: b\nanswer:", "question: c\nanswer:"])
    with torch.no_grad():
        base = model(tokens)
        with steer(model, features, "context", saes) as steering:
            to_context = model(tokens)
        with steer(model, features, "memory", saes):
            to_memory = model(tokens)
        again = model(tokens)
    assert steering.edit_strength == 2.0
    assert all(s.rows_edited > 0 and s.added > 0 for s in steering.stats.values())
    # only the last position changes; both directions change it, differently
    assert torch.allclose(base[:, :-1], to_context[:, :-1], atol=1e-5)
    assert not torch.allclose(base[:, -1], to_context[:, -1], atol=1e-4)
    assert not torch.allclose(base[:, -1], to_memory[:, -1], atol=1e-4)
    assert not torch.allclose(to_context[:, -1], to_memory[:, -1], atol=1e-4)
    assert torch.equal(base, again)  # hooks removed
