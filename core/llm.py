"""Offline batch inference in vLLM's shape::

from dsv import LLM, SamplingParams

llm = LLM(model=None, device="cpu")          # None: the embedded default model
outs = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=8))
print(outs[0].outputs[0].token_ids, outs[0].outputs[0].text)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dsv.engine.config import EngineConfig
from dsv.engine.llm_engine import LLMEngine, cache_config
from dsv.engine.outputs import RequestOutput
from dsv.engine.sampling import SamplingParams
from dsv.model.deepseek_v32 import DeepseekV32ForCausalLM


class LLM:
    """A model plus a continuous-batching engine; ``generate`` runs prompts to completion.

    Args:
        model: a checkpoint folder, a Hugging Face repo id already in the local cache, None for the embedded
            default model, or an already built :class:`DeepseekV32ForCausalLM` (then ``tokenizer`` may be given).
        device: backend name (``cpu`` is the reference backend).
        dtype: "auto" (the checkpoint's), "bfloat16" or "float32".
        tokenizer: a :class:`dsv.tokenizer.Tokenizer` for an in-memory model (loaded from the folder otherwise).
        **engine_args: :class:`~dsv.engine.config.EngineConfig` fields (page_size, kv_cache_dtype,
            max_total_tokens, chunked_prefill_size, max_running_requests, enable_prefix_caching,
            disable_cuda_graph, cuda_graph_max_bs, cuda_graph_bs, ...).
    """

    def __init__(
        self,
        model: str | DeepseekV32ForCausalLM | None = None,
        device: str = "cpu",
        dtype: str | torch.dtype = "auto",
        tokenizer: Any = None,
        **engine_args: Any,
    ) -> None:
        config = EngineConfig(**engine_args)
        if isinstance(model, DeepseekV32ForCausalLM):
            from dsv.backend.registry import select_backend

            backend = select_backend(device)
            self.engine = LLMEngine(
                model,
                backend.ops(config.kernel_choices(), cache_config(config, model.dtype)),
                config,
                tokenizer,
                backend.capabilities().torch_device,
                backend,
            )
        else:
            self.engine = LLMEngine.from_pretrained(model, device, dtype, config)
        self._counter = 0

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | Sequence[str] | None = None,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Complete every prompt (text, encoded with BOS, or ``prompt_token_ids``); outputs in input order."""
        texts, ids = self._inputs(prompts, prompt_token_ids)
        if isinstance(sampling_params, Sequence):
            if len(sampling_params) != len(ids):
                raise ValueError(f"{len(sampling_params)} sampling params for {len(ids)} prompts")
            params = list(sampling_params)
        else:
            params = [sampling_params or SamplingParams()] * len(ids)
        order, results = [], {}
        try:
            for text, prompt_ids, p in zip(texts, ids, params):
                rid = f"llm-{self._counter}"
                self._counter += 1
                self.engine.add_request(rid, prompt_ids, p, prompt=text)
                order.append(rid)
                results[rid] = RequestOutput(rid, list(prompt_ids), [], False, text)
            bar = _progress(len(order), use_tqdm)
            while self.engine.has_unfinished():
                for delta in self.engine.step():
                    results[delta.request_id].merge(delta)
                    if delta.finished and bar is not None:
                        bar.update(1)
            if bar is not None:
                bar.close()
        except BaseException:
            for rid in order:  # leave the engine clean (e.g. after KeyboardInterrupt)
                self.engine.abort(rid)
            while self.engine.has_unfinished():
                self.engine.step()
            raise
        return [results[rid] for rid in order]

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix."""
        self.engine.reset_prefix_cache()
        self.engine.step()

    def _inputs(
        self, prompts: str | Sequence[str] | None, prompt_token_ids: Sequence[Sequence[int]] | None
    ) -> tuple[list[str | None], list[list[int]]]:
        if prompt_token_ids is not None:
            ids = [list(p) for p in prompt_token_ids]
            if prompts is None:
                return [None] * len(ids), ids
            texts = [prompts] if isinstance(prompts, str) else list(prompts)
            if len(texts) != len(ids):
                raise ValueError("prompts and prompt_token_ids have different lengths")
            return list(texts), ids
        if prompts is None:
            raise ValueError("give prompts or prompt_token_ids")
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        if self.tokenizer is None:
            raise ValueError("text prompts need a tokenizer; pass prompt_token_ids instead")
        return list(texts), [self.tokenizer.encode(t, add_bos=True) for t in texts]


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="generating", unit="req")
