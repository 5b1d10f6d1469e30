"""DiffusionBlocks trainer: residual networks trained block by block as denoisers
(Shing et al., arXiv 2506.14202). The hot ops come from diffusionblocks_ext."""

__version__ = "0.1.0"
