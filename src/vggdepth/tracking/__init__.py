"""Experiment tracking: every MLflow call of the project, one module per job. `store` (where the store is, whether
it answers, the experiment, the parent run of a pipeline run, metric names), `callback` (a training run, logged as it
trains), `results` (the evaluate stage's test metrics), `report` (the report stage's table, figures and registered
model) and `sync` (what MLflow lacks, sent from a run's outputs). Nothing is imported here: a stage depends only on
the modules it uses (tests/test_stage_deps.py), so editing the report's tracking makes no training stage stale.
"""
