# The ablation report: bootstrap intervals, verdicts, tables and figures.
