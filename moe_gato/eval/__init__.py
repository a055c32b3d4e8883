"""Evaluation: rollouts of a checkpoint in the real environments, expert-normalized
scores, held-out captions and text, and the control-step latency benchmark.

    moe-gato eval --checkpoint runs/demo/teacher --tasks default --episodes 20 --out runs/demo/eval-all

Modules: ``scores`` (normalized scores, intervals, summaries; no rollouts), ``evaluate``
(rollouts and held-out metrics, resumable), ``report`` (eval.json / eval.md / eval.png),
``cli``.
"""
