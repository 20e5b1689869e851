"""DPAgg-TI (Peetathawatchai et al., arXiv 2411.14639): adapt a class-conditional plpriv EDM to a private concept.

1. textual inversion on EACH private image (:func:`plpriv.modules.textual_inversion.invert_images`: its own seeded
   optimisation, the network frozen) gives one conditioning vector u_i per image;
2. :class:`plpriv.privacy.noisy_mean.NoisyMeanMechanism` releases u* = mean of a subsample of the rows normalised to
   ``norm`` + Gaussian noise: one (epsilon, delta)-DP release (no composition over training steps);
3. images are sampled with u* as the class-label input.

Command (a folder of PNG/JPEG images, or a ``.npy``/``.npz`` array ``[n, H, W]``/``[n, C, H, W]`` in [0, 1] or
[0, 255]; images are converted to the model's channels and resized to its resolution)::

    python -m plpriv.runners.dpagg_ti --checkpoint runs/dpagg_digits_withheld/checkpoints/last.ckpt \\
        --images my_private_images/ --epsilon 1 --out runs/dpagg_ti

writes ``<out>/embedding.pt`` (``{"vector": [label_dim], "privacy": {...}}``: load with ``torch.load`` and pass the
vector to :func:`~plpriv.modules.textual_inversion.sample_with_vector` or ``EDM.sample(class_labels=
vector.expand(N, -1))``), ``<out>/release.json`` (the public record) and ``<out>/samples.png``. More samples
later: ``--embedding <out>/embedding.pt --num-samples 256 --out <folder>`` (no private data read).

Privacy boundary: adjacency is replace-one (the number of private images n is public and written); the per-image
vectors, which images were subsampled and the noise seed are never written. The noise is drawn from OS entropy unless
``--noise-seed`` is given (tests only: anyone who knows it can remove the noise).
"""

from __future__ import annotations

import argparse
import json
import math
import secrets
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plpriv.modules.textual_inversion import invert_images, load_frozen_edm, sample_with_vector

