"""Autoregressive character LM as a DiffusionBlocks task (docs/method.md §6): the two-stream
attention layout, the model and the task; the base it shares with recurrent.py (metrics,
generation, `sample`) is charlm.py's `CharacterLM`.

Block-wise: the target of noisy token i is y_i = the embedding of character i,
L2-normalised to model.target_norm (0.25), noised per sequence (one σ per sequence,
z = y + σ·ε). The layers see [clean ; noisy] (length 2T) under the mask of docs/method.md
§6: clean row i attends to clean columns <= i (causal); noisy row i attends to clean
columns < i and to itself, never to another noisy token. A noisy token takes the rotary
position of the character it stands for. Readout at the noisy rows: final RMSNorm -> F;
D = c_skip·z + c_out·F; logits = head(adaLN(D)) (model.readout=posterior adds z's
log-likelihood ⟨z, y_v⟩/σ², charlm.likelihood_logits); loss λ(σ)·CE over the T positions
(`weighted_cross_entropy`). Only block b's layers run; the clean stream enters every
block as plain token embeddings.

Two choices depart from the paper's recipe, each measured (docs/method.md §6): the
target norm 0.25 (with norm 1 the blocks below σ ≈ 0.5 read the answer off z and only
copy), and noisy token i also carries the embedding of character i − 1
(model.previous_char), so its row computes as the end-to-end row i − 1 does instead of
spending its first layer on fetching that character. model.noisy_input=evidence feeds
z·r/(σ² + r²) (charlm.evidence) in place of c_in·z: it helps the noisiest block alone,
not the chain, so it is not the default.

Generation (and the teacher-forced validation metrics): B Euler steps from σ_max·ε, each
block once (`sampler.denoise_chain`, the expected target r·softmax(logits)·Ê between
steps), greedy readout of the last step. The validation pass denoises all T noisy
tokens of a window at once; since noisy tokens never see each other, each one is exactly
a generation step teacher-forced on the true prefix. Generating one character runs the
clean prefix plus one noisy token: the noisy token stands at the last position, and the
clean slot at that position (a placeholder) is hidden from it by the mask.

End-to-end baseline (--mode e2e): the same modules as a plain causal LM over the clean
characters (is_causal attention), a learned constant in place of the σ-embedding (as
vit.py), logits = head(adaLN(final_norm(h))), next-character cross-entropy.

Metrics: charlm.py (proper scores in both modes, MAUVE of held-out continuations, and
block-wise the per-level table that shows whether a block only copies)."""

import functools
from dataclasses import dataclass

import torch
from torch import nn

import diffusionblocks_ext as dx

from .. import schedule
from ..errors import raise_first
from .charlm import CharacterLM, check_text_options
from .layers import AdaptiveNorm, LevelEmbedder, LlamaLayer, RMSNorm, rotary_tables


