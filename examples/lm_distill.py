"""Distil a small causal transformer LM into a smaller one with the fused, standardized KD loss.

What a language-model user copies: the student's loss is
:func:`zkd_jax.kd_loss_from_hidden` on the two models' last hidden states and output layers
(``standardize=True``: logit standardization; ``where=``: the padding mask; ``labels=`` and
``ce_weight=``: the next-token cross-entropy from the same pass). The ``[batch, seq, vocab]``
logits are never materialized, which is what matters at a vocabulary of 128k; here the vocabulary
is the generated text's characters, so it runs on a CPU.

1. Text: sentences generated from a small grammar (no download), one per sequence, of varying
   length, padded to ``--seq_len``; targets are the next characters, masked at padding.
2. The teacher (``--teacher_width``, ``--teacher_depth``) is trained on the text with
   cross-entropy for ``--teacher_steps``.
3. The student (smaller) is trained for ``--student_steps`` on
   ``tau^2 KL(Z(t) || Z(s)) + ce_weight * CE``; every ``--log_every`` steps the student's KD loss
   (and both models' cross-entropy) on a held-out batch is printed.

    python examples/lm_distill.py                       # under two minutes on a 2-core CPU
    python examples/lm_distill.py --teacher_steps=30 --student_steps=20 --seq_len=24

``--compare`` instead trains one teacher and then, for several seeds, students with plain KD, KD+LS
(logit standardization) and KD+LS from an offline top-k teacher cache (``k = 16, 64``, written by
:func:`zkd_jax.io.teacher_cache.write_teacher_cache`, read back by ``TeacherCache`` and
distilled with :func:`zkd_jax.topk_kd.topk_kd_loss_from_hidden`: exact standardization, the tail
as one bucket); it prints each method's held-out cross-entropy and top-1 agreement with the
teacher, mean +- std over the seeds. The models' vocabulary is ``--vocab`` (128) entries, of which
the text uses the first few dozen, as a real tokenizer's rare tokens:

    python examples/lm_distill.py --compare             # docs/topk_cache.md: the table and its time
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from zkd_jax import cross_entropy, kd_loss_from_hidden
from zkd_jax.io.teacher_cache import TeacherCache, write_teacher_cache
from zkd_jax.topk_kd import topk_kd_loss_from_hidden

PAD, BOS = 0, 1
SUBJECTS = ("the cat", "a dog", "my friend", "the old man", "she", "he", "the bird", "we")
VERBS = ("sees", "likes", "eats", "finds", "wants", "draws", "keeps")
OBJECTS = ("the fish", "a red ball", "some bread", "the moon", "a small box", "two apples")
ENDS = (".", " today.", " again.", " at night.", " in the garden.")
ALPHABET = sorted(set("".join(SUBJECTS + VERBS + OBJECTS + ENDS) + "0123456789 ,."))
VOCAB = 2 + len(ALPHABET)


def sentence(rng: np.random.Generator) -> str:
    """A grammar sentence, or a run of counting numbers (``3, 4, 5, 6.``)."""
    if rng.random() < 0.25:
        start = int(rng.integers(0, 90))
        return ", ".join(str(start + i) for i in range(int(rng.integers(2, 6)))) + "."
    pick = lambda words: words[int(rng.integers(len(words)))]  # noqa: E731
    return f"{pick(SUBJECTS)} {pick(VERBS)} {pick(OBJECTS)}{pick(ENDS)}"


def batch(rng: np.random.Generator, size: int, seq_len: int) -> dict[str, np.ndarray]:
    """``inputs``, ``targets`` int32 ``[size, seq_len]`` and the boolean ``mask`` of real targets."""
    tokens = np.full((size, seq_len + 1), PAD, np.int32)
    for row in range(size):
        ids = [BOS] + [2 + ALPHABET.index(c) for c in sentence(rng)]
        tokens[row, : min(len(ids), seq_len + 1)] = ids[: seq_len + 1]
    targets = tokens[:, 1:]
    return {"inputs": tokens[:, :-1], "targets": targets, "mask": targets != PAD}


class Block(nn.Module):
    """Pre-norm causal self-attention and MLP."""

    width: int
    heads: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        causal = nn.make_causal_mask(jnp.ones(x.shape[:2], bool))
        x = x + nn.MultiHeadDotProductAttention(self.heads, qkv_features=self.width)(nn.LayerNorm()(x), mask=causal)
        y = nn.Dense(self.width)(nn.gelu(nn.Dense(4 * self.width)(nn.LayerNorm()(x))))
        return x + y


class TinyLM(nn.Module):
    """``hidden(tokens) -> [B, T, width]``; ``__call__`` adds the output layer ``head`` (logits)."""

    width: int
    depth: int
    heads: int
    max_len: int
    vocab: int = VOCAB

    def setup(self):
        self.embed = nn.Embed(self.vocab, self.width)
        self.position = self.param("position", nn.initializers.normal(0.02), (self.max_len, self.width))
        self.blocks = [Block(self.width, self.heads) for _ in range(self.depth)]
        self.norm = nn.LayerNorm()
        self.head = nn.Dense(self.vocab)

    def hidden(self, tokens: jax.Array) -> jax.Array:
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return self.head(self.hidden(tokens))


def hidden_and_head(model: TinyLM, params: Any, tokens: jax.Array):
    """The last hidden states ``[B, T, H]``, the head's kernel ``[H, V]`` and bias ``[V]``."""
    head = params["params"]["head"]
    return model.apply(params, tokens, method=TinyLM.hidden), head["kernel"], head["bias"]