__all__ = ["dpagg_release", "load_private_images", "main", "noiseless_mean", "per_image_embeddings", "run_dpagg_ti",
           "sample_embedding"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def load_private_images(source: str | Path | np.ndarray | Tensor, image_shape: tuple[int, int, int]) -> Tensor:
    """Private images as float32 ``[n, C, H, W]`` in ``[-1, 1]`` at ``image_shape = (C, H, W)``.

    ``source``: a folder of images (sorted by name), a ``.npy``/``.npz`` file, or an array/tensor ``[n, H, W]`` or
    ``[n, C, H, W]`` with values in ``[0, 1]`` (floats) or ``[0, 255]`` (integers). Colour is averaged to grey for a
    1-channel model; grey is repeated for 3 channels; sizes are resampled (area down, bilinear up).
    """
    channels, height, width = image_shape
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            from PIL import Image

            files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {str(path)!r}")
            mode = "L" if channels == 1 else "RGB"
            arrays = [np.asarray(Image.open(f).convert(mode).resize((width, height), Image.BICUBIC)) for f in files]
            source = np.stack(arrays)
        elif path.suffix in (".npy", ".npz") and path.is_file():
            loaded = np.load(path)
            source = loaded[loaded.files[0]] if path.suffix == ".npz" else loaded
        else:
            raise FileNotFoundError(f"private images {str(path)!r} not found: give a folder of images or a .npy/.npz")
    x = torch.as_tensor(np.asarray(source) if not isinstance(source, Tensor) else source)
    if x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.permute(0, 3, 1, 2)  # [n, H, W, C] (PIL, numpy) -> [n, C, H, W]
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if x.ndim != 4 or x.shape[0] < 1:
        raise ValueError(f"private images must be [n, H, W] or [n, C, H, W] with n >= 1, got {tuple(x.shape)}")
    x = x.float() / 255.0 if not x.is_floating_point() else x.float()
    if float(x.min()) < 0 or float(x.max()) > 1:
        raise ValueError(f"private images must lie in [0, 1] (floats) or [0, 255] (integers), got values in "
                         f"[{float(x.min()):.3g}, {float(x.max()):.3g}]")
    if x.shape[1] != channels:
        x = x.mean(1, keepdim=True).expand(-1, channels, -1, -1) if channels in (1, 3) else x
    if tuple(x.shape[-2:]) != (height, width):
        mode = "area" if x.shape[-1] > width else "bilinear"
        extra = {"align_corners": False} if mode == "bilinear" else {}
        x = F.interpolate(x, size=(height, width), mode=mode, **extra)
    return (x.clamp(0, 1) * 2 - 1).contiguous()


def per_image_embeddings(denoiser: nn.Module, images: Tensor, steps: int = 100, lr: float = 0.1,
                         noise_draws: int = 4, seed: int = 0, chunk_size: int = 32, progress: bool = True) -> Tensor:
    """DPAgg-TI's first stage: one textual-inversion vector per image ``[n, label_dim]``, with a progress bar."""
    from tqdm.auto import tqdm

    with tqdm(total=images.shape[0], desc="textual inversion (per image)", unit="img", disable=not progress) as bar:
        return invert_images(denoiser, images, steps=steps, lr=lr, noise_draws=noise_draws, seed=seed,
                             chunk_size=chunk_size, progress=lambda done: bar.update(done - bar.n))


def dpagg_release(embeddings: Tensor, mechanism: Any, generator: torch.Generator | None = None) -> Tensor:
    """DPAgg-TI's second stage: the mechanism's noisy mean of the normalised (subsampled) per-image vectors."""
    return mechanism.release(embeddings, generator=generator)


def noiseless_mean(embeddings: Tensor, norm: float = 1.0) -> Tensor:
    """The non-private centroid: the mean of the rows scaled to ``norm`` (DPAgg-TI at epsilon = inf, q = 1)."""
    return (norm * embeddings / embeddings.norm(dim=1, keepdim=True).clamp_min(1e-12)).mean(0)


def run_dpagg_ti(
    checkpoint: str | Path,
    images: str | Path | np.ndarray | Tensor,
    out: str | Path | None = None,
    epsilon: float = 1.0,
    delta: float = 1e-5,
    norm: float = 1.0,
    sample_rate: float | None = 0.5,
    renormalize: bool = False,
    steps: int = 100,
    lr: float = 0.1,
    noise_draws: int = 4,
    seed: int = 0,
    noise_seed: int | None = None,
    num_samples: int = 64,
    progress: bool = True,
) -> dict[str, Any]:
    """The whole job: per-image TI, one DP release, samples. Returns ``{"vector", "privacy", "samples"}``.

    ``epsilon = inf`` releases the noiseless mean of the subsample (non-private, an upper bound). ``norm`` is the
    norm every per-image vector is scaled to (sensitivity 2 norm / B under replace-one); 1.0 is the norm of a
    one-hot class label. ``sample_rate``: the Poisson rate of the subsample (``None``: every image).
    ``renormalize``: rescale the release to norm ``norm`` (post-processing).
    """
    from plpriv.privacy.noisy_mean import NoisyMeanMechanism

    denoiser, sampler_kwargs = load_frozen_edm(checkpoint)
    model = denoiser.model
    shape = (int(model.in_channels), int(model.img_resolution), int(model.img_resolution))
    x = load_private_images(images, shape)
    n = x.shape[0]
    start = time.perf_counter()
    u = per_image_embeddings(denoiser, x, steps=steps, lr=lr, noise_draws=noise_draws, seed=seed, progress=progress)
    mech = NoisyMeanMechanism(norm=norm, sample_rate=sample_rate, target_epsilon=epsilon, delta=delta,
                              adjacency="replace-one", renormalize=renormalize)
    gen = torch.Generator().manual_seed(secrets.randbits(63) if noise_seed is None else int(noise_seed))
    vector = dpagg_release(u, mech, generator=gen)
    private = math.isfinite(epsilon)
    record = {**mech.record(), "num_images": n, "epsilon": mech.epsilon(n) if private else math.inf,
              "noise_std": mech.noise_std(n) if private else 0.0,
              "ti": {"steps": steps, "lr": lr, "noise_draws": noise_draws, "seed": seed}}
    # The run time of the private computation is not an output of the mechanism: printed, never written.
    seconds = round(time.perf_counter() - start, 1)
    if noise_seed is not None and private:  # a known noise seed lets anyone subtract the noise
        record["covered_by_epsilon"] = False
        record["warning"] = "noise drawn from a given --noise-seed (tests only): this release is NOT private"
        warnings.warn(f"DPAgg-TI: {record['warning']}", stacklevel=2)
    samples = sample_with_vector(denoiser, vector, num_samples, torch.Generator().manual_seed(seed), **sampler_kwargs)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"vector": vector, "label_dim": int(vector.numel()), "checkpoint": str(checkpoint),
                    "privacy": record}, out / "embedding.pt")
        (out / "release.json").write_text(json.dumps({**record, "vector": vector.tolist()}, indent=2))
        from plpriv.utils.figures import save_and_log_images

        save_and_log_images(None, samples.clamp(-1, 1), "samples", directory=out)
    return {"vector": vector, "privacy": record, "samples": samples, "seconds": seconds}


