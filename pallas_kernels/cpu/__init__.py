"""C++ kernels for the CPU backend, called from XLA through the FFI (impl "cpu").

`attention` holds the JAX-facing attention functions (decode and prefill over the KV arena,
one ragged kernel underneath, `ragged_attention.cc`); `matmul` the GEMM that multiplies by
one layer of stacked weights in place (`stacked_matmul.cc`); `activation` the MLP's
silu(gate) * up (`swiglu.cc`). The engine's steps use the last two as the decoder's
`models.layer_kernels.LayerKernels` when impl is "cpu". `build` compiles the sources (with
`parallel_for.h`, the split over XLA's thread pool) once per machine and registers them.
They serve CPU users, tests and CI where no GPU kernel runs: the XLA path gathers and
dequantizes K/V blocks into temporaries, copies each layer's weight slice before its dot
and runs a scalar exp; the kernels read in place and vectorize.
"""
