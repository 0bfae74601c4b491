"""The KD loss at language-model scale: temporary memory (compiled, not run) and CPU time.

Four forms of the same value and gradient, ``tau^2 KL(softmax(Z(t)/tau) || softmax(Z(s)/tau))``
with logit standardization, averaged over tokens, gradient in the student's inputs:

- ``naive``: the one-pass float32 formula on materialized ``[N, V]`` logits, plain autodiff;
- ``kd_loss``: :func:`zkd_jax.kd_loss` on the same logits (chunked over rows, automatic chunk);
- ``matmul+naive``: ``h @ W`` for both models, then ``naive`` (gradient in ``h_s`` and ``W_s``);
- ``fused``: :func:`zkd_jax.kd_loss_from_hidden` (gradient in ``h_s`` and ``W_s``).

Memory: for each ``--tokens`` N, ``jax.jit(jax.value_and_grad(...)).lower(...).compile()`` on
abstract bf16 inputs (``jax.ShapeDtypeStruct``: nothing is allocated or run) and XLA's
``memory_analysis().temp_size_in_bytes``, also as a multiple of one bf16 ``[N, V]`` array.
The ``kd_loss`` and ``fused`` forms are also compiled for float32 inputs.
Time: the same functions run at ``--time_shape`` (median of ``--repeats`` rounds after one
compiling call; in each round every form runs once, in turn).

    python benchmarks/llm_loss.py                      # N in (4096, 8192), V=128256, H=4096
    python benchmarks/llm_loss.py --tokens=512 --vocab=4096 --hidden=64 --time_shape=256,2048,64

TPU (``--topology``, the ``tpu`` extra; compiled on this machine for a slice that is not there,
nothing runs): ``kd_loss`` and ``fused`` (value and gradient, bf16, standardized, N the last of
``--tokens``) on one chip, with the rows sharded over all chips of the topology (``row_axis``) and
with the vocabulary sharded over them (``vocab_axis``): XLA:TPU's temporaries per chip, as a
multiple of one chip's share of the bf16 logits, and the all-gathers in the optimized HLO.

    ALLOW_MULTIPLE_LIBTPU_LOAD=1 JAX_PLATFORMS=cpu python benchmarks/llm_loss.py \
        --tokens 8192 --topology v5e:2x2 v5p:2x2x1 v6e:2x2

Prints a Markdown table per part and one JSON object (``RESULT {...}``) with every number.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from zkd_jax import kd_loss, kd_loss_from_hidden, standardize

TAU = 2.0


def naive_kd(student: jax.Array, teacher: jax.Array) -> jax.Array:
    """The one-pass formula in float32 (standardized), as any code base writes it."""
    s = standardize(student.astype(jnp.float32)) / TAU
    t = standardize(jax.lax.stop_gradient(teacher).astype(jnp.float32)) / TAU
    log_ps, log_pt = jax.nn.log_softmax(s, axis=-1), jax.nn.log_softmax(t, axis=-1)
    return TAU**2 * jnp.mean(jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1))


def chunked_kd(student: jax.Array, teacher: jax.Array) -> jax.Array:
    return kd_loss(student, teacher, TAU, standardize=True)


def matmul_naive(hs, ws, ht, wt) -> jax.Array:
    return naive_kd(hs @ ws, ht @ wt)


def fused(hs, ws, ht, wt) -> jax.Array:
    return kd_loss_from_hidden(hs, ws, ht, wt, TAU, standardize=True)


FORMS = {  # name: (function, takes hidden states, argnums of the gradient)
    "naive": (naive_kd, False, 0),
    "kd_loss": (chunked_kd, False, 0),
    "matmul+naive": (matmul_naive, True, (0, 1)),
    "fused": (fused, True, (0, 1)),
}


def _inputs(n: int, v: int, h: int, hidden: bool, make):
    """``make(shape, scale)`` for the form's arguments: logits of scale 3, or hidden states of
    scale 1 and heads of scale ``1 / sqrt(h)`` (logits of scale about 1)."""
    if hidden:
        return make((n, h), 1.0), make((h, v), h**-0.5), make((n, h), 1.0), make((h, v), h**-0.5)
    return make((n, v), 3.0), make((n, v), 3.0)


def temp_bytes(n: int, v: int, h: int, dtype=jnp.bfloat16, forms=tuple(FORMS)) -> dict[str, int]:
    """XLA's temporary bytes of each form's compiled value-and-gradient (abstract inputs)."""
    out = {}
    for name in forms:
        fn, hidden, argnums = FORMS[name]
        args = _inputs(n, v, h, hidden, lambda shape, _: jax.ShapeDtypeStruct(shape, dtype))
        compiled = jax.jit(jax.value_and_grad(fn, argnums=argnums)).lower(*args).compile()
        out[name] = int(compiled.memory_analysis().temp_size_in_bytes)
    return out


def cpu_seconds(n: int, v: int, h: int, repeats: int, dtype=jnp.bfloat16) -> dict[str, float]:
    """Median seconds of one value-and-gradient call of each form (after a compiling call).

    The forms take turns in every round, so that a change of the machine's load during the run
    (it is shared) falls on all of them alike.
    """
    rng = np.random.default_rng(0)
    calls, times = {}, {name: [] for name in FORMS}
    for name, (fn, hidden, argnums) in FORMS.items():
        args = _inputs(n, v, h, hidden, lambda shape, scale: jnp.asarray(
            scale * rng.standard_normal(shape, np.float32), dtype))
        step = jax.jit(jax.value_and_grad(fn, argnums=argnums))
        jax.block_until_ready(step(*args))
        calls[name] = (step, args)
    for _ in range(repeats):
        for name, (step, args) in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(step(*args))
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _tpu_programs(topology: str, n: int, v: int, h: int):
    """``(name, chips, compiled)`` of each form's value and gradient compiled for ``topology``
    (compile only): one chip; rows sharded over all chips; the vocabulary sharded over all chips."""
    from jax.experimental import topologies  # noqa: PLC0415
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: PLC0415

    devices = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices
    layouts = [("1 chip", devices[:1], None, None), (f"rows / {len(devices)}", devices, "x", None),
               (f"vocab / {len(devices)}", devices, None, "x")]
    for layout, devs, row, voc in layouts:
        mesh = Mesh(np.array(devs), ("x",))
        sds = lambda shape, *spec: jax.ShapeDtypeStruct(  # noqa: E731
            shape, jnp.bfloat16, sharding=NamedSharding(mesh, P(*spec)))
        ax = {"row_axis": row, "vocab_axis": voc} if row or voc else {}
        kd = jax.value_and_grad(lambda s, t: kd_loss(s, t, TAU, standardize=True, **ax))
        hid = jax.value_and_grad(lambda a, w, b, u: kd_loss_from_hidden(
            a, w, b, u, TAU, standardize=True, **ax), argnums=(0, 1))
        with jax.set_mesh(mesh):
            logits = sds((n, v), row, voc)
            yield layout, len(devs), "kd_loss", jax.jit(kd).lower(logits, logits).compile()
            hidden, head = sds((n, h), row), sds((h, v), None, voc)
            yield layout, len(devs), "fused", jax.jit(hid).lower(hidden, head, hidden, head).compile()


def tpu_table(topologies_: list[str], n: int, v: int, h: int) -> list[dict]:
    """Temporaries of the TPU programs (:func:`_tpu_programs`) as multiples of one chip's bf16
    logits (``[N, V]`` on one chip, its shard on several), and what their HLO gathers."""
    rows = []
    for topology in topologies_:
        for layout, chips, form, compiled in _tpu_programs(topology, n, v, h):
            hlo = compiled.as_text()
            temp = int(compiled.memory_analysis().temp_size_in_bytes)
            unit = n * v * 2 // chips
            rows.append({"topology": topology, "layout": layout, "form": form, "temp_bytes": temp,
                         "per_chip_logits_bytes": unit, "ratio": temp / unit,
                         "all_gathers": hlo.count("all-gather("), "u16_converts": hlo.count("u16[")})
            print(f"| {topology} | {layout} | {form} | {temp / 2**20:.1f} MiB | {temp / unit:.3f}x "
                  f"| {rows[-1]['all_gathers']} |", flush=True)
    return rows


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()}-core {cpu}, {jax.devices()[0].platform}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--time_shape", default="1024,32000,256", help="N,V,H of the timed runs")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--topology", nargs="+", default=None,
                        help="compile for these TPU topologies (e.g. v5e:2x2 v5p:2x2x1 v6e:2x2; needs "
                             "the tpu extra, nothing runs) instead of the CPU tables")
    args = parser.parse_args(argv)
    if args.topology:
        return tpu_main(args)
    n_t, v_t, h_t = (int(x) for x in args.time_shape.split(","))
    result = {"machine": machine(), "jax": jax.__version__,
              "date": datetime.date.today().isoformat(), "vocab": args.vocab, "hidden": args.hidden,
              "temp_bytes": {}, "temp_bytes_float32": {}, "time_shape": [n_t, v_t, h_t], "seconds": {}}

    print("| N | one bf16 [N, V] | " + " | ".join(FORMS) + " |")
    print("| ---: | ---: |" + " ---: |" * len(FORMS))
    for n in args.tokens:
        temps = temp_bytes(n, args.vocab, args.hidden)
        unit = n * args.vocab * 2
        result["temp_bytes"][str(n)] = temps
        cells = " | ".join(f"{b / 2**30:.2f} GiB ({b / unit:.2f}x)" for b in temps.values())
        print(f"| {n} | {unit / 2**30:.2f} GiB | {cells} |", flush=True)
    print("\nThe same with float32 inputs (multiples of one bf16 [N, V] array):")
    print("| N | kd_loss | fused |\n| ---: | ---: | ---: |")
    for n in args.tokens:
        temps = temp_bytes(n, args.vocab, args.hidden, jnp.float32, ("kd_loss", "fused"))
        result["temp_bytes_float32"][str(n)] = temps
        unit = n * args.vocab * 2
        print(f"| {n} | " + " | ".join(f"{b / 2**30:.2f} GiB ({b / unit:.2f}x)" for b in temps.values()) + " |")

    seconds = cpu_seconds(n_t, v_t, h_t, args.repeats)
    result["seconds"] = seconds
    print(f"\nCPU seconds per value-and-gradient, bf16, N={n_t}, V={v_t}, H={h_t}:")
    print("| " + " | ".join(FORMS) + " | kd_loss / naive | fused / matmul+naive |")
    print("|" + " ---: |" * (len(FORMS) + 2))
    ratios = (seconds["kd_loss"] / seconds["naive"], seconds["fused"] / seconds["matmul+naive"])
    print("| " + " | ".join(f"{s:.3f}" for s in seconds.values())
          + f" | {ratios[0]:.2f} | {ratios[1]:.2f} |")
    result["load_average"] = os.getloadavg()
    print("RESULT " + json.dumps(result))
    return result


def tpu_main(args) -> dict:
    import importlib.metadata  # noqa: PLC0415

    n = args.tokens[-1]
    result = {"jax": jax.__version__, "libtpu": importlib.metadata.version("libtpu"),
              "date": datetime.date.today().isoformat(), "tokens": n, "vocab": args.vocab,
              "hidden": args.hidden}
    print(f"N={n}, V={args.vocab}, H={args.hidden}, bf16, value and gradient, standardized; "
          f"jax {result['jax']}, libtpu {result['libtpu']}\n")
    print("| topology | layout | form | temporaries per chip | x one chip's logits | all-gathers |")
    print("| --- | --- | --- | ---: | ---: | ---: |")
    result["tpu"] = tpu_table(args.topology, n, args.vocab, args.hidden)
    print("RESULT " + json.dumps(result))
    return result


if __name__ == "__main__":
    main()
