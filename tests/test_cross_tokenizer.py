"""A teacher from another model family: its own tokenizer and chat template, answers as text that
the student re-tokenizes; token-level terms against it stop in one line."""
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import data
import teachers
import train
from test_train import pipeline_args

TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}<eot>{% endfor %}"
            "{% if add_generation_prompt %}[assistant]{% endif %}")


def other_family(folder, template=TEMPLATE):
    """A tiny model with a 320-token byte-level BPE tokenizer trained here (SmolLM2's has 49,152)."""
    texts = [e.prompt for pool in ("harmful", "harmless") for e in data.load_builtin(pool)]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<eot>", "<pad>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eot>", pad_token="<pad>", unk_token="<unk>")
    tok.chat_template = template
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    torch.manual_seed(3)
    teachers.save_model(LlamaForCausalLM(config).eval(), tok, folder)
    return folder


def phase(tiny_folder, out, *flags):
    args = pipeline_args(tiny_folder, out, "--no-eval", "--precision", "fp32", "--cache-dir", str(out / "cache"),
                         "--teacher-dir", str(out / "teachers"), *flags)
    prompts = train.load_pools(args)
    base = train.load_base(args, lambda msg: None)
    return args, prompts, base, teachers.prepare_teachers(teachers.TeacherFlags.from_args(args), base, prompts.harmful, prompts.harmless,
                                                          lambda msg: None)


def test_a_teacher_with_its_own_tokenizer_answers_in_it_and_the_student_learns_the_text(tiny_folder, tmp_path):
    good = other_family(str(tmp_path / "other"))
    args, prompts, base, found = phase(tiny_folder, tmp_path / "run", "--good-teacher", good, "--loss", "dpo=1")
    own = found.tokenizers["good"]
    assert len(own) == 320 and found.tokenizers["bad"] is base.tokenizer
    # its answers are what it generates from prompts in its own template, decoded by its own tokenizer
    model, tok, _ = teachers.load_model(good, dtype=torch.float32)
    direct, _ = teachers.generate(model, tok, [e.prompt for e in prompts.harmful], max_new_tokens=args.max_new_tokens)
    assert list(found.answers["good"][0]) == direct and any(direct)
    assert data.prompt_text(own, "hi") == "[user] hi<eot>[assistant]"
    # the student's targets are that text in the student's ids
    _, _, pools = train.training_pools(args, base.tokenizer, prompts, found.answers, lambda msg: None)
    for e, text, feats in zip(prompts.harmful, direct, pools["harmful"].good):
        assert feats["input_ids"] == data.encode(base.tokenizer, e.prompt, text, args.max_prompt_tokens,
                                                 args.max_response_tokens)["input_ids"]


def test_kl_against_a_teacher_with_another_vocabulary_stops_in_one_line_naming_both(tiny_folder, tmp_path):
    good = other_family(str(tmp_path / "other"))
    with pytest.raises(ValueError, match=r"--loss kl: .*teacher's tokenizer \(other, 320 tokens\) is not the "
                                         r"student's \(tiny\d*, 49152 tokens\)"):
        phase(tiny_folder, tmp_path / "run", "--good-teacher", good, "--loss", "dpo=1,kl=1")


def test_a_teacher_without_a_chat_template_gets_the_plain_format(tmp_path):
    tok = PreTrainedTokenizerFast.from_pretrained(other_family(str(tmp_path / "other"), template=None))
    assert not tok.chat_template
    assert data.prompt_text(tok, "How do plants grow?") == "User: How do plants grow?\nAssistant:"
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    assert data.prompt_text(tok, "And you?", history) == "User: Hi\nAssistant: Hello.\n\nUser: And you?\nAssistant:"


def test_a_whole_run_evaluates_that_teacher_in_its_own_template(tiny_folder, tmp_path):
    good = other_family(str(tmp_path / "other"))
    out = train.run(pipeline_args(tiny_folder, tmp_path / "run", "--good-teacher", good, "--loss", "dpo=1,npo=0.5",
                                  "--precision", "fp32"))
    held_out = data.stratified_sample(train.load_pools(pipeline_args(tiny_folder, tmp_path)).harmful_test, 3, 0)
    model, tok, _ = teachers.load_model(good, dtype=torch.float32)
    answers, _ = teachers.generate(model, tok, [e.prompt for e in held_out])
    assert out["results"]["good teacher"]["answers"]["harmful"] == answers
