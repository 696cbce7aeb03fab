"""C++ attention kernels for the CPU backend, called from XLA through the FFI (impl "cpu").

`attention` holds the JAX-facing functions (decode and prefill over the KV arena, one
ragged kernel underneath); `build` compiles `ragged_attention.cc` once per machine and
registers it. They serve CPU users, tests and CI where no GPU kernel runs: the XLA path
(`pallas_kernels.xla_attention`) gathers and dequantizes K/V blocks into temporaries, the
kernel reads them in place.
"""
