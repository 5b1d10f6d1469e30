"""Recurrent-depth character LM (Huginn, Geiping et al. 2025) as a DiffusionBlocks task
(docs/method.md §6): prelude layers -> a weight-shared core applied K times -> coda.

The model (same modules in both modes; all Llama layers with adaLN, causal attention):
  e = RMSNorm(prelude(embed(x)))                       once per sequence, σ-free
  core pass:  s' = RMSNorm(core(adapter([s ; e])))     the core's layers, shared by every pass
  readout:    logits = head(adaLN(RMSNorm(coda(s))))
Position j of a window reads characters <= j and predicts character j + 1.

End-to-end baseline (--mode e2e), Huginn's recipe: s_0 ~ N(0, I), K core passes, readout
of s_K, cross-entropy. K is drawn per step from Huginn's log-normal Poisson, τ ~ N(ln r̄ −
½·0.5², 0.5), K = 1 + Poisson(e^τ) (r̄ = model.mean_recurrence), and gradients flow only
through the last k = model.backprop_depth passes (truncated back-propagation). The
earlier passes run with grad mode on but nothing recorded (their inputs and the core's
parameters detached), so the trainer counts them as training layer evaluations, which
they are, and they save no activations. The core (and the coda) get a learned constant
in place of the σ-embedding.

DiffusionBlocks (--mode blocks, B = 1): the core is one denoiser D(z_σ, e, σ) of the
L2-normalised embedding of the next character, trained over the whole σ range with a
single pass per step (no unrolling): z = y + σ·ε (one σ per sequence), the core pass on
[c_in·z ; e] conditioned on σ gives F, D = c_skip·z + c_out·F, logits = readout(D) (the
coda and head conditioned on σ too) + ⟨z, y_v⟩/σ², z's log-likelihood (model.readout=
posterior: the head models the context, Bayes' rule adds what z tells), loss λ(σ)·CE.
At inference each of the K passes is one Euler step along K noise levels
(`sampler.denoise_chain`, σ_max -> σ_min, the expected target r·softmax(logits)·Ê between
steps), so inference with K passes costs prelude + K·(core + coda) layer evaluations: the readout (coda) runs at
every level because the Euler step needs the estimate it gives.

Budget: block-wise trains for the baseline's expected layer evaluations. A baseline step
runs prelude + E[K]·core + coda layers (E[K] = 1 + mean_recurrence: 16 by default), a
block-wise step prelude + core + coda (4), so block-wise takes 4× the steps
(`block_steps_per_e2e_step`); at the plain rule of the other tasks it would train on a
quarter of the baseline's compute.

Metrics (charlm.py): at K = model.recurrence, and test_brier_K{K} / test_sample_accuracy_K{K}
for every K of model.eval_recurrences (default 4, 8, 16, 32); end to end also test_ce_K{K}."""

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

import diffusionblocks_ext as dx

from .. import schedule
from ..errors import raise_first
from .charlm import CharacterLM, check_text_options
from .layers import AdaptiveNorm, LevelEmbedder, LlamaLayer, RMSNorm, rotary_tables

RECURRENCE_LOG_STD = 0.5   # Huginn's σ of ln(rate) for the random K


