"""A Gaussian VAE on the built-in `shapes` scenes (32×32 → an 8×8×4 latent), for the side-by-side
table with the VQ tokenizers.

    mmjax train --config experiments/vae_shapes.py --workdir runs/vae_shapes

Taming's conv encoder (`model_config` in experiments/vqgan_shapes.py, as measured) and the VQ-GAN's
decoder, with a diagonal Gaussian posterior (mean and clamped log-variance, AutoencoderKL's head),
trained on the ELBO with an L2 likelihood:
mean (x − x̂)² + β_KL · KL(q(z|x) ‖ N(0, I)) / (H·W·C). β_KL weighs nats per pixel dimension against
the squared error; the default keeps reconstructions sharp enough for the probe while the prior
samples (images/prior_*.png) still show scene-like structure. Same metrics and grids.
"""

import dataclasses
import runpy
from pathlib import Path

from mmjax.experiment import ExperimentConfig
from mmjax.tasks.autoencoder import AutoencoderLossConfig

_vqgan = runpy.run_path(str(Path(__file__).with_name("vqgan_shapes.py")))


def get_config() -> ExperimentConfig:
    return dataclasses.replace(_vqgan["get_config"](), name="vae_shapes", model=_vqgan["model_config"]("kl"),
                               loss=AutoencoderLossConfig(reconstruction="l2", kl_weight=0.02, perceptual_weight=0.0,
                                                          gan_weight=0.0))
