"""C++ kernels for the CPU backend, called from XLA through the FFI (impl "cpu").

`attention` holds the JAX-facing attention functions (decode and prefill over the KV arena,
one ragged kernel underneath, `ragged_attention.cc`); `matmul` the GEMM that multiplies by
one layer of stacked weights in place (`stacked_matmul.cc`), which the engine's steps use for
the dense layers when impl is "cpu"; `build` compiles both sources once per machine and
registers them. They serve CPU users, tests and CI where no GPU kernel runs: the XLA path
gathers and dequantizes K/V blocks into temporaries and copies each layer's weight slice
before its dot; the kernels read both in place.
"""
