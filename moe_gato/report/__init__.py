"""The main job's report (``moe_gato.report.report``): tables, numbers (``numbers``) and
figures (``figures``) from a pipeline's run folder. The pipeline hands it what it needs;
``moe-gato report`` is the pipeline's command (``moe_gato.pipeline.cli``)."""
