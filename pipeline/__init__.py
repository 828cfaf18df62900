"""The deploy end of a fine-tuning pipeline, next to the server: `merge` a LoRA adapter into
its base, `quantize` a checkpoint (AWQ / GPTQ / FP8 with llm-compressor) and `evaluate`
served models against a JSONL task set.

Each module owns one step and is reached through `gateway merge|quantize|eval` (the
argument parsing lives in `pipeline.cli`). Nothing here is imported by `gateway serve`;
torch, transformers, peft and llm-compressor are imported inside the functions that need
them, so `gateway` starts without them.
"""
