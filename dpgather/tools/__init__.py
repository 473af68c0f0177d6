"""dpgather.tools: what runs *beside* the library, built on its public API only.

- :mod:`.cli`: the ``dpgather`` command line (``python -m dpgather``).
- :mod:`.replay`: replay a serving trace through :class:`dpgather.DpAttention`, verified row by
  row; :mod:`.report`: its tables, ``report.json`` and plots.
- :mod:`.traces`: the trace format (JSON Lines, ``trace.schema.json``) and synthetic traces.
- :mod:`.calibrate`: ``dg.calibrate()``, the cost model's constants measured on this machine.
- :mod:`.timing`: the timing core the benchmarks and calibration share (clocks, protocol,
  statistics, nccl-tests bandwidths and tables).
- :mod:`.sync_bench`: the per-step sync benchmark (``dpgather bench-sync``).
- :mod:`.cublas`: capturable cuBLAS GEMMs for graph-runner functions.
- :mod:`.launch`: finding and setting up ``mpiexec``.

Nothing in the data plane (``dpgather``'s own modules, ``dpgather.core``, ``dpgather.kernels``,
``dpgather.dist``) imports this package, except the lazy ``dpgather.calibrate`` name; importing
it loads neither MPI nor CuPy.
"""
