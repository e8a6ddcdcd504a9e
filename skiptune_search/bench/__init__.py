"""The benchmarks behind BENCHMARKS.md: ``run`` (the command's driver, tables 1-2 and the
rendering), ``search`` (tables 3-4: proxy fidelity, search efficiency on the exhaustive grid),
``headline`` (table 5), ``gpu`` (table 6)."""
