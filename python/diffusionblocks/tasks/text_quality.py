"""Quality metrics for generated text, without downloads (the MAUVE recipe, at character
level and scaled down; evaluator.py is the same idea for digits).

The evaluator is a character LM that this project trains on the corpus's training split
only (text.py), deterministically (fixed seeds, fixed steps), out of the same LlamaLayers
as the compared models but larger and trained longer (`EvaluatorConfig`). It takes
minutes to train, so unlike the digits CNN it is cached across runs: as safetensors plus
a JSON of its config in a cache folder, under a name that hashes the training text, the
vocabulary size and the config, so a different corpus or config never reuses it.

Each sample is a row of token ids [P + C]: a prompt of P characters from the corpus and a
continuation of C characters (generated, or the true text for the references).

- MAUVE (Pillutla et al., 2021) between the continuations and the references, through the
  `mauve` package (pip install mauve-text), in the space of the evaluator's features: the
  mean of its final hidden states over the continuation, read in the context of its
  prompt (GPT-2-large's last-token state there, this evaluator's mean state here, so the
  values compare only with each other). The ceiling at a sample size: MAUVE of one half of
  the references against the other (`generation_quality`).
- evaluator bits per character of the continuations: how likely the evaluator finds them
  (low is fluent; too low can mean repetitive, hence the diversity measures).
- diversity: distinct-4 (unique 4-grams / all 4-grams) and the entropy of the character
  distribution of the continuations, each next to the same figure for the references."""

import contextlib
import hashlib
import importlib.metadata
import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..steps import warmup_cosine
from .data import text
from .layers import LlamaLayer, RMSNorm, rotary_tables

FORMAT = 1              # bump when EvaluatorLM or `train` changes, so old cache files are not reused
CACHE_ENV = "DIFFUSIONBLOCKS_CACHE"
FILE_PREFIX = "text-evaluator"
BATCH = 256             # sequences per forward pass at evaluation
SEEDS = (0, 1, 2)       # MAUVE's clustering seeds
HASH_SLICE = 1 << 22    # training ids hashed at a time (`fingerprint`)