# --- the 2T layout ---------------------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def two_stream_mask(clean: int, noisy: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean attention mask [clean + noisy, clean + noisy] on `device`, True = may attend.
    Rows and columns are the clean tokens (positions 0..clean−1), then the noisy tokens, which
    stand at the last `noisy` positions (clean − noisy .. clean − 1). Clean i sees clean j <= i;
    noisy at position p sees clean j < p and itself. Built once per shape and device."""
    if not 1 <= noisy <= clean:
        raise ValueError(f"two_stream_mask: expected 1 <= noisy <= clean, got noisy={noisy}, clean={clean}")
    columns = torch.arange(clean, device=device)
    noisy_positions = torch.arange(clean - noisy, clean, device=device)
    mask = torch.zeros(clean + noisy, clean + noisy, dtype=torch.bool, device=device)
    mask[:clean, :clean] = columns[None, :] <= columns[:, None]
    mask[clean:, :clean] = columns[None, :] < noisy_positions[:, None]
    mask[clean:, clean:] = torch.eye(noisy, dtype=torch.bool, device=device)
    return mask


def two_stream_positions(clean: int, noisy: int) -> list[int]:
    return list(range(clean)) + list(range(clean - noisy, clean))


# --- the autoregressive task ----------------------------------------------------------------------
@dataclass
class ARConfig:
    layers: int = 8
    width: int = 64
    heads: int = 4
    seq_len: int = 64                    # T characters per training window
    dataset: str = "text"                # "text" (model.data, a UTF-8 file, or the pydoc topics) or "text8"
    data: str = ""                       # text: a UTF-8 file, "" = the pydoc topics; text8: text8.zip, the
                                         # extracted file or its folder, "" = the cache (downloaded once)
    inference_steps: int = 0             # N Euler levels per generated character; 0 = B
    inference_schedule: str = "cdf"      # "cdf" (docs/method.md §5) or "karras" (ρ = 7)
    normalized_inference_embedding: bool = True
    target_norm: float = 0.25            # norm of the target y (charlm.py says why not 1)
    tied_target_embedding: bool = False  # the targets use the clean tokens' embedding table
    noisy_input: str = "c_in"            # what the layers get of z: "c_in" or "evidence" (charlm.NOISY_INPUTS)
    readout: str = "head"                # the logits: "head" or "posterior" (+ log-likelihood of z; charlm.READOUTS)
    previous_char: bool = True           # the noisy token at p also carries character p − 1
    eval_split: str = "validation"       # held-out split evaluated: "validation" or "test" (text8 only)
    eval_windows: int = 256              # windows of seq_len characters evaluated; 0 = all of the split (charlm.py)
    sample_tokens: int = 200             # characters generated per prompt at the end of a run
    quality_prompts: int = 400           # held-out prompts continued for MAUVE at the end of a run; 0 = none
    quality_prompt_chars: int = 32       # characters of each prompt
    quality_chars: int = 32              # characters generated after each prompt
    evaluator: str = "default"           # the evaluator LM of MAUVE (charlm.EVALUATORS)

    def check(self, config) -> None:
        raise_first(check_text_options(self, config) + [
            (self.layers >= 1, f"model.layers: expected at least 1, got {self.layers}"),
            (self.inference_steps >= 0,
             f"model.inference_steps: expected >= 0 (0 = B), got {self.inference_steps}"),
        ])


class ARModel(nn.Module):
    def __init__(self, options: ARConfig, vocab_size: int):
        super().__init__()
        width = options.width
        # Shared modules (used by every block).
        self.token_embed = nn.Embedding(vocab_size, width)                 # clean stream
        # y = normalize(E[token]); with model.tied_target_embedding E is token_embed's table
        self.target_embed = None if options.tied_target_embedding else nn.Parameter(torch.randn(vocab_size, width))
        self.noisy_embed = nn.Parameter(0.02 * torch.randn(width))         # marks the noisy stream
        self.e2e_cond = nn.Parameter(torch.randn(1, width))  # end-to-end only: stands in for the σ-embedding
        self.sigma_embed = LevelEmbedder(width, dx.c_noise)
        self.final_norm = RMSNorm(width)
        self.head_norm = AdaptiveNorm(width)
        self.head = nn.Linear(width, vocab_size)
        # The residual layers the partition cuts into blocks.
        self.layers = nn.ModuleList(LlamaLayer(width, options.heads) for _ in range(options.layers))

    def logits(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_norm(h, cond))


class AutoregressiveLM(CharacterLM):
    """Next-character prediction on the character corpus (text.py), see the module docstring."""

    name = "ar"
    Config = ARConfig
    presets = {
        # 8 Llama layers of width 64, B = 4 (2 layers per block), γ = 0.1 as docs/method.md §6 for text.
        "ar-text": lambda: dict(model=ARConfig(), blocks=4, gamma=0.1, e2e_steps=500, batch_size=32,
                                warmup_e2e_steps=25, checkpoint_every=250),
        # For tests: seconds, not minutes.
        "ar-text-tiny": lambda: dict(
            model=ARConfig(layers=2, width=16, heads=2, seq_len=12, eval_windows=4, sample_tokens=6, quality_prompts=0,
                           quality_prompt_chars=4, quality_chars=4, evaluator="tiny"),
            blocks=2, gamma=0.1, e2e_steps=4, warmup_e2e_steps=1, batch_size=4, checkpoint_every=4, threads=1),
        # text8 at the paper's text shape: 12 Llama layers of width 768, 12 heads, 256-character
        # windows, B = 4 (3 layers per block), γ = 0.1, AdamW 3e-4 with weight decay 0.03 (the
        # paper's text optimizer, as mdm-text8), batch 256. The AR recipe of this project stays
        # (target norm 0.25, previous_char, the MAUVE pass). The budget, 20 epochs end to end
        # (27,466 steps of 256 windows; block-wise 4× the steps), is our choice: our sources
        # do not print the paper's.
        "ar-text8": lambda: dict(
            model=ARConfig(dataset="text8", seq_len=256, layers=12, width=768, heads=12),
            blocks=4, gamma=0.1, lr=3e-4, weight_decay=0.03, batch_size=256, e2e_epochs=20,
            warmup_e2e_steps=2000, checkpoint_every=5000, threads=0),
        # For tests: one epoch of a ~100K-character text8 fixture (model.data=...) in seconds.
        "ar-text8-tiny": lambda: dict(
            model=ARConfig(dataset="text8", layers=2, width=16, heads=2, seq_len=32, eval_windows=4, sample_tokens=6,
                           quality_prompts=0, quality_prompt_chars=4, quality_chars=4, evaluator="tiny"),
            blocks=2, gamma=0.1, e2e_epochs=1, warmup_e2e_steps=2, batch_size=32, checkpoint_every=50, threads=1),
    }

    def __init__(self, options: ARConfig):
        super().__init__(options)
        self.model = ARModel(options, self.corpus.vocab_size)
        self.head_dim = options.width // options.heads

    # --- training (task.py) ---------------------------------------------------------------
    def block_loss(self, batch, block, plan, generator):
        sigma = schedule.sample_sigmas(len(batch), plan.training_range(block), generator=generator,
                                       device=batch.device)
        z, z_in = dx.add_noise(self.target(batch), sigma, generator=generator)  # one σ per sequence
        _, logits = self.denoise(batch, z, z_in, sigma, plan.layers(block))
        return dx.weighted_cross_entropy(logits, batch, dx.loss_weight(sigma)), sigma

    def end_to_end_loss(self, batch, generator):
        logits = self.end_to_end(batch)[:, :-1]
        return dx.weighted_cross_entropy(logits, batch[:, 1:], logits.new_ones(len(batch)))

    # --- the pieces the sampler chains (sampler.py) ---------------------------------------
    def two_stream(self, clean: torch.Tensor, z_in: torch.Tensor, cond: torch.Tensor,
                   layers: range) -> torch.Tensor:
        """`layers` on [clean tokens [N, Tc] ; noisy inputs c_in·z [N, Tn, d]], the noisy
        tokens at the last Tn positions; returns the hidden states [N, Tc + Tn, d]."""
        m = self.model
        clean_len, noisy_len = clean.shape[1], z_in.shape[1]
        tokens = m.token_embed(clean)
        noisy = z_in + m.noisy_embed
        if self.options.previous_char:
            # Noisy token p also carries character p − 1 (which it may see anyway), so its
            # row computes as the end-to-end row p − 1 does; position 0 has none.
            before = torch.cat([torch.zeros_like(tokens[:, :1]), tokens[:, :-1]], dim=1)
            noisy = noisy + before[:, clean_len - noisy_len:]
        x = torch.cat([tokens, noisy], dim=1)
        rope = rotary_tables(two_stream_positions(clean_len, noisy_len), self.head_dim, device=x.device)
        mask = two_stream_mask(clean_len, noisy_len, x.device)
        for index in layers:
            x = m.layers[index](x, cond, rope, mask)
        return x

    def denoise(self, clean: torch.Tensor, z: torch.Tensor, z_in: torch.Tensor, sigma: torch.Tensor,
                layers: range) -> tuple[torch.Tensor, torch.Tensor]:
        """(D, logits) [N, Tn, ·] at the noisy rows of `two_stream`."""
        m = self.model
        cond = m.sigma_embed(sigma)
        z_in = self.noisy_input(z, z_in, sigma)
        h = self.two_stream(clean, z_in, cond, layers)[:, clean.shape[1]:]
        D = dx.denoise(m.final_norm(h), z, sigma)
        return D, self.readout_logits(m.logits(D, cond), z, sigma)

    def end_to_end(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [N, T, V] of the plain causal LM: position t predicts character t + 1."""
        m = self.model
        x = m.token_embed(tokens)
        rope = rotary_tables(range(tokens.shape[1]), self.head_dim, device=x.device)
        cond = m.e2e_cond.expand(len(tokens), -1)
        for layer in m.layers:
            x = layer(x, cond, rope)
        return m.logits(m.final_norm(x), cond)

    # --- evaluation and generation ----------------------------------------------------------
    def num_steps(self, plan, steps: int | None = None) -> int:
        return steps or self.options.inference_steps or plan.num_blocks

    def chain(self, plan, clean, noisy_len, generator, steps=None, normalized=None) -> torch.Tensor:
        """Logits [N, noisy_len, V] of the last level of the Euler chain over the blocks."""
        return self.run_chain(plan, clean, (noisy_len, self.options.width), self.num_steps(plan, steps), generator,
                              normalized)

    def window_logits(self, windows, plan, mode, generator, steps=None, normalized=None):
        if mode == "e2e":
            return self.end_to_end(windows)[:, :-1]
        return self.chain(plan, windows, windows.shape[1], generator, steps, normalized)[:, 1:]

    def context_length(self, mode: str) -> int:
        # Block-wise, noisy position T−1 (the last trained) sees T−1 clean characters.
        return self.options.seq_len if mode == "e2e" else self.options.seq_len - 1

    def needs_prompt(self, mode: str) -> bool:
        return mode == "e2e"  # block-wise, noisy position 0 predicts the first character from nothing

    def next_logits(self, context, plan, mode, generator, steps=None):
        if mode == "e2e":
            return self.end_to_end(context)[:, -1]
        placeholder = context.new_zeros(len(context), 1)  # hidden from the noisy token
        return self.chain(plan, torch.cat([context, placeholder], dim=1), 1, generator, steps)[:, -1]

    def denoiser_inputs(self, windows):
        """(clean inputs, ids of the noisy targets) of `denoise` teacher-forced on `windows`:
        the clean stream is the window itself and every position is a target."""
        return windows, windows

    def finish(self, plan, mode, out_dir):
        metrics = self.proper_scores(plan, mode)
        if mode == "blocks":
            metrics["block_table"] = self.block_table(plan)
        metrics.update(self.generation_report(plan, mode))
        metrics.update(self.samples_for_report(plan, mode, out_dir))
        return metrics
