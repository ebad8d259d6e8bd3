"""The locally written tiny CLIP tokenizer loads in transformers and feeds the encoders like a real one."""

import json

import numpy as np
import pytest
import torch
import transformers
from helpers import load_from_torch, rel_err

from dpojax.models import CLIPTextModel, CLIPTextModelWithProjection
from dpojax.tiny import text_encoder_config
from dpojax.weights.tiny_tokenizer import EOS, MERGES, write_tiny_clip_tokenizer

# SD1.x pads with the end-of-text token (CLIP-L, quick_gelu); SDXL's tokenizer_2 pads with "!" (bigG, gelu).
FLAVOURS = {"sd15": (EOS, False, "quick_gelu"), "sdxl_2": ("!", True, "gelu")}


@pytest.fixture(scope="module", params=FLAVOURS)
def tiny(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    pad_token, projection, act = FLAVOURS[request.param]
    ids = write_tiny_clip_tokenizer(folder, vocab_size=1000, pad_token=pad_token)
    vocab = json.loads((folder / "vocab.json").read_text())
    return folder, transformers.CLIPTokenizer.from_pretrained(folder), ids, vocab, projection, act


def test_loads_the_written_files(tiny):
    folder, tok, ids, vocab, *_ = tiny
    backend = json.loads(tok.backend_tokenizer.to_str())["model"]
    assert [tuple(m) for m in backend["merges"]] == MERGES  # read from merges.txt, not generated from the vocab
    assert backend["vocab"] == vocab
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        ids["bos_token_id"], ids["eos_token_id"], ids["pad_token_id"])
    fast = transformers.CLIPTokenizerFast.from_pretrained(folder)  # 5.23: the same tokenizers-backed class
    assert fast("a dog").input_ids == tok("a dog").input_ids


def test_tokenizes_any_text_within_vocab(tiny):
    _, tok, ids, vocab, *_ = tiny
    text = ["The cat and the dog", "Ünïcode, emoji 🐈 and digits 42.", ""]
    enc = tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
    assert tok.model_max_length == 77
    assert all(len(row) == 77 for row in enc)
    assert max(max(row) for row in enc) < 1000
    assert enc[0][:7] == [vocab[t] for t in (
        "<|startoftext|>", "the</w>", "cat</w>", "and</w>", "the</w>", "dog</w>", EOS)]  # merges applied
    assert tok.unk_token_id not in enc[1][1:enc[1].index(ids["eos_token_id"])]
    assert tok.decode(enc[1], skip_special_tokens=True).replace(" ", "") == "ünïcode,emoji🐈anddigits42."
    assert enc[2] == [ids["bos_token_id"], ids["eos_token_id"]] + [ids["pad_token_id"]] * 75


def test_truncates_long_prompts(tiny):
    _, tok, ids, *_ = tiny
    enc = tok(["word " * 200], padding="max_length", max_length=77, truncation=True).input_ids[0]
    assert len(enc) == 77 and enc[0] == ids["bos_token_id"] and enc[-1] == ids["eos_token_id"]


def test_encoders_agree_on_the_tokenizers_ids(tiny):
    _, tok, ids, _, projection, act = tiny
    config = text_encoder_config(projection=projection, hidden_act=act, token_ids=ids)
    torch.manual_seed(0)
    reference = (transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel)(
        transformers.CLIPTextConfig(**config)).eval()
    model = load_from_torch(CLIPTextModelWithProjection if projection else CLIPTextModel, config, reference)
    enc = np.array(tok(["a red cube", "the dog and the cat"], padding="max_length", max_length=77).input_ids)
    out = model(enc)
    with torch.no_grad():
        inner = reference.text_model if projection else reference
        assert rel_err(out.pooler_output, inner(torch.from_numpy(enc)).pooler_output) <= 1e-4
        if projection:
            assert rel_err(out.text_embeds, reference(torch.from_numpy(enc)).text_embeds) <= 1e-4


@pytest.mark.parametrize("kwargs,message", [
    ({"vocab_size": 100}, "needs 526 ids but vocab_size is 100"),
    ({"vocab_size": 1000, "pad_token": "<pad>"}, "pad_token '<pad>' is not in the vocabulary"),
])
def test_bad_arguments_are_named(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        write_tiny_clip_tokenizer(tmp_path / "t", **kwargs)
    assert not (tmp_path / "t").exists()
