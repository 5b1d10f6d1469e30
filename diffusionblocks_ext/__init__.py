"""diffusionblocks_ext: the fused ops of DiffusionBlocks (noise sampling, the denoising
residual update, the score-matching losses) as PyTorch dispatcher ops with C++/CUDA
kernels, and a pure-PyTorch reference (`diffusionblocks_ext.reference`) with the same
signatures that serves whenever the compiled extension is absent.

Constants: SIGMA_MIN, SIGMA_MAX (the range of noise levels σ), SIGMA_DATA (the data's
standard deviation in EDM's preconditioning), P_MEAN, P_STD (the log-normal of training σ's);
HAS_EXT (the compiled extension loaded) and HAS_CUDA_KERNELS (with its CUDA kernels)."""

from . import reference
from ._version import __version__
from ._checks import values_trusted
from .ops import (HAS_CUDA_KERNELS, HAS_EXT, add_noise, backend, denoise, edm_loss, euler_step,
                  heun_step, sample_sigma, weighted_cross_entropy)
from .reference import (P_MEAN, P_STD, SIGMA_DATA, SIGMA_MAX, SIGMA_MIN, c_in, c_noise, c_out,
                        c_skip, loss_weight)

__all__ = [
    "HAS_EXT", "HAS_CUDA_KERNELS", "backend", "sample_sigma", "add_noise", "denoise", "euler_step",
    "heun_step", "edm_loss", "weighted_cross_entropy", "reference", "c_skip", "c_out", "c_in",
    "c_noise", "loss_weight", "SIGMA_MIN", "SIGMA_MAX", "SIGMA_DATA", "P_MEAN", "P_STD", "values_trusted",
]
