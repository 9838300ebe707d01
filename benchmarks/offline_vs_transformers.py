"""dsv's engine against transformers' ``generate()`` on the same weights, in one run.

Both get the same ``--num-prompts`` random prompts of ``--input-len`` tokens and produce exactly
``--output-len`` greedy tokens each (EOS ignored): dsv through ``LLM.generate`` (continuous batching, paged
KV cache), transformers as one padded batch through ``model.generate``. transformers cannot load the FP8
checkpoint on the CPU, so it gets a bf16 copy with the FP8 weights dequantized (the same values dsv computes
with); dsv runs the FP8 checkpoint in bf16 as shipped. The first call of each side (one-time costs such as
oneDNN's kernel JIT included) is reported separately; then the two are timed alternately ``--repeats`` times
and the medians give the headline (warm) figure.

    python benchmarks/offline_vs_transformers.py              # embedded default model, 32 x (128 in, 64 out)
    python benchmarks/offline_vs_transformers.py --json
    python benchmarks/offline_vs_transformers.py --enable-torch-compile   # dsv's compiled decode forward
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def bf16_copy(src: Path, dst: Path) -> Path:
    """A transformers-loadable bf16 checkpoint of ``src``: FP8 weights dequantized, no MTP layer."""
    from safetensors.torch import load_file, save_file

    from dsv.ops.quant import weight_dequant

    if (dst / "model.safetensors").exists():
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src / "config.json").read_text())
    block = tuple(cfg.get("quantization_config", {}).get("weight_block_size", (128, 128)))
    mtp = f"model.layers.{cfg['num_hidden_layers']}."
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(f))
    out = {}
    for name, t in tensors.items():
        if name.endswith("_scale_inv") or name.startswith(mtp):
            continue
        if t.dtype == torch.float8_e4m3fn:
            t = weight_dequant(t, tensors[name + "_scale_inv"], block, torch.bfloat16)
        elif t.dtype != torch.float32:
            t = t.to(torch.bfloat16)
        out[name] = t.contiguous()
    cfg.pop("quantization_config", None)
    cfg["num_nextn_predict_layers"] = 0
    cfg["torch_dtype"] = "bfloat16"
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def load_transformers(path: Path, cache: Path) -> tuple[object, str]:
    """transformers' model: the checkpoint itself if it loads on the CPU, else a bf16 copy (and why)."""
    import transformers

    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(path)
        return model.eval(), "original checkpoint"
    except Exception as exc:  # FP8 checkpoints need a GPU (and accelerate) in transformers
        reason = f"bf16 copy ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
    copy = bf16_copy(path, cache)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        copy, dtype=torch.bfloat16, output_loading_info=True
    )
    if info["missing_keys"] or info["mismatched_keys"]:
        raise RuntimeError(f"transformers did not load every weight: {info}")
    return model.eval(), reason


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="folder or cached Hub id (default: embedded tiny model)")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--enable-torch-compile",
        action="store_true",
        help="dsv's decode forward through torch.compile (the first call then includes its compilation)",
    )
    args = p.parse_args()

    from dsv import LLM, SamplingParams
    from dsv.model.resolve import resolve_model_path
    from dsv.server.cmd_bench import random_prompts

    path = resolve_model_path(args.model)
    llm = LLM(
        str(path), device="cpu", dtype="auto", log_stats=False, enable_torch_compile=args.enable_torch_compile
    )
    hf, hf_source = load_transformers(path, Path.home() / ".cache" / "dsv" / "bench" / (path.name + "-bf16"))
    vocab = min(llm.engine.model.cfg.vocab_size, llm.tokenizer.vocab_size)
    prompts = random_prompts(args.num_prompts, args.input_len, vocab, args.seed)
    batch = torch.tensor(prompts)
    mask = torch.ones_like(batch)

    def run_dsv(n: int) -> float:
        llm.reset_prefix_cache()  # every repeat recomputes its prompts
        start = time.perf_counter()
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
        elapsed = time.perf_counter() - start
        assert all(len(o.outputs[0].token_ids) == n for o in outs)
        return elapsed

    def run_hf(n: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(
                batch,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=hf.config.eos_token_id,
            )
        elapsed = time.perf_counter() - start
        assert out.shape == (args.num_prompts, args.input_len + n)
        return elapsed

    # First call of each on the full workload, in a fresh process: includes one-time costs (oneDNN kernel
    # JIT, lazy initialization). Then both are warm and timed alternately.
    cold_dsv, cold_hf = run_dsv(args.output_len), run_hf(args.output_len)
    dsv_t, hf_t = [], []
    for _ in range(args.repeats):
        dsv_t.append(run_dsv(args.output_len))
        hf_t.append(run_hf(args.output_len))
    n_out = args.num_prompts * args.output_len
    dsv_tps = n_out / statistics.median(dsv_t)
    hf_tps = n_out / statistics.median(hf_t)
    result = {
        "model": str(path),
        "num_prompts": args.num_prompts,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "threads": torch.get_num_threads(),
        "dsv_output_tokens_per_s": round(dsv_tps, 1),
        "transformers_output_tokens_per_s": round(hf_tps, 1),
        "speedup": round(dsv_tps / hf_tps, 2),
        "cold_dsv_output_tokens_per_s": round(n_out / cold_dsv, 1),
        "cold_transformers_output_tokens_per_s": round(n_out / cold_hf, 1),
        "cold_speedup": round(cold_hf / cold_dsv, 2),
        "dsv_seconds": [round(t, 3) for t in dsv_t],
        "transformers_seconds": [round(t, 3) for t in hf_t],
        "transformers_weights": hf_source,
        "dsv_torch_compile": args.enable_torch_compile,
        "torch": torch.__version__,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"dsv: {dsv_tps:.1f} output tok/s, transformers generate(): {hf_tps:.1f} output tok/s, "
            f"speedup {dsv_tps / hf_tps:.2f}x warm (median of {args.repeats}); first calls: "
            f"{result['cold_dsv_output_tokens_per_s']} vs {result['cold_transformers_output_tokens_per_s']} tok/s, "
            f"{result['cold_speedup']}x  ({args.num_prompts} prompts x {args.input_len} in / "
            f"{args.output_len} out; transformers on the {hf_source})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
