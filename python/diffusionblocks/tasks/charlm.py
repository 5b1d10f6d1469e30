"""What the two character-level LM tasks (ar.py, recurrent.py) share: the base class
`CharacterLM` (the corpus of model.dataset and the evaluation windows of model.eval_split,
from data/corpora.py; the target y and the sampler's estimate of it, the metrics,
generation and `sample`), the checks of the config fields both have, and a counter of
layer calls. "Validation" below means the held-out split of model.eval_split (validation
by default, text8's test split where chosen). model.eval_windows=0 evaluates every window of
that split: on text8's 5M characters at seq_len 256 that is 19,531 windows, 76× the default
256, in each metric pass (block-wise a pass runs the B-level chain, twice for test_brier).

Metrics, the same estimator in both modes (docs/measuring.md says how to read them):
- teacher-forced, character j of each validation window predicted from characters < j:
  `test_brier`, the Brier score (exact end to end; block-wise estimated without bias from
  two independent chains, since the chain draws a sample rather than giving a
  distribution) and `test_sample_accuracy`, the chance that a sample is right. End to end
  also `test_ce` (nats per character) and `test_accuracy` of the argmax; block-wise there
  is no likelihood to report.
- generation: `mauve` (± `mauve_std`) of continuations of held-out prompts against the
  true continuations, on the features of an evaluator LM (text_quality.py), for every
  decoding, beside a reference row, evaluator bits per character, distinct-4 and entropy
  (`generation` in the report).
- block-wise, `block_table`: per level of the chain, whether its block adds anything to
  what its noisy input already tells."""

import time
from pathlib import Path

import torch
import torch.nn.functional as F

import diffusionblocks_ext as dx

from .. import sampler, schedule
from ..errors import ConfigError, one_of
from ..task import SampleRequest, device_of
from . import text_quality
from .data import corpora, text

EVAL_SEED = 0        # the sampler's starting noise at evaluation: fixed, so evaluation is repeatable
EVAL_BATCH = 64      # validation windows per forward pass
SAMPLE_PROMPTS = 3   # prompts for the samples at the end of a run: the starts of validation chunks
PROMPT_LENGTH = 40
# The evaluator LM of the MAUVE pass (text_quality.py): "tiny" is for tests only.
EVALUATORS = {"default": {}, "tiny": dict(width=16, layers=1, heads=2, seq_len=16, batch_size=4, steps=4,
                                            warmup_steps=1)}
SAMPLING_SEEDS = (0, 1)  # generation seeds of the MAUVE pass (each scored with text_quality.SEEDS)


def evaluator_config(options) -> text_quality.EvaluatorConfig:
    """The evaluator LM's config that model.evaluator names."""
    return text_quality.EvaluatorConfig(**EVALUATORS.get(options.evaluator, {}))


