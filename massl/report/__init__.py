"""massl-report: one HTML page per run (RUN_DIR/report/index.html) with the training curves, the
evaluation results and pictures of what the teacher learned (docs/report.md).

matplotlib and scikit-learn are imported only when a report is written (the `report` extra)."""
