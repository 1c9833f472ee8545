"""rice_mllm: pretrain a RICE vision encoder, plug it into Qwen2.5 the LLaVA-NeXT way, train, finetune and chat."""

__version__ = "0.1.0"
