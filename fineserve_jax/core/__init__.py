"""The per-device core shared by serving and simulating (pure Python, no JAX).

  request.py          Request (what a user submits), RequestState (its life), Status
  sampling_params.py  SamplingParams, validated when built
"""
