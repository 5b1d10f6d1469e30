"""What the two character-level LM tasks (ar.py, recurrent.py) share: the base class
`CharacterLM` (the corpus and validation windows of text.py, the target y and the
sampler's estimate of it, the validation metrics, greedy generation and `sample`), the
checks of the config fields both have, and a counter of layer calls.

Metrics (both modes, the same windows and the same predictions): character j of each
validation window predicted from characters < j, j = 1..T−1: `test_ce` (nats per
character) and `test_accuracy` on the held-out split of text.py; block-wise, from the
readout of the last Euler level. Read them knowing what the chain is: a sampler. It ends
on one character (the last readout puts probability ≈ 1 on it), so block-wise
test_accuracy is the chance that a sample is right and test_ce that of a near one-hot
guess. The model's predictive distribution p(x_i | x_<i) is the readout of the first
level (σ_max, where z carries nothing): `test_ce_by_level[0]` in the report, which lists
every level's readout.

The score that compares the two modes like with like is in the report too (proper_scores):
`test_brier`, the Brier score of next-character prediction, exact end to end and
estimated without bias block-wise from two independent chains, and
`test_sample_accuracy`, the chance that a sample is right in either mode."""

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import sampler, schedule
from ..errors import ConfigError, one_of
from ..task import SampleRequest, device_of
from . import text

EVAL_SEED = 0        # the sampler's starting noise at evaluation: fixed, so evaluation is repeatable
EVAL_BATCH = 64      # validation windows per forward pass
SAMPLE_PROMPTS = 3   # prompts for the samples at the end of a run: the starts of validation chunks
PROMPT_LENGTH = 40


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
        one_of("model.inference_schedule", options.inference_schedule, schedule.INFERENCE_SCHEDULES),
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


def recording(denoise, outputs: list):
    """`denoise` (a chain's network evaluation), appending every level's logits to `outputs`."""
    def denoise_and_record(*args):
        D, logits = denoise(*args)
        outputs.append(logits)
        return D, logits
    return denoise_and_record


class CharacterLM:
    """Corpus, validation metrics, greedy generation and `sample` for a character LM task.
    A subclass defines `window_logits(windows, plan, mode, generator, normalized=None,
    record=None)` -> [W, T−1, V] (position j predicts character j+1 of each window;
    block-wise, `normalized` chooses the table E of the chain's estimate and `record`, a
    list, receives every level's logits), `next_logits(context, plan, mode, generator,
    steps)` -> [n, V] and `context_length(mode)`."""

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

    def run_chain(self, plan, inputs: torch.Tensor, target_shape: tuple[int, ...], steps: int, generator,
                  normalized: bool | None = None, record: list | None = None) -> torch.Tensor:
        """The logits of the last level of the Euler chain over `steps` levels, the subclass's
        `denoise` evaluating each. Between levels it hands on the expected target embedding
        softmax(logits)·E (docs/method.md §6), over the normalised E unless `normalized`
        (default: model.normalized_inference_embedding) says the raw one; `record`, a list,
        receives every level's logits."""
        if normalized is None:
            normalized = self.options.normalized_inference_embedding
        to_estimate = lambda D, logits: sampler.expected_embedding(logits, self.model.target_embed, normalized)  # noqa: E731
        denoise = self.denoise if record is None else recording(self.denoise, record)
        return sampler.denoise_chain(denoise, to_estimate, plan, inputs, target_shape, steps, generator,
                                     self.options.inference_schedule)

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
    def proper_scores(self, plan, mode) -> dict[str, float]:
        """Teacher-forced next-character scores that compare both modes like with like:
        test_brier (end to end exact, from softmax(logits); block-wise estimated without bias
        from two independent chains, each of which draws a sample) and test_sample_accuracy
        (the chance that a sample is right: mean p_y end to end, the chains' hit rate
        block-wise). test_accuracy beside them is the end-to-end argmax's, the chain's sample's."""
        first, second = (torch.Generator().manual_seed(EVAL_SEED + k) for k in range(2))
        brier, hits, count = 0.0, 0.0, 0
        for windows in self.validation_batches():
            targets = windows[:, 1:]
            if mode == "e2e":
                p = self.window_logits(windows, plan, mode, first).float().softmax(dim=-1)
                brier += brier_exact(p, targets).sum().item()
                hits += p.gather(-1, targets.unsqueeze(-1)).sum().item()
            else:
                s1 = self.window_logits(windows, plan, mode, first).argmax(dim=-1)
                s2 = self.window_logits(windows, plan, mode, second).argmax(dim=-1)
                brier += brier_from_two_samples(s1, s2, targets).sum().item()
                hits += ((s1 == targets).sum().item() + (s2 == targets).sum().item()) / 2
            count += targets.numel()
        return {"test_brier": brier / count, "test_sample_accuracy": hits / count}

    @torch.no_grad()
    def metrics_by_level(self, plan, mode, **kwargs) -> tuple[list[float], list[float]]:
        """Block-wise: (cross-entropy, accuracy) of the readout at every level of the Euler
        chain, noisiest first; the last level's are window_metrics'."""
        generator = torch.Generator().manual_seed(EVAL_SEED)
        ce, correct = [], []
        for windows in self.validation_batches():
            outputs = []
            self.window_logits(windows, plan, mode, generator, record=outputs, **kwargs)
            targets = windows[:, 1:]
            levels = [out[:, out.shape[1] - targets.shape[1]:] for out in outputs]  # align to targets
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
