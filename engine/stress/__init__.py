"""``engine stress``: a seeded matrix of migrations with injected faults.

* :mod:`~engine.stress.matrix` - cases and their seeded sampling;
* :mod:`~engine.stress.faults` - the main-channel relay and the trigger;
* :mod:`~engine.stress.verdict` - verdicts and the table of expected outcomes;
* :mod:`~engine.stress.leaks` - segments, temp directories and processes a case left behind;
* :mod:`~engine.stress.runner` - one case from start to verdict, and a matrix;
* :mod:`~engine.stress.report` - summary table, JUnit XML, JSON;
* :mod:`~engine.stress.convergence` - convergence strategies, cases and verdicts
  (``--converge``), run by :mod:`~engine.stress.converge_run`.
"""