@dataclass
class RecurrentConfig:
    prelude_layers: int = 1
    core_layers: int = 2                 # the weight-shared core: one pass runs these layers
    coda_layers: int = 1
    width: int = 64
    heads: int = 4
    seq_len: int = 64                    # characters per training window (seq_len − 1 predictions)
    dataset: str = "text"                # "text" (model.data, a UTF-8 file, or the pydoc topics) or "text8"
    data: str = ""                       # text: a UTF-8 file, "" = the pydoc topics; text8: text8.zip, the
                                         # extracted file or its folder, "" = the cache (downloaded once)
    mean_recurrence: int = 6             # baseline: r̄; K = 1 + Poisson(e^τ) per step (Huginn: r̄ = 32)
    backprop_depth: int = 3              # baseline: passes with gradients, the last k (Huginn: 8)
    recurrence: int = 8                  # K at evaluation (test_ce) and for samples
    eval_recurrences: tuple[int, ...] | None = (4, 8, 16, 32)  # Ks measured at the end of a run
    inference_schedule: str = "cdf"      # block-wise: the K noise levels, "cdf" or "karras"
    normalized_inference_embedding: bool = True
    target_norm: float = 1.0             # norm of the target y (charlm.py)
    tied_target_embedding: bool = False  # the targets use the clean tokens' embedding table
    noisy_input: str = "c_in"            # what the core gets of z: "c_in" or "evidence" (charlm.NOISY_INPUTS)
    readout: str = "posterior"           # the logits: "posterior" (head + log-likelihood of z) or "head" (charlm.READOUTS)
    eval_split: str = "validation"       # held-out split evaluated: "validation" or "test" (text8 only)
    eval_windows: int = 256              # windows of seq_len characters evaluated; 0 = all of the split (charlm.py)
    sample_tokens: int = 200
    quality_prompts: int = 400           # held-out prompts continued for MAUVE at the end of a run; 0 = none
    quality_prompt_chars: int = 32       # characters of each prompt
    quality_chars: int = 32              # characters generated after each prompt
    evaluator: str = "default"           # the evaluator LM of MAUVE (charlm.EVALUATORS)

    def __post_init__(self):
        if self.eval_recurrences is not None:  # a JSON list from config.json
            self.eval_recurrences = tuple(self.eval_recurrences)

    def block_steps_per_e2e_step(self) -> float:
        """Equal training compute: a baseline step runs prelude + K·core + coda layers with
        E[K] = 1 + mean_recurrence, a block-wise step prelude + core + coda (one pass)."""
        baseline = self.prelude_layers + (1 + self.mean_recurrence) * self.core_layers + self.coda_layers
        return baseline / self.layers

    @property
    def layers(self) -> int:
        """All layer modules (prelude, core, coda): what the partition and the counters see."""
        return self.prelude_layers + self.core_layers + self.coda_layers

    def check(self, config) -> None:
        raise_first(check_text_options(self, config) + [
            (self.prelude_layers >= 0, f"model.prelude_layers: expected >= 0, got {self.prelude_layers}"),
            (self.core_layers >= 1, f"model.core_layers: expected at least 1, got {self.core_layers}"),
            (self.coda_layers >= 0, f"model.coda_layers: expected >= 0, got {self.coda_layers}"),
            (self.mean_recurrence >= 1, f"model.mean_recurrence: expected at least 1, got {self.mean_recurrence}"),
            (self.backprop_depth >= 1, f"model.backprop_depth: expected at least 1, got {self.backprop_depth}"),
            (self.recurrence >= 1, f"model.recurrence: expected at least 1, got {self.recurrence}"),
            (all(k >= 1 for k in self.eval_recurrences or ()),
             f"model.eval_recurrences: expected recurrences >= 1, got {self.eval_recurrences}"),
            (config.mode == "e2e" or config.blocks == 1,
             f"blocks: the recurrent core is one denoiser over the whole σ range; expected blocks=1, "
             f"got {config.blocks}"),
            # one block holds every layer (the prelude and coda run outside its range), so
            # there is never an inactive block to move out
            (config.offload == "none", f"offload: the recurrent task trains one block; nothing to offload, "
             f"got offload={config.offload}"),
        ])


@contextlib.contextmanager
def untracked(parameters):
    """Runs with grad mode on but records no graph: `parameters` stop requiring grad for the
    duration (the caller detaches the inputs). For truncated back-propagation, instead of
    torch.no_grad, so that layer calls still count as training compute."""
    parameters = [p for p in parameters if p.requires_grad]
    for p in parameters:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in parameters:
            p.requires_grad_(True)


