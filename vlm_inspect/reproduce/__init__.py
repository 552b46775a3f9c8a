"""Re-make the tables of ``docs/`` from manifests in ``reproduce/``: training runs at several seeds,
evaluations, mean ± sd with binomial intervals, and verdicts on the papers' claims."""
