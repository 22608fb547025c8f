"""A performance model of dwops' CUDA C++ kernels that runs without a GPU.

* :mod:`.devices`: the GPUs' ceilings and occupancy limits, as data with their sources;
* the memory trace of a launch comes from the CUDA emulator (:mod:`dwops.cudaemu`), the instruction
  mix from the sm_90 machine code.

Everything this package prints is a prediction, labelled "model", never a measurement.
"""
