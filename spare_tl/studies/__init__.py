"""Floor 3, studies: experiments built on the stages, each saving JSON that the report and
``spare-tl docs`` read back.

The held-out results by demonstration type (:mod:`~spare_tl.studies.results`), SpARE against
the baselines (:mod:`~spare_tl.studies.baselines` with ``baseline_setup`` / ``baseline_sweep``),
the knowledge-conflict probes (:mod:`~spare_tl.studies.probes` with ``probe_data`` /
``probe_training``), the paper's original cache (:mod:`~spare_tl.studies.original`,
``original_cache``), the conflict table (:mod:`~spare_tl.studies.conflict_table`) and the
readers of their saved outputs (:mod:`~spare_tl.studies.saved`). Studies import the floors
below (ground, methods, stages); rendering them is :mod:`spare_tl.viz`'s job.
"""
