"""Masked diffusion language model, MD4 (Shi et al. 2024), as a DiffusionBlocks task (docs/method.md §6).

Forward process: each character stays with probability α(t) and becomes [MASK] otherwise;
the schedule is linear, α(t) = 1 − t, so t is the masking rate (t = 1: all masked). The
model sees x_t and t and predicts the clean character at every position (logits over the
real vocabulary only: [MASK] is never predicted, unmasked positions are carried over).
MD4's continuous-time ELBO, per sequence of T characters:

    −log p(x) <= ∫_0^1 w(t) E_{x_t}[ Σ_{n masked} −log p_θ(x_n | x_t, t) ] dt,
    w(t) = −α'(t) / (1 − α(t)) = 1/t for the linear schedule.

(The prior and reconstruction terms vanish: α(1) = 0, α(0) = 1.) The training loss of
one example is the integrand at one t, divided by T: `weighted_cross_entropy` with weight
w(t) and ignore_index on unmasked positions sums the CE over masked positions and divides
by T, so losses are in nats per character.

DiffusionBlocks: the t axis is cut into B ranges of equal width in α (for α = 1 − t, equal
widths in t); block 0 (the first layers) takes the most-masked range, t near 1. Each block
is trained alone as a whole denoiser of its range: embeddings -> only its layers -> head,
with t drawn (stratified) from its range widened by γ·width on each side. The blocks'
losses are conditional expectations E[w·CE | t in range]; the ELBO is the width-weighted
sum of them, i.e. their mean for equal widths.

The partition owns these ranges (partition.MaskingAxis; the task's level_name "t" asks
for that axis): half-open in α, [b/B, (b+1)/B) with the last closed, so in t block b
holds (1 − (b+1)/B, 1 − b/B] and the last block also t = 0. A t exactly on a boundary
belongs to the *less* masked block: the convention of a sampler that walks t down a grid
(the step that starts at t = 2/3, B = 3, lies in [1/3, 2/3], so block 1 serves it, and
S = B steps run every block exactly once).

Model: the bidirectional adaLN-Zero TransformerLayer of layers.py, with rotary positions
in its attention (model.positions=learned: absolute embeddings instead), conditioned on t
by layers.py's LevelEmbedder fed TIME_SCALE·t. Shared by all blocks: token embedding
(with [MASK]), t-embedder, output adaLN and head.

End-to-end baseline (--mode e2e): the same model, all layers, t over the whole (0, 1].

Evaluation (both modes, identical draws): bits per character from the ELBO on the
held-out split of model.eval_split (validation; text8's test split, as MD4 reports).
Each of W fixed held-out windows gets K values of t, one per stratum,
t_k = 1 − (k + u)/K with u ~ U[0, 1) (k = 0..K−1), and one mask draw each, from a fixed
generator, so both modes see the same t's and masks; each t is served by the block whose
range holds it (all layers end to end). BPC = mean of w(t)·Σ_masked CE / T over the W·K
samples, divided by ln 2: an unbiased estimate of the ELBO, an upper bound on the NLL.

Sampling (MD4's ancestral sampler): start all [MASK]; on the grid t_i = 1 − i/S each
still-masked position is revealed with probability (α(t_{i+1}) − α(t_i))/(1 − α(t_i)) =
(t_i − t_{i+1})/t_i, drawn from the model at t_i (the block holding t_i). The last step
reaches t = 0, where that probability is 1: nothing stays masked."""

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import diffusionblocks_ext as dx

from ..errors import ConfigError, layer_stack_problems, raise_first
from ..partition import MaskingAxis
from ..task import SampleRequest, device_of
from .data import corpora
from .layers import AdaptiveNorm, LevelEmbedder, TransformerLayer

IGNORE = -100              # weighted_cross_entropy's ignore_index: unmasked positions
EVAL_SEED = 0              # the evaluation's t's and masks; fixed, so both modes see the same draws
TIME_SCALE = 1000.0        # t in [0, 1] -> DiT-style timestep before the sinusoidal features
MIN_T = 1e-12              # the smallest t a training draw takes


# --- the schedule (linear) ----------------------------------------------------------------
def alpha(t: torch.Tensor) -> torch.Tensor:
    """Probability that a character is still unmasked at time t."""
    return 1 - t


