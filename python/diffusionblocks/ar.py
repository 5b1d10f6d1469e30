"""Autoregressive character LM as a DiffusionBlocks task (SPEC §6, issue 5), and the
pieces the character-level LM tasks share (`CharacterLM`; recurrent.py uses them too).

Block-wise: the target of noisy token i is y_i = the L2-normalised embedding of character
i, noised per sequence (one σ per sequence, z = y + σ·ε). The layers see [clean ; noisy]
(length 2T) under the mask of SPEC §6: clean row i attends to clean columns <= i (causal);
noisy row i attends to clean columns < i and to itself, never to another noisy token.
A noisy token takes the rotary position of the character it stands for. Readout at the
noisy rows: final RMSNorm -> F; D = c_skip·z + c_out·F; logits = head(adaLN(D)); loss
λ(σ)·CE over the T positions (`weighted_cross_entropy`). Only block b's layers run; the
clean stream enters every block as plain token embeddings.

Generation (and the teacher-forced validation metrics): B Euler steps from σ_max·ε, each
block once (`sampler.denoise_chain`, expected embedding softmax(logits)·E between steps as
for ViT), greedy readout of the last step. The validation pass denoises all T noisy
tokens of a window at once; since noisy tokens never see each other, each one is exactly
a generation step teacher-forced on the true prefix. Generating one character runs the
clean prefix plus one noisy token: the noisy token stands at the last position, and the
clean slot at that position (a placeholder) is hidden from it by the mask.

End-to-end baseline (--mode e2e): the same modules as a plain causal LM over the clean
characters (is_causal attention), a learned constant in place of the σ-embedding (as
vit.py), logits = head(adaLN(final_norm(h))), next-character cross-entropy.

Metrics (both modes, the same windows and the same predictions): character j of each
validation window predicted from characters < j, j = 1..T−1: `test_ce` (nats per
character) and `test_accuracy` on the held-out split of text.py; block-wise, from the
readout of the last Euler level. Read them knowing what the chain is: a sampler. It ends
on one character (the last readout puts probability ≈ 1 on it), so block-wise
test_accuracy is the chance that a sample is right and test_ce that of a near one-hot
guess. The model's predictive distribution p(x_i | x_<i) is the readout of the first
level (σ_max, where z carries nothing): `test_ce_by_level[0]` in the report, which lists
every level's readout."""

import functools
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import diffusionblocks_ext as dx

from . import sampler, schedule, text
from .errors import ConfigError, raise_first
from .layers import AdaptiveNorm, SigmaEmbedder
from .llama import LlamaLayer, RMSNorm, rotary_tables
from .task import SampleRequest, device_of

EVAL_SEED = 0        # the sampler's starting noise at evaluation: fixed, so evaluation is repeatable
EVAL_BATCH = 64      # validation windows per forward pass
SAMPLE_PROMPTS = 3   # prompts for the samples at the end of a run: the starts of validation chunks
PROMPT_LENGTH = 40


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


