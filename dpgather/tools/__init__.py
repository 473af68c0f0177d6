"""dpgather.tools: what runs *beside* the library — the command line, trace replay, reports,
cost-model calibration, the MPI launcher helper and the timing core the benchmarks share.

Nothing in the data plane (``dpgather``, ``dpgather.core``, ``dpgather.kernels``,
``dpgather.dist``) imports this package; it imports the library like any user would.
"""