def check_text_options(options, config) -> list[tuple[bool, str]]:
    """The checks of the fields every character-LM config has."""
    return [
        (options.width >= 1 and options.heads >= 1 and options.width % options.heads == 0
         and (options.width // options.heads) % 2 == 0,
         f"model.width: expected a multiple of model.heads={options.heads} with an even head size "
         f"(rotary positions), got {options.width}"),
        (options.seq_len >= 2, f"model.seq_len: expected at least 2, got {options.seq_len}"),
        *corpora.option_checks(options),
        (options.sample_tokens >= 0, f"model.sample_tokens: expected >= 0, got {options.sample_tokens}"),
        one_of("model.inference_schedule", options.inference_schedule, schedule.INFERENCE_SCHEDULES),
        (options.target_norm > 0, f"model.target_norm: expected > 0, got {options.target_norm:g}"),
        (options.quality_prompts >= 0, f"model.quality_prompts: expected >= 0 (0 = no MAUVE pass), "
                                       f"got {options.quality_prompts}"),
        (options.quality_prompt_chars >= 1,
         f"model.quality_prompt_chars: expected at least 1, got {options.quality_prompt_chars}"),
        (options.quality_chars >= 1, f"model.quality_chars: expected at least 1, got {options.quality_chars}"),
        one_of("model.evaluator", options.evaluator, EVALUATORS),
        (options.quality_prompt_chars + options.quality_chars <= evaluator_config(options).seq_len,
         f"model.quality_chars: prompt and continuation ({options.quality_prompt_chars} + {options.quality_chars}) "
         f"exceed the {evaluator_config(options).seq_len} characters the evaluator LM reads"),
        one_of("model.noisy_input", options.noisy_input, NOISY_INPUTS),
        one_of("model.readout", options.readout, READOUTS),
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


def brier_exact(probabilities: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The Brier score ‖p − e_y‖² = 1 − 2·p_y + Σ_v p_v² of each prediction: probabilities
    [..., V], targets [...] -> [...]. A proper score: lowest, in expectation, for the true
    distribution; 0 for a sure right answer, 2 for a sure wrong one."""
    p_y = probabilities.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return 1 - 2 * p_y + probabilities.square().sum(-1)


def brier_from_two_samples(first: torch.Tensor, second: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """An unbiased estimate of brier_exact(p, y) from two independent draws of p (token ids
    [...], as the Euler chain gives them: a sample, not a distribution): E 1[s = y] = p_y
    and E 1[s1 = s2] = Σ_v p_v², so 1 − 1[s1 = y] − 1[s2 = y] + 1[s1 = s2] has the mean
    1 − 2·p_y + Σ_v p_v²."""
    hit = lambda s: (s == targets).double()  # noqa: E731
    return 1 - hit(first) - hit(second) + (first == second).double()


# How a character is chosen from next-character logits. Block-wise the logits are the chain's
# last readout, which is nearly one-hot on the character the chain drew, so "greedy" there
# returns a sample; end to end, "greedy" is the argmax and "ancestral" the like-for-like draw.
DECODINGS = ("greedy", "ancestral", "top-p")
TOP_P = 0.95  # the nucleus of the paper's baseline decoding


def choose(logits: torch.Tensor, decoding: str, generator: torch.Generator, top_p: float = TOP_P) -> torch.Tensor:
    """Token ids [n] from logits [n, V]: the argmax ("greedy"), a draw from softmax(logits)
    at temperature 1 ("ancestral"), or a draw from the smallest set of most likely tokens
    whose probability reaches top_p, renormalised ("top-p"). Draws use one uniform per row
    from `generator` (a CPU generator), by inverse CDF, so they are the same on any device."""
    if decoding == "greedy":
        return logits.argmax(dim=-1)
    p = logits.float().softmax(dim=-1)
    if decoding == "top-p":
        sorted_p, order = p.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(dim=-1) - sorted_p          # mass of the more likely tokens
        sorted_p = sorted_p.masked_fill(before >= top_p, 0)  # keeps the token that crosses top_p
        p = torch.zeros_like(p).scatter(-1, order, sorted_p)
        p = p / p.sum(dim=-1, keepdim=True)
    u = torch.rand(len(p), 1, generator=generator, dtype=torch.float64).to(p.device)
    cdf = p.double().cumsum(dim=-1)
    return (cdf < u * cdf[:, -1:]).sum(dim=-1).clamp(max=p.shape[-1] - 1)


def evidence(z: torch.Tensor, sigma: torch.Tensor, target_norm: float) -> torch.Tensor:
    """What the noisy target z [N, ..., d] tells about y, as the layers' input in place of
    c_in·z: z·r/(σ² + r²) for targets of norm r. Under Gaussian noise ⟨z, y⟩/σ² is the log-
    likelihood of y, so for σ ≫ r this is that evidence, and it fades with σ: at σ_max it is
    nearly 0 where c_in·z is unit-variance noise that 2 layers must learn to ignore. For
    σ ≪ r it tends to y/r, of unit norm; its noise is at most 1/2 per dimension (at σ = r)."""
    r = target_norm
    variance = sigma.double().reshape((-1,) + (1,) * (z.dim() - 1)).square()
    return (z * (r / (variance + r * r))).to(z.dtype)


NOISY_INPUTS = ("evidence", "c_in")
READOUTS = ("head", "posterior")


def likelihood_logits(z: torch.Tensor, sigma: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log N(z; y_v, σ²I) for every target y_v (rows of `targets` [V, d], all of one norm),
    up to a constant per row of z: ⟨z, y_v⟩/σ². z [N, ..., d], σ [N] -> [N, ..., V]."""
    variance = sigma.reshape((-1,) + (1,) * (z.dim() - 1)).square()
    return (z / variance) @ targets.t()


class CharacterLM(corpora.TextBatches):
    """Corpus, metrics, generation and `sample` for a character LM task. A subclass defines
    `window_logits(windows, plan, mode, generator, normalized=None)` -> [W, T−1, V]
    (position j predicts character j+1 of each window; block-wise, `normalized` chooses the
    table of the chain's estimate), `next_logits(context, plan, mode, generator, steps)`
    -> [n, V], `context_length(mode)`, `num_steps(plan)` (the chain's levels) and
    `denoiser_inputs(windows)` (what `denoise` reads, teacher-forced)."""

    level_name = "sigma"

    def __init__(self, options):
        self.options = options
        data = corpora.load(options)
        # held_out: the ids of model.eval_split; validation: its evaluation windows [W, seq_len]
        self.corpus, self.held_out, self.validation = data.corpus, data.held_out, data.windows

    # --- training (task.py) ---------------------------------------------------------------
    def no_weight_decay(self):
        return set()

    # --- the target y and the sampler's estimate of it ---------------------------------------
    def target_table(self) -> torch.Tensor:
        """E [V, d], the learned target embeddings: model.target_embed, or with
        model.tied_target_embedding the clean tokens' table."""
        m = self.model
        return m.token_embed.weight if self.options.tied_target_embedding else m.target_embed

    def target(self, tokens: torch.Tensor) -> torch.Tensor:
        """y: the target embedding of each token, L2-normalised to model.target_norm."""
        return self.options.target_norm * F.normalize(self.target_table()[tokens], dim=-1)

    def every_target(self) -> torch.Tensor:
        """[V, d]: y of every token, row v the target of token v."""
        table = self.target_table()
        return self.target(torch.arange(len(table), device=table.device))

    def noisy_input(self, z: torch.Tensor, z_in: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """What the layers read of the noisy target: c_in·z (z_in, as given) or `evidence`."""
        return evidence(z, sigma, self.options.target_norm) if self.options.noisy_input == "evidence" else z_in

    def readout_logits(self, logits: torch.Tensor, z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The block's logits as model.readout says: the head's ("head"), or the head's plus
        the likelihood of z ("posterior"): then the head models p(y | context) and Bayes'
        rule adds what z tells, so no block spends its layers on reading the answer off z."""
        if self.options.readout == "head":
            return logits
        return logits + likelihood_logits(z, sigma, self.every_target())

    def run_chain(self, plan, inputs: torch.Tensor, target_shape: tuple[int, ...], steps: int, generator,
                  normalized: bool | None = None) -> torch.Tensor:
        """The logits of the last level of the Euler chain over `steps` levels, the subclass's
        `denoise` evaluating each. Between levels it hands on the expected target
        r·softmax(logits)·Ê over the targets' own table (unit rows Ê scaled to the target norm
        r, so the estimate is E[y] as the Euler step assumes), unless `normalized` (default:
        model.normalized_inference_embedding) says the raw table."""
        if normalized is None:
            normalized = self.options.normalized_inference_embedding
        scale = self.options.target_norm if normalized else 1.0  # the targets' own table r·Ê
        to_estimate = lambda D, logits: scale * sampler.expected_embedding(logits, self.target_table(), normalized)  # noqa: E731
        return sampler.denoise_chain(self.denoise, to_estimate, plan, inputs, target_shape, steps, generator,
                                     self.options.inference_schedule)

    # --- evaluation -------------------------------------------------------------------------
    def evaluate(self, plan, mode):
        """One pass over the validation windows. End to end: the cross-entropy (a likelihood)
        and the argmax's accuracy. Block-wise the chain's last readout is nearly one-hot on the
        character it drew, so its argmax is a sample: only its hit rate is reported, as
        test_sample_accuracy (finish adds the proper score of both modes)."""
        ce, accuracy = self.window_metrics(plan, mode)
        return {"test_ce": ce, "test_accuracy": accuracy} if mode == "e2e" else {"test_sample_accuracy": accuracy}

    def validation_batches(self):
        """The validation windows (kept on the CPU with the corpus), EVAL_BATCH at a time, on
        the model's device."""
        device = device_of(self.model)
        return (windows.to(device) for windows in self.validation.split(EVAL_BATCH))

    @torch.no_grad()
    def window_metrics(self, plan, mode, **kwargs) -> tuple[float, float]:
        """(cross-entropy in nats per character, argmax accuracy) of the validation windows."""
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
    def proper_scores(self, plan, mode, **kwargs) -> dict[str, float]:
        """Teacher-forced next-character scores that compare both modes like with like:
        test_brier (end to end exact, from softmax(logits); block-wise estimated without bias
        from two independent chains, each of which draws a sample) and test_sample_accuracy
        (the chance that a sample is right: mean p_y end to end, the chains' hit rate
        block-wise). `kwargs` go to window_logits (e.g. the recurrent task's passes)."""
        first, second = (torch.Generator().manual_seed(EVAL_SEED + k) for k in range(2))
        brier, hits, count = 0.0, 0.0, 0
        for windows in self.validation_batches():
            targets = windows[:, 1:]
            if mode == "e2e":
                p = self.window_logits(windows, plan, mode, first, **kwargs).float().softmax(dim=-1)
                brier += brier_exact(p, targets).sum().item()
                hits += p.gather(-1, targets.unsqueeze(-1)).sum().item()
            else:
                s1 = self.window_logits(windows, plan, mode, first, **kwargs).argmax(dim=-1)
                s2 = self.window_logits(windows, plan, mode, second, **kwargs).argmax(dim=-1)
                brier += brier_from_two_samples(s1, s2, targets).sum().item()
                hits += ((s1 == targets).sum().item() + (s2 == targets).sum().item()) / 2
            count += targets.numel()
        return {"test_brier": brier / count, "test_sample_accuracy": hits / count}

    @torch.no_grad()
    def block_table(self, plan, windows: int = EVAL_BATCH) -> list[dict]:
        """Does every block work? Block-wise, one row per level of the chain (noisiest first):
        the block that runs there, teacher-forced on the first `windows` validation windows
        with the true next character noised to the level's σ (z = y + σ·ε), against what its
        input alone already tells:
          accuracy, brier          the block's readout (argmax; Brier of its softmax)
          z_alone_accuracy         the nearest target embedding to z: a pure copier
          previous_and_z_accuracy  the previous level's readout (on its own noise draw) times
                                   z's Gaussian likelihood, the Bayes combination of the two
        A block whose accuracy is no better than max(z_alone, previous_and_z) adds nothing
        to its input. At the last level (σ_min) z names the character: every block copies."""
        generator = torch.Generator().manual_seed(EVAL_SEED)
        batch = self.validation[:windows].to(device_of(self.model))
        inputs, ids = self.denoiser_inputs(batch)
        targets = batch[:, 1:]
        y = self.target(ids)
        table = self.every_target()
        rows, previous = [], None
        for sigma_value in schedule.INFERENCE_SCHEDULES[self.options.inference_schedule](
                self.num_steps(plan)).tolist():
            sigma = torch.full((len(batch),), sigma_value, device=batch.device)
            z, z_in = dx.add_noise(y, sigma, generator=generator)
            block = int(plan.block_of(torch.tensor([sigma_value]))[0])
            _, logits = self.denoise(inputs, z, z_in, sigma, plan.enter(block))
            logits = logits[:, -targets.shape[1]:].float()
            log_likelihood = -torch.cdist(z[:, -targets.shape[1]:], table.expand(len(z), -1, -1)).square() \
                / (2 * sigma_value ** 2)
            combined = log_likelihood if previous is None else previous + log_likelihood
            hit = lambda scores: (scores.argmax(dim=-1) == targets).double().mean().item()  # noqa: E731
            rows.append({"sigma": sigma_value, "block": block, "accuracy": hit(logits),
                         "brier": brier_exact(logits.softmax(dim=-1), targets).mean().item(),
                         "z_alone_accuracy": hit(log_likelihood), "previous_and_z_accuracy": hit(combined)})
            previous = logits.log_softmax(dim=-1)
        return rows

    # --- generation -------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, plan, mode, prompt: torch.Tensor, tokens: int, count: int,
                 generator: torch.Generator, steps: int | None = None, decoding: str = "greedy") -> torch.Tensor:
        """[count, len(prompt) + tokens] on the CPU (for decoding): the prompt ([P], or
        [count, P] for one prompt per row), then `tokens` characters, each from the last
        context_length(mode) characters, chosen by `decoding` (see DECODINGS)."""
        if decoding not in DECODINGS:
            raise ConfigError(f"decoding: expected one of {', '.join(DECODINGS)}, got {decoding!r}")
        sequences = prompt.to(device_of(self.model)).expand(count, -1).clone()
        window = self.context_length(mode)
        for _ in range(tokens):
            context = sequences[:, max(0, sequences.shape[1] - window):]
            logits = self.next_logits(context, plan, mode, generator, steps)
            sequences = torch.cat([sequences, choose(logits, decoding, generator)[:, None]], dim=1)
        return sequences.cpu()

    # --- generation quality (MAUVE against held-out text) ----------------------------------
    def decodings(self, mode: str) -> tuple[str, ...]:
        """The decodings judged, the like-for-like one first: block-wise the chain (its greedy
        readout is its sample), end to end a draw at temperature 1, then the paper's top-p
        baseline and greedy."""
        return ("greedy",) if mode == "blocks" else ("ancestral", "top-p", "greedy")

    def quality_windows(self) -> torch.Tensor:
        """[n, P + C] held-out windows (n = model.quality_prompts at most): the prompts are
        their first P characters, the references the whole windows. Non-overlapping, from the
        start of the held-out text (model.eval_split), the same for every run on this corpus."""
        length = self.options.quality_prompt_chars + self.options.quality_chars
        ids = self.held_out
        count = min(self.options.quality_prompts, len(ids) // length)
        windows = ids[:count * length].view(count, length).long()
        # Even windows first, then odd ones: the reference row compares the two halves, which
        # then come from the same stretches of text rather than from two different topics.
        return torch.cat([windows[0::2], windows[1::2]])

    def generation_report(self, plan, mode, steps: int | None = None, decodings: tuple[str, ...] | None = None,
                          sampling_seeds: tuple[int, ...] = SAMPLING_SEEDS) -> dict:
        """MAUVE of the continuations of held-out prompts against the true continuations, on
        the features of an evaluator LM (text_quality.py, trained once on the training split
        and cached), for each decoding and SAMPLING_SEEDS; the headline is `mauve` (mean ±
        `mauve_std` over sampling and clustering seeds) of the like-for-like decoding. `steps`
        (Euler levels, or the recurrent task's K) and `decodings` default to the task's."""
        windows = self.quality_windows()
        if len(windows) < 2:
            return {}
        prompt_chars = self.options.quality_prompt_chars
        evaluator, _ = text_quality.load_or_train(self.corpus, config=evaluator_config(self.options))  # trains on first use
        refs = text_quality.measure_references(evaluator, windows, prompt_chars)  # once for every decoding
        by_decoding = {}
        decodings = decodings or self.decodings(mode)
        for decoding in decodings:
            seeds = sampling_seeds if (mode == "blocks" or decoding != "greedy") else sampling_seeds[:1]
            runs = []
            for seed in seeds:
                generated = self.generate(plan, mode, windows[:, :prompt_chars], self.options.quality_chars,
                                          len(windows), torch.Generator().manual_seed(seed), steps, decoding)
                runs.append(text_quality.continuation_quality(evaluator, generated, refs))
            scores = [value for run in runs for value in run["mauve_by_seed"]]
            mauve_mean, mauve_std = text_quality.mean_std(scores)
            summary = {"mauve_mean": mauve_mean, "mauve_std": mauve_std, "mauve_by_seed": scores,
                       "sampling_seeds": list(seeds)}
            for name in ("evaluator_bpc", "distinct4", "unigram_entropy_bits"):
                summary[name] = sum(run[name] for run in runs) / len(runs)
            by_decoding[decoding] = summary
        headline = by_decoding[decodings[0]]
        return {"mauve": headline["mauve_mean"], "mauve_std": headline["mauve_std"],
                "generation": {"prompts": len(windows), "prompt_chars": prompt_chars,
                               "continuation_chars": self.options.quality_chars, "by_decoding": by_decoding,
                               "reference": refs.row, "measured_with": text_quality.provenance(evaluator)}}

    def default_prompts(self) -> list[str]:
        """The starts of the first held-out chunks (model.eval_split): text the model never saw."""
        ids = self.held_out
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
                                request.steps, request.decoding or "greedy")
        seconds = time.perf_counter() - started
        continuations = [self.corpus.decode(row[len(prompt):]) for row in ids]
        summary = {"prompt": prompt_text, "continuations": continuations, "tokens": tokens, "count": count,
                   "seed": request.seed, "mode": mode, "decoding": request.decoding or "greedy", "layer_evals": counter.calls,
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
        """Continuations of the default prompts by the like-for-like decoding (the chain
        block-wise, a draw at temperature 1 end to end), written to out_dir/samples.txt."""
        if self.options.sample_tokens == 0:
            return {}
        decoding = self.decodings(mode)[0]
        samples, lines, layer_evals, seconds = [], [], 0, 0.0
        for seed, prompt in enumerate(self.default_prompts()):  # independent draws per prompt
            summary = self.sample(plan, mode, SampleRequest(prompt=prompt, seed=seed, decoding=decoding))
            samples.append({"prompt": prompt, "continuation": summary["continuations"][0]})
            lines.append(f"--- prompt ---\n{prompt}\n--- continuation ({mode}, {decoding}) ---\n"
                         f"{summary['continuations'][0]}\n")
            layer_evals += summary["layer_evals"]
            seconds += summary["seconds"]
        if out_dir is not None:
            (Path(out_dir) / "samples.txt").write_text("".join(lines), encoding="utf-8")
        return {"samples": samples, "sample_layer_evals": layer_evals, "sample_seconds": round(seconds, 3)}
