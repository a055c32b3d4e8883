"""``moe-gato report``: the main job's report from a pipeline's run folder, alone.

    moe-gato report --run runs/demo --out reports/2026-11-26

The pipeline's saved config (``<run>/pipeline.yaml``) gives the report what it needs: each
stage's command and the sweep's config (``moe_gato.report.report.write_report``).
"""

from __future__ import annotations

import argparse
from datetime import date
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", default="runs/demo", help="the pipeline's run folder (its --out)")
    p.add_argument("--out", default=None, help="report folder (default: reports/<today>)")


def run(args: argparse.Namespace) -> int:
    import yaml

    from moe_gato.config import from_dict
    from moe_gato.pipeline.config import PipelineConfig
    from moe_gato.pipeline.stages import Paths, stage_commands
    from moe_gato.report.report import check_run, write_report

    run_dir = Path(args.run)
    check_run(run_dir)
    cfg = from_dict(PipelineConfig, yaml.safe_load((run_dir / "pipeline.yaml").read_text()))
    p = Paths(cfg, args.out or Path("reports") / date.today().isoformat())
    write_report(run_dir, p.report, commands=stage_commands(p), sweep=p.sweep_config())
    return 0