class RecurrentModel(nn.Module):
    def __init__(self, options: RecurrentConfig, vocab_size: int):
        super().__init__()
        width = options.width
        self.token_embed = nn.Embedding(vocab_size, width)
        # blocks: y = normalize(E[next]); with model.tied_target_embedding E is token_embed's table
        self.target_embed = None if options.tied_target_embedding else nn.Parameter(torch.randn(vocab_size, width))
        self.constant_cond = nn.Parameter(torch.randn(1, width))  # σ-free layers' conditioning vector
        self.sigma_embed = LevelEmbedder(width, dx.c_noise)       # blocks: core and readout on σ
        self.prelude_norm = RMSNorm(width)
        self.adapter = nn.Linear(2 * width, width, bias=False)    # [state ; e] -> the core's input
        self.core_norm = RMSNorm(width)
        self.final_norm = RMSNorm(width)
        self.head_norm = AdaptiveNorm(width)
        self.head = nn.Linear(width, vocab_size)
        # Every layer module once, in order: prelude, core, coda (the counters hook these).
        self.layers = nn.ModuleList(LlamaLayer(width, options.heads) for _ in range(options.layers))
        self.prelude = range(0, options.prelude_layers)
        self.core = range(options.prelude_layers, options.prelude_layers + options.core_layers)
        self.coda = range(self.core.stop, options.layers)

    def run(self, x: torch.Tensor, indices: range, cond: torch.Tensor, rope) -> torch.Tensor:
        for index in indices:
            x = self.layers[index](x, cond, rope)
        return x

    def core_parameters(self):
        """What one core pass uses (the conditioning vector aside)."""
        yield from self.adapter.parameters()
        yield from self.core_norm.parameters()
        for index in self.core:
            yield from self.layers[index].parameters()


