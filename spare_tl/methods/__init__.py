"""Floor 1, methods: ways to steer a model at inference time, each a
:class:`~spare_tl.methods.base.SteeringMethod`.

SpARE's edit of SAE activations (:mod:`~spare_tl.methods.edit`, :mod:`~spare_tl.methods.spare`),
the hooks that apply it (:mod:`~spare_tl.methods.hooks`), the baselines ICL, ActAdd, task
vectors and CAD (:mod:`~spare_tl.methods.baselines`) and the conflict probe that gates steering
(:mod:`~spare_tl.methods.conflict_probe`). A method imports only the ground floor (models,
SAEs, features, generation, data); no method knows about caches of stages or studies.
"""