@dataclass(frozen=True)
class EvaluatorConfig:
    """The evaluator's shape and training. The default is stronger than the compared models
    (8 layers of width 64, 500 steps of 32×64 characters): twice the width, 3.3× the
    characters seen, twice the context. On the default corpus it trains in about 5.5
    minutes on one CPU thread and scores 1.52 bits per character on the validation split
    (1.58 in windows of 64 characters, where the best compared model, ar-text end to end,
    scores 1.80: 1.251 nats in README.md)."""
    width: int = 128
    layers: int = 4
    heads: int = 4
    seq_len: int = 128          # characters per training window, and the longest sequence it reads
    batch_size: int = 32
    steps: int = 800
    lr: float = 2e-3            # AdamW, linear warm-up then cosine decay to 0
    warmup_steps: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0      # max global gradient norm
    seed: int = 0               # initial weights and training batches

    def check(self) -> None:
        problems = [
            (self.width >= 1 and self.heads >= 1 and self.width % self.heads == 0
             and (self.width // self.heads) % 2 == 0,
             f"config.width: expected a multiple of config.heads={self.heads} with an even head size "
             f"(rotary positions), got {self.width}"),
            (self.layers >= 1, f"config.layers: expected at least 1, got {self.layers}"),
            (self.seq_len >= 2, f"config.seq_len: expected at least 2, got {self.seq_len}"),
            (self.batch_size >= 1, f"config.batch_size: expected at least 1, got {self.batch_size}"),
            (self.steps >= 1, f"config.steps: expected at least 1, got {self.steps}"),
            (0 <= self.warmup_steps < self.steps,
             f"config.warmup_steps: expected 0 <= warmup_steps < steps={self.steps}, got {self.warmup_steps}"),
            (self.lr > 0, f"config.lr: expected > 0, got {self.lr}"),
        ]
        for ok, message in problems:
            if not ok:
                raise ValueError(message)


# --- the evaluator ------------------------------------------------------------------------------
class EvaluatorLM(nn.Module):
    """A causal character LM: token embedding, LlamaLayers conditioned on a learned constant
    (as ar.py's end-to-end mode: the layers are adaLN-Zero, so they need a cond vector),
    final RMSNorm, linear head. Reads sequences of at most `max_length` characters, the
    length it was trained on (rotary positions beyond it were never seen)."""

    def __init__(self, vocab_size: int, width: int = 128, layers: int = 4, heads: int = 4, max_length: int = 128):
        super().__init__()
        if vocab_size < 1:
            raise ValueError(f"vocab_size: expected at least 1, got {vocab_size}")
        self.vocab_size, self.max_length, self.head_dim = vocab_size, max_length, width // heads
        self.token_embed = nn.Embedding(vocab_size, width)
        self.cond = nn.Parameter(torch.randn(1, width))
        self.layers = nn.ModuleList(LlamaLayer(width, heads) for _ in range(layers))
        self.final_norm = RMSNorm(width)
        self.head = nn.Linear(width, vocab_size)

    @classmethod
    def from_config(cls, vocab_size: int, config: EvaluatorConfig) -> "EvaluatorLM":
        return cls(vocab_size, config.width, config.layers, config.heads, config.seq_len)

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [n, L] of any integer dtype (a corpus stores uint8) -> final normed hidden
        states [n, L, width]; position t has seen characters 0..t."""
        check_ids(self, ids, "ids")
        x = self.token_embed(ids.long())
        rope = rotary_tables(range(ids.shape[1]), self.head_dim, device=x.device)
        cond = self.cond.expand(len(ids), -1)
        for layer in self.layers:
            x = layer(x, cond, rope)
        return self.final_norm(x)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [n, L] -> [n, L, vocab_size]: position t predicts character t + 1."""
        return self.head(self.hidden(ids))


def check_ids(model: EvaluatorLM, ids: torch.Tensor, name: str) -> None:
    """Raises ValueError naming `name` unless ids is [n, L] integer, 1 <= L <= the model's
    max_length, with every id in the vocabulary."""
    if not isinstance(ids, torch.Tensor):
        raise ValueError(f"{name}: expected an integer tensor [n, L], got {type(ids).__name__}")
    if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"{name}: expected an integer tensor [n, L], got {ids.dtype} {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise ValueError(f"{name}: expected at least one sequence of at least one character, got {tuple(ids.shape)}")
    if ids.shape[1] > model.max_length:
        raise ValueError(f"{name}: length {ids.shape[1]} exceeds the evaluator's {model.max_length} characters "
                         f"(EvaluatorConfig.seq_len)")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= model.vocab_size:
        raise ValueError(f"{name}: expected token ids in [0, {model.vocab_size}), got [{low}, {high}]")


def train(train_ids: torch.Tensor, vocab_size: int, config: EvaluatorConfig = EvaluatorConfig()) -> EvaluatorLM:
    """A pure function of (training ids, vocab size, config): AdamW with linear warm-up and
    cosine decay, next-character cross-entropy on random windows of the training ids (on
    the CPU, with torch's current thread count)."""
    config.check()
    if train_ids.dim() != 1 or len(train_ids) < config.seq_len:
        raise ValueError(f"train_ids: expected a 1-D tensor of at least config.seq_len={config.seq_len} ids, "
                         f"got shape {tuple(train_ids.shape)}")
    generator = torch.Generator().manual_seed(config.seed)
    with torch.random.fork_rng():  # the initial weights, without touching the caller's RNG
        torch.manual_seed(config.seed)
        model = EvaluatorLM.from_config(vocab_size, config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, config.steps, config.warmup_steps))
    model.train()
    with torch.enable_grad():  # callable from inside an evaluation's no_grad
        for _ in range(config.steps):
            batch = text.train_batch(train_ids, config.batch_size, config.seq_len, generator)
            logits = model.logits(batch)[:, :-1]
            loss = F.cross_entropy(logits.reshape(-1, vocab_size), batch[:, 1:].reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            schedule.step()
    return model.eval()


# --- the cache ----------------------------------------------------------------------------------
def cache_folder(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir`, else $DIFFUSIONBLOCKS_CACHE, else ~/.cache/diffusionblocks."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path.home() / ".cache" / "diffusionblocks"


def fingerprint(train_ids: torch.Tensor, vocab_size: int, config: EvaluatorConfig) -> str:
    """sha256 (hex) of everything training depends on: the training ids (as little-endian
    int64, whatever dtype stores them, so a cache file keeps its name), the vocabulary size,
    the config (its seed included) and FORMAT. The ids go in slices of HASH_SLICE: text8's
    90M take about 1.5 s and never a 720 MB copy."""
    digest = hashlib.sha256()
    digest.update(f"{FILE_PREFIX} format {FORMAT} vocab {vocab_size} ".encode())
    digest.update(json.dumps(asdict(config), sort_keys=True).encode())
    for part in train_ids.reshape(-1).split(HASH_SLICE):
        digest.update(part.to(torch.int64).numpy().astype("<i8", copy=False).tobytes())
    return digest.hexdigest()


def cache_file(train_ids: torch.Tensor, vocab_size: int, config: EvaluatorConfig,
               cache_dir: str | Path | None = None) -> Path:
    """The safetensors file of this evaluator; its JSON lies beside it (same name, .json)."""
    return cache_path(fingerprint(train_ids, vocab_size, config), cache_dir)


def cache_path(digest: str, cache_dir: str | Path | None = None) -> Path:
    """The safetensors file named by a `fingerprint`."""
    return cache_folder(cache_dir) / f"{FILE_PREFIX}-{digest[:16]}.safetensors"


def _write_atomically(path: Path, write) -> None:
    """write(tmp_path), then rename it over `path`: readers see the old file or the whole new one."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def load_or_train(corpus: text.Corpus, cache_dir: str | Path | None = None,
                  config: EvaluatorConfig | None = None) -> tuple[EvaluatorLM, bool]:
    """The cached evaluator of (corpus.train, corpus.vocab_size, config), or a freshly trained
    one written to the cache. Returns (model in eval mode on the CPU, reused)."""
    config = config or EvaluatorConfig()
    config.check()
    digest = fingerprint(corpus.train, corpus.vocab_size, config)  # once: seconds on text8
    path = cache_path(digest, cache_dir)
    if path.exists():
        model = EvaluatorLM.from_config(corpus.vocab_size, config)
        model.load_state_dict(load_file(str(path)))
        return model.eval(), True
    model = train(corpus.train, corpus.vocab_size, config)
    path.parent.mkdir(parents=True, exist_ok=True)
    about = {"format": FORMAT, "config": asdict(config), "vocab_size": corpus.vocab_size,
             "train_characters": len(corpus.train), "sha256": digest}
    # The JSON first: once the weights exist, their description does too.
    _write_atomically(path.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(about, indent=2) + "\n"))
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    _write_atomically(path, lambda tmp: save_file(weights, str(tmp)))
    return model, False


# The packages a MAUVE figure depends on besides the evaluator's weights (PCA, k-means).
MAUVE_STACK = ("mauve-text", "faiss-cpu", "faiss-gpu", "scikit-learn", "numpy", "torch")


def provenance(model: EvaluatorLM) -> dict:
    """What a MAUVE figure was measured with: sha256 (first 16 hex) of the evaluator's weights
    and the versions of MAUVE_STACK that are installed. The evaluator trains with fixed seeds,
    but another torch build or thread count may round differently, and another scikit-learn
    or faiss may cluster differently, so figures compare only where these agree."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    versions = {}
    for package in MAUVE_STACK:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {"evaluator_weights": digest.hexdigest()[:16], "packages": versions}


# --- what the evaluator measures ------------------------------------------------------------------
def _check_start(ids: torch.Tensor, start: int, lowest: int) -> None:
    if not lowest <= start < ids.shape[1]:
        raise ValueError(f"start: expected {lowest} <= start < L={ids.shape[1]}, got {start}")


@torch.no_grad()
def features(model: EvaluatorLM, ids: torch.Tensor, start: int, batch: int = BATCH) -> torch.Tensor:
    """[n, width] float32 on the CPU: per sequence of ids [n, L] (on any device), the mean of
    the evaluator's final hidden states over positions start..L−1, i.e. the continuation
    read in the context of the prompt before it."""
    check_ids(model, ids, "ids")
    _check_start(ids, start, 0)
    device = next(model.parameters()).device
    chunks = [model.hidden(ids[i:i + batch].to(device))[:, start:].mean(dim=1).float().cpu()
              for i in range(0, len(ids), batch)]
    return torch.cat(chunks)


@torch.no_grad()
def bits_per_character(model: EvaluatorLM, ids: torch.Tensor, start: int, batch: int = BATCH) -> float:
    """The evaluator's mean −log2 p(x_t | x_<t) over characters t = start..L−1 of every
    sequence of ids [n, L] (start >= 1: the first character has no context)."""
    check_ids(model, ids, "ids")
    _check_start(ids, start, 1)
    device = next(model.parameters()).device
    total = 0.0
    for i in range(0, len(ids), batch):
        chunk = ids[i:i + batch].to(device)
        logits = model.logits(chunk)[:, start - 1:-1].float()  # position t − 1 predicts character t
        total += F.cross_entropy(logits.reshape(-1, model.vocab_size), chunk[:, start:].reshape(-1),
                                 reduction="sum").item()
    return total / (ids.shape[0] * (ids.shape[1] - start)) / math.log(2)


def reference(model: EvaluatorLM, corpus: text.Corpus, max_windows: int = 1024) -> dict[str, float]:
    """The evaluator's own figure: bits per character on the corpus's validation split (non-
    overlapping windows of max_length characters, every character after the first of each)."""
    windows = text.validation_windows(corpus.validation, model.max_length, max_windows)
    return {"evaluator_validation_bpc": bits_per_character(model, windows, 1)}


# --- diversity --------------------------------------------------------------------------------------
def _rows(sequences, name: str) -> list[torch.Tensor]:
    """A 2-D tensor (one sequence a row) or a list of 1-D tensors -> list of 1-D CPU tensors."""
    if isinstance(sequences, torch.Tensor):
        if sequences.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D tensor or a list of 1-D tensors, got shape "
                             f"{tuple(sequences.shape)}")
        return list(sequences.cpu())
    rows = [torch.as_tensor(s).cpu() for s in sequences]
    if any(r.dim() != 1 for r in rows):
        raise ValueError(f"{name}: expected a list of 1-D tensors, got shapes {[tuple(r.shape) for r in rows]}")
    return rows


def distinct_n(sequences, n: int = 4) -> float:
    """Unique n-grams / all n-grams, counted over the whole set (an n-gram never spans two
    sequences). sequences: [m, L] ids or a list of 1-D id tensors."""
    if n < 1:
        raise ValueError(f"n: expected at least 1, got {n}")
    grams = [row.unfold(0, n, 1) for row in _rows(sequences, "sequences") if len(row) >= n]
    if not grams:
        raise ValueError(f"sequences: expected at least one sequence of n={n} or more characters")
    grams = torch.cat(grams)                     # [all n-grams, n]
    return len(torch.unique(grams, dim=0)) / len(grams)


def unigram_entropy(ids) -> float:
    """Entropy in bits of the empirical character distribution of ids (a tensor of any shape,
    or a list of 1-D id tensors)."""
    if isinstance(ids, torch.Tensor):
        flat = ids.reshape(-1).cpu()
    else:
        flat = torch.cat(_rows(ids, "ids")) if len(ids) else torch.zeros(0, dtype=torch.int64)
    if flat.numel() == 0:
        raise ValueError("ids: expected at least one character")
    if int(flat.min()) < 0:
        raise ValueError(f"ids: expected non-negative token ids, got {int(flat.min())}")
    p = torch.bincount(flat.long()).double()
    p = p[p > 0] / flat.numel()
    return float(-(p * p.log2()).sum())


# --- MAUVE -------------------------------------------------------------------------------------------
def mauve(p_features: torch.Tensor, q_features: torch.Tensor, seed: int, num_buckets="auto") -> float:
    """MAUVE between feature sets p [n, d] and q [m, d] (the `mauve` package: l2-normalised,
    PCA to 90% of the variance, k-means into num_buckets clusters, 'auto' = max(2, min(n, m)/10),
    seeded by `seed`). 1 = indistinguishable at this quantisation, near 0 = disjoint."""
    try:
        import mauve as mauve_package  # lazily: it imports faiss and scikit-learn
    except ImportError as error:
        raise ImportError("mauve: the MAUVE metric needs the mauve package (pip install mauve-text)") from error
    p, q = (torch.as_tensor(f).detach().cpu().float().numpy() for f in (p_features, q_features))
    for name, f in (("p_features", p), ("q_features", q)):
        if f.ndim != 2 or len(f) == 0:
            raise ValueError(f"{name}: expected a non-empty 2-D array [n, d], got shape {f.shape}")
    if p.shape[1] != q.shape[1]:
        raise ValueError(f"q_features: expected the feature size of p_features ({p.shape[1]}), got {q.shape[1]}")
    with _quiet_stderr():
        out = mauve_package.compute_mauve(p_features=np.ascontiguousarray(p), q_features=np.ascontiguousarray(q),
                                          seed=seed, num_buckets=num_buckets, verbose=False, device_id=-1)
    return float(out.mauve)


@contextlib.contextmanager
def _quiet_stderr():
    """faiss's k-means warns on standard error (from C++) whenever it has fewer than 39
    points per cluster, which MAUVE's default of n/10 clusters always gives; the warning
    says nothing about the result, so it is silenced at the file descriptor."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and population standard deviation (0 for one value, never NaN)."""
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std())


def _check_seeds(seeds) -> list[int]:
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds: expected at least one clustering seed")
    return seeds


def _text_figures(model: EvaluatorLM, ids: torch.Tensor, P: int) -> dict[str, float]:
    """The evaluator's bits per character and the diversity of characters P.. of ids."""
    return {"evaluator_bpc": bits_per_character(model, ids, P), "distinct4": distinct_n(ids[:, P:], 4),
            "unigram_entropy_bits": unigram_entropy(ids[:, P:])}


@dataclass
class References:
    """The true continuations, measured once for every set of generations judged against
    them: their features (MAUVE's space) and their own row (`row`: MAUVE of one half of
    them against the other, a ceiling at half the sample size, and _text_figures)."""
    ids: torch.Tensor
    prompt_length: int
    features: torch.Tensor
    row: dict


def measure_references(model: EvaluatorLM, ids: torch.Tensor, prompt_length: int, seeds=SEEDS) -> References:
    """References of ids [n, P + C] (prompts and their true continuations), n >= 2. The
    reference row splits the rows into halves in order: shuffle references whose order
    means something (e.g. consecutive windows of one document)."""
    check_ids(model, ids, "references")
    if not 1 <= prompt_length < ids.shape[1]:
        raise ValueError(f"prompt_length: expected 1 <= P < L={ids.shape[1]}, got {prompt_length}")
    if len(ids) < 2:
        raise ValueError(f"references: expected at least 2 rows (the reference MAUVE splits them), got {len(ids)}")
    seeds = _check_seeds(seeds)
    real = features(model, ids, prompt_length)
    half = len(ids) // 2
    by_seed = [mauve(real[:half], real[half:2 * half], s) for s in seeds]
    mauve_mean, mauve_std = mean_std(by_seed)
    row = {"mauve_mean": mauve_mean, "mauve_std": mauve_std, **_text_figures(model, ids, prompt_length)}
    return References(ids, prompt_length, real, row)


def continuation_quality(model: EvaluatorLM, prompts_and_continuations: torch.Tensor, refs: References,
                         seeds=SEEDS) -> dict:
    """MAUVE (per clustering seed, mean and population std) of generations [n, P + C] against
    `refs`, beside their _text_figures; plain floats, JSON-ready."""
    generated = prompts_and_continuations
    check_ids(model, generated, "prompts_and_continuations")
    if refs.ids.shape != generated.shape:
        raise ValueError(f"references: expected the shape of prompts_and_continuations {tuple(generated.shape)}, "
                         f"got {tuple(refs.ids.shape)}")
    generated_features = features(model, generated, refs.prompt_length)
    by_seed = [mauve(generated_features, refs.features, s) for s in _check_seeds(seeds)]
    mauve_mean, mauve_std = mean_std(by_seed)
    return {"mauve_mean": mauve_mean, "mauve_std": mauve_std, "mauve_by_seed": by_seed,
            **_text_figures(model, generated, refs.prompt_length)}


def generation_quality(model: EvaluatorLM, prompts_and_continuations: torch.Tensor, references: torch.Tensor,
                       prompt_length: int, seeds=SEEDS) -> dict:
    """Every metric of the module docstring for one set of generations, as plain floats
    (and one list): continuation_quality, and the references' row with the keys prefixed
    (`reference_bpc`, `reference_distinct4`, `reference_unigram_entropy_bits`,
    `mauve_reference_mean`/`_std`). To judge several sets against the same references,
    measure them once with `measure_references` and call continuation_quality."""
    check_ids(model, prompts_and_continuations, "prompts_and_continuations")
    check_ids(model, references, "references")
    if references.shape != prompts_and_continuations.shape:
        raise ValueError(f"references: expected the shape of prompts_and_continuations "
                         f"{tuple(prompts_and_continuations.shape)}, got {tuple(references.shape)}")
    refs = measure_references(model, references, prompt_length, seeds)
    row = refs.row
    return {**continuation_quality(model, prompts_and_continuations, refs, seeds),
            "mauve_reference_mean": row["mauve_mean"], "mauve_reference_std": row["mauve_std"],
            "reference_bpc": row["evaluator_bpc"], "reference_distinct4": row["distinct4"],
            "reference_unigram_entropy_bits": row["unigram_entropy_bits"]}