def loss_weight(t: torch.Tensor) -> torch.Tensor:
    """MD4's w(t) = −α'(t)/(1 − α(t)); 1/t for α = 1 − t."""
    return 1 / t


def mask_tokens(x0: torch.Tensor, t: torch.Tensor, mask_id: int,
                generator: torch.Generator | None) -> torch.Tensor:
    """x_t: each position of x0 [N, T] masked with probability 1 − α(t), t [N] (on x0's device;
    the uniforms come from the CPU generator)."""
    u = torch.rand(x0.shape, dtype=torch.float64, generator=generator).to(x0.device, non_blocking=True)
    masked = u < (1 - alpha(t.to(torch.float64)))[:, None]
    return torch.where(masked, torch.full_like(x0, mask_id), x0)


def md4_loss(logits: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
             mask_id: int) -> torch.Tensor:
    """Per example [N]: w(t)·Σ_{masked n} −log p(x0_n) / T (nats per character)."""
    target = torch.where(xt == mask_id, x0, torch.full_like(x0, IGNORE))
    weight = loss_weight(t.to(torch.float64)).to(logits.dtype)
    return dx.weighted_cross_entropy(logits, target, weight, ignore_index=IGNORE)


def stratified_t(n: int, t_range: tuple[float, float], generator: torch.Generator | None,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """n times in (lo, hi] on `device`, one per equal stratum (MD4 draws antithetic times;
    stratified is the same idea with an independent offset per stratum). Float64, and never 0:
    w(0) is infinite (rounding could reach 0 once in ~1e15 draws; MIN_T keeps the loss finite)."""
    lo, hi = t_range
    u = torch.rand(n, dtype=torch.float64, generator=generator).to(device, non_blocking=True)
    return (hi - (torch.arange(n, dtype=torch.float64, device=device) + u) / n * (hi - lo)).clamp_min(MIN_T)


# --- the model ----------------------------------------------------------------------------
@dataclass
class MDMConfig:
    dataset: str = "text"          # "text" (model.data, a UTF-8 file, or the pydoc topics) or "text8"
    data: str = ""                 # text: a UTF-8 file, "" = the pydoc topics; text8: text8.zip, the
                                   # extracted file or its folder, "" = the cache (downloaded once)
    seq_len: int = 64
    layers: int = 6
    width: int = 64
    heads: int = 4
    mlp_ratio: int = 4
    positions: str = "rotary"      # "rotary" (in attention) or "learned" (absolute, added to the input)
    eval_split: str = "validation" # held-out split evaluated: "validation" or "test" (text8 only)
    eval_windows: int = 512        # W windows of seq_len characters evaluated; 0 = every window of the
                                   # split (text8's test split at seq_len 256: 19,531, i.e. W·K forward passes)
    eval_t_samples: int = 6        # K strata of t per window (a multiple of B: equal work per block)
    sample_count: int = 4          # sequences written to samples.txt / report.json at the end
    sample_steps: int = 0          # unmasking steps; 0 = one per generated character

    def check(self, config) -> None:
        """Raises ConfigError naming the first bad field (config: the whole TrainConfig)."""
        problems = layer_stack_problems(self) + [
            *corpora.option_checks(self),
            (self.seq_len >= 2, f"model.seq_len: expected at least 2, got {self.seq_len}"),
            (self.positions in ("rotary", "learned"),
             f"model.positions: expected 'rotary' or 'learned', got {self.positions!r}"),
            (self.positions != "rotary" or (self.width // max(self.heads, 1)) % 2 == 0,
             f"model.width: rotary positions need an even head size, got {self.width}/{self.heads} heads"),
            (self.eval_t_samples >= 1, f"model.eval_t_samples: expected at least 1, got {self.eval_t_samples}"),
            (self.sample_count >= 0, f"model.sample_count: expected >= 0, got {self.sample_count}"),
            (self.sample_steps >= 0, f"model.sample_steps: expected >= 0 (0 = one per character), "
                                     f"got {self.sample_steps}"),
            (config.partition == "equi", f"partition: the masked-diffusion task cuts t equally in α "
                                         f"(partition=equi), got {config.partition!r}"),
        ]
        raise_first(problems)


def scaled_time(t: torch.Tensor) -> torch.Tensor:
    """t [N] -> TIME_SCALE·t [N] in float32: the t-embedder's input, on the scale of DiT's timesteps."""
    return TIME_SCALE * t.float()


class MaskedDiffusionLM(nn.Module):
    """Bidirectional adaLN-Zero transformer over x_t; shared modules: token and position
    embeddings, t-embedder, output adaLN and head; model.layers is what blocks cut."""

    def __init__(self, config: MDMConfig, vocab_size: int):
        super().__init__()
        self.mask_id = vocab_size  # one extra input token; the head predicts real characters only
        # GPT-2's 0.02 for the token embedding: with nn.Embedding's N(0, 1), learned positions
        # (model.positions=learned) would be drowned out and attention see a bag of characters.
        self.token_embed = nn.Embedding(vocab_size + 1, config.width)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, config.seq_len, config.width)) \
            if config.positions == "learned" else None
        self.time_embed = LevelEmbedder(config.width, scaled_time)
        self.head_norm = AdaptiveNorm(config.width)
        self.head = nn.Linear(config.width, vocab_size)
        self.layers = nn.ModuleList(TransformerLayer(config.width, config.heads, config.mlp_ratio,
                                                     rotary=config.positions == "rotary")
                                    for _ in range(config.layers))

    def forward(self, xt: torch.Tensor, t: torch.Tensor, layers: range) -> torch.Tensor:
        """Logits [N, T, V] of the clean characters given x_t [N, T] and t [N], through `layers` only."""
        h = self.token_embed(xt)
        if self.pos_embed is not None:
            h = h + self.pos_embed[:, :xt.shape[1]]
        cond = self.time_embed(t)
        for index in layers:
            h = self.layers[index](h, cond)
        return self.head(self.head_norm(h, cond))


