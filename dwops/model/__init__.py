"""A performance model of dwops' CUDA C++ kernels that runs without a GPU.

* :mod:`.devices`: the GPUs' ceilings and occupancy limits, as data with their sources;
* :mod:`.sass`: the kernels' machine code (instruction classes, loops, registers, local memory)
  and occupancy;
* :mod:`.predict`: the prediction per bench row (``python -m dwops model``), from the launch plan,
  the memory trace of the CUDA emulator (:func:`dwops.cudaemu.tracing`) and the machine code.

Everything this package prints is a prediction, labelled "model", never a measurement.
"""
