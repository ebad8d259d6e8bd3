"""CLIP text encoders against transformers 5 (PyTorch) on tiny random configs, fp32."""

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from helpers import load_from_torch, perturb_, rel_err

from dpojax.models import CLIPTextModel, CLIPTextModelWithProjection
from dpojax.weights import io, naming

EOS = 990  # below other ids in the inputs, so "first EOS" and "highest id" pooling pick different tokens
BASE = dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=77, projection_dim=16, bos_token_id=998, pad_token_id=1)
CASES = {
    "quick_gelu": dict(hidden_act="quick_gelu", eos_token_id=EOS),
    "gelu": dict(hidden_act="gelu", eos_token_id=EOS, num_hidden_layers=5),
    "legacy_eos_2": dict(hidden_act="quick_gelu", eos_token_id=2, num_hidden_layers=2),  # pools at argmax(ids)
}


def _input_ids() -> np.ndarray:
    """No id 2 anywhere; EOS at 9, 30, 76 and padded with EOS after it (SD1.x); row 2 holds 995 before its EOS."""
    ids = np.random.RandomState(0).randint(3, EOS, (3, 77))
    ids[0, 9:] = EOS
    ids[1, 30] = ids[2, 76] = EOS
    ids[2, 4] = 995
    return ids


def _reference(cls: type, config: dict, seed: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return perturb_(cls(transformers.CLIPTextConfig(**config)).eval(), seed=seed)


@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
@pytest.mark.parametrize("case", CASES)
def test_text_encoder_matches_transformers(case, projection):
    config = {**BASE, **CASES[case]}
    reference = _reference(
        transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel, config, seed=1)
    model = load_from_torch(CLIPTextModelWithProjection if projection else CLIPTextModel, config, reference)
    ids = _input_ids()
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids), output_hidden_states=True)
        # CLIPTextModelWithProjection's output has no pooler_output: take it from its inner CLIPTextModel.
        pooled = (reference.text_model if projection else reference)(torch.from_numpy(ids)).pooler_output
    out = model(ids, output_hidden_states=True)

    assert rel_err(out.last_hidden_state, expected.last_hidden_state) <= 1e-4
    assert len(out.hidden_states) == len(expected.hidden_states) == config["num_hidden_layers"] + 1
    for mine, theirs in zip(out.hidden_states, expected.hidden_states, strict=True):  # [-2]: SDXL's input
        assert rel_err(mine, theirs) <= 1e-4
    assert rel_err(out.pooler_output, pooled) <= 1e-4
    assert (out.text_embeds is None) != projection
    if projection:
        assert rel_err(out.text_embeds, expected.text_embeds) <= 1e-4
    assert model(ids).hidden_states is None


def test_padding_attention_mask_matches_transformers():
    config = {**BASE, **CASES["quick_gelu"]}
    reference = _reference(transformers.CLIPTextModel, config, seed=2)
    model = load_from_torch(CLIPTextModel, config, reference)
    ids = _input_ids()
    mask = np.ones_like(ids)
    mask[0, 10:] = 0
    mask[1, 31:] = 0
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    out = model(ids, attention_mask=mask)
    assert rel_err(out.pooler_output, expected.pooler_output) <= 1e-4
    assert rel_err(out.last_hidden_state, expected.last_hidden_state) <= 1e-4


def test_param_paths_are_transformers_keys_and_config_is_static():
    """Only parameters are state, their keys are 5.23's; the model runs under jit from (graphdef, state)."""
    config = {**BASE, **CASES["gelu"]}
    model = CLIPTextModelWithProjection.from_config(config)
    graphdef, state = nnx.split(model)
    assert all(isinstance(v, nnx.Param) for _, v in nnx.to_flat_state(state))
    torch_keys = _reference(transformers.CLIPTextModelWithProjection, config, seed=3).state_dict().keys()
    assert set(naming.to_state_dict(model)) == set(torch_keys)
    assert model.config["hidden_act"] == "gelu" and dict(model.config) == config

    ids = _input_ids()
    jitted = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x).text_embeds)(state, ids)
    np.testing.assert_allclose(jitted, model(ids).text_embeds, rtol=1e-5, atol=1e-6)


def test_missing_config_keys_take_transformers_defaults():
    with torch.device("meta"):  # shapes only
        theirs = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig())
    ours = io.abstract_module(CLIPTextModelWithProjection, {})
    assert naming.to_state_dict_shapes(ours) == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}


@pytest.mark.parametrize("bad,message", [
    ({"hidden_act": "relu"}, "hidden_act='relu' is not supported"),
    ({"num_attention_heads": 5}, "hidden_size=32 is not divisible by num_attention_heads=5"),
    ({"eos_token_id": [2, 3]}, r"eos_token_id=\[2, 3\] must be one integer"),
])
def test_bad_config_is_named(bad, message):
    with pytest.raises(ValueError, match=message):
        CLIPTextModel.from_config({**BASE, **bad})


def test_too_many_tokens_is_named():
    model = io.abstract_module(CLIPTextModel, {**BASE, "max_position_embeddings": 8})
    with pytest.raises(ValueError, match=r"at most 8 tokens \(max_position_embeddings\), got shape \(1, 9\)"):
        model(np.zeros((1, 9), np.int32))