# --- the task -----------------------------------------------------------------------------
class MaskedDiffusion(corpora.TextBatches):
    """Character-level masked diffusion (MD4) on the text corpus as a task (see task.py)."""

    Config = MDMConfig
    level_name = "t"
    presets = {
        # 6 layers of width 64 (B = 3: 2 per block), 64-character windows, batch 32, 1,000
        # end-to-end steps (3,000 block steps), AdamW 3e-3 with cosine decay: minutes on 2 cores.
        "mdm-text": lambda: dict(model=MDMConfig(), blocks=3, gamma=0.05, e2e_steps=1000, batch_size=32,
                                 checkpoint_every=500),
        # For tests: seconds, not minutes.
        "mdm-text-tiny": lambda: dict(
            model=MDMConfig(seq_len=16, layers=2, width=16, heads=2, mlp_ratio=2, eval_windows=8,
                            eval_t_samples=2, sample_count=2),
            blocks=2, gamma=0.05, e2e_steps=10, warmup_e2e_steps=2, batch_size=8, lr=1e-3,
            checkpoint_every=5, threads=1),
        # text8 as MD4 and the paper: 12 layers of width 768, 12 heads, 256-character windows,
        # B = 3, γ = 0.05, AdamW 3e-4 with weight decay 0.03, batch 256; bits per character on
        # every window of the test split (the paper: 1.45 block-wise, 1.56 end to end). The
        # budget, 100 epochs end to end (137,329 steps; block-wise 3× the steps), is our
        # choice: our sources do not print the paper's.
        "mdm-text8": lambda: dict(
            model=MDMConfig(dataset="text8", seq_len=256, layers=12, width=768, heads=12, eval_split="test",
                            eval_windows=0),
            blocks=3, gamma=0.05, lr=3e-4, weight_decay=0.03, batch_size=256, e2e_epochs=100,
            warmup_e2e_steps=2000, checkpoint_every=5000, threads=0),
        # For tests: one epoch of a ~100K-character text8 fixture (model.data=...) in seconds.
        "mdm-text8-tiny": lambda: dict(
            model=MDMConfig(dataset="text8", seq_len=32, layers=2, width=32, heads=2, mlp_ratio=2,
                            eval_split="test", eval_windows=8, eval_t_samples=2, sample_count=2),
            blocks=2, gamma=0.05, lr=1e-3, batch_size=32, e2e_epochs=1, warmup_e2e_steps=2,
            checkpoint_every=50, threads=1),  # a checkpoint every 5 of its 176 steps would triple the time
    }

    def __init__(self, options: MDMConfig):
        self.options = options
        data = corpora.load(options)
        self.corpus, self.validation = data.corpus, data.windows  # windows of model.eval_split [W, seq_len]
        self.model = MaskedDiffusionLM(options, self.corpus.vocab_size)
        self.num_layers = len(self.model.layers)

    @property
    def mask_id(self) -> int:
        return self.model.mask_id

    # --- training (task.py) ---------------------------------------------------------
    def loss_on_range(self, x0: torch.Tensor, t_range: tuple[float, float], layers: range,
                      generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """MD4's loss with t stratified over t_range, through `layers`: (loss [N], t [N])."""
        t = stratified_t(len(x0), t_range, generator, x0.device)
        xt = mask_tokens(x0, t, self.mask_id, generator)
        logits = self.model(xt, t, layers)
        return md4_loss(logits, x0, xt, t, self.mask_id), t.float()

    def block_loss(self, batch, block, plan, generator):
        return self.loss_on_range(batch, plan.training_range(block), plan.layers(block), generator)

    def end_to_end_loss(self, batch, generator):
        return self.loss_on_range(batch, (0.0, 1.0), range(self.num_layers), generator)[0]

    def no_weight_decay(self):
        return {"pos_embed"}

    # --- evaluation -------------------------------------------------------------------
    def logits(self, xt: torch.Tensor, t: torch.Tensor, plan) -> torch.Tensor:
        """Each row served by the block whose range holds its t (one block end to end)."""
        blocks = plan.block_of(t)
        out = None
        for block in blocks.unique().tolist():
            rows = (blocks == block).nonzero().squeeze(1)
            part = self.model(xt[rows], t[rows], plan.enter(block))
            if out is None:
                out = part.new_empty(xt.shape + (part.shape[-1],))
            out[rows] = part
        return out

    @torch.no_grad()
    def elbo_terms(self, plan, windows: torch.Tensor | None = None, samples: int | None = None,
                   batch_rows: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
        """(t [W, K], nats per character [W, K]), on the model's device: the ELBO integrand of
        each validation window at its K stratified t's, from the fixed evaluation generator."""
        device = device_of(self.model)
        windows = (self.validation if windows is None else windows).to(device)
        K = samples or self.options.eval_t_samples
        generator = torch.Generator().manual_seed(EVAL_SEED)
        W = len(windows)
        u = torch.rand(W, K, dtype=torch.float64, generator=generator).to(device)
        t = 1 - (torch.arange(K, dtype=torch.float64, device=device) + u) / K     # in (0, 1]
        x0 = windows.repeat_interleave(K, dim=0)                                     # row w·K + k
        xt = mask_tokens(x0, t.reshape(-1), self.mask_id, generator)
        flat_t = t.reshape(-1)
        terms = torch.cat([
            md4_loss(self.logits(xt[i:i + batch_rows], flat_t[i:i + batch_rows], plan),
                     x0[i:i + batch_rows], xt[i:i + batch_rows], flat_t[i:i + batch_rows], self.mask_id)
            for i in range(0, len(x0), batch_rows)])
        return t, terms.reshape(W, K)

    def bits_per_character(self, plan) -> tuple[float, dict[str, float]]:
        """Validation BPC, and where the bits come from: the ELBO's share from each third of
        t (the ranges of B = 3 whatever the run's B; the three sum to the BPC)."""
        t, terms = self.elbo_terms(plan)
        bits = terms / math.log(2)
        thirds = MaskingAxis(3)
        third_of = thirds.block_of(t.reshape(-1)).view_as(t)
        by_t = {f"t in ({lo:.3g}, {hi:.3g}]": (bits * (third_of == b)).mean().item()
                for b, (lo, hi) in enumerate(thirds.level_range(b) for b in range(3))}
        return bits.mean().item(), by_t

    def evaluate(self, plan, mode):
        bpc, by_t = self.bits_per_character(plan)
        return {"test_bpc": bpc, "test_bpc_by_t": by_t}

    def finish(self, plan, mode, out_dir):
        """Samples for the report (and samples.txt beside it)."""
        result = {}
        if self.options.sample_count:
            summary = self.sample(plan, mode, SampleRequest(count=self.options.sample_count,
                                                            out=Path(out_dir) / "samples.txt"))
            result.update({"samples": summary["samples"], "sample_steps": summary["steps"]})
        return result

    # --- generation (`diffusionblocks sample DIR`) --------------------------------------
    @torch.no_grad()
    def generate(self, plan, count: int, steps: int, generator: torch.Generator,
                 prompt: torch.Tensor | None = None) -> torch.Tensor:
        """[count, seq_len] characters, on the CPU (for decoding), by MD4's ancestral sampler
        over `steps` steps; the prompt (if any) is fixed unmasked at the start. The draws come
        from the CPU generator, on CPU probabilities."""
        T = self.options.seq_len
        device = device_of(self.model)
        x = torch.full((count, T), self.mask_id, dtype=torch.int64, device=device)
        if prompt is not None and len(prompt):
            x[:, :len(prompt)] = prompt.to(device)
        for i in range(steps):
            t_now, t_next = 1 - i / steps, 1 - (i + 1) / steps
            t = torch.full((count,), t_now, dtype=torch.float64, device=device)
            block = int(plan.block_of(t[:1])[0])
            logits = self.model(x, t, plan.enter(block))
            probabilities = logits.float().softmax(dim=-1).reshape(-1, logits.shape[-1]).cpu()
            proposal = torch.multinomial(probabilities, 1, generator=generator).view(count, T).to(device)
            reveal_p = (alpha(t_next) - alpha(t_now)) / (1 - alpha(t_now))  # q(x_s = x_0 | x_t = [MASK])
            u = torch.rand(count, T, dtype=torch.float64, generator=generator).to(device)
            reveal = (x == self.mask_id) & (u < reveal_p)
            x = torch.where(reveal, proposal, x)
        return x.cpu()

    def sample(self, plan, mode, request):
        T = self.options.seq_len
        if request.decoding is not None:
            raise ConfigError("decoding: the mdm task unmasks by its own sampler; it has no decoding")
        try:
            prompt = self.corpus.encode(request.prompt) if request.prompt else torch.empty(0, dtype=torch.int64)
        except ValueError as error:  # a character the corpus never had
            raise ConfigError(str(error)) from None
        if len(prompt) >= T:
            raise ConfigError(f"prompt: {len(prompt)} characters leave nothing to generate in model.seq_len={T}")
        tokens = request.tokens or T - len(prompt)
        if len(prompt) + tokens > T:
            raise ConfigError(f"tokens: expected at most {T - len(prompt)} (model.seq_len={T} minus the "
                              f"prompt), got {tokens}")
        count = request.count or self.options.sample_count or 1
        # Steps default to one per masked position (the whole window is generated; the first
        # len(prompt) + tokens characters are returned: a sample of the model's marginal).
        steps = request.steps or self.options.sample_steps or T - len(prompt)
        started = time.perf_counter()
        ids = self.generate(plan, count, steps, torch.Generator().manual_seed(request.seed), prompt)
        seconds = time.perf_counter() - started
        samples = [self.corpus.decode(row[:len(prompt) + tokens]) for row in ids]
        summary = {"samples": samples, "steps": steps, "count": count, "tokens": tokens, "seed": request.seed,
                   "layer_evals": self._layer_evals(plan, steps), "seconds": round(seconds, 3)}
        out = request.out
        if out is None and request.run_dir is not None:  # the CLI's default: a file in the run directory
            out = Path(request.run_dir) / f"samples-{mode}-S{steps}-seed{request.seed}.txt"
        if out is not None:
            out = Path(out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text("".join(f"--- sample {i} ---\n{s}\n" for i, s in enumerate(samples)), encoding="utf-8")
            summary["file"] = str(out)
        return summary

    @staticmethod
    def _layer_evals(plan, steps: int) -> int:
        """Layer forward calls (each over the batch of sequences) of a `steps`-step sampler."""
        t = torch.tensor([1 - i / steps for i in range(steps)], dtype=torch.float64)
        return sum(len(plan.layers(int(b))) for b in plan.block_of(t))