# --- what the character-level LMs share ---------------------------------------------------------
def check_text_options(options, config) -> list[tuple[bool, str]]:
    """The checks of the fields every character-LM config has."""
    return [
        (options.width >= 1 and options.heads >= 1 and options.width % options.heads == 0
         and (options.width // options.heads) % 2 == 0,
         f"model.width: expected a multiple of model.heads={options.heads} with an even head size "
         f"(rotary positions), got {options.width}"),
        (options.seq_len >= 2, f"model.seq_len: expected at least 2, got {options.seq_len}"),
        (not options.data or Path(options.data).is_file(), f"model.data: no such file {options.data!r}"),
        (options.eval_windows >= 1, f"model.eval_windows: expected at least 1, got {options.eval_windows}"),
        (options.sample_tokens >= 0, f"model.sample_tokens: expected >= 0, got {options.sample_tokens}"),
        (options.inference_schedule in schedule.INFERENCE_SCHEDULES,
         f"model.inference_schedule: expected one of {', '.join(schedule.INFERENCE_SCHEDULES)}, "
         f"got {options.inference_schedule!r}"),
    ]


class LayerCallCounter:
    """Counts forward calls of `layers` inside a `with` block (what `sample` reports)."""

    def __init__(self, layers):
        self.layers, self.calls, self._handles = layers, 0, []

    def _count(self, module, args):
        self.calls += 1

    def __enter__(self):
        self._handles = [layer.register_forward_pre_hook(self._count) for layer in self.layers]
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        return False


class _Recorder:
    """A denoiser that passes through to the task and keeps every level's logits."""

    def __init__(self, task):
        self.task, self.outputs = task, []

    def denoise(self, *args):
        D, logits = self.task.denoise(*args)
        self.outputs.append(logits)
        return D, logits

    def sampler_estimate(self, D, logits):
        return self.task.sampler_estimate(D, logits)


class CharacterLM:
    """Corpus, validation metrics, greedy generation and `sample` for a character LM task.
    A subclass defines `window_logits(windows, plan, mode, generator)` -> [W, T−1, V]
    (position j predicts character j+1 of each window), `next_logits(context, plan, mode,
    generator, steps)` -> [n, V] and `context_length(mode)`."""

    level_name = "sigma"

    def __init__(self, options):
        self.options = options
        try:
            self.corpus = text.load(options.data)
            self.validation = text.validation_windows(self.corpus.validation, options.seq_len,
                                                      options.eval_windows)
            if len(self.corpus.train) < options.seq_len:
                raise ValueError(f"model.seq_len: {options.seq_len} exceeds the "
                                 f"{len(self.corpus.train)} training characters")
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise ConfigError(str(error) if str(error).startswith("model.") else f"model.data: {error}") from None

    # --- training (task.py) ---------------------------------------------------------------
    def train_batch(self, step, batch_size, seed, generator):
        return text.train_batch(self.corpus.train, batch_size, self.options.seq_len, generator)

    def no_weight_decay(self):
        return set()

    # --- the target y and the sampler's estimate of it (model.target_embed: [V, d]) -------------
    def target(self, tokens: torch.Tensor) -> torch.Tensor:
        """y: the L2-normalised target embedding of each token."""
        return F.normalize(self.model.target_embed[tokens], dim=-1)

    def sampler_estimate(self, D, logits):
        """The expected target embedding softmax(logits)·E (SPEC §6; the normalised E unless
        model.normalized_inference_embedding is false, as in the authors' ViT code)."""
        embedding = self.model.target_embed
        if self.options.normalized_inference_embedding:
            embedding = F.normalize(embedding, dim=-1)
        return logits.softmax(dim=-1) @ embedding

    # --- evaluation -------------------------------------------------------------------------
    def evaluate(self, plan, mode):
        ce, accuracy = self.window_metrics(plan, mode)
        return {"test_ce": ce, "test_accuracy": accuracy}

    def validation_batches(self):
        """The validation windows (kept on the CPU with the corpus), EVAL_BATCH at a time, on
        the model's device."""
        device = device_of(self.model)
        return (windows.to(device) for windows in self.validation.split(EVAL_BATCH))

    @torch.no_grad()
    def window_metrics(self, plan, mode, **kwargs) -> tuple[float, float]:
        """(cross-entropy in nats per character, accuracy) of the validation windows."""
        generator = torch.Generator().manual_seed(EVAL_SEED)
        total_ce, correct, count = 0.0, 0, 0
        for windows in self.validation_batches():
            logits = self.window_logits(windows, plan, mode, generator, **kwargs)
            targets = windows[:, 1:]
            total_ce += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                        reduction="sum").item()
            correct += (logits.argmax(dim=-1) == targets).sum().item()
            count += targets.numel()
        return total_ce / count, correct / count

    @torch.no_grad()
    def metrics_by_level(self, plan, mode, **kwargs) -> tuple[list[float], list[float]]:
        """Block-wise: (cross-entropy, accuracy) of the readout at every level of the Euler
        chain, noisiest first; the last level's are window_metrics'."""
        recorder = _Recorder(self)
        generator = torch.Generator().manual_seed(EVAL_SEED)
        ce, correct = [], []
        for windows in self.validation_batches():
            recorder.outputs = []
            self.window_logits(windows, plan, mode, generator, denoiser=recorder, **kwargs)
            targets = windows[:, 1:]
            levels = [out[:, out.shape[1] - targets.shape[1]:] for out in recorder.outputs]  # align to targets
            ce.append([F.cross_entropy(out.reshape(-1, out.shape[-1]), targets.reshape(-1), reduction="sum").item()
                       for out in levels])
            correct.append([(out.argmax(dim=-1) == targets).sum().item() for out in levels])
        count = self.validation[:, 1:].numel()
        return [sum(c) / count for c in zip(*ce)], [sum(c) / count for c in zip(*correct)]

    # --- generation -------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, plan, mode, prompt: torch.Tensor, tokens: int, count: int,
                 generator: torch.Generator, steps: int | None = None) -> torch.Tensor:
        """[count, len(prompt) + tokens] on the CPU (for decoding): the prompt, then greedy
        characters, each predicted from the last context_length(mode) characters."""
        sequences = prompt.to(device_of(self.model)).expand(count, -1).clone()
        window = self.context_length(mode)
        for _ in range(tokens):
            context = sequences[:, max(0, sequences.shape[1] - window):]
            logits = self.next_logits(context, plan, mode, generator, steps)
            sequences = torch.cat([sequences, logits.argmax(dim=-1, keepdim=True)], dim=1)
        return sequences.cpu()

    def default_prompts(self) -> list[str]:
        """The starts of the first validation chunks: held-out text the model never saw."""
        ids = self.corpus.validation
        prompts = [self.corpus.decode(ids[i * text.CHUNK: i * text.CHUNK + PROMPT_LENGTH])
                   for i in range(SAMPLE_PROMPTS) if i * text.CHUNK + PROMPT_LENGTH <= len(ids)]
        return prompts or [self.corpus.decode(ids[:PROMPT_LENGTH])]  # a short file: its held-out start

    def needs_prompt(self, mode: str) -> bool:
        """Whether generation needs at least one character to start from."""
        return True

    def sample(self, plan, mode, request: SampleRequest) -> dict:
        for name, value in (("cfg", request.cfg), ("class", request.label)):
            if value is not None:
                raise ConfigError(f"{name}: the {self.name} task generates text; it has no {name}")
        if request.sampler != "euler":
            raise ConfigError(f"sampler: the {self.name} task samples with Euler steps only")
        prompt_text = self.default_prompts()[0] if request.prompt is None else request.prompt
        try:
            prompt = self.corpus.encode(prompt_text)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if len(prompt) == 0 and self.needs_prompt(mode):
            raise ConfigError(f"prompt: the {self.name} task ({mode}) needs at least one character to continue")
        tokens = self.options.sample_tokens if request.tokens is None else request.tokens
        count = request.count or 1
        started = time.perf_counter()
        with LayerCallCounter(self.model.layers) as counter:
            ids = self.generate(plan, mode, prompt, tokens, count, torch.Generator().manual_seed(request.seed),
                                request.steps)
        seconds = time.perf_counter() - started
        continuations = [self.corpus.decode(row[len(prompt):]) for row in ids]
        summary = {"prompt": prompt_text, "continuations": continuations, "tokens": tokens, "count": count,
                   "seed": request.seed, "mode": mode, "layer_evals": counter.calls,
                   "seconds": round(seconds, 3)}
        out = request.out or (Path(request.run_dir) / "samples-cli.txt" if request.run_dir else None)
        if out is not None:
            out = Path(out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text("".join(f"--- prompt ---\n{prompt_text}\n--- continuation {i} ---\n{c}\n"
                                   for i, c in enumerate(continuations)), encoding="utf-8")
            summary["file"] = str(out)
        return summary

    def samples_for_report(self, plan, mode, out_dir) -> dict:
        """Greedy continuations of the default prompts, written to out_dir/samples.txt."""
        if self.options.sample_tokens == 0:
            return {}
        samples, lines, layer_evals, seconds = [], [], 0, 0.0
        for seed, prompt in enumerate(self.default_prompts()):  # independent starting noise per prompt
            summary = self.sample(plan, mode, SampleRequest(prompt=prompt, seed=seed))
            samples.append({"prompt": prompt, "continuation": summary["continuations"][0]})
            lines.append(f"--- prompt ---\n{prompt}\n--- continuation ({mode}) ---\n{summary['continuations'][0]}\n")
            layer_evals += summary["layer_evals"]
            seconds += summary["seconds"]
        if out_dir is not None:
            (Path(out_dir) / "samples.txt").write_text("".join(lines), encoding="utf-8")
        return {"samples": samples, "sample_layer_evals": layer_evals, "sample_seconds": round(seconds, 3)}


# --- the autoregressive task ----------------------------------------------------------------------
@dataclass
class ARConfig:
    layers: int = 8
    width: int = 64
    heads: int = 4
    seq_len: int = 64                    # T characters per training window
    data: str = ""                       # a UTF-8 text file; "" = the pydoc_data topics (text.py)
    inference_steps: int = 0             # N Euler levels per generated character; 0 = B
    inference_schedule: str = "cdf"      # "cdf" (SPEC §5) or "karras" (ρ = 7)
    normalized_inference_embedding: bool = True
    eval_windows: int = 256              # validation windows of seq_len characters
    sample_tokens: int = 200             # characters generated per prompt at the end of a run

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
        self.target_embed = nn.Parameter(torch.randn(vocab_size, width))   # y = normalize(E[token])
        self.noisy_embed = nn.Parameter(0.02 * torch.randn(width))         # marks the noisy stream
        self.e2e_cond = nn.Parameter(torch.randn(1, width))  # end-to-end only: stands in for the σ-embedding
        self.sigma_embed = SigmaEmbedder(width)
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
        # 8 Llama layers of width 64, B = 4 (2 layers per block), γ = 0.1 as SPEC §6 for text.
        "ar-text": lambda: dict(model=ARConfig(), blocks=4, gamma=0.1, e2e_steps=500, batch_size=32,
                                warmup_e2e_steps=25, checkpoint_every=250),
        # For tests: seconds, not minutes.
        "ar-text-tiny": lambda: dict(
            model=ARConfig(layers=2, width=16, heads=2, seq_len=12, eval_windows=4, sample_tokens=6),
            blocks=2, gamma=0.1, e2e_steps=4, warmup_e2e_steps=1, batch_size=4, checkpoint_every=4, threads=1),
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
        x = torch.cat([m.token_embed(clean), z_in + m.noisy_embed], dim=1)
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
        h = self.two_stream(clean, z_in, cond, layers)[:, clean.shape[1]:]
        D = dx.denoise(m.final_norm(h), z, sigma)
        return D, m.logits(D, cond)

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

    def chain(self, plan, clean, noisy_len, generator, steps=None, denoiser=None) -> torch.Tensor:
        """Logits [N, noisy_len, V] of the last level of the Euler chain over the blocks."""
        return sampler.denoise_chain(denoiser or self, plan, clean, (noisy_len, self.options.width),
                                     self.num_steps(plan, steps), generator, self.options.inference_schedule)

    def window_logits(self, windows, plan, mode, generator, steps=None, denoiser=None):
        if mode == "e2e":
            return self.end_to_end(windows)[:, :-1]
        return self.chain(plan, windows, windows.shape[1], generator, steps, denoiser)[:, 1:]

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

    def finish(self, plan, mode, out_dir):
        metrics = {}
        if mode == "blocks":
            # The readout of every Euler level (the last one gives test_ce): what each block adds.
            metrics["test_ce_by_level"], metrics["test_accuracy_by_level"] = self.metrics_by_level(plan, mode)
            # SPEC §6 leaves the sampler's E open (as vit.py): the other choice on the same weights.
            configured = self.options.normalized_inference_embedding
            self.options.normalized_inference_embedding = not configured
            try:
                other = "unnormalized" if configured else "normalized"
                metrics[f"test_ce_{other}_E"], metrics[f"test_accuracy_{other}_E"] = self.window_metrics(plan, mode)
            finally:
                self.options.normalized_inference_embedding = configured
        metrics.update(self.samples_for_report(plan, mode, out_dir))
        return metrics

