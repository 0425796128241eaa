"""The offline demo data, owned in one place: the sources installed offline, the seeded split into training and
held-out images, the demo ingest and the benchmarks made from the held-out split.

It sits above the stages it feeds: ``dataset.py`` calls ingest and ``benchmarks.py`` uses evaluate's benchmark
writer, while ingest and evaluate never import it, except that their CLIs (``--demo``, ``--write-datasets``) load
it lazily, when the flag is given. Whoever needs the held-out images gets them from ``split.py`` or from the ingest
manifest's ``demo`` section, never by re-deriving the split.
"""