def sample_embedding(checkpoint: str | Path, embedding: str | Path, out: str | Path | None, num_samples: int = 64,
                     seed: int = 0) -> dict[str, Any]:
    """Samples from a released ``embedding.pt`` (post-processing of the release: no further privacy cost); writes
    ``<out>/samples.png`` and ``<out>/samples.pt`` (``[N, C, H, W]`` in ``[-1, 1]``)."""
    denoiser, sampler_kwargs = load_frozen_edm(checkpoint)
    path = Path(embedding)
    if not path.is_file():
        raise FileNotFoundError(f"embedding {str(path)!r} not found: run this module with --images first")
    vector = torch.load(path, map_location="cpu")["vector"]
    samples = sample_with_vector(denoiser, vector, num_samples, torch.Generator().manual_seed(seed), **sampler_kwargs)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        torch.save(samples, out / "samples.pt")
        from plpriv.utils.figures import save_and_log_images

        save_and_log_images(None, samples.clamp(-1, 1), "samples", directory=out)
        print(f"DPAgg-TI: {num_samples} samples from {path} -> {out}/samples.png, samples.pt")
    return {"vector": vector, "samples": samples}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m plpriv.runners.dpagg_ti", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a class-conditional plpriv EDM checkpoint (last.ckpt)")
    p.add_argument("--images", default=None, help="folder of private images, or a .npy/.npz array")
    p.add_argument("--embedding", default=None,
                   help="sample from a released embedding.pt instead (no private data read, no privacy cost)")
    p.add_argument("--out", default="runs/dpagg_ti", help="output folder (embedding.pt, release.json, samples.png)")
    p.add_argument("--epsilon", type=float, default=1.0, help="target epsilon of the one release ('inf': no noise)")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--norm", type=float, default=1.0, help="norm each per-image vector is scaled to (sensitivity)")
    p.add_argument("--sample-rate", type=float, default=0.5, help="Poisson subsampling rate (amplification)")
    p.add_argument("--renormalize", action="store_true", help="rescale the release to --norm (post-processing)")
    p.add_argument("--steps", type=int, default=100, help="Adam steps of each image's textual inversion")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--noise-draws", type=int, default=4, help="(sigma, noise) draws per image and step")
    p.add_argument("--seed", type=int, default=0, help="seed of the TI and sampling randomness (not the DP noise)")
    p.add_argument("--noise-seed", type=int, default=None, help="fixed DP noise seed: TESTS ONLY")
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if (args.images is None) == (args.embedding is None):
        parser.error("give --images (adapt: per-image TI and one DP release) or --embedding (sample from a release)")
    if args.embedding is not None:
        return sample_embedding(args.checkpoint, args.embedding, args.out, args.num_samples, args.seed)
    result = run_dpagg_ti(args.checkpoint, args.images, args.out, epsilon=args.epsilon, delta=args.delta,
                          norm=args.norm, sample_rate=args.sample_rate, renormalize=args.renormalize,
                          steps=args.steps, lr=args.lr,
                          noise_draws=args.noise_draws, seed=args.seed, noise_seed=args.noise_seed,
                          num_samples=args.num_samples)
    rec = result["privacy"]
    print(f"DPAgg-TI: released one vector from {rec['num_images']} images at (epsilon, delta) = "
          f"({rec['epsilon']:.3g}, {rec['delta']:g}), replace-one (noise std {rec['noise_std']:.3g}); "
          f"{result['seconds']} s; wrote {args.out}/embedding.pt, "
          f"release.json, samples.png")
    return result


if __name__ == "__main__":
    main()
