"""DiffusionBlocks in one file: a residual MLP classifying scikit-learn's digits, cut into B
blocks that are trained alone as denoisers of a label embedding, then chained by Euler steps.
Only the ops of `diffusionblocks_ext` are used, not the trainer (docs/method.md has the maths).

    python examples/plain_loop.py --blocks 3 --steps 1500 --seed 0
"""
import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits

import diffusionblocks_ext as dx

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=1500, help="block steps (each runs one block)")
parser.add_argument("--blocks", type=int, default=3)
parser.add_argument("--layers", type=int, default=6)
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
assert args.layers % args.blocks == 0, "--layers must be a multiple of --blocks"
t0 = time.time()
torch.set_num_threads(1)  # the matrices are tiny: a second thread costs more than it saves
torch.manual_seed(args.seed)
gen = torch.Generator().manual_seed(args.seed)  # block choice, σ and ε all come from here

images, labels = load_digits(return_X_y=True)
x_all, y_all = torch.tensor(images / 16.0, dtype=torch.float32), torch.tensor(labels)
perm = torch.randperm(len(x_all), generator=gen)
train, test = perm[:1437], perm[1437:]  # the usual 80/20 split of 1797 digits

# Cut the σ axis where each piece holds 1/B of the training density ln σ ~ N(P_mean, P_std²),
# in float64 because Φ(ln 80) is within 2e-6 of 1. Ascending boundaries σ_0 = 0.002 .. σ_B = 80.
B, W, LABEL_NORM = args.blocks, 128, 0.25


def cdf(sigma):  # where σ sits in the training density
    return torch.special.ndtr((torch.tensor(sigma, dtype=torch.float64).log() - dx.P_MEAN) / dx.P_STD)


def sigma_at(fraction):  # fraction of the way from σ_min to σ_max in that density; clamp pins the ends
    q = cdf(dx.SIGMA_MIN) + fraction * (cdf(dx.SIGMA_MAX) - cdf(dx.SIGMA_MIN))
    return (dx.P_MEAN + dx.P_STD * torch.special.ndtri(q)).exp().clamp(dx.SIGMA_MIN, dx.SIGMA_MAX)


bounds = sigma_at(torch.arange(B + 1, dtype=torch.float64) / B).tolist()
# The forward pass runs from noise to data, so block 0 (the input end) owns the noisiest piece.
ranges = [(bounds[B - 1 - k], bounds[B - k]) for k in range(B)]


class Layer(nn.Module):  # h + f(h), told its σ by FiLM so one block can cover a range of σ
    def __init__(self):
        super().__init__()
        self.film, self.norm = nn.Linear(W, 2 * W), nn.LayerNorm(W, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(W, 2 * W), nn.GELU(), nn.Linear(2 * W, W))

    def forward(self, h, cond):
        shift, scale = self.film(cond).chunk(2, dim=-1)
        return h + self.mlp(self.norm(h) * (1 + scale) + shift)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        # Shared by every block: the input embeddings, the σ embedding, the readout, the labels E.
        self.embed_x, self.embed_z, self.out = nn.Linear(64, W), nn.Linear(W, W), nn.Linear(W, W)
        self.embed_sigma = nn.Sequential(nn.Linear(1, W), nn.SiLU(), nn.Linear(W, W))
        self.E = nn.Parameter(torch.randn(10, W))
        self.logit_scale = nn.Parameter(torch.tensor(10.0))
        self.layers = nn.ModuleList(Layer() for _ in range(args.layers))

    def block(self, b, x, z, z_in, sigma):
        """Only block b's layers, on the clean input x and the noisy target z: (D, logits)."""
        h = self.embed_x(x) + self.embed_z(z_in)
        cond = self.embed_sigma(dx.c_noise(sigma)[:, None])
        for layer in self.layers[b * len(self.layers) // B:(b + 1) * len(self.layers) // B]:
            h = layer(h, cond)
        D = dx.denoise(self.out(h), z, sigma)
        # Logits against the unit-norm labels, scaled so that D = y gives the true class logit_scale.
        return D, self.logit_scale * D @ F.normalize(self.E, dim=-1).T / LABEL_NORM


net = Net()
opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=0.01)
sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=args.steps, pct_start=0.05)
for step in range(args.steps):
    b = int(torch.randint(B, (), generator=gen))  # each step trains one block, alone
    idx = train[torch.randint(len(train), (128,), generator=gen)]
    x, lab = x_all[idx], y_all[idx]
    sigma = dx.sample_sigma(len(idx), *ranges[b], generator=gen)
    # Targets of norm 0.25, not 1: at norm 1 the cleanest blocks read the label off z and only copy.
    y = LABEL_NORM * F.normalize(net.E[lab], dim=-1)
    _, logits = net.block(b, x, *dx.add_noise(y, sigma, generator=gen), sigma)
    loss = dx.weighted_cross_entropy(logits, lab, dx.loss_weight(sigma)).mean()
    opt.zero_grad()  # the other blocks' grads stay None, so AdamW leaves them untouched
    loss.backward()
    nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    sched.step()
    if step % 500 == 0 or step == args.steps - 1:
        print(f"step {step:5d}  block {b}  loss {loss.item():.4f}")

# Inference: B levels spaced evenly in the CDF from σ_max down to σ_min, one inside each
# block's piece, so the chain costs exactly one forward pass of the whole network.
levels = sigma_at(torch.linspace(1, 0, B, dtype=torch.float64)).tolist() if B > 1 else [dx.SIGMA_MIN]
with torch.no_grad():
    x, n = x_all[test], len(test)
    z = levels[0] * torch.randn(n, W, generator=gen)
    for b, level in enumerate(levels):
        sigma = torch.full((n,), level)
        D, logits = net.block(b, x, z, dx.c_in(sigma)[:, None] * z, sigma)
        if b + 1 < B:
            # Hand on the expected label over unit-norm E (4x the target scale), so a block's
            # belief outweighs the noise still left in z; see docs/method.md §6.
            E_hat = logits.softmax(-1) @ F.normalize(net.E, dim=-1)
            z = dx.euler_step(z, E_hat, sigma, torch.full((n,), levels[b + 1]), denoised=True)
    accuracy = (logits.argmax(-1) == y_all[test]).float().mean().item()
print(f"trained and evaluated in {time.time() - t0:.1f} s")
print(f"test accuracy (block-wise, B={B}): {accuracy:.4f}")
