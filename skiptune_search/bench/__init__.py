"""The benchmarks behind BENCHMARKS.md, one ``Table`` per table registered in ``tables`` (the
registry and the context a table reads): ``run`` (the command's driver, tables 1-4 and the
rendering), ``search`` (what tables 3-4 measure: proxy fidelity, search efficiency on the
exhaustive grid), ``headline`` (tables 5 and 8), ``gpu`` (table 6), ``sizes`` (table 7). A new
table: docs/extending.md."""
