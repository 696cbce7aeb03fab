"""`LLM`: the notebook-friendly single-model front end over the device engine."""

from __future__ import annotations

from typing import List, Sequence, Union

from fineserve_jax.core.field_checks import InvalidRequest
from fineserve_jax.core.request import Request
from fineserve_jax.core.sampling_params import SamplingParams
from fineserve_jax.engine.device_engine import Engine, ModelSpec, RequestOutput
from fineserve_jax.engine.sharding import first_devices
from fineserve_jax.scheduler.local import SchedulerConfig


class LLM:
    """Offline generation with one model.

    `LLM(model="tiny-llama" | HF_DIR | Model, quant="org", attention_impl="auto")`;
    `generate(prompts, SamplingParams(...))` takes strings (tokenized with the checkpoint's
    tokenizer, or the byte tokenizer for embedded presets) or token-id lists and returns
    one `RequestOutput` per prompt, in order (`.token_ids`, `.text`, `.finish_reason`; a bad
    prompt gets `.status == "failed"` and `.error` instead of stopping the others).
    `tensor_parallel_size=N` runs the model tensor-parallel on the process's first N devices
    (`arena_bytes` is then per device). `arena_bytes="auto"` sizes the KV arena so that the
    largest decode bucket at full context fits (capped by free memory; `engine.startup`
    says what it chose).
    """

    def __init__(self, model, quant: str = "org", attention_impl: str = "auto",
                 dtype: str = "float32", max_model_len: int = 512, arena_bytes="auto",
                 enable_prefix_caching: bool = True, tensor_parallel_size: int = 1,
                 **engine_kwargs):
        engine_kwargs.setdefault("scheduler", SchedulerConfig(admission="fcfs", execution="fcfs",
                                                              drop=False))
        # Offline generation schedules first-come-first-served and drops nothing, so step
        # times only seed the cost estimates: one run per bucket instead of best of three,
        # and none where an earlier start of the same steps stored its time.
        engine_kwargs.setdefault("profile_reps", 0)
        if "devices" in engine_kwargs:
            raise ValueError("LLM takes tensor_parallel_size, not devices (use Engine for a "
                             "chosen device group)")
        devices = first_devices(tensor_parallel_size)  # validates the size
        if tensor_parallel_size == 1:
            devices = None  # the default device, as without tensor parallelism
        self.engine = Engine([ModelSpec("model", model, quant)], attention_impl=attention_impl,
                             devices=devices,
                             dtype=dtype, max_model_len=max_model_len, arena_bytes=arena_bytes,
                             enable_prefix_caching=enable_prefix_caching, **engine_kwargs)

    @property
    def model(self):
        return self.engine.models["model"]

    def generate(self, prompts: Sequence[Union[str, Sequence[int]]],
                 sampling_params: Union[None, SamplingParams, Sequence[SamplingParams]] = None,
                 progress: bool = False) -> List[RequestOutput]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # one prompt given bare
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params or SamplingParams()] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(sampling_params)} sampling params")
        reqs, refused = [], {}
        for i, (p, sp) in enumerate(zip(prompts, sampling_params)):
            try:
                reqs.append(Request(model="model", prompt=p, sampling=sp))
            except InvalidRequest as e:  # this prompt alone fails; the others run
                refused[i] = str(e)
        outs = iter(self.engine.run(reqs, realtime=False, progress=progress))
        return [RequestOutput(request_id=-1, model="model", prompt_token_ids=[], token_ids=[],
                              text=None, status="failed", finish_reason=None, error=refused[i])
                if i in refused else next(outs) for i in range(len(prompts))]
