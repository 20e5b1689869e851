"""Textual inversion (Gal et al., ICLR 2023) for a diffusers text-to-image model (Stable Diffusion v1.x layout).

A new token (``placeholder_token``, e.g. ``"<s*>"``) gets a row in the CLIP text encoder's token embedding; only that
row is learned, with the pipeline's noise-prediction loss (diffusers' ``train_textual_inversion.py``):

    L(v) = E_{x, t, eps} || eps_theta(z_t, t, c(template % <s*>; v)) - target ||^2,
    z_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps     (DDPM's forward process, Ho et al. 2020 eq. 4)

(target ``eps``, or the velocity for ``v_prediction`` schedulers), the UNet, VAE and every other row of the text
encoder frozen. Other rows get a zero gradient (a hook masks them) and are restored bit-for-bit after each step, as
diffusers' script does. :func:`invert_images_sd` runs one such optimisation PER IMAGE (DPAgg-TI's first stage);
:func:`save_learned_embeds` writes the diffusers format (``{token: [1, d]}`` in safetensors) that
``StableDiffusionPipeline.load_textual_inversion`` reads.

Weights come from a LOCAL directory (``pipe.save_pretrained(dir)`` layout: ``tokenizer/``, ``text_encoder/``,
``unet/``, ``scheduler/``, optional ``vae/``); nothing is downloaded. Needs ``transformers`` (CLIP).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor, nn

from plpriv.utils.seeding import derive_seed

__all__ = ["SDTextualInversion", "invert_images_sd", "load_sd_components", "save_learned_embeds"]

SD_SUBFOLDERS = ("tokenizer", "text_encoder", "unet", "scheduler")


def load_sd_components(path: str | Path) -> dict[str, Any]:
    """Tokenizer, text encoder, UNet, scheduler (and VAE, when present) from a local diffusers directory."""
    root = Path(path)
    missing = [s for s in SD_SUBFOLDERS if not (root / s).is_dir()]
    if not root.is_dir() or missing:
        raise FileNotFoundError(
            f"Stable Diffusion weights not found at {str(root)!r} (missing: {', '.join(missing) or 'the directory'}). "
            "plpriv never downloads them: save a pipeline locally once, e.g. `StableDiffusionPipeline.from_pretrained("
            "'stable-diffusion-v1-5/stable-diffusion-v1-5').save_pretrained('weights/sd15')` on a machine with access, "
            "and pass that directory.")
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    parts: dict[str, Any] = {
        "tokenizer": CLIPTokenizer.from_pretrained(root / "tokenizer"),
        "text_encoder": CLIPTextModel.from_pretrained(root / "text_encoder"),
        "unet": UNet2DConditionModel.from_pretrained(root / "unet"),
        "scheduler": DDPMScheduler.from_pretrained(root / "scheduler"),
        "vae": AutoencoderKL.from_pretrained(root / "vae") if (root / "vae").is_dir() else None,
    }
    return parts


def save_learned_embeds(path: str | Path, token: str, vector: Tensor) -> Path:
    """Write ``{token: vector [1, d]}`` as safetensors (diffusers' textual-inversion format)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({token: vector.detach().float().reshape(1, -1).contiguous().cpu()}, str(path))
    return path


class SDTextualInversion(LightningModule):
    """One new token's embedding learned on images, everything else frozen (batches: images ``[B, 3, H, W]`` in
    ``[-1, 1]``, or latents when there is no VAE, or ``(images, ...)`` tuples).

    Args:
        pretrained_path: a local diffusers directory (:func:`load_sd_components`), or ``None`` with ``components``.
        components: ``{"tokenizer", "text_encoder", "unet", "scheduler", "vae" (or None)}``, e.g. tiny test models.
        placeholder_token: the new token (must not be in the vocabulary yet).
        initializer_token: a one-token word whose embedding starts the new row (``None``: the mean embedding).
        template: the prompt, ``{}`` replaced by the token.
        lr: Adam's learning rate (diffusers' script: 5e-4 x batch x accumulation). seed: the loss's randomness.
    """

    def __init__(self, pretrained_path: str | None = None, components: dict[str, Any] | None = None,
                 placeholder_token: str = "<s*>", initializer_token: str | None = None,
                 template: str = "a picture in the style of {}", lr: float = 5e-3, seed: int = 0) -> None:
        super().__init__()
        if (pretrained_path is None) == (components is None):
            raise ValueError("give exactly one of `pretrained_path` (a local diffusers directory) and `components`")
        parts = load_sd_components(pretrained_path) if pretrained_path is not None else dict(components or {})
        missing = [k for k in SD_SUBFOLDERS if parts.get(k) is None]
        if missing:
            raise ValueError(f"`components` lacks {missing}; give tokenizer, text_encoder, unet, scheduler "
                             "(vae optional)")
        if "{}" not in template:
            raise ValueError(f"`template` must contain '{{}}' for the token, got {template!r}")
        self.tokenizer, self.scheduler = parts["tokenizer"], parts["scheduler"]
        self.text_encoder, self.unet, self.vae = parts["text_encoder"], parts["unet"], parts.get("vae")
        for m in (self.text_encoder, self.unet, self.vae):
            if m is not None:
                m.requires_grad_(False).eval()
        if placeholder_token in self.tokenizer.get_vocab() or self.tokenizer.add_tokens(placeholder_token) != 1:
            raise ValueError(f"`placeholder_token` {placeholder_token!r} is already in the vocabulary: pick a new one")
        self.placeholder_token, self.template, self.lr, self.seed = placeholder_token, template, float(lr), int(seed)
        self.token_id = int(self.tokenizer.convert_tokens_to_ids(placeholder_token))
        self.text_encoder.resize_token_embeddings(len(self.tokenizer), mean_resizing=False)  # the row is set below
        table = self.embeddings.weight
        with torch.no_grad():
            if initializer_token is None:
                init = table[: self.token_id].mean(0)
            else:
                ids = self.tokenizer.encode(initializer_token, add_special_tokens=False)
                if len(ids) != 1:
                    raise ValueError(f"`initializer_token` {initializer_token!r} must be one token, got {len(ids)}")
                init = table[ids[0]]
            table[self.token_id] = init
        self.initial_embedding = init.detach().clone()
        # every row as it was, restored after each step (all but the new one); moves with the module, never saved
        self.register_buffer("_frozen_rows", table.detach().clone(), persistent=False)
        table.requires_grad_(True)
        mask = torch.zeros(table.shape[0], 1, dtype=table.dtype, device=table.device)
        mask[self.token_id] = 1
        self.register_buffer("_row_mask", mask, persistent=False)
        table.register_hook(lambda g: g * self._row_mask.to(g.dtype))  # only the new row gets a gradient
        ids = self.tokenizer(template.format(placeholder_token), padding="max_length", truncation=True,
                             max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids
        if not bool((ids == self.token_id).any()):
            raise ValueError(f"the prompt {template.format(placeholder_token)!r} loses {placeholder_token!r} at the "
                             f"tokenizer's {self.tokenizer.model_max_length} tokens: shorten `template`")
        self.register_buffer("input_ids", ids, persistent=False)

    @property
    def embeddings(self) -> nn.Embedding:
        return self.text_encoder.get_input_embeddings()

    @property
    def learned_embedding(self) -> Tensor:
        """The new token's row ``[d]`` (detached)."""
        return self.embeddings.weight[self.token_id].detach().clone()

    def set_embedding(self, vector: Tensor) -> None:
        with torch.no_grad():
            self.embeddings.weight[self.token_id] = vector.to(self.embeddings.weight)

    def train(self, mode: bool = True) -> SDTextualInversion:
        super().train(mode)
        for m in (self.text_encoder, self.unet, self.vae):
            if m is not None:
                m.eval()  # frozen networks: no dropout
        return self

    def latents(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if self.vae is None:
            return images
        with torch.no_grad():
            dist = self.vae.encode(images).latent_dist
            return dist.sample(generator) * float(self.vae.config.scaling_factor)

    def loss(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The noise-prediction loss (mean over elements), its randomness from ``generator``."""
        z = self.latents(images, generator)
        b = z.shape[0]
        noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        steps = int(self.scheduler.config.num_train_timesteps)
        t = torch.randint(0, steps, (b,), generator=generator, device=z.device).long()
        noisy = self.scheduler.add_noise(z, noise, t)
        hidden = self.text_encoder(self.input_ids.expand(b, -1))[0]
        pred = self.unet(noisy, t, hidden).sample
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            target = noise
        elif kind == "v_prediction":
            target = self.scheduler.get_velocity(z, noise, t)
        else:
            raise ValueError(f"scheduler prediction_type {kind!r} is not supported (epsilon or v_prediction)")
        return F.mse_loss(pred.float(), target.float())

    def restore_frozen_rows(self) -> None:
        """Put every row but the new token's back to its original value (bit-for-bit)."""
        with torch.no_grad():
            table = self.embeddings.weight
            keep = self._row_mask.bool().squeeze(1)
            table[~keep] = self._frozen_rows.to(table)[~keep]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        gen = torch.Generator(device=images.device).manual_seed(derive_seed(self.seed, self.global_step, batch_idx))
        loss = self.loss(images, gen)
        self.log("train/loss", loss, prog_bar=True, batch_size=images.shape[0])
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.restore_frozen_rows()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([self.embeddings.weight], lr=self.lr)

    def save_embedding(self, path: str | Path) -> Path:
        """diffusers' format: ``pipe.load_textual_inversion(path)`` adds the token with this embedding."""
        return save_learned_embeds(path, self.placeholder_token, self.learned_embedding)


def invert_images_sd(module: SDTextualInversion, images: Tensor, steps: int = 100, lr: float | None = None,
                     seed: int = 0, batch_repeats: int = 1, progress: bool = False) -> Tensor:
    """One textual-inversion embedding per image ``[n, d]``: each image's own run from the initial embedding, fresh
    Adam, noise from a generator seeded by ``(seed, i)`` (row i depends on image i alone)."""
    if images.ndim != 4 or images.shape[0] < 1:
        raise ValueError(f"`images` must be [n, C, H, W] with n >= 1, got shape {tuple(images.shape)}")
    from tqdm.auto import tqdm

    table = module.embeddings.weight
    out = []
    for i in tqdm(range(images.shape[0]), desc="textual inversion (per image)", disable=not progress):
        module.set_embedding(module.initial_embedding)
        opt = torch.optim.Adam([table], lr=module.lr if lr is None else lr)
        gen = torch.Generator(device=images.device).manual_seed(derive_seed(seed, i))
        x = images[i: i + 1].expand(batch_repeats, -1, -1, -1)
        with torch.enable_grad():
            for _ in range(steps):
                loss = module.loss(x, gen)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                module.restore_frozen_rows()
        out.append(module.learned_embedding)
    module.set_embedding(module.initial_embedding)
    return torch.stack(out)
