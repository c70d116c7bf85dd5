"""Floor 2, stages: SpARE's pipeline, each stage cached under ``cache_data/<model>/<stage>/``.

memorised set (:mod:`~spare_tl.stages.memorised`) → behaviours, the grouped prompts
(:mod:`~spare_tl.stages.behaviours`) → activations (:mod:`~spare_tl.stages.activations`) →
feature statistics (:mod:`~spare_tl.stages.statistics`) → functional features
(:mod:`~spare_tl.stages.selection`) → evaluation (:mod:`~spare_tl.stages.evaluation`, in
the harness of :mod:`~spare_tl.stages.harness`); :mod:`~spare_tl.stages.pipeline` runs them
from one config. Beside them: the development sweep (:mod:`~spare_tl.stages.sweep`), the
steerability scan (:mod:`~spare_tl.stages.scan`), SAE training
(:mod:`~spare_tl.stages.train_saes` and its ``sae_*`` helpers) and the cache upgrade
(:mod:`~spare_tl.stages.migrations`, here because it reads the memorised stage). Stages import
the ground floor and :mod:`spare_tl.methods`, nothing above.
"""
