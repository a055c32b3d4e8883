"""The main job as one pipeline: collect -> IsoFLOP sweep -> fit -> pick -> train the
teacher -> train the scratch baseline -> distill -> evaluate -> time -> report.

    moe-gato demo                         # configs/demo/default.yaml (make demo)
    moe-gato demo --quick                 # configs/demo/quick.yaml: the micro configuration
    moe-gato demo --stage pick            # one stage alone; its inputs must be done

    from moe_gato.pipeline import load_pipeline_config, run_pipeline
    run_pipeline(load_pipeline_config("configs/demo/quick.yaml"))

Under ``out`` (runs/demo): ``stages.json`` (status and wall time per stage),
``pipeline.yaml`` (the resolved config), ``sweep/`` (runs, ``results.csv``, ``fit/``),
``pick.json`` with ``teacher.yaml`` and ``student.yaml`` (+ ``student.model.yaml``), the
runs ``teacher/``, ``scratch/``, ``student/``, ``eval/<model>/``, ``latency/<model>.json``;
the report goes to ``reports/<date>/`` (``moe_gato.report``). Each stage prints the
``moe-gato`` command that runs it alone (``STAGES``).
"""

from moe_gato.pipeline.config import PipelineConfig, load_pipeline_config
from moe_gato.pipeline.stages import MODELS, STAGE_NAMES, STAGES, Paths, run_pipeline

__all__ = ["PipelineConfig", "load_pipeline_config", "run_pipeline", "STAGES", "STAGE_NAMES",
           "MODELS", "Paths"]
