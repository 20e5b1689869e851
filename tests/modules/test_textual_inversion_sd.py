"""Textual inversion for a diffusers text-to-image model on a tiny randomly initialised UNet2DConditionModel + CLIP
text encoder + tokenizer built here (no download): only the new token's row changes, the export loads in diffusers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from diffusers import DDPMScheduler, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

from plpriv.modules.textual_inversion_sd import (  # noqa: E402
    SDTextualInversion,
    invert_images_sd,
    load_sd_components,
)


def _tokenizer(tmp: Path) -> CLIPTokenizer:
    """A character-level CLIP BPE tokenizer (no merges) over lowercase letters."""
    chars = list("abcdefghijklmnopqrstuvwxyz")
    vocab = {t: i for i, t in enumerate(["<|startoftext|>", "<|endoftext|>", *chars, *[c + "</w>" for c in chars]])}
    (tmp / "vocab.json").write_text(json.dumps(vocab))
    (tmp / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(tmp / "vocab.json"), str(tmp / "merges.txt"), model_max_length=16)


def _components(tmp: Path) -> dict:
    torch.manual_seed(0)
    tok = _tokenizer(tmp)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=16,
                                        eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                                        pad_token_id=tok.pad_token_id))
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=16,
                                attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    return {"tokenizer": tok, "text_encoder": text, "unet": unet, "scheduler": DDPMScheduler(num_train_timesteps=100),
            "vae": None}


def test_only_the_new_row_changes_and_export_loads_in_diffusers(tmp_path: Path) -> None:
    parts = _components(tmp_path)
    frozen = {n: p.detach().clone() for n, p in parts["unet"].state_dict().items()}
    module = SDTextualInversion(components=parts, placeholder_token="<s*>", initializer_token="a", lr=0.05,
                                 template="x {}")
    table_before = module.embeddings.weight.detach().clone()
    tid = module.token_id
    assert tid == table_before.shape[0] - 1 and torch.equal(table_before[tid], table_before[module.tokenizer.encode(
        "a", add_special_tokens=False)[0]])
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    u = invert_images_sd(module, latents, steps=4, seed=0)
    assert u.shape == (3, 16) and not torch.allclose(u[0], table_before[tid])
    after = module.embeddings.weight.detach()
    others = torch.ones(after.shape[0], dtype=torch.bool)
    others[tid] = False
    assert torch.equal(after[others], table_before[others])  # every other row bit-for-bit
    assert all(torch.equal(v, parts["unet"].state_dict()[n]) for n, v in frozen.items())  # UNet unchanged
    # per image: row i is image i's own run (replace image 0: rows 1, 2 unchanged)
    u2 = invert_images_sd(module, torch.cat([torch.zeros(1, 4, 8, 8), latents[1:]]), steps=4, seed=0)
    torch.testing.assert_close(u2[1:], u[1:])
    # export in diffusers' format and load it with diffusers' own loader into a fresh text encoder
    module.set_embedding(u[2])
    path = module.save_embedding(tmp_path / "learned_embeds.safetensors")
    from diffusers.loaders import TextualInversionLoaderMixin

    fresh = _components(tmp_path)
    holder = type("Holder", (TextualInversionLoaderMixin,), {})()
    holder.tokenizer, holder.text_encoder = fresh["tokenizer"], fresh["text_encoder"]
    holder.hf_device_map, holder.components = None, {}  # what a pipeline also has
    holder.load_textual_inversion(str(path))
    new_id = fresh["tokenizer"].convert_tokens_to_ids("<s*>")
    torch.testing.assert_close(fresh["text_encoder"].get_input_embeddings().weight[new_id], u[2])


def test_missing_stable_diffusion_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"not found at .*nowhere.*never downloads.*save_pretrained"):
        load_sd_components(tmp_path / "nowhere")
    (tmp_path / "partial" / "unet").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="missing: tokenizer, text_encoder, scheduler"):
        SDTextualInversion(pretrained_path=str(tmp_path / "partial"))
    with pytest.raises(ValueError, match="already in the vocabulary"):
        SDTextualInversion(components=_components(tmp_path), placeholder_token="a</w>")
    with pytest.raises(ValueError, match="loses '<s\\*>'.*shorten"):  # truncated at 16 tokens
        SDTextualInversion(components=_components(tmp_path), template="a long prompt in the style of {}")
