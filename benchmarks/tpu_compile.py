"""The TPU table: zkd_jax's train step compiled for TPU slices on a machine without a TPU.

For each case (chip, config, images per chip, dtype) it compiles, with libtpu's TPU compiler,
the train step ``zkd-train`` runs (``zkd_jax.aot.compile_programs``: the trainer's own setup with
abstract arguments, in a child process) and, for KD / KD+LS, the plain Flax/optax yardstick of
``yardstick.py`` compiled the same way (same models, same abstract arguments and shardings, its own
child process), and records per chip: HBM (total and share of the chip), GFLOP and GB per step,
the roofline bound (``zkd_jax.aot.figures``) and which bound it is. K-student rows compile every
form of the K-student step (``zkd_jax.step.multi.FORMS``).

    python benchmarks/tpu_compile.py --out=benchmarks/results/tpu_compile.jsonl \
        --table=benchmarks/results/tpu_compile.md [--cases=all|quick] [--only=PATTERN ...] \
        [--into=docs/tpu_compile.md:bench]

Results are appended to ``--out`` (one JSON object per program, resumable: cases already there are
skipped), and the Markdown table is rewritten from all of them after every case. Each record says
which jax and libtpu compiled it; the table's first line says so too. ``--into=FILE:MARKER``
writes the same table between ``<!-- MARKER -->`` and ``<!-- /MARKER -->`` in FILE (a docs page,
the README). ``--only`` picks cases by id, in the order given. Nothing runs on a device.
"""

from __future__ import annotations

import datetime
import fnmatch
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from absl import app, flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_OUT = flags.DEFINE_string("out", "benchmarks/results/tpu_compile.jsonl", "JSON lines to append.")
_TABLE = flags.DEFINE_string("table", "benchmarks/results/tpu_compile.md", "Markdown table.")
_CASES = flags.DEFINE_enum(
    "cases", "all", ["all", "quick", "coverage"],
    "quick: v5e and v5p bf16 CIFAR; coverage: every method, a ViT student, ImageNet, K students "
    "and a two-host slice with small models, every program (train and eval steps).")
_ONLY = flags.DEFINE_multi_string(
    "only", None, "Run only the cases of --cases whose id (chip|file:arg|batch|dtype|K, as in the "
    "records' 'case') matches one of these shell patterns, in the order of the patterns "
    "(e.g. --only='v5e:2x2|cifar100:*|64|f32|K1').")
_INTO = flags.DEFINE_multi_string(
    "into", None, "FILE:MARKER: also write the table between '<!-- MARKER -->' and "
    "'<!-- /MARKER -->' in FILE (e.g. docs/tpu_compile.md:bench).")
_YARD = flags.DEFINE_string("yardstick_case", None, "Internal: compile one yardstick case.")

CIFAR = "kd_ls,resnet32x4,resnet8x4"
IMAGENET = "kd_ls,ResNet34,ResNet18"
K = 4


def cases(which: str) -> list[dict]:
    """Most telling first (a slow machine may stop early; the table keeps what finished)."""
    chips = {"v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2", "v4": "v4:2x2x1"}

    def cifar(chip, batch, bf16=True, **kw):
        return dict(chip=chips[chip], file="cifar100", arg=CIFAR, batch=batch, bf16=bf16, **kw)

    out = [cifar("v5e", 64), cifar("v5p", 64), cifar("v5e", 512), cifar("v5p", 512)]
    if which == "quick":
        return out
    out += [dict(chip=chips["v5p"], file="imagenet", arg=IMAGENET, batch=256, bf16=True),
            cifar("v6e", 64), cifar("v5e", 64, students=K)]
    out += [cifar(c, b, bf16=False) for c in ("v5e", "v5p") for b in (64, 512)]
    out += [cifar("v6e", 512), cifar("v4", 64)]
    out += [cifar("v6e", b, bf16=False) for b in (64, 512)]
    out += [dict(chip=chips[c], file="imagenet", arg=IMAGENET, batch=256, bf16=True)
            for c in ("v5e", "v6e")]
    return out


def coverage() -> list[dict]:
    """Every method +/- LS, a ViT student, ImageNet, K students, a multi-host slice: small
    models and batches (the point is that every program compiles), every program."""
    small = "resnet8,resnet8"
    def method(m):
        return dict(chip="v5e:2x2", file="cifar100", arg=f"{m},{small}", batch=8, bf16=True,
                    full=True)

    out = [method(m) for m in ("kd", "kd_ls", "dkd", "mlkd", "ctkd")]
    out += [dict(chip="v5e:2x2", file="cifar100", arg=f"kd_ls,{small}", batch=8, bf16=True,
                 full=True, students=2),
            dict(chip="v5p:2x2x2", file="cifar100", arg=f"kd_ls,{small}", batch=8, bf16=True,
                 full=True),
            dict(chip="v5e:2x2", file="cifar100_vit", arg="kd_ls,resnet56,deit_ti", batch=2,
                 bf16=True, full=True),
            dict(chip="v5p:2x2x1", file="imagenet", arg=IMAGENET, batch=8, bf16=True,
                 full=True)]
    return out + [method(m) for m in ("dkd_ls", "mlkd_ls", "ctkd_ls")]


