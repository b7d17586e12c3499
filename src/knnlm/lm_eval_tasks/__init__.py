"""lm-evaluation-harness task YAMLs for Macondo; pass this folder to ``lm_eval --include_path`` (see docs/lm_eval.md)."""
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