def run(*, teacher_steps: int = 200, student_steps: int = 200, batch_size: int = 32,
        seq_len: int = 40, teacher_width: int = 64, teacher_depth: int = 2, student_width: int = 32,
        student_depth: int = 1, temperature: float = 2.0, ce_weight: float = 0.1,
        learning_rate: float = 3e-3, log_every: int = 25, seed: int = 0,
        optimize: bool = True, verbose: bool = True) -> dict[str, list[float]]:
    """Train the teacher, distil the student; return the logged curves (held-out batch).

    Returns ``teacher_ce`` (every ``log_every`` steps of the teacher's training: that step's batch,
    before its update), ``student_kd`` and ``student_ce`` (during distillation, on the held-out
    batch; the first entry before any step, the last after the last). ``optimize=False`` compiles
    at XLA's backend optimization level 0 (faster compiling, slower programs: for tests).
    """
    say = print if verbose else (lambda *a, **k: None)
    level = None if optimize else {"xla_backend_optimization_level": 0}
    jit = functools.partial(jax.jit, compiler_options=level)
    rng = np.random.default_rng(seed)
    held_out = {k: jnp.asarray(v) for k, v in batch(np.random.default_rng(seed + 1), 64, seq_len).items()}
    teacher = TinyLM(teacher_width, teacher_depth, heads=4, max_len=seq_len)
    student = TinyLM(student_width, student_depth, heads=2, max_len=seq_len)
    keys = jax.random.split(jax.random.PRNGKey(seed))
    tokens = held_out["inputs"][:1]
    t_params, s_params = jit(lambda k: (teacher.init(k[0], tokens), student.init(k[1], tokens)))(keys)
    tx = optax.adam(learning_rate)
    log: dict[str, list[float]] = {"teacher_ce": [], "student_kd": [], "student_ce": []}

    def ce_of(model, params, b):
        return cross_entropy(model.apply(params, b["inputs"]), b["targets"], where=b["mask"])

    @jit
    def teacher_step(params, opt, b):
        loss, grads = jax.value_and_grad(lambda p: ce_of(teacher, p, b))(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    def distill_loss(s_p, t_p, b, ce):
        hs, ws, bs = hidden_and_head(student, s_p, b["inputs"])
        ht, wt, bt = hidden_and_head(teacher, jax.lax.stop_gradient(t_p), b["inputs"])
        return kd_loss_from_hidden(hs, ws, ht, wt, temperature, standardize=True, where=b["mask"],
                                   student_bias=bs, teacher_bias=bt, labels=b["targets"], ce_weight=ce)

    @jit
    def student_step(s_p, opt, t_p, b):
        loss, grads = jax.value_and_grad(distill_loss)(s_p, t_p, b, ce_weight)
        updates, opt = tx.update(grads, opt, s_p)
        return optax.apply_updates(s_p, updates), opt, loss

    @jit
    def evaluate(s_p, t_p):
        kd = distill_loss(s_p, t_p, held_out, 0.0)  # the KD term alone
        return kd, ce_of(student, s_p, held_out), ce_of(teacher, t_p, held_out)

    start = time.perf_counter()
    opt = tx.init(t_params)
    for step in range(teacher_steps):
        t_params, opt, loss = teacher_step(t_params, opt, batch(rng, batch_size, seq_len))
        if step % log_every == 0:
            log["teacher_ce"].append(float(loss))
            say(f"teacher step {step:4d}  cross-entropy {loss:.3f} (this batch, before the step)")

    opt = tx.init(s_params)
    for step in range(student_steps + 1):
        if step % log_every == 0 or step == student_steps:
            kd, s_ce, t_ce = (float(x) for x in evaluate(s_params, t_params))
            log["student_kd"].append(kd)
            log["student_ce"].append(s_ce)
            say(f"student step {step:4d}  KD loss {kd:.4f}  cross-entropy {s_ce:.3f} "
                f"(teacher {t_ce:.3f})")
        if step < student_steps:
            s_params, opt, _ = student_step(s_params, opt, t_params, batch(rng, batch_size, seq_len))
    say(f"done in {time.perf_counter() - start:.1f} s")
    return log


COMPARE_METHODS = ("KD", "KD+LS", "KD+LS top-16 cache", "KD+LS top-64 cache")


def compare(*, teacher_steps: int = 200, student_steps: int = 200, batch_size: int = 32,
            seq_len: int = 40, seeds: int = 3, vocab: int = 128, temperature: float = 2.0,
            ce_weight: float = 0.1, learning_rate: float = 3e-3, teacher_width: int = 64,
            teacher_depth: int = 2, student_width: int = 32, student_depth: int = 1,
            methods: tuple[str, ...] = COMPARE_METHODS, cache_dir: str | None = None,
            optimize: bool = True, verbose: bool = True) -> dict[str, list[tuple[float, float]]]:
    """One teacher; per method and seed a student; ``{method: [(held-out CE, agreement), ...]}``.

    The students of every method see the same ``student_steps`` batches (in a per-seed order) and
    start from the same per-seed initialization; the caches hold the teacher on those batches.
    Agreement: the fraction of held-out (non-padding) tokens where the student's most likely next
    character is the teacher's.
    """
    say = print if verbose else (lambda *a, **k: None)
    jit = functools.partial(jax.jit, compiler_options=None if optimize else {"xla_backend_optimization_level": 0})
    start = time.perf_counter()
    teacher = TinyLM(teacher_width, teacher_depth, heads=4, max_len=seq_len, vocab=vocab)
    student = TinyLM(student_width, student_depth, heads=2, max_len=seq_len, vocab=vocab)
    held_out = {k: jnp.asarray(v) for k, v in batch(np.random.default_rng(10_001), 64, seq_len).items()}
    tx = optax.adam(learning_rate)

    @jit
    def teacher_step(params, opt, b):
        loss, grads = jax.value_and_grad(lambda p: cross_entropy(teacher.apply(p, b["inputs"]), b["targets"],
                                                                 where=b["mask"]))(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    t_params = jit(teacher.init)(jax.random.PRNGKey(10_000), held_out["inputs"][:1])
    opt, rng = tx.init(t_params), np.random.default_rng(10_000)
    for _ in range(teacher_steps):
        t_params, opt, loss = teacher_step(t_params, opt, batch(rng, batch_size, seq_len))
    say(f"teacher: {teacher_steps} steps, last batch cross-entropy {float(loss):.3f} "
        f"({time.perf_counter() - start:.0f} s)")

    data_rng = np.random.default_rng(20_000)
    data = [batch(data_rng, batch_size, seq_len) for _ in range(student_steps)]
    teacher_logits = lambda b: teacher.apply(t_params, b["inputs"])  # noqa: E731  (the writer jits it)
    caches, tmp = {}, tempfile.TemporaryDirectory(prefix="lm_distill_cache_") if cache_dir is None else None
    for method in methods:
        if "cache" in method:
            k = int(method.split("top-")[1].split()[0])
            path = f"{cache_dir or tmp.name}/top{k}"
            write_teacher_cache(path, teacher_logits, data, top_k=k, temperature=temperature,
                                standardize=True, batches_per_shard=64, process_index=0)
            caches[method] = TeacherCache(path, process_index=0)
            caches[method].check(temperature=temperature, standardize=True)
    say(f"caches written ({time.perf_counter() - start:.0f} s)")

    def loss_fn(method, s_p, b, cached):
        hs, ws, bs = hidden_and_head(student, s_p, b["inputs"])
        common = dict(where=b["mask"], student_bias=bs, labels=b["targets"], ce_weight=ce_weight)
        if cached is not None:
            return topk_kd_loss_from_hidden(hs, ws, cached["indices"], cached["logits"], temperature,
                                            stats=cached["stats"], standardize=True, tail="bucket", **common)
        ht, wt, bt = hidden_and_head(teacher, t_params, b["inputs"])
        return kd_loss_from_hidden(hs, ws, ht, wt, temperature, standardize=method == "KD+LS",
                                   teacher_bias=bt, **common)

    @jit
    def evaluate(s_p):
        s_logits, t_logits = student.apply(s_p, held_out["inputs"]), teacher.apply(t_params, held_out["inputs"])
        agree = jnp.argmax(s_logits, -1) == jnp.argmax(t_logits, -1)
        mask = held_out["mask"]
        return (cross_entropy(s_logits, held_out["targets"], where=mask),
                jnp.sum(agree & mask) / jnp.sum(mask))

    results: dict[str, list[tuple[float, float]]] = {}
    for method in methods:
        @jit
        def step(s_p, opt, b, cached, method=method):
            grads = jax.grad(functools.partial(loss_fn, method))(s_p, b, cached)
            updates, opt = tx.update(grads, opt, s_p)
            return optax.apply_updates(s_p, updates), opt

        for seed in range(seeds):
            s_p = jit(student.init)(jax.random.PRNGKey(seed), held_out["inputs"][:1])
            opt = tx.init(s_p)
            for n in np.random.default_rng(seed).permutation(student_steps):
                cached = caches[method][int(n)] if method in caches else None
                s_p, opt = step(s_p, opt, data[n], cached)
            ce, agree = (float(x) for x in evaluate(s_p))
            results.setdefault(method, []).append((ce, agree))
        say(f"{method}: {seeds} students ({time.perf_counter() - start:.0f} s)")
    say(comparison_table(results))
    say(f"done in {time.perf_counter() - start:.0f} s")
    return results


def comparison_table(results: dict[str, list[tuple[float, float]]]) -> str:
    """A Markdown table: method, held-out cross-entropy and agreement, mean +- std over seeds."""
    lines = ["| method | held-out cross-entropy | agreement with the teacher |", "|---|---|---|"]
    for method, runs in results.items():
        ce, agree = np.asarray(runs).T
        lines.append(f"| {method} | {ce.mean():.4f} ± {ce.std():.4f} | "
                     f"{100 * agree.mean():.2f} % ± {100 * agree.std():.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("teacher_steps", 200), ("student_steps", 200), ("batch_size", 32),
                          ("seq_len", 40), ("log_every", 25), ("seed", 0)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--ce_weight", type=float, default=0.1)
    parser.add_argument("--compare", action="store_true", help="KD, KD+LS, KD+LS from a top-k cache")
    parser.add_argument("--seeds", type=int, default=3, help="--compare: students per method")
    parser.add_argument("--vocab", type=int, default=128, help="--compare: the models' vocabulary")
    args = vars(parser.parse_args(argv))
    if args.pop("compare"):
        for name in ("log_every", "seed"):
            args.pop(name)
        compare(**args)
    else:
        for name in ("seeds", "vocab"):
            args.pop(name)
        run(**args)


if __name__ == "__main__":
    main()
