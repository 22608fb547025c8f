"""Benchmarks of dwops against the memory floor and the frameworks, driven by ``python -m dwops bench``.

* :mod:`.cases`: the problems and the suites that list them (network layer shapes);
* :mod:`.devices`: arrays, timers, cache flushing and copy bandwidth on the host or a GPU;
* :mod:`.workloads`: one case's inputs, its dwops call, its baselines and its reference check;
* :mod:`.runner`: the loop with its time budget;
* :mod:`.report`: progress bar, markdown table, JSON (schema in its docstring);
* :mod:`.env`: versions, devices and backends (also ``python -m dwops info``).

Nothing here is imported by ``import dwops``; frameworks are imported only when a baseline needs them.
"""
