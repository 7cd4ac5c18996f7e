"""A randomly initialised checkpoint with the shapes of a published SmolLM2 model and the SmolLM2
tokenizer, for memory and speed benches of larger students offline (weights do not change memory
or time; they make every quality number meaningless).

    python bench/random_model.py --shape smollm2-1.7b --out runs/random-1.7b
    python bench/memory.py --model runs/random-1.7b --device cuda
"""
import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import teachers  # noqa: E402

# config.json of HuggingFaceTB/SmolLM2-{135M,360M,1.7B}: Llama, tied embeddings, vocabulary 49152
SHAPES = {"smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                               num_attention_heads=9, num_key_value_heads=3),
          "smollm2-360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                               num_attention_heads=15, num_key_value_heads=5),
          "smollm2-1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                               num_attention_heads=32, num_key_value_heads=32)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=SHAPES, default="smollm2-1.7b")
    p.add_argument("--tokenizer", default="smollm2-135m", help="alias, GGUF or folder holding the SmolLM2 tokenizer")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    path = teachers._alias_path(a.tokenizer) if a.tokenizer in teachers.ALIASES else a.tokenizer
    try:
        tok = (AutoTokenizer.from_pretrained(path) if os.path.isdir(path)
               else AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path)))
    except (OSError, ValueError) as e:
        sys.exit(f"error: --tokenizer {a.tokenizer}: {str(e).splitlines()[0]}")
    config = LlamaConfig(vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, **SHAPES[a.shape])
    torch.manual_seed(a.seed)
    model = LlamaForCausalLM(config)
    teachers.save_model(model, tok, a.out, dtype=torch.bfloat16)
    n = sum(t.numel() for t in model.parameters())
    print(f"{a.out}: random {a.shape} shapes, {n / 1e6:.0f} M parameters (bf16)")


if __name__ == "__main__":
    main()