class RecurrentDepthLM(CharacterLM):
    """Next-character prediction with a recurrent-depth model, see the module docstring."""

    name = "recurrent"
    Config = RecurrentConfig
    presets = {
        # Prelude 1, core 2 (shared), coda 1 layers of width 64; Huginn's random K (mean 1 + 6)
        # and truncated backprop through 3 passes; block-wise B = 1 (one denoiser, whole σ range),
        # trained for the baseline's layer evaluations: 4× the steps, one core pass each.
        "recurrent-text": lambda: dict(model=RecurrentConfig(), blocks=1, gamma=0.0, e2e_steps=600,
                                       batch_size=32, warmup_e2e_steps=30, checkpoint_every=200),
        "recurrent-text-tiny": lambda: dict(
            model=RecurrentConfig(width=16, heads=2, seq_len=12, mean_recurrence=2, backprop_depth=1,
                                  recurrence=3, eval_recurrences=(2, 3), eval_windows=4, sample_tokens=4,
                                  quality_prompts=0, quality_prompt_chars=4, quality_chars=4, evaluator="tiny"),
            blocks=1, gamma=0.0, e2e_steps=4, warmup_e2e_steps=1, batch_size=4, checkpoint_every=4, threads=1),
    }

    def __init__(self, options: RecurrentConfig):
        super().__init__(options)
        self.model = RecurrentModel(options, self.corpus.vocab_size)
        self.head_dim = options.width // options.heads

    # --- the pieces ---------------------------------------------------------------------------
    def rope(self, x: torch.Tensor):
        """The rotary tables for the sequence x [N, S, ...], on its device."""
        return rotary_tables(range(x.shape[1]), self.head_dim, device=x.device)

    def prelude(self, tokens: torch.Tensor) -> torch.Tensor:
        m = self.model
        cond = m.constant_cond.expand(len(tokens), -1)
        return m.prelude_norm(m.run(m.token_embed(tokens), m.prelude, cond, self.rope(tokens)))

    def core_pass(self, state: torch.Tensor, e: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        m = self.model
        h = m.adapter(torch.cat([state, e], dim=-1))
        return m.core_norm(m.run(h, m.core, cond, self.rope(state)))

    def readout(self, state: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        m = self.model
        h = m.final_norm(m.run(state, m.coda, cond, self.rope(state)))
        return m.head(m.head_norm(h, cond))

    # --- the baseline: Huginn's unrolled recurrence -----------------------------------------------
    def recur(self, e: torch.Tensor, passes: int, generator: torch.Generator, backprop: int | None = None):
        """Logits after `passes` core passes from s_0 ~ N(0, I); gradients through the last
        `backprop` passes only (None: all)."""
        m = self.model
        cond = m.constant_cond.expand(len(e), -1)
        state = torch.randn(e.shape, generator=generator).to(e.device, non_blocking=True)  # drawn on the CPU generator
        first_tracked = 0 if backprop is None else max(0, passes - backprop)
        with untracked(m.core_parameters()) if torch.is_grad_enabled() else contextlib.nullcontext():
            for _ in range(first_tracked):
                state = self.core_pass(state, e.detach(), cond.detach())
        for _ in range(first_tracked, passes):
            state = self.core_pass(state, e, cond)
        return self.readout(state, cond)

    def training_recurrence(self, generator: torch.Generator) -> int:
        """Huginn's K: 1 + Poisson(e^τ), τ ~ N(ln r̄ − s²/2, s), so E[e^τ] = r̄."""
        s = RECURRENCE_LOG_STD
        tau = torch.normal(math.log(self.options.mean_recurrence) - s * s / 2, s, (1,), generator=generator)
        return 1 + int(torch.poisson(tau.exp(), generator=generator).item())

    def end_to_end_loss(self, batch, generator):
        inputs, targets = batch[:, :-1], batch[:, 1:]
        passes = self.training_recurrence(generator)
        logits = self.recur(self.prelude(inputs), passes, generator, self.options.backprop_depth)
        return dx.weighted_cross_entropy(logits, targets, logits.new_ones(len(batch)))

    # --- DiffusionBlocks: the core as one denoiser --------------------------------------------------
    def denoise(self, e: torch.Tensor, z: torch.Tensor, z_in: torch.Tensor, sigma: torch.Tensor,
                layers: range) -> tuple[torch.Tensor, torch.Tensor]:
        """One core pass on (c_in·z, e) at σ, then the readout: (D, logits). `layers` is the
        one block's range (every layer); only the core and coda run here."""
        cond = self.model.sigma_embed(sigma)
        z_in = self.noisy_input(z, z_in, sigma)
        D = dx.denoise(self.core_pass(z_in, e, cond), z, sigma)
        return D, self.readout_logits(self.readout(D, cond), z, sigma)

    def block_loss(self, batch, block, plan, generator):
        inputs, targets = batch[:, :-1], batch[:, 1:]
        sigma = schedule.sample_sigmas(len(batch), plan.training_range(block), generator=generator,
                                       device=batch.device)
        z, z_in = dx.add_noise(self.target(targets), sigma, generator=generator)  # one σ per sequence
        _, logits = self.denoise(self.prelude(inputs), z, z_in, sigma, plan.layers(block))
        return dx.weighted_cross_entropy(logits, targets, dx.loss_weight(sigma)), sigma

    # --- evaluation and generation --------------------------------------------------------------
    def logits(self, tokens: torch.Tensor, plan, mode: str, passes: int, generator, normalized=None) -> torch.Tensor:
        """[N, T, V]: position j predicts character j + 1, after `passes` core passes."""
        e = self.prelude(tokens)
        if mode == "e2e":
            return self.recur(e, passes, generator)
        return self.run_chain(plan, e, (tokens.shape[1], self.options.width), passes, generator, normalized)

    def window_logits(self, windows, plan, mode, generator, passes=None, normalized=None):
        return self.logits(windows[:, :-1], plan, mode, passes or self.options.recurrence, generator, normalized)

    def context_length(self, mode: str) -> int:
        return self.options.seq_len - 1

    def next_logits(self, context, plan, mode, generator, steps=None):
        return self.logits(context, plan, mode, steps or self.options.recurrence, generator)[:, -1]

    def num_steps(self, plan, steps: int | None = None) -> int:
        return steps or self.options.recurrence

    def denoiser_inputs(self, windows):
        """(prelude features, ids of the targets) of `denoise` teacher-forced on `windows`."""
        return self.prelude(windows[:, :-1]), windows[:, 1:]

    def finish(self, plan, mode, out_dir):
        metrics = self.proper_scores(plan, mode)  # at K = model.recurrence
        if mode == "blocks":
            metrics["block_table"] = self.block_table(plan)  # one row per core pass
        for passes in self.options.eval_recurrences or ():
            scores = self.proper_scores(plan, mode, passes=passes)
            if mode == "e2e":  # a likelihood and the argmax's accuracy exist end to end only
                scores["test_ce"], scores["test_accuracy"] = self.window_metrics(plan, mode, passes=passes)
            metrics.update({f"{name}_K{passes}": value for name, value in scores.items()})
        metrics.update(self.generation_report(plan, mode))
        metrics.update(self.samples_for_report(plan, mode, out_dir))
        return metrics
