"""`LLM`: the notebook-friendly single-model front end over the device engine."""

from __future__ import annotations

from typing import List, Sequence, Union

from fineserve_jax.core.request import Request
from fineserve_jax.core.sampling_params import SamplingParams
from fineserve_jax.engine.device_engine import Engine, ModelSpec, RequestOutput
from fineserve_jax.scheduler.local import SchedulerConfig


class LLM:
    """Offline generation with one model.

    `LLM(model="tiny-llama" | HF_DIR | Model, quant="org", attention_impl="auto")`;
    `generate(prompts, SamplingParams(...))` takes strings (tokenized with the checkpoint's
    tokenizer, or the byte tokenizer for embedded presets) or token-id lists and returns
    one `RequestOutput` per prompt, in order (`.token_ids`, `.text`, `.finish_reason`; a bad
    prompt gets `.status == "failed"` and `.error` instead of stopping the others).
    """

    def __init__(self, model, quant: str = "org", attention_impl: str = "auto",
                 dtype: str = "float32", max_model_len: int = 512, arena_bytes: int = 16 << 20,
                 **engine_kwargs):
        engine_kwargs.setdefault("scheduler", SchedulerConfig(admission="fcfs", execution="fcfs",
                                                              drop=False))
        self.engine = Engine([ModelSpec("model", model, quant)], attention_impl=attention_impl,
                             dtype=dtype, max_model_len=max_model_len, arena_bytes=arena_bytes,
                             **engine_kwargs)

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
        reqs = [Request(model="model", prompt=p, sampling=sp)
                for p, sp in zip(prompts, sampling_params)]
        return self.engine.run(reqs, realtime=False, progress=progress)
