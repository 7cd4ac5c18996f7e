"""bench/memory_sizes.py: its parameter counts against real models built from the same configs."""
import os
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import optim
from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
import memory_sizes  # noqa: E402


def tiny(c):
    config = LlamaConfig(vocab_size=c["vocab"], hidden_size=c["hidden"], intermediate_size=c["intermediate"],
                         num_hidden_layers=c["layers"], num_attention_heads=c["heads"], num_key_value_heads=c["kv_heads"],
                         tie_word_embeddings=c["tied"])
    return LlamaForCausalLM(config)


def test_parameter_counts_match_a_built_model_tied_and_untied():
    for tied in (True, False):
        c = dict(hidden=64, layers=3, heads=8, kv_heads=2, intermediate=96, vocab=500, tied=tied)
        model = tiny(c)
        assert memory_sizes.n_params(c) == sum(p.numel() for p in model.parameters())
        optim.add_lora(model, r=4, dtype=torch.float32)
        assert memory_sizes.lora_params(c, 4) == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_a_full_fine_tune_holds_20_bytes_a_parameter_and_fsdp2_divides_all_but_the_working_set():
    c = memory_sizes.CONFIGS["llama-3.1-8b"]
    p = memory_sizes.n_params(c)
    assert abs(p - 8.03e9) < 0.01e9                      # Llama-3.1-8B's published size
    ddp = memory_sizes.per_gpu(c, "ddp")
    assert ddp["weights"] + ddp["grads"] + ddp["master"] + ddp["optimizer"] == 20 * p
    assert ddp["frozen"] == 4 * p                         # reference and good teacher in bf16
    f2, f8 = memory_sizes.per_gpu(c, "fsdp2", 2), memory_sizes.per_gpu(c, "fsdp2", 8)
    working = 2 * (2 * memory_sizes.layer_params(c) + c["vocab"] * c["hidden"])
    assert f8["optimizer"] == 8 * p / 8 and f8["weights"] == 4 * p / 8 + working
    # train.py --fsdp shards the student only: the frozen models stay whole unless streamed (--offload all)
    assert f2["total"] - f8["total"] == (4 + 4 + 8) * p * (1 / 2 - 1 / 8) and f8["frozen"] == 4 * p
    assert memory_sizes.per_gpu(c, "fsdp2-offload", 8)["frozen"] == 2 * working