def select(chosen: list[dict], patterns: list[str] | None) -> list[dict]:
    """The cases whose id matches one of ``patterns`` (shell patterns), in the patterns' order."""
    if not patterns:
        return chosen
    out = []
    for pattern in patterns:
        out += [c for c in chosen if fnmatch.fnmatchcase(case_id(c), pattern) and c not in out]
    return out


def case_id(c: dict) -> str:
    return (f"{c['chip']}|{c['file']}:{c['arg']}|{c['batch']}|{'bf16' if c['bf16'] else 'f32'}"
            f"|K{c.get('students', 1)}")


def load_config(c: dict):
    import importlib.util  # noqa: PLC0415

    spec = importlib.util.spec_from_file_location("cfg", ROOT / "configs" / f"{c['file']}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(c["arg"])
    config.mixed_precision = c["bf16"]
    if c.get("students", 1) > 1:
        config.students = tuple({"seed": s} for s in range(c["students"]))
    return config


def yardstick_record(c: dict) -> dict:
    """Child mode: the yardstick of ``c`` compiled for its topology (one record)."""
    import jax  # noqa: PLC0415

    import yardstick  # noqa: PLC0415
    from zkd_jax.aot import figures, parse_topology  # noqa: PLC0415
    from zkd_jax.aot.worker import count_chips, libtpu_version, topology_devices  # noqa: PLC0415
    from zkd_jax.parallel import abstract_batch, create_mesh  # noqa: PLC0415
    from zkd_jax.step.state import replicated_shapes  # noqa: PLC0415
    from zkd_jax.trainer import setup, students  # noqa: PLC0415

    config = load_config(c)
    topo = parse_topology(c["chip"])
    devices = topology_devices(topo)
    chips = count_chips(devices)
    mesh = create_mesh(devices)
    config.batch_size = c["batch"] * chips
    method = students.build_methods(students.run_students(config)[0])[0]
    _, image_shape, _, student, teacher, teacher_vars = setup.build_models(
        config, method, mesh, abstract=True)
    opt = config.optimizer
    init, step = yardstick.make_yardstick(
        student, teacher, temperature=float(method.temperature),
        ce_weight=float(method.ce_weight), kd_weight=float(method.kd_weight),
        standardize_logits=bool(method.standardize), lr=float(opt.lr),
        momentum=float(opt.momentum), weight_decay=float(opt.weight_decay))
    variables = jax.eval_shape(
        lambda r: student.init(r, jax.numpy.zeros((1, *image_shape)), train=False),
        jax.random.PRNGKey(0))
    state = replicated_shapes(jax.eval_shape(init, variables["params"],
                                             variables.get("batch_stats", {})), mesh)
    batch = abstract_batch({"image": ((config.batch_size, *image_shape), jax.numpy.float32),
                            "label": ((config.batch_size,), jax.numpy.int32)}, mesh)
    start = time.perf_counter()
    compiled = step.lower(state, teacher_vars, batch["image"], batch["label"]).compile()
    dpc = len(devices) // chips
    rec = {"program": "yardstick", "status": "ok",
           "compile_seconds": time.perf_counter() - start, "libtpu_version": libtpu_version(),
           "jax_version": jax.__version__, "chips": chips, "per_chip_batch": c["batch"]}
    rec.update(figures.memory_figures(compiled, dpc))
    rec.update(figures.cost_figures(compiled, dpc, 1))
    rec["hbm_fraction"] = rec["total_bytes"] / topo.chip.hbm_bytes
    rec.update(figures.roofline(topo.chip, flops=rec["flops_per_step"],
                                bytes_=rec["bytes_per_step"], per_chip_images=c["batch"],
                                chips=chips, steps_per_epoch=1))
    return rec


def run_yardstick(c: dict) -> dict:
    env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(filter(None, (str(ROOT), str(ROOT / "benchmarks"),
                                                        os.environ.get("PYTHONPATH")))))
    proc = subprocess.run([sys.executable, __file__, f"--yardstick_case={json.dumps(c)}"],
                          capture_output=True, text=True, env=env, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        why = (f"the compiler crashed (signal {-proc.returncode})" if proc.returncode < 0 else
               proc.stderr.strip().splitlines()[-1:] or ["failed"])
        return {"program": "yardstick", "status": "crashed" if proc.returncode < 0 else "failed",
                "error": why if isinstance(why, str) else why[0]}
    return json.loads(lines[-1][len("RESULT "):])


def run_case(c: dict) -> list[dict]:
    from zkd_jax import aot  # noqa: PLC0415

    config = load_config(c)
    students = c.get("students", 1)
    if c.get("full"):
        try:
            return aot.compile_programs(config.to_dict(), c["chip"],
                                        per_chip_batch=c["batch"]).records
        except aot.DoesNotFitError as err:
            return [{"program": "train_step", "status": "does_not_fit", "error": str(err)}]
    try:
        report = aot.compile_programs(config.to_dict(), c["chip"], per_chip_batch=c["batch"],
                                      all_forms=students > 1,
                                      only=None if students > 1 else ["train_step"])
        records = report.records
        if students > 1:
            records = [r for r in records if r["program"].startswith("train_step")]
    except aot.DoesNotFitError as err:
        records = [{"program": "train_step", "status": "does_not_fit", "error": str(err)}]
    if students == 1 and c["arg"].split(",")[0] in ("kd", "kd_ls"):
        records.append(run_yardstick(c))
    return records


def table(rows: list[dict]) -> str:
    versions = sorted({(r.get("jax_version"), r.get("libtpu_version")) for r in rows
                       if r.get("status") == "ok"}, key=str)
    said = "; ".join(f"jax {j}, libtpu {t}" for j, t in versions) or "nothing compiled yet"
    head = (f"Compiled by `benchmarks/tpu_compile.py` with XLA's TPU compiler ({said}) on a "
            "machine without a TPU; nothing ran on a device. Per chip, per step.\n\n"
            "| chip | config | img/chip | dtype | program | HBM GiB (% chip) | GFLOP/step | "
            "GB/step | bound | roofline img/s/chip | vs yardstick bytes |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    yard = {r["case"]: r for r in rows if r.get("program") == "yardstick" and
            r.get("status") == "ok"}
    for r in rows:
        case = r["case"]
        parts = case.split("|")
        if r.get("status") != "ok":
            lines.append(f"| {parts[0]} | {parts[1]} {parts[4]} | {parts[2]} | {parts[3]} | "
                         f"{r['program']} | {r.get('status')}: {r.get('error', '')[:120]} "
                         "| | | | | |")
            continue
        y = yard.get(case)
        ratio = (f"{r['bytes_per_step'] / y['bytes_per_step']:.2f}x"
                 if y and r["program"] != "yardstick" else "")
        per_chip = float(r.get("per_chip_batch") or parts[2])
        lines.append(
            f"| {parts[0]} | {parts[1]} {parts[4]} | {per_chip:g} | {parts[3]} | {r['program']} | "
            f"{r['total_bytes'] / 2**30:.3f} ({100 * r['hbm_fraction']:.1f} %) | "
            f"{r['flops_per_step'] / 1e9:.1f} | {r['bytes_per_step'] / 1e9:.2f} | {r['bound']} | "
            f"{r['images_per_sec_per_chip']:,.0f} | {ratio} |")
    return head + "\n".join(lines) + "\n"


def write_into(spec: str, text: str) -> None:
    """Replaces the text between ``<!-- MARKER -->`` and ``<!-- /MARKER -->`` in FILE."""
    name, marker = spec.rsplit(":", 1)
    path = pathlib.Path(name)
    doc = path.read_text()
    start, end = f"<!-- {marker} -->\n", f"<!-- /{marker} -->"
    if start not in doc or end not in doc:
        raise app.UsageError(f"--into={spec}: {path} has no '{start.strip()}' ... '{end}' block")
    before, rest = doc.split(start, 1)
    write_atomic(path, before + start + text + end + rest.split(end, 1)[1])


def write_atomic(path: pathlib.Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False) as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(f.name, path)


def main(argv) -> None:
    del argv
    if _YARD.value:
        print("RESULT " + json.dumps(yardstick_record(json.loads(_YARD.value))), flush=True)
        return
    out = pathlib.Path(_OUT.value)
    rows = [json.loads(ln) for ln in out.read_text().splitlines()] if out.exists() else []
    done = {r["case"] for r in rows}
    write_tables(rows)  # the --into blocks are checked before anything is compiled
    chosen = coverage() if _CASES.value == "coverage" else cases(_CASES.value)
    for c in select(chosen, _ONLY.value):
        cid = case_id(c)
        if cid in done:
            continue
        date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        for r in run_case(c):
            r.update(case=cid, date=date)
            rows.append(r)
        write_atomic(out, "".join(json.dumps(r) + "\n" for r in rows))
        write_tables(rows)
        print(f"{cid}: done", flush=True)


def write_tables(rows: list[dict]) -> None:
    text = table(rows)
    write_atomic(pathlib.Path(_TABLE.value), text)
    for spec in _INTO.value or ():
        write_into(spec, text)


if __name__ == "__main__":
    app.run(main)
