"""Do fp32 activations select the committed functional features? (a reproducibility check)

    python benchmarks/check_feature_dtype.py [--dtype float32]

Recomputes, in a temporary cache, the activations and statistics of the committed feature
set's layers (both directions) from the committed grouped prompts and SAEs with the model in
``--dtype``, selects features with the committed K, and prints per layer how many context and
memory features the committed set and the recomputed one share. The committed cache is only
read. About 4 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from spare_tl.embedded import DEFAULT_FEATURES, load_steering_setup
from spare_tl.saes import site_of_hook
from spare_tl.stages.activations import collect_activations
from spare_tl.stages.behaviours import STAGE as GROUPED_STAGE
from spare_tl.stages.behaviours import GroupedPrompts
from spare_tl.stages.selection import functional_features
from spare_tl.stages.statistics import feature_statistics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    model, committed, saes_by_hook = load_steering_setup(dtype=args.dtype)
    grouped = GroupedPrompts.load(Path(DEFAULT_FEATURES).parent / GROUPED_STAGE)
    print(f"model in {model.cfg.dtype}; committed features {DEFAULT_FEATURES}")
    tmp = Path(tempfile.mkdtemp(prefix="spare-tl-dtype-check-"))
    start = time.perf_counter()
    try:
        for direction in ("context", "memory"):
            fset = committed.for_direction(direction)
            layers = sorted(fset.layers)
            site = site_of_hook(fset.layers[layers[0]].hook_name)
            saes = {layer: saes_by_hook[fset.layers[layer].hook_name] for layer in layers}
            acts = collect_activations(
                model, grouped, layers, cache_root=tmp, progress=False, site=site
            )
            stats = feature_statistics(
                model, acts, saes, latent_code=fset.latent_code, cache_root=tmp, progress=False
            )
            fresh = functional_features(
                stats, committed.setting(direction), model_name=model.cfg.model_name
            )
            for layer in layers:
                old, new = fset.layers[layer], fresh.layers[layer]
                parts = []
                for kind in ("context", "memory"):
                    a = set(getattr(old, f"{kind}_features").tolist())
                    b = set(getattr(new, f"{kind}_features").tolist())
                    parts.append(f"{kind} {len(a & b)} shared ({len(a)} committed, {len(b)} new)")
                print(f"to {direction}, layer {layer}: " + "; ".join(parts))
    finally:
        shutil.rmtree(tmp)
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
